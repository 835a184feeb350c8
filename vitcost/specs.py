"""What vitcost is asked about: the architecture (:class:`ViTSpec`) and the workload (:class:`Workload`).

Both are validated pydantic models; :func:`make_spec` and :func:`make_workload` turn pydantic's
errors into one-line :class:`~vitcost.errors.ConfigError` messages.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitcost.errors import ConfigError, shorten


class Mode(str, Enum):
    train = "train"
    infer = "infer"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    amp_bf16 = "amp-bf16"
    amp_fp16 = "amp-fp16"


class AttentionKernel(str, Enum):
    eager = "eager"  # q * scale, then q @ k^T (timm today)
    eager_postscale = "eager-postscale"  # (q @ k^T) * scale: the N x N scores scaled (timm < 0.9, HF ViT)
    sdpa = "sdpa"


class Impl(str, Enum):
    """Whose code runs the model: timm's (vitcost's reference mirrors it) or Hugging Face
    transformers' (separate q, k, v projections, its eager attention, its layer order)."""

    timm = "timm"
    hf = "hf"


class Mlp(str, Enum):
    """The MLP: fc1, GELU, fc2; or SwiGLU, ``down(silu(gate(x)) * up(x))`` (DINOv2-giant)."""

    gelu = "gelu"
    swiglu = "swiglu"


