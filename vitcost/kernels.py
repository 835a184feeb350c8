"""The ViT family as a list of kernels: what each operator of a step computes and moves.

This module is a *model* for the time engine (``vitcost.timing``), as ``vitcost.memory`` is
for the memory replay: it walks the same operators in the same order (patch embedding,
LayerNorm, the linears under autocast with their input casts, attention by kernel, GELU or
SwiGLU, LayerScale, residual adds, the head and loss, their backward, the recompute of
checkpointed blocks, the optimizer step) and writes down, per operator, the kernels it
launches: a matmul's shape and MACs, a fused attention kernel's MACs, and the bytes every
kernel reads and writes. Element sizes come from the memory model's :class:`Shapes` (which
tensor is fp32 and which is low precision under autocast is decided there, once). A GEMM's
MACs are m * n * k of its shape; summed over a step they equal ``formulas``' MAC counts and
FlopCounterMode's (tests/test_time.py holds both).

Bias additions are fused into the matmul (cuBLASLt's epilogue); views (reshape, transpose
of a contiguous tensor, slicing the class token) launch nothing. Each kernel carries
``count``: the times it runs per step (a block's kernels run ``depth`` times).
Every size is in bytes; every count of work in MACs.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
import math
from typing import NamedTuple, Optional

from vitcost import sharding
from vitcost.formulas import param_tensors, zero_shares
from vitcost.memory import shapes_of
from vitcost.ops import Shapes
from vitcost.specs import AttentionKernel, Checkpointing, Impl, Mlp, Optimizer, Pooling, PosEmbed, ViTSpec, Workload

# Where the time goes: the groups of the breakdown (``launch`` is added by the engine).
GROUPS = ("matmul", "attention", "memory", "optimizer")

# Kinds the engine prices differently.
GEMM = "gemm"  # a (batched) matmul: MACs over the shape-aware matmul rate, or its bytes
FLASH = "flash"  # a fused attention kernel: MACs over the attention rate, or its bytes
STREAM = "stream"  # memory-bound: bytes over the bandwidth


class Kernel(NamedTuple):
    """One kernel (or a few launched together), run ``count`` times a step."""

    name: str  # component path: blocks/attn/qkv, blocks/norm1, optimizer, ...
    phase: str  # forward | backward | recompute | optimizer
    group: str  # one of GROUPS
    kind: str  # GEMM | FLASH | STREAM
    bytes: int  # read + written, one run
    macs: int = 0  # one run
    m: int = 0  # a GEMM's output rows, columns and reduction, and its batch
    n: int = 0
    k: int = 0
    batch: int = 1
    tokens: int = 0  # a FLASH kernel's sequence length (its tiles pad it)
    launches: int = 1  # kernels launched per run
    count: int = 1
    op: str = ""  # a pointwise operator that may be bound by arithmetic, not bytes: "gelu/2" (op / element bytes)
    elems: int = 0  # the elements it computes, one run


class NotModelled(ValueError):
    """The time model has no kernels for this configuration (the reason is the message)."""


def why_not(spec: ViTSpec) -> Optional[str]:
    """Why the time model has no kernels for ``spec`` (None: it has)."""
    if spec.mae is not None:
        return "MAE pretraining (two stacks of blocks) has no kernel list yet"
    return None


class _Walk:
    """Collects kernels in execution order for one phase at a time."""

    def __init__(self, sh: Shapes) -> None:
        self.sh = sh
        self.out: list[Kernel] = []
        self.phase = "forward"
        self.count = 1

    def gemm(self, name: str, group: str, m: int, n: int, k: int, a: int, b: int, c: int, batch: int = 1) -> None:
        """``a``, ``b``, ``c``: element bytes of the two operands and the output."""
        self.out.append(Kernel(name, self.phase, group, GEMM, batch * (m * k * a + k * n * b + m * n * c),
                               macs=batch * m * n * k, m=m, n=n, k=k, batch=batch, count=self.count))

    def stream(self, name: str, group: str, read: int, write: int, launches: int = 1, op: str = "",
               elems: int = 0, elem_bytes: int = 0) -> None:
        """``op``, ``elems``, ``elem_bytes``: a pointwise operator that computes so many elements
        of that size (a CPU may take longer over the arithmetic than over the bytes)."""
        self.out.append(Kernel(name, self.phase, group, STREAM, read + write, launches=launches, count=self.count,
                               op=f"{op}/{elem_bytes}" if op else "", elems=elems))

    def flash(self, name: str, macs: int, tokens: int, read: int, write: int, launches: int = 1) -> None:
        self.out.append(Kernel(name, self.phase, "attention", FLASH, read + write, macs=macs, tokens=tokens,
                               launches=launches, count=self.count))


# --- forward ----------------------------------------------------------------------------------


def _layernorm(w: _Walk, name: str, rows: int, d: int) -> int:
    """LayerNorm over ``rows`` rows of ``d``: reads the stream, writes its output and the (rows,)
    statistics. Returns the output's element bytes (fp32 under CUDA autocast)."""
    sh = w.sh
    out = 4 if sh.ln_upcast else sh.res
    if sh.ln_upcast:
        w.stream(name, "memory", rows * d * sh.res, rows * d * 4)  # the copy up
    w.stream(name, "memory", rows * d * (4 if sh.ln_upcast else sh.res), rows * d * out + 2 * rows * sh.stat,
             op="layer_norm", elems=rows * d, elem_bytes=out)
    return out


