"""Closed-form counts for a timm-style Vision Transformer. Pure integer functions of shapes.

Conventions, fixed here for the whole package:

* 1 MAC is one multiply-accumulate; FLOPs = 2 x MACs. Bias additions, normalisation,
  softmax, GELU and residual additions are not counted (FlopCounterMode counts none of them).
* The attention matmuls (q.k^T and attention.v) are counted whatever kernel runs them.
* Counts are per image and forward unless a name says otherwise.
* Every total is the sum of named parts: a dict keyed by path (``blocks/attn/qkv``).
"""

from __future__ import annotations

from functools import lru_cache

from vitcost.specs import Impl, Mlp, Pooling, PosEmbed, ViTSpec
from vitcost.swin import bias_entries, stages

# The order components are listed in, everywhere (params, MACs, tables).
COMPONENT_ORDER = (
    "patch_embed", "pos_embed", "prefix_tokens", "mask_token", "blocks/norm1", "blocks/attn/qkv",
    "blocks/attn/q_kT", "blocks/attn/attn_v", "blocks/attn/relative_bias", "blocks/attn/proj", "blocks/norm2",
    "blocks/mlp/fc1", "blocks/mlp/fc2", "blocks/layer_scale", "patch_merging", "norm", "head",
    # MAE's decoder
    "decoder/embed", "decoder/mask_token", "decoder/pos_embed", "decoder/blocks", "decoder/blocks/attn/qkv",
    "decoder/blocks/attn/q_kT", "decoder/blocks/attn/attn_v", "decoder/blocks/attn/proj", "decoder/blocks/mlp/fc1",
    "decoder/blocks/mlp/fc2", "decoder/norm", "decoder/pred",
)

# --- tokens -------------------------------------------------------------------------


def grid_tokens(image: int, patch: int) -> int:
    """Patches along one side: the conv patch embedding floors (``224 // 14 = 16``)."""
    return image // patch


def attention_map_elements(tokens: int) -> int:
    """Elements of one head's attention map: N x N."""
    return tokens * tokens


# --- parameters ---------------------------------------------------------------------


