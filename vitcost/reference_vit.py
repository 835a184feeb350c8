"""The reference Vision Transformer that vitcost measures: timm's ``VisionTransformer``, rewritten.

timm cannot be imported everywhere vitcost runs, so this module mirrors its architecture
module for module and op for op (conv patch embedding, prefix tokens, learned position
embedding added after or before the prefix tokens, pre-norm blocks with a fused qkv linear,
``eager`` or ``sdpa`` attention, GELU MLP, final norm, class-token or mean-pool head).
Dropout, drop-path and layer-scale are left out: at their timm defaults (rate 0, no
layer-scale) they are identities.

This module imports torch; the analytic core never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitcost.specs import ViTSpec


class PatchEmbed(nn.Module):
    """Conv2d(C, D, P, stride P), then (B, D, gh, gw) -> (B, gh*gw, D), as timm does; with a
    smaller ``stride``, overlapping patches padded by (P - stride) / 2."""

    def __init__(self, channels: int, dim: int, patch: int, stride: int = 0) -> None:
        super().__init__()
        stride = stride or patch
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=stride, padding=(patch - stride) // 2,
                              bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Rope2d(nn.Module):
    """Axial 2-D rotary position embedding: channel i of a head is rotated with channel
    i + hd/2 by an angle of the patch's row (the first hd/4 pairs) or column (the last hd/4)
    times a frequency 100^(-j / (hd/4)); the prefix tokens are not rotated (cos 1, sin 0).
    ``cos`` and ``sin`` are (N, hd) buffers shared by every block."""

    def __init__(self, grid_h: int, grid_w: int, head_dim: int, prefix: int) -> None:
        super().__init__()
        quarter = head_dim // 4
        freqs = 1.0 / (100 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
        ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
        angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (patches, hd/2)
        angles = torch.cat([torch.zeros(prefix, head_dim // 2, dtype=torch.float64), angles])
        angles = torch.cat([angles, angles], dim=1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in x's dtype (``rotate_half``: (-x2, x1) of the halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


def relative_position_index(grid_h: int, grid_w: int, cls: bool) -> torch.Tensor:
    """BEiT's index into a relative position bias table: (N, N) entries, one per pair of
    tokens, ``(dy + gh - 1) (2 gw - 1) + dx + gw - 1`` between patches; with a class token,
    three more entries at the end (class to patch, patch to class, class to class)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, patches)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = (rel[..., 0] + grid_h - 1) * (2 * grid_w - 1) + rel[..., 1] + grid_w - 1
    if not cls:
        return index
    n_rel = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
    out = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1, dtype=torch.long)
    out[1:, 1:] = index
    out[0, 0:] = n_rel - 3
    out[0:, 0] = n_rel - 2
    out[0, 0] = n_rel - 1
    return out