def _linear(w: _Walk, name: str, rows: int, d_in: int, d_out: int, in_bytes: int, group: str = "matmul") -> None:
    """A linear over ``rows``: under autocast an input of another dtype is cast down first."""
    sh = w.sh
    if sh.amp and in_bytes != sh.lo:
        w.stream(name, "memory", rows * d_in * in_bytes, rows * d_in * sh.lo)
    w.gemm(name, group, rows, d_out, d_in, sh.lo, sh.lo, sh.lo)


def _attention_sizes(sh: Shapes) -> tuple[int, int, int, int, int, int]:
    """batch, tokens, heads, head width, the bytes of one (B, N, D) matmul operand and of one
    layer's attention maps."""
    return sh.b, sh.n, sh.h, sh.d // sh.h, sh.b * sh.n * sh.d * sh.lo, sh.amap


def _rope(w: _Walk, spec: ViTSpec, p: str, backward: bool = False) -> None:
    """RoPE-2D on q and k (``memory._rope_forward``): the two products, the negated half, the
    halves put together, the sum and (autocast) the cast back, each a pass over (B, N, D);
    backward as many again, and the two branches' gradients added. Memory-bound."""
    if spec.pos_embed != PosEmbed.rope_2d:
        return
    sh = w.sh
    e = sh.b * sh.n * sh.d
    wide, lo = sh.par, sh.lo
    cast = wide != lo
    read = 3 * e * lo + 2 * e * wide + (e * wide if cast else 0)
    write = 3 * e * wide + e * lo * 3 // 2 + (e * lo if cast else 0)
    launches = 5 + int(cast)
    if backward:
        read, write, launches = read + 2 * e * lo, write + e * lo, launches + 2
    for name in ("q", "k"):
        w.stream(p + "attn/rope_" + name, "memory", read, write, launches=launches)


def _attention_forward(w: _Walk, spec: ViTSpec, wl: Workload, p: str) -> None:
    sh = w.sh
    b, n, h, hd, t, amap = _attention_sizes(sh)
    _rope(w, spec, p)
    if wl.attention == AttentionKernel.sdpa:
        w.flash(p + "attn/core", b * h * n * n * hd * 2, n, 3 * t, t + b * h * n * 4)
        return
    explicit32 = spec.impl == Impl.hf
    softmax32 = (explicit32 or sh.softmax_fp32) and sh.lo == 2
    post = wl.attention == AttentionKernel.eager_postscale
    name = p + "attn/core"
    if not post:
        w.stream(name, "attention", t, t)  # q * scale
    if not sh.eager_views:
        w.stream(name, "attention", t, t)  # q made contiguous for bmm
        w.stream(name, "attention", t, t)  # k^T made contiguous
    w.gemm(p + "attn/q_kT", "attention", n, n, hd, sh.lo, sh.lo, sh.lo, batch=b * h)
    if post:
        w.stream(name, "attention", amap, amap)  # scores * scale
    maps = b * h * n * n
    relative = spec.pos_embed == PosEmbed.relative_bias
    widened = relative and sh.par > sh.lo  # the scores plus an fp32 bias: fp32 (under autocast)
    if relative:
        table = h * n * n * sh.par
        w.stream(p + "attn/relative_bias", "attention", 2 * table + n * n * 8, 2 * table, launches=2)  # gather, copy
        w.stream(p + "attn/relative_bias", "attention", amap + table, maps * sh.par)  # added to the scores
    if widened:  # the softmax in fp32, its output copied down for the matmul
        w.stream(name, "attention", 2 * maps * 4, maps * 4, op="softmax", elems=maps, elem_bytes=4)
        w.stream(name, "attention", maps * 4, amap)
    elif softmax32:
        w.stream(name, "attention", amap, 2 * amap)  # the scores cast up
        w.stream(name, "attention", 2 * amap, 2 * amap, op="softmax", elems=maps, elem_bytes=4)  # softmax in fp32
        w.stream(name, "attention", 2 * amap, amap)  # cast back for the matmul
    else:
        w.stream(name, "attention", amap, amap, op="softmax", elems=maps, elem_bytes=sh.lo)
    if not sh.eager_views:
        w.stream(name, "attention", t, t)  # v made contiguous
    w.gemm(p + "attn/attn_v", "attention", n, hd, n, sh.lo, sh.lo, sh.lo, batch=b * h)
    w.stream(name, "attention", t, t)  # transpose(1, 2).reshape: a copy