def linear_params(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def layernorm_params(dim: int) -> int:
    return 2 * dim


def patch_embed_params(channels: int, patch: int, dim: int) -> int:
    """(A video's tubelet of ``t`` frames counts as ``t`` times the channels.)"""
    """Conv2d(C, D, P, stride P) with bias: D * (P^2 * C + 1)."""
    return dim * (patch * patch * channels + 1)


def pos_embed_tokens(spec: ViTSpec) -> int:
    """Positions a learned embedding holds: grid, plus the prefix tokens unless they get none."""
    if spec.pos_embed != PosEmbed.learned:
        return 0
    if spec.impl == Impl.hf:  # Hugging Face: the class (and distillation) tokens, never registers
        grid = spec.pos_grid ** 2 if spec.pos_grid else spec.patch_tokens
        return grid + int(spec.class_token) + int(spec.dist_token)
    grid = spec.pos_grid ** 2 if spec.pos_grid else spec.patch_tokens  # (timm's dynamic_img_size)
    return grid + (spec.prefix_tokens if spec.pos_embed_prefix else 0)


def block_param_tensors(spec: ViTSpec) -> list[tuple[str, int]]:
    """(path, elements) of each parameter tensor of one block, in ``parameters()`` order."""
    d, f = spec.dim, spec.mlp_hidden
    if spec.impl == Impl.hf:
        return _hf_block_param_tensors(spec)
    tensors = [
        ("norm1/weight", d),
        ("norm1/bias", d),
        ("attn/qkv/weight", 3 * d * d),
    ]
    if spec.qkv_bias:
        tensors.append(("attn/qkv/bias", 3 * d))
    if spec.pos_embed == PosEmbed.relative_bias:
        tensors.append(("attn/relative_position_bias_table", relative_bias_entries(spec) * spec.heads))
    tensors += [("attn/proj/weight", d * d), ("attn/proj/bias", d)]
    if spec.layer_scale:
        tensors.append(("ls1/gamma", d))
    tensors += [
        ("norm2/weight", d),
        ("norm2/bias", d),
        ("mlp/fc1/weight", f * d),
        ("mlp/fc1/bias", f),
        ("mlp/fc2/weight", d * f),
        ("mlp/fc2/bias", d),
    ]
    if spec.layer_scale:
        tensors.append(("ls2/gamma", d))
    return tensors


def _hf_block_param_tensors(spec: ViTSpec) -> list[tuple[str, int]]:
    """Hugging Face's ``ViTLayer`` (and DeiT's): attention (q, k, v, o projections), the two
    norms, the MLP. With LayerScale, ``Dinov2Layer``: norm1, attention, LayerScale, norm2,
    MLP, LayerScale (timm's order, with q, k, v apart)."""
    d, f = spec.dim, spec.mlp_hidden
    if spec.video:  # VideoMAELayer: query (bias), key (none), value (bias), dense; MLP; the two norms
        qb = [d] if spec.qkv_bias else []
        return [("attn/q/weight", d * d), *[("attn/q/bias", n) for n in qb], ("attn/k/weight", d * d),
                ("attn/v/weight", d * d), *[("attn/v/bias", n) for n in qb],
                ("attn/proj/weight", d * d), ("attn/proj/bias", d),
                ("mlp/fc1/weight", f * d), ("mlp/fc1/bias", f), ("mlp/fc2/weight", d * f), ("mlp/fc2/bias", d),
                ("norm1/weight", d), ("norm1/bias", d), ("norm2/weight", d), ("norm2/bias", d)]
    attn: list[tuple[str, int]] = []
    for name in ("q", "k", "v"):
        attn.append((f"attn/{name}/weight", d * d))
        if spec.qkv_bias:
            attn.append((f"attn/{name}/bias", d))
    attn += [("attn/proj/weight", d * d), ("attn/proj/bias", d)]
    mlp = [("mlp/fc1/weight", f * d), ("mlp/fc1/bias", f), ("mlp/fc2/weight", d * f), ("mlp/fc2/bias", d)]
    if spec.mlp == Mlp.swiglu:  # Dinov2SwiGLUFFN: gate_proj, up_proj, down_proj
        mlp = [("mlp/gate/weight", f * d), ("mlp/gate/bias", f), ("mlp/up/weight", f * d), ("mlp/up/bias", f),
               ("mlp/fc2/weight", d * f), ("mlp/fc2/bias", d)]
    if spec.layer_scale:
        return [("norm1/weight", d), ("norm1/bias", d), *attn, ("ls1/gamma", d),
                ("norm2/weight", d), ("norm2/bias", d), *mlp, ("ls2/gamma", d)]
    return attn + [("norm1/weight", d), ("norm1/bias", d), ("norm2/weight", d), ("norm2/bias", d), *mlp]


def _fc1s(spec: ViTSpec) -> int:
    """Linear layers into the MLP's hidden width: SwiGLU has two (gate and up)."""
    return 2 if spec.mlp == Mlp.swiglu else 1


def relative_bias_entries(spec: ViTSpec) -> int:
    """Rows of a block's relative position bias table (BEiT): one per relative offset between
    two patches, (2 gh - 1)(2 gw - 1), and three for the class token's pairs."""
    if spec.pos_embed != PosEmbed.relative_bias:
        return 0
    return (2 * spec.grid_h - 1) * (2 * spec.grid_w - 1) + (3 if spec.class_token else 0)


def head_in(spec: ViTSpec) -> int:
    """The classifier's input width: D, or 2 D for the class token and mean concatenated."""
    return 2 * spec.dim if spec.pooling == Pooling.token_avg else spec.dim


FROZEN = " (frozen)"  # a parameter with requires_grad=False: a weight, no gradient, no optimizer state


def _mae_param_tensors(spec: ViTSpec) -> list[tuple[str, int]]:
    """``ViTMAEForPreTraining``: the encoder (its position embedding a frozen sin-cos table),
    then the decoder: its mask token, its frozen table, the embedding linear, its layers
    (Hugging Face's ViT layer at the decoder's width), its norm, the pixel predictor."""
    m, d, L = spec.mae, spec.dim, spec.patch_tokens
    dd, fd = m.decoder_dim, m.decoder_mlp_hidden
    tensors = [("cls_token", d), ("pos_embed" + FROZEN, (L + 1) * d),
               ("patch_embed/weight", d * spec.channels * spec.patch * spec.patch), ("patch_embed/bias", d)]
    block = _hf_block_param_tensors(spec)
    for i in range(spec.depth):
        tensors += [(f"blocks.{i}/{name}", n) for name, n in block]
    tensors += [("norm/weight", d), ("norm/bias", d),
                ("decoder/mask_token", dd), ("decoder/pos_embed" + FROZEN, (L + 1) * dd),
                ("decoder/embed/weight", dd * d), ("decoder/embed/bias", dd)]
    decoder = _hf_block_param_tensors(spec.model_copy(update={"dim": dd, "mlp_hidden": fd}))
    for i in range(m.decoder_depth):
        tensors += [(f"decoder/blocks.{i}/{name}", n) for name, n in decoder]
    pixels = spec.patch * spec.patch * spec.channels
    return tensors + [("decoder/norm/weight", dd), ("decoder/norm/bias", dd),
                      ("decoder/pred/weight", pixels * dd), ("decoder/pred/bias", pixels)]


def param_tensors(spec: ViTSpec) -> list[tuple[str, int]]:
    """(path, elements) of every parameter tensor, in the reference model's ``parameters()`` order.

    timm's order: the model's own tensors (class, distillation, register tokens, position
    embedding), then patch embedding, blocks, final norm, heads.
    """
    if spec.mae is not None:
        return _mae_param_tensors(spec)
    if spec.swin is not None:
        return _swin_param_tensors(spec)
    d = spec.dim
    tensors: list[tuple[str, int]] = []
    hf = spec.impl == Impl.hf
    if spec.class_token:
        tensors.append(("cls_token", d))
    if spec.dist_token and not hf:
        tensors.append(("dist_token", d))
    if spec.mask_token:
        tensors.append(("mask_token", d))
    if spec.registers and spec.impl == Impl.timm:
        tensors.append(("reg_token", spec.registers * d))
    if pos_embed_tokens(spec):
        tensors.append(("pos_embed", pos_embed_tokens(spec) * d))
    if spec.dist_token and hf:  # Hugging Face registers these after the position embedding
        tensors.append(("dist_token", d))
    if spec.registers and hf:
        tensors.append(("reg_token", spec.registers * d))
    tensors.append(("patch_embed/weight", d * spec.channels * spec.patch * spec.patch * spec.tubelet))
    tensors.append(("patch_embed/bias", d))
    block = block_param_tensors(spec)
    for i in range(spec.depth):
        tensors += [(f"blocks.{i}/{name}", n) for name, n in block]
    tensors += [("norm/weight", d), ("norm/bias", d)]
    if spec.classes:
        tensors += [("head/weight", spec.classes * head_in(spec)), ("head/bias", spec.classes)]
        if spec.dist_token:
            tensors += [("head_dist/weight", spec.classes * d), ("head_dist/bias", spec.classes)]
    return tensors


def _swin_block_param_tensors(spec: ViTSpec, d: int, heads: int, f: int) -> list[tuple[str, int]]:
    """``SwinLayer``: attention (q, k, v, o projections, the relative position bias table),
    the two norms, the MLP."""
    attn: list[tuple[str, int]] = []
    for name in ("q", "k", "v"):
        attn.append((f"attn/{name}/weight", d * d))
        if spec.qkv_bias:
            attn.append((f"attn/{name}/bias", d))
    return attn + [("attn/proj/weight", d * d), ("attn/proj/bias", d),
                   ("attn/relative_position_bias_table", bias_entries(spec) * heads),
                   ("norm1/weight", d), ("norm1/bias", d), ("norm2/weight", d), ("norm2/bias", d),
                   ("mlp/fc1/weight", f * d), ("mlp/fc1/bias", f), ("mlp/fc2/weight", d * f), ("mlp/fc2/bias", d)]


def _swin_param_tensors(spec: ViTSpec) -> list[tuple[str, int]]:
    """``SwinForImageClassification``: the patch embedding and its norm, each stage's blocks
    and patch merging (a 4C -> 2C linear without bias, then its 4C norm), the final norm,
    the classifier."""
    d = spec.dim
    tensors = [("patch_embed/weight", d * spec.channels * spec.patch * spec.patch), ("patch_embed/bias", d),
               ("patch_embed/norm/weight", d), ("patch_embed/norm/bias", d)]
    for st in stages(spec):
        block = _swin_block_param_tensors(spec, st.dim, st.heads, st.mlp_hidden)
        for j in range(st.depth):
            tensors += [(f"stages.{st.index}/blocks.{j}/{name}", n) for name, n in block]
        if st.merges:
            tensors += [(f"stages.{st.index}/merging/reduction/weight", 8 * st.dim * st.dim),
                        (f"stages.{st.index}/merging/norm/weight", 4 * st.dim),
                        (f"stages.{st.index}/merging/norm/bias", 4 * st.dim)]
    last = stages(spec)[-1].dim
    tensors += [("norm/weight", last), ("norm/bias", last)]
    if spec.classes:
        tensors += [("head/weight", spec.classes * last), ("head/bias", spec.classes)]
    return tensors


def _swin_param_counts(spec: ViTSpec) -> dict[str, int]:
    """Swin's parameters by component (``patch_embed`` with its norm; the blocks summed over
    every stage)."""
    counts = dict.fromkeys(("patch_embed", "blocks/norm1", "blocks/attn/qkv", "blocks/attn/relative_bias",
                            "blocks/attn/proj", "blocks/norm2", "blocks/mlp/fc1", "blocks/mlp/fc2",
                            "patch_merging", "norm", "head"), 0)
    counts["patch_embed"] = patch_embed_params(spec.channels, spec.patch, spec.dim) + layernorm_params(spec.dim)
    for st in stages(spec):
        d, f, k = st.dim, st.mlp_hidden, st.depth
        counts["blocks/norm1"] += k * layernorm_params(d)
        counts["blocks/attn/qkv"] += k * linear_params(d, 3 * d, spec.qkv_bias)
        counts["blocks/attn/relative_bias"] += k * bias_entries(spec) * st.heads
        counts["blocks/attn/proj"] += k * linear_params(d, d)
        counts["blocks/norm2"] += k * layernorm_params(d)
        counts["blocks/mlp/fc1"] += k * linear_params(d, f)
        counts["blocks/mlp/fc2"] += k * linear_params(f, d)
        if st.merges:
            counts["patch_merging"] += linear_params(4 * d, 2 * d, bias=False) + layernorm_params(4 * d)
    last = stages(spec)[-1].dim
    counts["norm"] = layernorm_params(last)
    counts["head"] = linear_params(last, spec.classes) if spec.classes else 0
    return counts


def _swin_mac_counts(spec: ViTSpec) -> dict[str, int]:
    """Swin's forward MACs per image: each stage's blocks at its width on its tokens, their
    attention products within windows (N = M^2 keys per query: ``tokens x N x D`` each),
    patch merging (a quarter of the tokens, 4C -> 2C), the head on the pooled vector."""
    counts = dict.fromkeys(("blocks/attn/qkv", "blocks/attn/q_kT", "blocks/attn/attn_v", "blocks/attn/proj",
                            "blocks/mlp/fc1", "blocks/mlp/fc2", "patch_merging"), 0)
    for st in stages(spec):
        n, d, k = st.tokens, st.dim, st.depth
        counts["blocks/attn/qkv"] += k * qkv_macs(n, d)
        counts["blocks/attn/q_kT"] += k * n * st.window_tokens * d
        counts["blocks/attn/attn_v"] += k * n * st.window_tokens * d
        counts["blocks/attn/proj"] += k * linear_macs(n, d, d)
        counts["blocks/mlp/fc1"] += k * linear_macs(n, d, st.mlp_hidden)
        counts["blocks/mlp/fc2"] += k * linear_macs(n, st.mlp_hidden, d)
        if st.merges:
            counts["patch_merging"] += linear_macs(n // 4, 4 * d, 2 * d)
    return {"patch_embed": patch_embed_macs(spec.patch_tokens, spec.channels, spec.patch, spec.dim), **counts,
            "head": linear_macs(1, stages(spec)[-1].dim, spec.classes)}


_ONE_ROW = ("cls_token", "dist_token", "mask_token", "reg_token", "pos_embed")  # (1, n, D) tables


def param_rows(spec: ViTSpec) -> list[int]:
    """The first dimension of each tensor of :func:`param_tensors` (what FSDP shards along):
    a linear's output features, a convolution's output channels, a vector's length, and 1
    for the (1, n, D) tokens and position embedding."""
    d = spec.dim
    inputs = {"patch_embed": spec.channels * spec.patch * spec.patch * spec.tubelet, "head": head_in(spec),
              "head_dist": d, "fc2": spec.mlp_hidden}
    rows = []
    for name, n in param_tensors(spec):
        parts = name.split("/")
        if parts[-1] in _ONE_ROW:
            rows.append(1)
        elif parts[-1] == "relative_position_bias_table":  # (entries, heads)
            rows.append(n // spec.heads)
        elif parts[-1] == "weight" and not parts[-2].startswith(("norm", "fc_norm")):
            rows.append(n // inputs.get(parts[-2], d))
        else:
            rows.append(n)  # biases, norms, LayerScale's gamma: one dimension
    return rows


def _mae_decoder_param_counts(spec: ViTSpec) -> dict[str, int]:
    """MAE's decoder parameters by component (its blocks summed over its depth)."""
    m, L = spec.mae, spec.patch_tokens
    dd, fd = m.decoder_dim, m.decoder_mlp_hidden
    block = 3 * linear_params(dd, dd, spec.qkv_bias) + linear_params(dd, dd) + 2 * layernorm_params(dd) \
        + linear_params(dd, fd) \
        + linear_params(fd, dd)
    pixels = spec.patch * spec.patch * spec.channels
    return {"decoder/mask_token": dd, "decoder/pos_embed": (L + 1) * dd, "decoder/embed": linear_params(spec.dim, dd),
            "decoder/blocks": m.decoder_depth * block, "decoder/norm": layernorm_params(dd),
            "decoder/pred": linear_params(dd, pixels)}


def param_counts(spec: ViTSpec) -> dict[str, int]:
    """Parameters by component; blocks are summed over depth (``blocks/attn/qkv``)."""
    if spec.swin is not None:
        return _swin_param_counts(spec)
    d = spec.dim
    counts = {
        "patch_embed": patch_embed_params(spec.channels * spec.tubelet, spec.patch, d),
        "pos_embed": pos_embed_tokens(spec) * d,
        "prefix_tokens": spec.prefix_tokens * d,
        "blocks/norm1": spec.depth * layernorm_params(d),
        "blocks/attn/qkv": spec.depth * (linear_params(d, 3 * d, spec.qkv_bias) - (d if spec.video and spec.qkv_bias else 0)),
        "blocks/attn/proj": spec.depth * linear_params(d, d),
        "blocks/norm2": spec.depth * layernorm_params(d),
        "blocks/mlp/fc1": spec.depth * linear_params(d, spec.mlp_hidden) * _fc1s(spec),
        "blocks/mlp/fc2": spec.depth * linear_params(spec.mlp_hidden, d),
        "norm": layernorm_params(d),
        "head": (1 + int(spec.dist_token)) * linear_params(head_in(spec), spec.classes) if spec.classes else 0,
    }
    if spec.mask_token:
        counts["mask_token"] = d
    if spec.pos_embed == PosEmbed.relative_bias:
        counts["blocks/attn/relative_bias"] = spec.depth * relative_bias_entries(spec) * spec.heads
    if spec.layer_scale:  # one D-vector per residual branch
        counts["blocks/layer_scale"] = spec.depth * 2 * d
    if spec.mae is not None:
        counts.update(_mae_decoder_param_counts(spec))
    return counts


# --- MACs (per image, forward) -----------------------------------------------------


def linear_macs(tokens: int, d_in: int, d_out: int) -> int:
    """A linear layer over ``tokens`` rows: tokens * d_in * d_out (bias ignored)."""
    return tokens * d_in * d_out


def patch_embed_macs(grid: int, channels: int, patch: int, dim: int) -> int:
    """The conv patch embedding: one (P^2 * C) x D product per patch (bias ignored)."""
    return grid * channels * patch * patch * dim


def qkv_macs(tokens: int, dim: int) -> int:
    return linear_macs(tokens, dim, 3 * dim)


def attention_score_macs(tokens: int, dim: int) -> int:
    """q.k^T over all heads: heads * N * N * head_dim = N^2 * D."""
    return tokens * tokens * dim


def attention_value_macs(tokens: int, dim: int) -> int:
    """attention.v over all heads: N^2 * D."""
    return tokens * tokens * dim


def block_macs(n: int, d: int, f: int, depth: int, prefix: str = "blocks", fc1s: int = 1) -> dict[str, int]:
    """A stack of ``depth`` blocks over ``n`` tokens, width ``d``, MLP ``f`` (``fc1s`` linears
    into it: 2 for SwiGLU), by component, keyed ``<prefix>/attn/qkv`` and so on."""
    return {
        f"{prefix}/attn/qkv": depth * qkv_macs(n, d),
        f"{prefix}/attn/q_kT": depth * attention_score_macs(n, d),
        f"{prefix}/attn/attn_v": depth * attention_value_macs(n, d),
        f"{prefix}/attn/proj": depth * linear_macs(n, d, d),
        f"{prefix}/mlp/fc1": depth * linear_macs(n, d, f) * fc1s,
        f"{prefix}/mlp/fc2": depth * linear_macs(n, f, d),
    }


def mac_counts(spec: ViTSpec) -> dict[str, int]:
    """Forward MACs per image by component; ``blocks/...`` are summed over depth.

    Per block with a 4x MLP this is 12 N D^2 + 2 N^2 D.
    """
    if spec.mae is not None:
        return _mae_mac_counts(spec)
    if spec.swin is not None:
        return _swin_mac_counts(spec)
    d = spec.dim
    return {
        "patch_embed": patch_embed_macs(spec.patch_tokens, spec.channels * spec.tubelet, spec.patch, d),
        **block_macs(spec.tokens, d, spec.mlp_hidden, spec.depth, fc1s=_fc1s(spec)),
        "head": (1 + int(spec.dist_token)) * linear_macs(1, head_in(spec), spec.classes),
    }


def _mae_mac_counts(spec: ViTSpec) -> dict[str, int]:
    """MAE: the encoder on the visible patches and the class token, the decoder on every patch."""
    m, d = spec.mae, spec.dim
    n, nd = spec.kept_patches + 1, spec.patch_tokens + 1
    return {
        "patch_embed": patch_embed_macs(spec.patch_tokens, spec.channels, spec.patch, d),
        **block_macs(n, d, spec.mlp_hidden, spec.depth),
        "decoder/embed": linear_macs(n, d, m.decoder_dim),
        **block_macs(nd, m.decoder_dim, m.decoder_mlp_hidden, m.decoder_depth, prefix="decoder/blocks"),
        "decoder/pred": linear_macs(nd, m.decoder_dim, spec.patch * spec.patch * spec.channels),
    }


def training_macs(forward: dict[str, int], recompute_blocks: bool = False,
                  recompute_fc2: bool = False) -> dict[str, int]:
    """Forward + backward MACs per image for one training step, by component.

    Rule: every matmul's backward costs two matmuls of the forward's size (gradient of the
    input and of the weight; for q.k^T and attention.v, of both operands), so a layer costs
    3x its forward. Deviation: the patch embedding computes no input gradient (the image
    needs none), so it costs 2x. With full activation checkpointing each block's forward is
    run again in backward, but PyTorch's non-reentrant checkpoint stops once the last saved
    tensor (GELU's output) exists, so fc2 is not rerun: 4x for the blocks, 3x for fc2.
    ``recompute_fc2``: LayerScale saves fc2's output, so fc2 is rerun too.
    """
    out = {}
    for path, macs in forward.items():
        factor = 2 if path == "patch_embed" else 3
        in_block = path.startswith(("blocks/", "decoder/blocks/"))
        if recompute_blocks and in_block and (not path.endswith("blocks/mlp/fc2") or recompute_fc2):
            factor += 1
        out[path] = factor * macs
    return out


# --- sharding -----------------------------------------------------------------------------------


def zero_partition(numels: list[int], ranks: int) -> list[list[int]]:
    """Indices of the parameters each rank's optimizer steps under ``ZeroRedundancyOptimizer``:
    largest first, each to the rank with the fewest elements so far (the lowest such rank on a
    tie), as ``_partition_parameters`` does; within a rank, in the order they were given to it."""
    import heapq

    order = sorted(range(len(numels)), key=lambda i: numels[i], reverse=True)  # stable: ties keep their order
    heap = [(0, rank) for rank in range(ranks)]  # (elements so far, rank): the least, then the lowest rank
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        size, rank = heapq.heappop(heap)
        out[rank].append(i)
        heapq.heappush(heap, (size + numels[i], rank))
    return out


@lru_cache(maxsize=256)
def zero_shares(spec: ViTSpec, ranks: int) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Each rank's share of ``param_tensors(spec)`` under ZeRO-1, as (path, elements) in the
    order its optimizer steps them: :func:`zero_partition` over every parameter."""
    tensors = param_tensors(spec)
    return tuple(tuple(tensors[i] for i in part) for part in zero_partition([n for _, n in tensors], ranks))