class Optimizer(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd_momentum = "sgd-momentum"
    sgd = "sgd"


class Strategy(str, Enum):
    """How a step is spread over GPUs (each rank runs its share of the batch)."""

    ddp = "ddp"  # DistributedDataParallel: every rank holds everything, plus its gradient buckets
    zero1 = "zero1"  # DDP with ZeroRedundancyOptimizer: each rank keeps the optimizer states of its share
    zero2 = "zero2"  # FSDP2 ``fully_shard`` without resharding after forward (ZeRO-2, FSDP1's SHARD_GRAD_OP)
    fsdp = "fsdp"  # FSDP2 ``fully_shard`` per block, then the root; blocks reshard after forward (ZeRO-3)
    hsdp = "hsdp"  # fsdp within a replica group (a node), the replicas' gradients all-reduced


# Strategies that shard parameters, gradients and optimizer states with FSDP2's ``fully_shard``.
FSDP_STRATEGIES = frozenset((Strategy.zero2, Strategy.fsdp, Strategy.hsdp))


class Checkpointing(str, Enum):
    none = "none"
    full = "full"


class PosEmbed(str, Enum):
    learned = "learned"  # a learned table added to the tokens
    sincos = "sincos"  # a fixed 2-D sin-cos table added to the patches (a buffer); "sincos-2d" is the same
    sincos_2d = "sincos-2d"  # (read as sincos)
    sincos_1d = "sincos-1d"  # a fixed 1-D sin-cos table over the patch index, added to the patches
    rope_2d = "rope-2d"  # axial 2-D rotary embedding, applied to q and k in every block
    relative_bias = "relative-bias"  # a learned bias per head and relative offset, added to the attention scores
    none = "none"


# position encodings that add a table to the tokens, and those of them that are fixed buffers
POS_TABLES = frozenset((PosEmbed.learned, PosEmbed.sincos, PosEmbed.sincos_1d))
POS_BUFFERS = frozenset((PosEmbed.sincos, PosEmbed.sincos_1d))


class Pooling(str, Enum):
    token = "token"
    avg = "avg"
    token_avg = "token+avg"  # the class token and the patch tokens' mean, concatenated (DINOv2's linear head)


class Device(str, Enum):
    """Where the step runs: decides the autocast policy and the allocator's rounding."""

    cuda = "cuda"
    cpu = "cpu"


class Allocator(str, Enum):
    """The CUDA caching allocator's mode: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` or not."""

    native = "native"
    expandable = "expandable"


_FROZEN = ConfigDict(frozen=True, extra="forbid")

# Bounds that no real configuration comes near, so that an absurd number is an error, not a
# traceback, a hang or gigabytes of memory (the replay is O(1) in depth, the allocator's trace
# and the parameter list are not).
MAX_DIM = 1 << 16
MAX_DEPTH = 1024
MAX_MLP_HIDDEN = 1 << 20
MAX_PIXELS = 1 << 16  # per side
MAX_CHANNELS = 1024
MAX_TOKENS_EXTRA = 4096  # register tokens
MAX_CLASSES = 10**7
MAX_BATCH = 1 << 24


class MAE(BaseModel):
    """Masked-autoencoder pretraining (Hugging Face's ``ViTMAEForPreTraining``): the encoder
    runs on the visible patches, a decoder of its own width, depth and heads on all of them,
    and the loss is the squared error on the masked patches' pixels."""

    model_config = _FROZEN

    mask_ratio: float = Field(gt=0, lt=1, allow_inf_nan=False)
    decoder_dim: int = Field(gt=0, le=MAX_DIM)
    decoder_depth: int = Field(gt=0, le=MAX_DEPTH)
    decoder_heads: int = Field(gt=0, le=MAX_DIM)
    decoder_mlp_hidden: int = Field(gt=0, le=MAX_MLP_HIDDEN)
    norm_pix_loss: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "MAE":
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder heads {self.decoder_heads} do not divide the decoder width {self.decoder_dim}")
        return self


MAX_STAGES = 8


class Swin(BaseModel):
    """A hierarchical Swin Transformer (Hugging Face's ``SwinForImageClassification``): stages
    of blocks on a grid that halves between stages while the width doubles (patch merging),
    each block's attention within M x M windows, every second block's windows shifted by M / 2
    (a roll of the grid and an attention mask), a relative position bias table per block."""

    model_config = _FROZEN

    depths: tuple[int, ...] = Field(min_length=1, max_length=MAX_STAGES)  # blocks per stage
    heads: tuple[int, ...] = Field(min_length=1, max_length=MAX_STAGES)  # attention heads per stage
    window: int = Field(gt=0, le=MAX_PIXELS)  # M: windows of M x M tokens
    mlp_ratio: float = Field(default=4.0, gt=0, le=64, allow_inf_nan=False)

    @field_validator("depths", "heads")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 or v > MAX_DEPTH for v in value):
            raise ValueError(f"each stage needs 1 to {MAX_DEPTH} blocks and heads, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Swin":
        if len(self.depths) != len(self.heads):
            raise ValueError(f"Swin: {len(self.depths)} stage depths but {len(self.heads)} head counts")
        return self


class ViTSpec(BaseModel):
    """A timm-style Vision Transformer and the image it is fed."""

    model_config = _FROZEN

    name: str = "custom"
    dim: int = Field(gt=0, le=MAX_DIM)
    depth: int = Field(gt=0, le=MAX_DEPTH)
    heads: int = Field(gt=0, le=MAX_DIM)
    mlp_hidden: int = Field(gt=0, le=MAX_MLP_HIDDEN)
    patch: int = Field(gt=0, le=MAX_PIXELS)
    image_h: int = Field(gt=0, le=MAX_PIXELS)
    image_w: int = Field(gt=0, le=MAX_PIXELS)
    channels: int = Field(default=3, gt=0, le=MAX_CHANNELS)
    class_token: bool = True
    dist_token: bool = False
    registers: int = Field(default=0, ge=0, le=MAX_TOKENS_EXTRA)
    pos_embed: PosEmbed = PosEmbed.learned
    pos_embed_prefix: bool = True
    pooling: Pooling = Pooling.token
    classes: int = Field(default=1000, ge=0, le=MAX_CLASSES)
    qkv_bias: bool = True
    layer_scale: bool = False  # LayerScale on both residual branches (timm init_values; DINOv2, DeiT III, CaiT)
    impl: Impl = Impl.timm
    mlp: Mlp = Mlp.gelu
    mask_token: bool = False  # a mask-token parameter the forward does not use (HF DINOv2's use_mask_token)
    mae: Optional[MAE] = None  # masked-autoencoder pretraining instead of classification
    drop_path: bool = False  # stochastic depth in training (timm: rates rising from 0 at block 0)
    # DeiT's hard distillation in training: each head its own cross-entropy (the distillation
    # head against a teacher's labels), averaged; the teacher's own forward is not counted
    distillation: bool = False
    # a model built for another image: the side of its square position grid, interpolated to
    # the image's every forward (timm's dynamic_img_size, Hugging Face's interpolate_pos_encoding,
    # DINOv2's); 0: built for this image
    pos_grid: int = Field(default=0, ge=0, le=MAX_PIXELS)
    frames: int = Field(default=1, gt=0, le=4096)  # a video's frames (VideoMAE)
    tubelet: int = Field(default=1, gt=0, le=4096)  # frames per patch (VideoMAE's tubelet_size)
    # an overlapping patch embedding: the conv's stride, below the patch (0: the patch, no
    # overlap), with the padding (patch - stride) / 2 on every side
    patch_stride: int = Field(default=0, ge=0, le=MAX_PIXELS)
    # a hierarchical Swin Transformer: ``dim``, ``heads`` and ``mlp_hidden`` are then its first
    # stage's, ``depth`` the blocks of every stage (``vitcost.swin``)
    swin: Optional[Swin] = None

    @field_validator("pos_embed", mode="before")
    @classmethod
    def _sincos_alias(cls, value: object) -> object:
        return PosEmbed.sincos if value in ("sincos-2d", PosEmbed.sincos_2d) else value

    @model_validator(mode="after")
    def _consistent(self) -> "ViTSpec":
        if self.dim % self.heads:
            raise ValueError(f"--heads {self.heads} does not divide --dim {self.dim}")
        if self.image_h < self.patch or self.image_w < self.patch:
            raise ValueError(
                f"image {self.image_h}x{self.image_w} is smaller than patch {self.patch}"
            )
        if self.pooling in (Pooling.token, Pooling.token_avg) and self.classes and not self.class_token:
            raise ValueError("a class-token head needs the class token: use --pool avg or --class-token")
        if self.pos_embed == PosEmbed.sincos and self.dim % 4:
            raise ValueError(f"sin-cos position embedding needs --dim divisible by 4, got {self.dim}")
        if self.pos_embed == PosEmbed.sincos_1d and self.dim % 2:
            raise ValueError(f"1-D sin-cos position embedding needs an even --dim, got {self.dim}")
        if self.pos_embed == PosEmbed.rope_2d and self.head_dim % 4:
            raise ValueError(f"--pos-embed rope-2d rotates pairs of q and k along two axes: the head width "
                             f"{self.head_dim} (--dim / --heads) must be divisible by 4")
        if self.pos_embed == PosEmbed.relative_bias and (self.dist_token or self.registers):
            raise ValueError("--pos-embed relative-bias is BEiT's: patches and at most a class token (no distillation "
                             "token or registers)")
        if self.pos_embed in (PosEmbed.sincos_1d, PosEmbed.rope_2d, PosEmbed.relative_bias) and (
                self.impl != Impl.timm or self.mae or self.video):
            raise ValueError(f"--pos-embed {self.pos_embed.value} is modelled on the reference (timm-style) ViT: "
                             "not with --impl hf, MAE or video")
        if self.video:
            if self.impl != Impl.hf:
                raise ValueError("a video model (--frames, --tubelet) is modelled as Hugging Face's VideoMAE: use --impl hf")
            if (self.class_token or self.dist_token or self.registers or self.layer_scale or self.mae
                    or self.pos_embed != PosEmbed.sincos or self.pooling != Pooling.avg or self.mlp != Mlp.gelu):
                raise ValueError("VideoMAE: no class token, a fixed sin-cos table, the tokens' mean (--pool avg), "
                                 "a GELU MLP")
            if self.frames < self.tubelet:
                raise ValueError(f"--frames {self.frames} is fewer than one tubelet of {self.tubelet}")
        if self.pos_grid and not (self.pos_embed == PosEmbed.learned and not self.video and not self.mae and (
                self.impl == Impl.timm or not self.dist_token)):
            raise ValueError("a position grid of another size (pos_grid), interpolated every forward, is timm's "
                             "(dynamic_img_size), Hugging Face's ViT's (interpolate_pos_encoding=True) or DINOv2's: "
                             "a learned table, no MAE or video")
        if self.distillation and not (self.dist_token and self.impl == Impl.timm and self.classes):
            raise ValueError("--distillation trains timm's distilled DeiT: it needs --dist-token, a head, --impl timm")
        if self.drop_path and (self.impl != Impl.timm or self.mae):
            raise ValueError("--drop-path is modelled as timm's stochastic depth (--impl timm)")
        if self.mlp == Mlp.swiglu and not (self.impl == Impl.hf and self.layer_scale):
            raise ValueError("--mlp swiglu is modelled as Hugging Face's DINOv2 SwiGLU (--impl hf, LayerScale); "
                             "timm's SwiGLU variants are not modelled yet")
        if self.mae is not None:
            if self.impl != Impl.hf:
                raise ValueError("MAE pretraining is modelled as Hugging Face's ViTMAEForPreTraining: use --impl hf")
            if (not self.class_token or self.dist_token or self.registers or self.layer_scale or self.classes
                    or self.pos_embed != PosEmbed.learned or self.mask_token):
                raise ValueError("MAE pretraining: a class token, a (frozen) learned position embedding, "
                                 "no head, registers, distillation token or LayerScale")
            if not self.divisible or self.grid_h != self.grid_w:
                raise ValueError(f"MAE pretraining cuts a square image into whole patches (its sin-cos tables are "
                                 f"square): {self.image_h}x{self.image_w} with patch {self.patch}")
            if self.kept_patches < 1:
                raise ValueError(f"mask ratio {self.mae.mask_ratio} leaves no patch visible")
        if self.swin is not None:
            _check_swin(self)
        if self.patch_stride:
            if self.patch_stride >= self.patch:
                raise ValueError(f"--patch-stride {self.patch_stride}: an overlapping patch embedding strides less "
                                 f"than the patch ({self.patch}); leave it out for stride = patch")
            if (self.patch - self.patch_stride) % 2:
                raise ValueError(f"--patch-stride {self.patch_stride} with patch {self.patch}: the padding "
                                 f"(patch - stride) / 2 = {(self.patch - self.patch_stride) / 2:g} is not whole")
            if self.impl != Impl.timm or self.mae or self.video:
                raise ValueError("--patch-stride is modelled on the reference (timm-style) ViT: not with --impl hf, "
                                 "MAE or video")
        return self

    @property
    def kept_patches(self) -> int:
        """Patches the MAE encoder sees: ``int(L * (1 - mask_ratio))``, as Hugging Face rounds."""
        return int(self.patch_tokens * (1 - self.mae.mask_ratio)) if self.mae else self.patch_tokens

    @property
    def pos_table(self) -> bool:
        """A position table is added to the tokens (learned, or a fixed sin-cos buffer)."""
        return self.pos_embed in POS_TABLES

    @property
    def stride(self) -> int:
        """The patch embedding's stride: the patch, or a smaller ``patch_stride`` (overlapping)."""
        return self.patch_stride or self.patch

    @property
    def patch_pad(self) -> int:
        """Zero padding on every side of the image: (patch - stride) / 2."""
        return (self.patch - self.stride) // 2

    @property
    def grid_h(self) -> int:
        """Patches down the image: floor((H - P + 2 pad) / S) + 1 (H // P without overlap)."""
        if not self.patch_stride:  # (read on every report: the common case kept short)
            return self.image_h // self.patch
        return (self.image_h - self.patch + 2 * self.patch_pad) // self.patch_stride + 1

    @property
    def grid_w(self) -> int:
        if not self.patch_stride:
            return self.image_w // self.patch
        return (self.image_w - self.patch + 2 * self.patch_pad) // self.patch_stride + 1

    @property
    def patch_tokens(self) -> int:
        return self.grid_h * self.grid_w * (self.frames // self.tubelet)

    @property
    def video(self) -> bool:
        """Frames in tubelets (VideoMAE), not one image."""
        return self.frames > 1 or self.tubelet > 1

    @property
    def prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.registers

    @property
    def tokens(self) -> int:
        """Tokens the (encoder's) blocks run on: under MAE, the visible patches only."""
        return (self.kept_patches if self.mae else self.patch_tokens) + self.prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def divisible(self) -> bool:
        """Every pixel in some patch: the strides cover the padded image exactly."""
        over = self.patch - self.stride  # (2 pad)
        return (self.image_h - over) % self.stride == 0 and (self.image_w - over) % self.stride == 0


def _check_swin(spec: "ViTSpec") -> None:
    """What a Swin spec must be: Hugging Face's layout, and a grid its windows and merges cut
    exactly (Hugging Face pads a grid that is not; vitcost does not model the padding)."""
    sw = spec.swin
    if (spec.impl != Impl.hf or spec.class_token or spec.dist_token or spec.registers or spec.mae or spec.video
            or spec.layer_scale or spec.mask_token or spec.drop_path or spec.distillation or spec.patch_stride
            or spec.pos_grid or spec.mlp != Mlp.gelu or spec.pooling != Pooling.avg
            or spec.pos_embed != PosEmbed.none):
        raise ValueError("Swin is modelled as Hugging Face's SwinForImageClassification: no class token, "
                         "registers or absolute position table, the tokens' mean (--pool avg), a GELU MLP")
    if spec.depth != sum(sw.depths) or spec.heads != sw.heads[0] or spec.mlp_hidden != int(sw.mlp_ratio * spec.dim):
        raise ValueError("Swin: --depth is the stages' blocks together, --heads and --mlp-hidden the first stage's")
    if spec.image_h % spec.patch or spec.image_w % spec.patch:
        raise ValueError(f"Swin: image {spec.image_h}x{spec.image_w} is not a whole number of {spec.patch}-pixel "
                         "patches (Hugging Face pads it; the padding is not modelled)")
    gh, gw = spec.grid_h, spec.grid_w
    if sw.window > min(gh, gw):
        raise ValueError(f"Swin: window {sw.window} is larger than the {gh}x{gw} patch grid: use a window of at most "
                         f"{min(gh, gw)} or a larger image")
    for s, heads in enumerate(sw.heads):
        width = spec.dim << s
        if width % heads:
            raise ValueError(f"Swin: stage {s + 1}'s {heads} heads do not divide its width {width}")
        if s and (gh % 2 or gw % 2):
            raise ValueError(f"Swin: stage {s}'s {gh}x{gw} grid is odd, so patch merging pads it (not modelled): "
                             "use an image that halves evenly")
        if s:
            gh, gw = gh // 2, gw // 2
        if min(gh, gw) < sw.window:
            raise ValueError(f"Swin: stage {s + 1}'s {gh}x{gw} grid is smaller than the window {sw.window} (Hugging "
                             f"Face's {sw.window ** 2}x{sw.window ** 2} relative bias cannot be added to its scores): "
                             "use a smaller window, fewer stages or a larger image")
        if gh % sw.window or gw % sw.window:
            raise ValueError(f"Swin: stage {s + 1}'s {gh}x{gw} grid is not a whole number of {sw.window}x{sw.window} "
                             "windows (Hugging Face pads it; the padding is not modelled)")


class Workload(BaseModel):
    """How the model is run: batch, mode, precision, kernel, optimizer, device type."""

    model_config = _FROZEN

    batch: int = Field(default=8, gt=0, le=MAX_BATCH)
    mode: Mode = Mode.train
    precision: Precision = Precision.amp_bf16
    attention: AttentionKernel = AttentionKernel.sdpa
    optimizer: Optimizer = Optimizer.adamw
    keep_grads: bool = False
    checkpointing: Checkpointing = Checkpointing.none
    device: Device = Device.cuda
    strategy: Strategy = Strategy.ddp
    ranks: int = Field(default=1, gt=0, le=65536)  # GPUs (processes) the step is spread over
    rank: int = Field(default=0, ge=0, le=65535)  # whose share a sharded strategy's figures are
    grad_accum: int = Field(default=1, gt=0, le=4096)  # micro-steps (of ``batch`` each) per optimizer step
    replicas: int = Field(default=1, gt=0, le=65536)  # HSDP: replica groups, each sharding over ranks / replicas
    # FSDP2's MixedPrecisionPolicy(param_dtype=the precision's, reduce_dtype=fp32): fp32 sharded
    # parameters, gradients and optimizer states; compute and all-gathers in bf16 / fp16
    mixed_precision: bool = False

    @model_validator(mode="after")
    def _rank_in_range(self) -> "Workload":
        if self.rank >= self.ranks:
            raise ValueError(f"rank {self.rank} is not one of the {self.ranks} ranks")
        if self.ranks % self.replicas:
            raise ValueError(f"{self.ranks} ranks do not split into {self.replicas} equal replica groups")
        return self

    @property
    def training(self) -> bool:
        return self.mode == Mode.train

    @property
    def saves_activations(self) -> bool:
        """The forward saves what backward needs: training without checkpointing (a
        checkpointed block saves only its input, and no_grad nothing)."""
        return self.training and self.checkpointing == Checkpointing.none

    @property
    def accumulates(self) -> bool:
        """Backward adds into gradients that already exist: ``zero_grad(set_to_none=False)``, or
        every micro-step after the first of a gradient accumulation (whose peak is that of the
        last one: the gradients exist, and the optimizer steps after it)."""
        return self.keep_grads or (self.training and self.grad_accum > 1)

    @property
    def shards_optimizer(self) -> bool:
        """Each rank keeps the optimizer states of its share of the parameters only."""
        return self.training and self.strategy == Strategy.zero1 and self.ranks > 1

    @property
    def fsdp(self) -> bool:
        """Parameters, gradients and optimizer states sharded by ``fully_shard`` (a training step)."""
        return self.training and self.strategy in FSDP_STRATEGIES

    @property
    def param_bytes(self) -> int:
        """Element bytes of the parameters (and their gradients) as the step computes with
        them: 2 in bf16 and fp16, else 4 (autocast keeps them fp32)."""
        return 2 if self.precision in (Precision.bf16, Precision.fp16) else 4

    @property
    def master_bytes(self) -> int:
        """Element bytes of the parameters the optimizer steps: fp32 under FSDP's mixed precision."""
        return 4 if self.mixed_precision else self.param_bytes

    @property
    def shard_ranks(self) -> int:
        """The ranks a parameter is sharded over: all of them, or (HSDP) one replica group's."""
        return self.ranks // self.replicas if self.strategy == Strategy.hsdp else self.ranks

    @property
    def shard_rank(self) -> int:
        """This rank's index within its shard group (HSDP's mesh is replicas x shard ranks)."""
        return self.rank % self.shard_ranks


def _one_line(err: ValidationError) -> str:
    """``--depth 5000: Input should be less than or equal to 1024``: the flag, the value
    (cut short when long), pydantic's message."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    value = first.get("input")
    shown = "" if value is None or isinstance(value, (dict, list)) else " " + shorten(
        str(value.value if isinstance(value, Enum) else value))
    flag = {"image_h": "--image height", "image_w": "--image width"}.get(loc, "--" + loc.replace("_", "-"))
    return f"{flag}{shown}: {msg}"



def make_spec(**fields: object) -> ViTSpec:
    """Build a :class:`ViTSpec`, raising :class:`ConfigError` with a one-line message."""
    try:
        return ViTSpec(**fields)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def make_workload(**fields: object) -> Workload:
    """Build a :class:`Workload`, raising :class:`ConfigError` with a one-line message."""
    try:
        return Workload(**fields)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