def _block_forward(w: _Walk, spec: ViTSpec, wl: Workload, recompute: bool = False) -> None:
    sh = w.sh
    rows, d, f = sh.b * sh.n, sh.d, sh.f
    p = "blocks/"
    ln = _layernorm(w, p + "norm1", rows, d)
    if spec.impl == Impl.hf:
        for _ in range(3):  # q, k and v: three linears, each casting its input
            _linear(w, p + "attn/qkv", rows, d, d, ln)
    else:
        _linear(w, p + "attn/qkv", rows, d, 3 * d, ln)
    _attention_forward(w, spec, wl, p)
    _linear(w, p + "attn/proj", rows, d, d, sh.lo)
    _branch_end(w, spec, wl, p + "attn/proj", rows)
    ln = _layernorm(w, p + "norm2", rows, d)
    if spec.mlp == Mlp.swiglu:
        _linear(w, p + "mlp/fc1", rows, d, 2 * f, ln)
        w.stream(p + "mlp/act", "memory", rows * 2 * f * sh.lo, rows * f * sh.lo, launches=2,
                 op="silu", elems=rows * f, elem_bytes=sh.lo)  # silu(x1) * x2
    else:
        _linear(w, p + "mlp/fc1", rows, d, f, ln)
        w.stream(p + "mlp/act", "memory", rows * f * sh.lo, rows * f * sh.lo, op="gelu", elems=rows * f,
                 elem_bytes=sh.lo)
    if recompute and not spec.layer_scale:
        return  # the non-reentrant checkpoint stops at the last saved tensor: fc2 is not rerun
    _linear(w, p + "mlp/fc2", rows, f, d, sh.lo)
    if recompute:
        return
    _branch_end(w, spec, wl, p + "mlp/fc2", rows)


def _branch_end(w: _Walk, spec: ViTSpec, wl: Workload, name: str, rows: int) -> None:
    """LayerScale, drop-path's mask, and the residual add that ends a branch."""
    sh = w.sh
    d = sh.d
    branch = sh.lo
    if spec.layer_scale:
        w.stream(name, "memory", rows * d * branch, rows * d * sh.res)
        branch = sh.res
    if spec.drop_path and wl.training:
        w.stream(name, "memory", rows * d * branch, rows * d * sh.res)
        branch = sh.res
    w.stream(name, "memory", rows * d * (sh.res + branch), rows * d * sh.res)  # x + branch


def _prologue_forward(w: _Walk, spec: ViTSpec) -> None:
    sh = w.sh
    b, d = sh.b, sh.d
    k = sh.conv_w // d
    if sh.amp:
        w.stream("patch_embed", "memory", sh.b * sh.image * 4, sh.b * sh.image * sh.lo)  # the image cast down
    # the conv as an implicit GEMM: one (C P^2) x D product per patch
    w.gemm("patch_embed", "matmul", b * sh.patches, d, k, sh.lo, sh.lo, sh.lo)
    rows = b * sh.n
    if spec.prefix_tokens or spec.impl == Impl.hf:
        w.stream("prefix_tokens", "memory", b * sh.patches * d * sh.lo, rows * d * sh.res)  # cat
    if spec.pos_table or spec.video:
        w.stream("pos_embed", "memory", rows * d * sh.res + sh.pos * d * 4, rows * d * sh.res)


def _epilogue_forward(w: _Walk, spec: ViTSpec, wl: Workload) -> None:
    sh = w.sh
    b, d = sh.b, sh.d
    if not spec.classes:
        _layernorm(w, "norm", b * sh.n, d)
        return
    if spec.pooling == Pooling.avg:
        w.stream("norm", "memory", b * sh.n * d * sh.res, b * d * sh.res)  # the mean over tokens
        ln = _layernorm(w, "norm", b, d)
    else:
        ln = _layernorm(w, "norm", b * sh.n, d)
        if spec.pooling == Pooling.token_avg:
            w.stream("norm", "memory", b * sh.n * d * ln, 2 * b * d * ln)  # mean, then the cat
    heads = 1 + int(spec.dist_token)
    width = 2 if spec.pooling == Pooling.token_avg else 1
    for _ in range(heads):
        _linear(w, "head", b, width * d, spec.classes, ln)
    if wl.training:
        logits = heads * b * spec.classes
        w.stream("loss", "memory", logits * sh.lo, logits * 4 * 2, launches=2 * heads)  # log_softmax, nll