class RelativeIndex(nn.Module):
    """The (N, N) index into every block's relative position bias table: one buffer, shared."""

    def __init__(self, grid_h: int, grid_w: int, cls: bool) -> None:
        super().__init__()
        self.register_buffer("index", relative_position_index(grid_h, grid_w, cls), persistent=False)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, kernel: str, relative: int = 0) -> None:
        super().__init__()
        self.rope: list = []  # [the model's Rope2d], not registered here: its buffers are the model's
        self.relative: list = []  # [the model's RelativeIndex], likewise
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.kernel = kernel
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # BEiT's relative position bias: a learned (entries, heads) table per block
        self.relative_position_bias_table = nn.Parameter(torch.randn(relative, heads) * 0.02) if relative else None
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self) -> torch.Tensor:
        """The (1, H, N, N) bias the table gives every pair of tokens."""
        index = self.relative[0].index
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.rope:
            rope = self.rope[0]
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        if self.kernel == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)
        elif self.kernel == "eager-postscale":
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if self.relative_position_bias_table is not None:
                attn = attn + self.relative_bias()
            attn = attn.softmax(dim=-1)
            x = attn @ v
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            if self.relative_position_bias_table is not None:
                attn = attn + self.relative_bias()
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """timm's LayerScale (not in place): the branch output times a learned D-vector."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


DROP_PATH_RATE = 0.1  # the rate --drop-path builds the reference with (memory does not depend on it)


class DropPath(nn.Module):
    """timm's stochastic depth: in training, each sample's branch is kept with probability
    ``1 - rate`` (and scaled up), or dropped."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        mask.div_(keep)
        return x * mask


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, qkv_bias: bool, kernel: str,
                 layer_scale: bool = False, drop_path: float = 0.0, relative: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, kernel, relative)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def sincos_1d(positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embedding over the patch index (the Transformer's), shape
    (1, positions, dim): sines in the first half of the channels, cosines in the second."""
    if dim % 2:
        raise ValueError("1-D sin-cos position embedding needs an even width")
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    out = torch.arange(positions, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).float().unsqueeze(0)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / big_vision), shape (1, gh*gw, dim)."""
    if dim % 4:
        raise ValueError("sin-cos position embedding needs a width divisible by 4")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    emb = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    return emb.float().unsqueeze(0)


def resample_abs_pos_embed(posemb: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int],
                           num_prefix_tokens: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed`` (timm/layers/pos_embed.py), as ``dynamic_img_size`` calls
    it every forward: the prefix rows kept, the grid's rows bicubic-resampled (antialiased) in
    fp32 and cast back, the two put together again."""
    if num_prefix_tokens:
        posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    else:
        posemb_prefix = None
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    posemb = posemb.float()
    posemb = posemb.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode="bicubic", antialias=True)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim)
    posemb = posemb.to(orig_dtype)
    if posemb_prefix is not None:
        posemb = torch.cat([posemb_prefix, posemb], dim=1)
    return posemb


class VisionTransformer(nn.Module):
    """timm-style ViT built from a :class:`vitcost.specs.ViTSpec`."""

    def __init__(self, spec: ViTSpec, attention: str = "sdpa", checkpointing: str = "none"):
        super().__init__()
        self.spec = spec
        self.checkpointing = checkpointing
        d = spec.dim
        self.patch_embed = PatchEmbed(spec.channels, d, spec.patch, spec.patch_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.registers, d)) if spec.registers else None
        grid = spec.grid_h * spec.grid_w
        if spec.pos_embed == "learned":
            # (built for another image: timm's dynamic_img_size resamples it every forward)
            n_pos = (spec.pos_grid ** 2 if spec.pos_grid else grid) + (spec.prefix_tokens if spec.pos_embed_prefix else 0)
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)
        elif spec.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(spec.grid_h, spec.grid_w, d), persistent=False)
        elif spec.pos_embed == "sincos-1d":
            self.register_buffer("pos_embed", sincos_1d(grid, d), persistent=False)
        else:
            self.pos_embed = None
        self.rope = Rope2d(spec.grid_h, spec.grid_w, d // spec.heads, spec.prefix_tokens) \
            if spec.pos_embed == "rope-2d" else None
        # timm's stochastic depth schedule: rates rising linearly from 0 at the first block
        top = DROP_PATH_RATE if spec.drop_path else 0.0
        rates = [top * k / (spec.depth - 1) if spec.depth > 1 else 0.0 for k in range(spec.depth)]
        relative = 0
        if spec.pos_embed == "relative-bias":
            relative = (2 * spec.grid_h - 1) * (2 * spec.grid_w - 1) + (3 if spec.class_token else 0)
            self.relative_index = RelativeIndex(spec.grid_h, spec.grid_w, spec.class_token)
        self.blocks = nn.Sequential(*(
            Block(d, spec.heads, spec.mlp_hidden, spec.qkv_bias, attention, spec.layer_scale, rate, relative)
            for rate in rates
        ))
        if relative:
            for blk in self.blocks:
                blk.attn.relative.append(self.relative_index)
        if self.rope is not None:
            for blk in self.blocks:
                blk.attn.rope.append(self.rope)
        # timm: with average pooling the final norm runs on the pooled vector (fc_norm), not
        # on every token
        avg = spec.pooling == "avg" and spec.classes
        self.norm = nn.Identity() if avg else nn.LayerNorm(d, eps=1e-6)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if avg else nn.Identity()
        self.head = nn.Linear(d, spec.classes) if spec.classes else None
        self.head_dist = nn.Linear(d, spec.classes) if spec.classes and spec.dist_token else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def _prefix(self, b: int) -> list[torch.Tensor]:
        return [
            t.expand(b, -1, -1)
            for t in (self.cls_token, self.dist_token, self.reg_token)
            if t is not None
        ]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm: with no_embed_class the position is added to the patches before the prefix
        # tokens are concatenated, otherwise after.
        prefix = self._prefix(x.shape[0])
        if self.pos_embed is None:
            return torch.cat(prefix + [x], dim=1) if prefix else x
        pos_embed = self.pos_embed
        if self.spec.pos_grid:  # timm's dynamic_img_size: resampled to the image's grid every forward
            g = self.spec.pos_grid
            pos_embed = resample_abs_pos_embed(pos_embed, (self.spec.grid_h, self.spec.grid_w), (g, g),
                                               self.spec.prefix_tokens if self.spec.pos_embed_prefix else 0)
        if self.spec.pos_embed_prefix and self.spec.pos_embed == "learned":
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            return x + pos_embed
        x = x + pos_embed
        return torch.cat(prefix + [x], dim=1) if prefix else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        if self.checkpointing == "full" and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            # as timm: the Sequential's call holds its input (the embedding) until the last
            # block returns, which under no_grad keeps one more (B, N, D) tensor alive
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.head is None:
            return x
        if self.spec.pooling == "avg":
            return self.head(self.fc_norm(x[:, self.spec.prefix_tokens :].mean(dim=1)))
        out = self.head(x[:, 0])
        if self.head_dist is not None and self.spec.distillation and self.training:
            return out, self.head_dist(x[:, 1])  # timm's distilled training: both heads, each its loss
        if self.head_dist is not None:
            # timm's VisionTransformerDistilled outside distilled training: mean of both heads.
            out = (out + self.head_dist(x[:, 1])) / 2
        return out


def build(spec: ViTSpec, attention: str = "sdpa", checkpointing: str = "none") -> VisionTransformer:
    return VisionTransformer(spec, attention=attention, checkpointing=checkpointing)


__all__ = ["VisionTransformer", "build", "sincos_1d", "sincos_2d"]