# --- backward ---------------------------------------------------------------------------------


def _linear_backward(w: _Walk, name: str, rows: int, d_in: int, d_out: int, grad_bytes: int, in_bytes: int,
                     input_grad: bool = True, group: str = "matmul") -> int:
    """A linear's backward: the incoming gradient cast down under autocast, the input's gradient
    (grad @ W), the weight's (grad^T @ input), the bias's (a sum over rows), the weight's and
    bias's gradients cast up to fp32, the input's cast back to its dtype. Returns its bytes."""
    sh = w.sh
    if sh.amp and grad_bytes != sh.lo:
        w.stream(name, "memory", rows * d_out * grad_bytes, rows * d_out * sh.lo)
    if input_grad:
        w.gemm(name, group, rows, d_in, d_out, sh.lo, sh.lo, sh.lo)
    w.gemm(name, group, d_out, d_in, rows, sh.lo, sh.lo, sh.lo)
    w.stream(name, "memory", rows * d_out * sh.lo, d_out * sh.lo)  # the bias's gradient
    if sh.amp:
        w.stream(name, "memory", (d_in + 1) * d_out * sh.lo, (d_in + 1) * d_out * 4, launches=2)
        if input_grad and in_bytes != sh.lo:
            w.stream(name, "memory", rows * d_in * sh.lo, rows * d_in * in_bytes)
            return in_bytes
    return sh.lo


def _layernorm_backward(w: _Walk, name: str, rows: int, d: int, grad_bytes: int) -> None:
    """The input's gradient (one kernel) and gamma's and beta's (another), each reading the
    gradient and the saved input."""
    sh = w.sh
    x = 4 if sh.ln_upcast else sh.res
    w.stream(name, "memory", 2 * rows * d * (grad_bytes + x) + 2 * rows * sh.stat, rows * d * x, launches=2,
             op="layer_norm_backward", elems=rows * d, elem_bytes=x)
    if sh.ln_upcast:
        w.stream(name, "memory", rows * d * 4, rows * d * sh.res)


def _attention_backward(w: _Walk, spec: ViTSpec, wl: Workload, p: str) -> None:
    sh = w.sh
    b, n, h, hd, t, amap = _attention_sizes(sh)
    name = p + "attn/core"
    if wl.attention == AttentionKernel.sdpa:
        # FlashAttention's backward recomputes the scores: 5 matmuls of N^2 hd per head where
        # the forward has 2; a preprocessing pass (dO . O) and the dq conversion launch too
        w.flash(name, b * h * n * n * hd * 5, n, 5 * t + b * h * n * 4, 3 * t, launches=3)
    else:
        explicit32 = spec.impl == Impl.hf
        softmax32 = (explicit32 or sh.softmax_fp32) and sh.lo == 2
        if not sh.eager_views:
            w.stream(name, "attention", t, t)  # the transposed gradient made contiguous
        w.gemm(p + "attn/attn_v", "attention", n, n, hd, sh.lo, sh.lo, sh.lo, batch=b * h)  # g @ v^T
        w.gemm(p + "attn/attn_v", "attention", n, hd, n, sh.lo, sh.lo, sh.lo, batch=b * h)  # probs^T @ g
        maps = b * h * n * n
        relative = spec.pos_embed == PosEmbed.relative_bias
        if softmax32 or (relative and sh.par > sh.lo):
            w.stream(name, "attention", amap, 2 * amap)
            w.stream(name, "attention", 4 * amap, 2 * amap, op="softmax_backward", elems=maps, elem_bytes=4)
            w.stream(name, "attention", 2 * amap, amap)
        else:  # softmax backward reads its output
            w.stream(name, "attention", 2 * amap, amap, op="softmax_backward", elems=maps, elem_bytes=sh.lo)
        if relative:  # the bias's gradient: summed over the batch, put into a zero table
            w.stream(p + "attn/relative_bias", "attention", maps * (4 if sh.par > sh.lo else sh.lo), h * n * n * sh.par)
            w.stream(p + "attn/relative_bias", "attention", h * n * n * sh.par + n * n * 8, h * n * n * sh.par,
                     launches=2)
        if wl.attention == AttentionKernel.eager_postscale:
            w.stream(name, "attention", amap, amap)
        w.gemm(p + "attn/q_kT", "attention", n, hd, n, sh.lo, sh.lo, sh.lo, batch=b * h)  # g @ k
        w.gemm(p + "attn/q_kT", "attention", hd, n, n, sh.lo, sh.lo, sh.lo, batch=b * h)  # q^T @ g
        if wl.attention != AttentionKernel.eager_postscale:
            w.stream(name, "attention", t, t)  # times the scale
    if spec.impl == Impl.hf:
        w.stream(name, "attention", 3 * t, 3 * t, launches=3)  # each head-split gradient made contiguous
    else:
        w.stream(name, "attention", 3 * t, 3 * t)  # unbind's backward stacks q, k, v
        w.stream(name, "attention", 3 * t, 3 * t)  # the permuted stack copied to (B, N, 3D)


def _block_backward(w: _Walk, spec: ViTSpec, wl: Workload) -> None:
    sh = w.sh
    rows, d, f = sh.b * sh.n, sh.d, sh.f
    p = "blocks/"
    ln = 4 if sh.ln_upcast else sh.res
    g = _branch_backward(w, spec, wl, p + "mlp/fc2", rows)
    _linear_backward(w, p + "mlp/fc2", rows, f, d, g, sh.lo)
    if spec.mlp == Mlp.swiglu:
        w.stream(p + "mlp/act", "memory", rows * 3 * f * sh.lo, rows * 2 * f * sh.lo, launches=3,
                 op="silu_backward", elems=rows * f, elem_bytes=sh.lo)
        gi = _linear_backward(w, p + "mlp/fc1", rows, d, 2 * f, sh.lo, ln)
    else:
        w.stream(p + "mlp/act", "memory", rows * 2 * f * sh.lo, rows * f * sh.lo, op="gelu_backward",
                 elems=rows * f, elem_bytes=sh.lo)
        gi = _linear_backward(w, p + "mlp/fc1", rows, d, f, sh.lo, ln)
    _layernorm_backward(w, p + "norm2", rows, d, gi)
    w.stream(p + "norm2", "memory", 2 * rows * d * sh.res, rows * d * sh.res)  # the residual's two gradients added
    g = _branch_backward(w, spec, wl, p + "attn/proj", rows)
    _linear_backward(w, p + "attn/proj", rows, d, d, g, sh.lo)
    _attention_backward(w, spec, wl, p)
    _rope(w, spec, p, backward=True)
    if spec.impl == Impl.hf:
        for i in range(3):
            gi = _linear_backward(w, p + "attn/qkv", rows, d, d, sh.lo, ln)
            if i:
                w.stream(p + "attn/qkv", "memory", 2 * rows * d * gi, rows * d * gi)  # the input's gradients added
    else:
        gi = _linear_backward(w, p + "attn/qkv", rows, d, 3 * d, sh.lo, ln)
    _layernorm_backward(w, p + "norm1", rows, d, gi)
    w.stream(p + "norm1", "memory", 2 * rows * d * sh.res, rows * d * sh.res)


def _branch_backward(w: _Walk, spec: ViTSpec, wl: Workload, name: str, rows: int) -> int:
    """Drop-path's and LayerScale's backward; returns the gradient's element bytes as it
    reaches the linear."""
    sh = w.sh
    d = sh.d
    if spec.drop_path and wl.training:
        w.stream(name, "memory", 2 * rows * d * sh.res, rows * d * sh.res)
    if spec.layer_scale:
        w.stream(name, "memory", rows * d * sh.res, rows * d * sh.res)  # g * gamma
        w.stream(name, "memory", rows * d * (sh.res + sh.lo), d * 4, launches=2)  # gamma's: (g * x).sum
    return sh.res


def _epilogue_backward(w: _Walk, spec: ViTSpec) -> None:
    sh = w.sh
    b, d = sh.b, sh.d
    heads = 1 + int(spec.dist_token)
    logits = heads * b * spec.classes
    w.stream("loss", "memory", logits * 8, logits * 4, launches=2 * heads)
    ln = 4 if sh.ln_upcast else sh.res
    width = 2 if spec.pooling == Pooling.token_avg else 1
    for i in range(heads):
        _linear_backward(w, "head", b, width * d, spec.classes, 4 if sh.amp else sh.lo, ln)
    rows = b if spec.pooling == Pooling.avg else b * sh.n
    if spec.pooling != Pooling.avg:
        w.stream("norm", "memory", 0, rows * d * ln)  # the class row's gradient scattered into zeros
    _layernorm_backward(w, "norm", rows, d, ln)
    if spec.pooling == Pooling.avg:
        w.stream("norm", "memory", b * d * sh.res, b * sh.n * d * sh.res)  # the mean's gradient expanded


def _prologue_backward(w: _Walk, spec: ViTSpec) -> None:
    sh = w.sh
    b, d = sh.b, sh.d
    rows = b * sh.n
    if spec.pos_embed == PosEmbed.learned:
        w.stream("pos_embed", "memory", rows * d * sh.res, sh.pos * d * 4)  # summed over the batch
    if spec.prefix_tokens or spec.impl == Impl.hf:
        w.stream("prefix_tokens", "memory", rows * d * sh.res, b * sh.patches * d * sh.lo)  # the cat's slice, cast
    # the conv's weight gradient; the image needs none
    _linear_backward(w, "patch_embed", b * sh.patches, sh.conv_w // d, d, sh.lo, sh.lo, input_grad=False)


# --- Swin ---------------------------------------------------------------------------------------


def _swin_windows(w: _Walk, st, shifted: int, backward: bool = False) -> None:
    """A Swin block's own passes over its tokens (``vitcost.swin``): the pad's copy, the roll
    (shifted blocks), the window partition and reverse (copies when a row holds more than one
    window), the roll back; the bias gathered from its table and copied, added to the scores
    (with the mask, the mask's sum first); backward, each copy's gradient and the bias's sum
    into its table. ``shifted``: how many of the ``w.count`` blocks roll."""
    sh = w.sh
    rows, d = sh.b * sh.n, sh.d
    tok = rows * d * sh.res
    h, n, maps = sh.h, sh.n, sh.b * sh.h * sh.n * sh.n
    table = h * n * n * sh.par
    copies = 2 + (2 if st.windows > st.grid_h // st.window else 0)  # pad, residual's view; partition, reverse
    plain = w.count - shifted
    for count, rolls in ((plain, 0), (shifted, 2)):
        if not count:
            continue
        w.count = count
        w.stream("blocks/attn/windows", "memory", (copies + rolls) * tok, (copies + rolls) * tok,
                 launches=copies + rolls)
        if backward:
            w.stream("blocks/attn/relative_bias", "attention", maps * sh.lo, table + table, launches=3)
        else:
            w.stream("blocks/attn/relative_bias", "attention", 2 * table + n * n * 8, 2 * table, launches=2)
            bias = table if not rolls else maps * max(sh.par, sh.res)
            if rolls:  # the mask expanded over the batch and added to the bias
                w.stream("blocks/attn/relative_bias", "attention", table + maps * sh.res, bias, launches=2)
            w.stream("blocks/attn/relative_bias", "attention", maps * sh.lo + bias, maps * max(sh.par, sh.lo))
    w.count = plain + shifted


def _swin_step(w: _Walk, spec: ViTSpec, wl: Workload) -> None:
    """A Swin step: the patch embedding and its norm, each stage's blocks (Hugging Face's layer
    at the stage's width on B x windows batches of M^2 tokens) with their window passes, patch
    merging, the final norm, the mean and the head; backward in reverse."""
    from vitcost.swin import stage_shapes, stages

    top, b = w.sh, w.sh.b
    sts = stages(spec)
    first, last = stage_shapes(top, sts[0], b), stage_shapes(top, sts[-1], b)
    w.sh = first
    rows0 = b * sts[0].tokens
    if first.amp:
        w.stream("patch_embed", "memory", b * first.image * 4, b * first.image * first.lo)
    w.gemm("patch_embed", "matmul", rows0, spec.dim, first.conv_w // spec.dim, first.lo, first.lo, first.lo)
    _layernorm(w, "patch_embed", rows0, spec.dim)

    def merge(st, backward: bool) -> None:
        rows = b * st.tokens // 4
        if backward:
            _linear_backward(w, "patch_merging", rows, 4 * st.dim, 2 * st.dim, w.sh.res, 4 if w.sh.ln_upcast else w.sh.res)
            _layernorm_backward(w, "patch_merging", rows, 4 * st.dim, w.sh.res)
            w.stream("patch_merging", "memory", 8 * rows * 4 * st.dim * w.sh.res, 4 * rows * 4 * st.dim * w.sh.res,
                     launches=12)  # each quarter's two slices put into zeros, summed
        else:
            w.stream("patch_merging", "memory", rows * 4 * st.dim * w.sh.res, rows * 4 * st.dim * w.sh.res)  # cat
            ln = _layernorm(w, "patch_merging", rows, 4 * st.dim)
            _linear(w, "patch_merging", rows, 4 * st.dim, 2 * st.dim, ln)

    for st in sts:
        w.sh = stage_shapes(top, st, b)
        w.count = st.depth
        _block_forward(w, spec, wl)
        _swin_windows(w, st, sum(st.shifted(j) for j in range(st.depth)))
        w.count = 1
        if st.merges:
            merge(st, False)
    w.sh = last
    rows = b * sts[-1].tokens
    ln = _layernorm(w, "norm", rows, last.d)
    w.stream("norm", "memory", rows * last.d * ln, b * last.d * ln)  # the mean over tokens
    _linear(w, "head", b, last.d, spec.classes, ln)
    if not wl.training:
        w.sh = top
        return
    logits = b * spec.classes
    w.stream("loss", "memory", logits * last.lo, logits * 4 * 2, launches=2)
    w.phase = "backward"
    w.stream("loss", "memory", logits * 8, logits * 4, launches=2)
    _linear_backward(w, "head", b, last.d, spec.classes, 4 if last.amp else last.lo, ln)
    w.stream("norm", "memory", b * last.d * last.res, rows * last.d * last.res)  # the mean's gradient expanded
    _layernorm_backward(w, "norm", rows, last.d, last.res)
    for st in reversed(sts):
        w.sh = stage_shapes(top, st, b)
        if st.merges:
            merge(st, True)
        w.count = st.depth
        _block_backward(w, spec, wl)
        _swin_windows(w, st, sum(st.shifted(j) for j in range(st.depth)), backward=True)
        w.count = 1
    w.sh = first
    _layernorm_backward(w, "patch_embed", rows0, spec.dim, first.res)
    _linear_backward(w, "patch_embed", rows0, first.conv_w // spec.dim, spec.dim, first.lo, first.lo,
                     input_grad=False)
    w.sh = top


# --- the optimizer ----------------------------------------------------------------------------

# Bytes read + written per parameter element of fp32 state, and the passes over the
# parameters, of each optimizer's step as PyTorch writes it (torch/optim/adamw.py, sgd.py):
# AdamW: params *= 1 - lr wd; exp_avg.lerp_(g); exp_avg_sq *= b2; exp_avg_sq += (1 - b2) g^2;
# denom = sqrt(exp_avg_sq) / bc2 + eps (three passes); params.addcdiv_(exp_avg, denom).
_OPTIMIZER_PASSES = {
    Optimizer.adamw: (80, 8),
    Optimizer.adam: (72, 7),
    Optimizer.sgd_momentum: (32, 3),  # buf *= m; buf += g; params -= lr buf
    Optimizer.sgd: (12, 1),
}
# torch's multi_tensor_apply: 65,536-element chunks, at most 320 blocks and (for 4 lists) 36
# tensors per launch (aten/src/ATen/native/cuda/MultiTensorApply.cuh).
_CHUNK, _BLOCKS, _TENSORS = 65536, 320, 36


def _optimizer(w: _Walk, wl: Workload, sizes: tuple[int, ...], chunks: int) -> None:
    sh = w.sh
    w.phase, w.count = "optimizer", 1
    elems = sum(sizes)
    per_elem, passes = _OPTIMIZER_PASSES[wl.optimizer]
    scale = wl.master_bytes / 4  # (the parameters stepped: fp32 under FSDP's mixed precision)
    if wl.keep_grads:  # zero_grad() writes zeros into the gradients the optimizer steps with
        w.stream("optimizer", "optimizer", 0, elems * wl.master_bytes, launches=len(sizes))
    if sh.cuda:  # foreach (the CUDA default): a few launches per pass over every tensor
        launches = passes * max(math.ceil(len(sizes) / _TENSORS), math.ceil(chunks / _BLOCKS))
    else:  # one kernel per pass and tensor (the CPU default)
        launches = passes * len(sizes)
    w.stream("optimizer", "optimizer", int(elems * per_elem * scale), 0, launches=launches)  # read + written


# --- a step ---------------------------------------------------------------------------------


def _weight_casts(w: _Walk, spec: ViTSpec, sizes: tuple[int, ...], matrices: int) -> None:
    """Autocast's low-precision copies of the matmul weights, made once per forward."""
    sh = w.sh
    if sh.amp:
        w.stream("autocast", "memory", matrices * 4, matrices * sh.lo, launches=len(sizes))


@lru_cache(maxsize=1024)
def _weights(spec: ViTSpec) -> tuple[tuple[int, ...], int, int]:
    """Elements of every parameter tensor, of the matmul weights among them, and the
    tensors' 65,536-element chunks (``multi_tensor_apply``'s)."""
    tensors = param_tensors(spec)
    sizes = tuple(e for _, e in tensors if e)
    return (sizes, sum(e for path, e in tensors if path.endswith("weight") and "norm" not in path),
            sum(-(-s // _CHUNK) for s in sizes))


def param_elements(spec: ViTSpec) -> int:
    """Elements of every parameter: what data parallel all-reduces (as gradients) and ZeRO-1
    all-gathers (as parameters)."""
    return sum(_weights(spec)[0])


@lru_cache(maxsize=1024)
def _stepped(spec: ViTSpec, ranks: int, rank: int, fsdp: bool = False) -> tuple[tuple[int, ...], int]:
    """Elements of the parameters one rank's optimizer steps under ZeRO-1 (its share), or
    under FSDP (``ranks``: the shard group's; each parameter's unpadded chunk), and their chunks."""
    shares = sharding.shards(spec, ranks, rank) if fsdp else (n for _, n in zero_shares(spec, ranks)[rank])
    sizes = tuple(n for n in shares if n)
    return sizes, sum(-(-s // _CHUNK) for s in sizes)


@lru_cache(maxsize=1024)
def step_kernels(spec: ViTSpec, wl: Workload, sh: Shapes) -> tuple[Kernel, ...]:
    """Every kernel of one step (a training step, or one forward under no_grad) in order."""
    why = why_not(spec)
    if why:
        raise NotModelled(why)
    w = _Walk(sh)
    sizes, matrices, chunks = _weights(spec)
    if wl.fsdp:
        stepped, stepped_chunks = _stepped(spec, wl.shard_ranks, wl.shard_rank, fsdp=True)
    elif wl.shards_optimizer:
        stepped, stepped_chunks = _stepped(spec, wl.ranks, wl.rank)
    else:
        stepped, stepped_chunks = sizes, chunks
    _weight_casts(w, spec, sizes, matrices)
    if spec.swin is not None:
        _swin_step(w, spec, wl)
        if wl.training:
            _optimizer(w, wl, stepped, stepped_chunks)
        return tuple(w.out)
    _prologue_forward(w, spec)
    w.count = spec.depth
    _block_forward(w, spec, wl)
    w.count = 1
    _epilogue_forward(w, spec, wl)
    if not wl.training:
        return tuple(w.out)
    w.phase = "backward"
    _epilogue_backward(w, spec)
    w.count = spec.depth
    if wl.checkpointing == Checkpointing.full:
        w.phase = "recompute"
        _block_forward(w, spec, wl, recompute=True)
        w.phase = "backward"
    _block_backward(w, spec, wl)
    w.count = 1
    _prologue_backward(w, spec)
    _optimizer(w, wl, stepped, stepped_chunks)
    return tuple(w.out)


def model_macs(kernels: tuple[Kernel, ...]) -> int:
    """MACs of the step as the model defines it: every matmul and attention MAC of forward and
    backward, none of a checkpoint's recompute; the fused backward's recomputed scores count
    as the two matmuls of an eager backward would, not five."""
    total = 0
    for kern in kernels:
        if kern.phase == "recompute":
            continue
        macs = kern.macs
        if kern.kind == FLASH and kern.phase == "backward":
            macs = macs * 4 // 5
        total += macs * kern.count
    return total


# --- every batch from two -------------------------------------------------------------------


def at_batch(spec: ViTSpec, wl: Workload) -> tuple[Kernel, ...]:
    """The step's kernels at ``wl.batch``, memory-bound ones summed per group and phase (their
    time is their bytes over the bandwidth, so the sum prices the same)."""
    return _merged(step_kernels(spec, wl, shapes_of(spec, wl)))


def lines(spec: ViTSpec, wl: Workload) -> Optional[tuple]:
    """The kernels of every batch from 2 on as lines (``vitcost.timing.Line``), or None at
    batch 1, which has a kernel list of its own.

    Every kernel's bytes, MACs and the one matmul dimension that holds the batch are affine in
    the batch, and which kernels run does not depend on it past batch 1 (eager attention copies
    its operands from batch 2 on): the list is built at batches 2 and 3 once per structure, and
    any other batch is a line through them.
    """
    if wl.batch == 1:
        return None
    return _lines(spec, wl.model_copy(update={"batch": 2}))


@lru_cache(maxsize=1024)
def _lines(spec: ViTSpec, wl2: Workload) -> tuple:
    from vitcost.timing import lines_of

    sh2 = shapes_of(spec, wl2)
    two = _merged(step_kernels(spec, wl2, sh2))
    # past batch 1 the batch enters the kernels through Shapes.b alone
    three = _merged(step_kernels(spec, wl2, replace(sh2, b=3)))
    if [(k.name, k.kind, k.phase) for k in two] != [(k.name, k.kind, k.phase) for k in three]:  # pragma: no cover
        raise AssertionError("the kernel list changed between batches 2 and 3")
    return lines_of(two, three)


def _merged(kernels: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
    """Memory-bound kernels summed per (group, phase), each counted ``count`` times; the
    matmuls, the fused attention kernels and the pointwise operators as they are."""
    out: list[Kernel] = []
    streams: dict[tuple[str, str], list[int]] = {}
    for k in kernels:
        if k.kind != STREAM or k.op:
            out.append(k)
            continue
        acc = streams.setdefault((k.group, k.phase), [0, 0])
        acc[0] += k.bytes * k.count
        acc[1] += k.launches * k.count
    out += [Kernel(f"{group} ({phase})", phase, group, STREAM, total, launches=launches)
            for (group, phase), (total, launches) in streams.items()]
    return tuple(out)
