"""The Swin family: Hugging Face's ``SwinForImageClassification``, its geometry and its step.

A *model* like ``vitcost.memory``'s ViT, composed of the same operator pieces
(``vitcost.ops``): the patch embedding and its norm; per stage, blocks on a grid cut into
M x M windows (``window_partition``: a copy), every second block's grid rolled by M / 2 first
and its windows' attention masked where the roll brought far patches together (the mask is
built every forward); each block's attention is Hugging Face's (q, k, v and o projections,
the eager kernel or SDPA) on the B x windows window batches, with the relative position bias
gathered from its table and added to the scores (with the mask, a combined bias of the
whole score size); the windows put back (``window_reverse``) and rolled back; between
stages, patch merging (the four interleaved sub-grids concatenated, 4C wide, normed and
projected to 2C). Then the final norm, the tokens' mean, the classifier.

Every block is replayed (no lumps: the stages differ), so no program is compiled for it.
Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from vitcost.ops import (
    Grads,
    Shapes,
    attention_core_backward,
    attention_core_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    gelu_mlp_backward,
    kernel_sizes,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    relative_bias_backward,
    relative_bias_forward,
)
from vitcost.replay import B, F, S, Replay
from vitcost.specs import AttentionKernel, ViTSpec, Workload
from vitcost.vit_hf import qkv_backward

QKV = ("q", "k", "v")
INDEX = 8  # int64


@dataclass(frozen=True)
class Stage:
    """One stage: its blocks, width, heads, grid and windows (as Hugging Face clamps them)."""

    index: int
    depth: int
    dim: int
    heads: int
    mlp_hidden: int
    grid_h: int
    grid_w: int
    window: int  # M
    shift: int  # the odd blocks' roll: M / 2, or 0 where the grid is no larger than a window
    merges: bool  # patch merging follows (every stage but the last)

    @property
    def tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def windows(self) -> int:
        return (self.grid_h // self.window) * (self.grid_w // self.window)

    @property
    def window_tokens(self) -> int:
        """N = M x M: what each window's attention runs on."""
        return self.window * self.window

    @property
    def attention_elements(self) -> int:
        """Attention-map elements of one block per image: heads x windows x N x N."""
        return self.heads * self.windows * self.window_tokens ** 2

    def shifted(self, j: int) -> bool:
        """Block ``j`` of the stage rolls its grid (and masks its windows)."""
        return j % 2 == 1 and self.shift > 0


@lru_cache(maxsize=1024)
def stages(spec: ViTSpec) -> tuple[Stage, ...]:
    sw = spec.swin
    gh, gw = spec.grid_h, spec.grid_w
    out = []
    for s, (depth, heads) in enumerate(zip(sw.depths, sw.heads)):
        if s:
            gh, gw = gh // 2, gw // 2
        dim = spec.dim << s
        clamped = min(gh, gw) <= sw.window  # Hugging Face's set_shift_and_window_size
        window = min(gh, gw) if clamped else sw.window
        out.append(Stage(s, depth, dim, heads, int(sw.mlp_ratio * dim), gh, gw, window,
                         0 if clamped else sw.window // 2, s < len(sw.depths) - 1))
    return tuple(out)


def bias_entries(spec: ViTSpec) -> int:
    """Rows of each block's relative position bias table: (2M - 1)^2."""
    return (2 * spec.swin.window - 1) ** 2


# --- the step ---------------------------------------------------------------------------------


def stage_shapes(sh: Shapes, st: Stage, batch: int) -> Shapes:
    """A stage's sizes as its attention sees them: B x windows window batches of N = M^2
    tokens (so that ``b * n`` is still every token of the batch), its width, heads and MLP."""
    bw = batch * st.windows
    return replace(sh, b=bw, n=st.window_tokens, d=st.dim, f=st.mlp_hidden, h=st.heads, one=bw == 1,
                   one_head=st.heads == 1, **kernel_sizes(st.window_tokens, st.dim, st.heads, sh.cuda, sh.lo))


def _math(sh: Shapes, grad: bool) -> bool:
    """SDPA runs its math fallback: on the CPU, for the bias (which needs a gradient)."""
    return grad and not sh.cuda


def _attention_mask(r: Replay, p: str, st: Stage, e: int) -> None:
    """``get_attn_mask``, built every forward of a shifted block: each position's region of the
    roll (int64 index arithmetic over the grid's rows and columns), cut into windows like the
    tokens, and the (windows, N, N) mask of pairs from different regions (-100) in the stream's
    dtype ``e``, which the layer holds until it returns."""
    h, w, nw, n = st.grid_h, st.grid_w, st.windows, st.window_tokens
    r.alloc(p + "m.h", h * INDEX, F)  # arange
    r.alloc(p + "m.w", w * INDEX, F)
    for axis, size in (("h", h), ("w", w)):  # (i >= size - M).long() + (i >= size - shift).long()
        for k in (0, 1):
            r.alloc(f"{p}m.{axis}.ge", size, F)
            r.alloc(f"{p}m.{axis}.l{k}", size * INDEX, F)
            r.free(f"{p}m.{axis}.ge")
        r.alloc(f"{p}m.{axis}.region", size * INDEX, F)
        r.free(f"{p}m.{axis}.l0", f"{p}m.{axis}.l1")
    r.alloc(p + "m.h3", h * INDEX, F)  # h_region * 3
    r.alloc(p + "m.sum", h * w * INDEX, F)  # + w_region
    r.free(p + "m.h3")
    r.alloc(p + "m.img", h * w * e, F)  # .to(dtype)
    r.free(p + "m.sum")
    if st.grid_w // st.window > 1:  # window_partition copies
        r.alloc(p + "m.win", h * w * e, F)
    r.alloc(p + "m.diff", nw * n * n * e, F)
    r.alloc(p + "m.ne", nw * n * n, F)  # bool
    r.alloc(p + "m.fill", nw * n * n * e, F)
    r.free(p + "m.ne")
    r.alloc(p + "m.eq", nw * n * n, F)
    r.alloc(p + "mask", nw * n * n * e, F)
    r.free(p + "m.fill", p + "m.eq", p + "m.diff", p + "m.h", p + "m.w", p + "m.h.region", p + "m.w.region",
           p + "m.img", p + "m.win")


def block_forward(r: Replay, i: int, j: int, st: Stage, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool,
                   nxt: str) -> None:
    """``SwinLayer.forward`` (block ``j`` of stage ``st``, block ``i`` of the model) on ``b{i}.in``,
    leaving ``nxt``."""
    p = f"b{i}."
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    keep = S if grad else F
    shifted = st.shifted(j)
    copies = st.grid_w // st.window > 1  # window_partition and window_reverse copy
    sdpa = wl.attention == AttentionKernel.sdpa
    math = sdpa and _math(sh, grad)
    up = sh.ln_upcast
    cast = sh.casts or up  # the linears after a norm cast its output down
    r.where = f"forward: stages.{st.index}.blocks.{j}.attn"
    layernorm_forward(r, sh, p + "ln1", F, keep, grad, upcast=up)
    e_ln = 4 if up else sh.res
    tok = bn * d * e_ln
    r.alloc(p + "pad", tok, F)  # maybe_pad: F.pad copies even when it pads nothing
    r.free(p + "ln1")
    src = p + "pad"
    if shifted:
        r.alloc(p + "roll", tok, F)
        src = p + "roll"
    win = src
    if copies:
        r.alloc(p + "win", tok, F)
        win = p + "win"
        if shifted:
            r.free(p + "roll")
    if shifted:
        _attention_mask(r, p, st, e_ln)
    # q, k, v read the windows: saved by them (cast copies under autocast, the windows then free)
    if grad and not cast:
        r.retag(win, S)
    out_cat = S if (grad and (sdpa or sh.eager_views)) else F
    for name in QKV:
        linear_forward(r, sh, p, name, d * d, d if spec.qkv_bias else 0, bn * d if cast else 0, bn * d,
                       out_cat, grad)
    # the relative position bias: table[index], viewed (N, N, H), permuted to (H, N, N), contiguous
    n, h = sh.n, sh.h
    bias = h * n * n * sh.par
    relative_bias_forward(r, sh, p, bias)
    comb, comb_elems = p + "bias", h * n * n
    if shifted:  # the mask expanded over the batch (reshape copies, but at batch 1), added to the bias
        if sh.b > st.windows:
            r.alloc(p + "mask.x", sh.b * n * n * e_ln, F)
        comb, comb_elems = p + "comb", sh.b * h * n * n
        r.alloc(comb, comb_elems * max(sh.par, e_ln), S if (grad and sdpa and not math) else F)
    if sdpa:  # on the CPU a mask that needs a gradient sends SDPA to its math fallback
        if sh.amp:  # autocast casts the (fp32) mask for SDPA (a fused kernel saves the cast)
            r.alloc(p + "comb.lo", comb_elems * sh.lo, S if (grad and not math) else F)
        attention_core_forward(r, sh, p, AttentionKernel.sdpa, grad, bias_given=True, math=math,
                               call_temps=(p + "comb.lo",))
        if not (grad and not math):
            r.free(p + "comb.lo")
    else:
        attention_core_forward(r, sh, p, AttentionKernel.eager_postscale, grad, explicit32=True, bias_given=True)
    linear_forward(r, sh, p, "proj", d * d, d, 0, bn * d, F, grad)
    # the attention returns: its q, k, v (unless saved), the bias, the expanded mask and the sum go
    if not grad:
        r.free(p + "attn", *(p + x for x in QKV))
    elif (math or not sdpa) and not sh.eager_views:
        r.free(*(p + x for x in QKV))
    r.free(p + "bias", p + "mask.x")
    if not (grad and sdpa and not math):
        r.free(p + "comb")
    # window_reverse (a copy), the roll back, the residual
    back = p + "proj"
    if copies:
        r.alloc(p + "rev", bn * d * sh.lo, F)
        back = p + "rev"
    if shifted:
        r.alloc(p + "unroll", bn * d * sh.lo, F)
        if copies:
            r.free(p + "rev")
        back = p + "unroll"
    r.alloc(p + "x1", sh.tok, keep)  # shortcut + attention windows
    if win != p + "pad":
        r.free(p + "pad")  # ``hidden_states`` is rebound (the windows, a view of it otherwise, hold it)
    r.where = f"forward: stages.{st.index}.blocks.{j}.mlp"
    layernorm_forward(r, sh, p + "ln2", F if (cast or not grad) else S, keep, grad, upcast=up)
    linear_forward(r, sh, p, "fc1", f * d, f, bn * d if cast else 0, bn * f, keep, grad)
    r.alloc(p + "gelu", sh.hid, keep)
    if not grad:
        r.free(p + "fc1")  # (the norm's output is the layer's until the MLP returns)
    linear_forward(r, sh, p, "fc2", d * f, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "gelu")
    if cast or not grad:
        r.free(p + "ln2")
    r.alloc(nxt, sh.tok, keep)
    # the layer returns: what it held goes
    r.free(p + "fc2", p + "mask", p + "proj", back)
    if cast or not grad:
        r.free(win)  # (unless the projections saved it)
    if not grad:
        r.free(p + "x1")
        if j:  # (a stage's input is its caller's until the stage returns)
            r.free(p + "in")


def _merge_forward(r: Replay, st: Stage, sh: Shapes, grad: bool, x: str, nxt: str) -> None:
    """``SwinPatchMerging``: the four interleaved sub-grids concatenated (B, L/4, 4C), its 4C
    norm, the 4C -> 2C reduction (no bias): the next stage's input ``nxt``."""
    keep = S if grad else F
    up = sh.ln_upcast
    cast = sh.casts or up
    rows = sh.b * sh.n // 4
    p = f"s{st.index}."
    r.where = f"forward: stages.{st.index}.merging"
    r.alloc(p + "m.cat", sh.tok, S if (grad and not up) else F)
    msh = replace(sh, b=rows, n=1, d=4 * sh.d)
    layernorm_forward(r, msh, p + "m.ln", F if (cast or not grad) else S, keep, grad, upcast=up)
    if up or not grad:
        r.free(p + "m.cat")
    linear_forward(r, msh, p, "m.red", 8 * sh.d * sh.d, 0, rows * 4 * sh.d if cast else 0, rows * 2 * sh.d,
                   keep, grad)
    r.rename(p + "m.red", nxt)
    if cast or not grad:
        r.free(p + "m.ln")


def forward(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, grad: bool, image_elems: int) -> None:
    """The patch embedding and its norm, the stages, the final norm, the mean, the head, and
    (training) the loss."""
    keep = S if grad else F
    up = sh.ln_upcast
    b = sh.b
    sts = stages(spec)
    r.where = "forward: patch embedding"
    first = stage_shapes(sh, sts[0], b)
    linear_forward(r, first, "", "patches", sh.conv_w, sh.d, image_elems, b * spec.patch_tokens * sh.d,
                   S if (grad and not up) else F, grad)
    layernorm_forward(r, first, "emb", F, keep, grad, upcast=up)
    if up or not grad:
        r.free("patches")
    r.rename("emb", "b0.in")
    r.retag("b0.in", keep)
    i = 0
    held = ()  # what the encoder holds until the next stage returns: its reshaped state, its weights
    for st in sts:
        ssh = stage_shapes(sh, st, b)
        stage_in = f"b{i}.in"
        probs = ""  # the last layer's attention weights, held by the stage's loop (no_grad, eager)
        for j in range(st.depth):
            block_forward(r, i, j, st, ssh, spec, wl, grad, f"b{i + 1}.in")
            r.free(probs)
            probs = "" if grad else f"b{i}.probs"
            i += 1
        x = f"b{i}.in"
        if st.merges:
            _merge_forward(r, st, ssh, grad, x, f"b{i}.merged")
        r.alloc(f"s{st.index}.reshaped", ssh.b * ssh.n * ssh.d * ssh.res // (2 if st.merges else 1), F)
        if st.merges:
            r.free(x)  # ``hidden_states_before_downsampling``: nothing saved it
            r.rename(f"b{i}.merged", x)
        r.free(*held)  # the stage returns: the encoder rebinds what it held
        if not grad and st.index:
            r.free(stage_in)
        held = (f"s{st.index}.reshaped", probs)
    r.free(*held)  # the encoder returns
    last = stage_shapes(sh, sts[-1], b)
    x = f"b{i}.in"
    r.where = "forward: norm + head"
    layernorm_forward(r, last, "norm", F, keep, grad, upcast=up)
    if grad and not up:
        r.retag(x, S)
    pooled = b * last.d
    r.alloc("pooled", pooled * (4 if up else sh.res), S if (grad and not (sh.casts or up)) else F)
    if not grad:
        r.free(x, "b0.in")  # the backbone returns: the encoder's output and the embeddings go
    linear_forward(r, last, "", "head", spec.classes * last.d, spec.classes, pooled if (sh.casts or up) else 0,
                   b * spec.classes, F, grad)
    r.free("norm")  # the model's output goes once its logits are read
    if not grad:
        r.free("pooled")
        r.free_matching(".bc")
        r.free_matching(".wc")
        return
    if sh.casts or up:
        r.free("pooled")
    cross_entropy_forward(r, replace(sh, classes=spec.classes), "head")
    r.free_matching(".bc")  # autocast exits: bias copies go; weight copies stay saved
    r.alloc("seed", sh.par, F)


def _block_backward(r: Replay, gr: Grads, i: int, j: int, st: Stage, sh: Shapes, spec: ViTSpec, wl: Workload,
                    g: str, out: str) -> None:
    """Block ``i``'s backward from ``g`` (its output's gradient) to ``out`` (its input's)."""
    p = f"b{i}."
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    casts = sh.casts
    up = sh.ln_upcast
    shifted = st.shifted(j)
    copies = st.grid_w // st.window > 1
    sdpa = wl.attention == AttentionKernel.sdpa
    r.where = f"backward: stages.{st.index}.blocks.{j}.mlp"
    gfc2 = linear_backward(r, gr, sh, p, "fc2", bn * d, bn * f, d * f, d, casts, False, (p + "gelu",))
    gfc1 = gelu_mlp_backward(r, gr, sh, p, gfc2, casts or up)
    layernorm_backward(r, gr, sh, p, "ln2", gfc1, p + "x1", upcast=up)
    r.alloc(p + "g.x1", sh.tok, B)  # the residual: the incoming gradient plus the MLP branch's
    r.free(p + "g.ln2in", g)
    gr.accumulate(p + "ln2.w", p + "ln2.b")
    r.where = f"backward: stages.{st.index}.blocks.{j}.attn"
    g_att = p + "g.x1"
    tok_lo = bn * d * sh.lo
    if shifted:  # the roll back's backward: a roll
        r.alloc(p + "g.unroll", tok_lo, B)
        g_att = p + "g.unroll"
    if copies:  # window_reverse's backward: the windows' layout again
        r.alloc(p + "g.rev", tok_lo, B)
        r.free(*((p + "g.unroll",) if shifted else ()))
        g_att = p + "g.rev"
    math = sdpa and _math(sh, True)
    moved = (g_att,) if g_att != p + "g.x1" else ()  # (the residual's gradient is read again below)
    gproj = linear_backward(r, gr, sh, p, "proj", bn * d, bn * d, d * d, d, casts and not moved, False,
                            moved + (() if sdpa and not math else (p + "attn",)))
    n, h = sh.n, sh.h
    kernel = AttentionKernel.sdpa if sdpa else AttentionKernel.eager_postscale
    attention_core_backward(r, sh, p, gproj, kernel, explicit32=not sdpa, qkv=QKV, bias_grad=lambda: None,
                            bias_later=shifted, math=math, mask_cast=sh.amp)
    if sdpa and not math:
        # CUDA's memory-efficient kernel (derived from its source, not measured): the mask's
        # gradient at the scores' size, which the broadcast (or the mask's sum) reduces
        r.alloc(p + "g.comb", sh.b * h * n * n * sh.lo, B)
        r.free(p + "comb.lo", p + "comb")
        r.alloc(p + "g.bias", h * n * n * sh.par, B)
        r.free(p + "g.comb")
    # the bias's gradient, summed over the window batch, into its table (a zero table, index_put)
    relative_bias_backward(r, gr, sh, p, bias_entries(spec) * h)
    win = p + ("win" if copies else "roll" if shifted else "pad")
    # (the math fallback's k gradient comes from its scale's product: (B, H, N, hd) like q's)
    total = qkv_backward(r, gr, sh, p, spec.qkv_bias, win, eager=math or not sdpa, cast=casts or up, kT=not math)
    # window_partition's and the roll's backward, the pad's (a slice copy), then the norm's
    if copies:
        r.alloc(p + "g.win", bn * d * (4 if up else sh.res), B)
        r.free(total)
        total = p + "g.win"
    if shifted:
        r.alloc(p + "g.roll", bn * d * (4 if up else sh.res), B)
        r.free(total)
        total = p + "g.roll"
    r.alloc(p + "g.pad", bn * d * (4 if up else sh.res), B)
    r.free(total)
    layernorm_backward(r, gr, sh, p, "ln1", p + "g.pad", p + "in", upcast=up)
    r.alloc(out, sh.tok, B)
    r.free(p + "g.ln1in", p + "g.x1")
    gr.accumulate(p + "ln1.w", p + "ln1.b")


def _merge_backward(r: Replay, gr: Grads, st: Stage, sh: Shapes, g: str, out: str) -> None:
    """Patch merging's backward: the reduction, the 4C norm, the concatenation's (each quarter
    put into the grid's gradient)."""
    up = sh.ln_upcast
    cast = sh.casts or up
    rows = sh.b * sh.n // 4
    p = f"s{st.index}."
    msh = replace(sh, b=rows, n=1, d=4 * sh.d)
    r.where = f"backward: stages.{st.index}.merging"
    gin = linear_backward(r, gr, msh, p, "m.red", rows * 2 * sh.d, rows * 4 * sh.d, 8 * sh.d * sh.d, 0, False,
                          cast, (g, p + "m.ln"))
    layernorm_backward(r, gr, msh, p, "m.ln", gin, p + "m.cat", upcast=up)
    gr.accumulate(p + "m.ln.w", p + "m.ln.b")
    # each quarter's gradient (a view of the concatenation's) through its two strided slices,
    # a half-grid then a whole-grid tensor of zeros with it put in, summed as they come
    for k in range(4):
        r.alloc(f"{p}g.m.half{k}", sh.tok // 2, B)
        if k == 3:
            r.free(p + "g.m.lnin")  # the last view of it is done
        r.alloc(f"{p}g.m.full{k}", sh.tok, B)
        r.free(f"{p}g.m.half{k}")
        if k:
            r.alloc(f"{p}g.m.acc{k}", sh.tok, B)
            r.free(f"{p}g.m.acc{k - 1}" if k > 1 else p + "g.m.full0", f"{p}g.m.full{k}")
    r.rename(p + "g.m.acc3", out)


def backward(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, gr: Grads) -> None:
    """The loss, the head, the mean and the final norm, the stages in reverse (patch merging
    before each stage's blocks), the embedding's norm and the patch embedding."""
    b = sh.b
    sts = stages(spec)
    up = sh.ln_upcast
    last = stage_shapes(sh, sts[-1], b)
    r.where = "backward: loss + head"
    cross_entropy_backward(r, replace(sh, classes=spec.classes))
    pooled = b * last.d
    gin = linear_backward(r, gr, last, "", "head", b * spec.classes, pooled, spec.classes * last.d, spec.classes,
                          sh.amp, sh.casts or up, ("g.logits", "pooled"), free_first=("g.logits",))
    r.alloc("g.pool.z", pooled * sh.res, B)
    r.free(gin)
    r.alloc("g.mean", last.tok, B)  # the mean's backward: spread over the tokens
    r.free("g.pool.z")
    r.where = "backward: norm"
    i = spec.depth
    layernorm_backward(r, gr, last, "", "norm", "g.mean", f"b{i}.in", upcast=up)
    gr.accumulate("norm.w", "norm.b")
    g = "g.normin"
    for st in reversed(sts):
        ssh = stage_shapes(sh, st, b)
        if st.merges:
            _merge_backward(r, gr, st, ssh, g, f"g.s{st.index}.out")
            g = f"g.s{st.index}.out"
        for j in reversed(range(st.depth)):
            i -= 1
            _block_backward(r, gr, i, j, st, ssh, spec, wl, g, f"g.b{i}.in")
            g = f"g.b{i}.in"
    first = stage_shapes(sh, sts[0], b)
    r.where = "backward: patch embedding"
    layernorm_backward(r, gr, first, "", "emb", g, "patches", upcast=up)
    gr.accumulate("emb.w", "emb.b")
    d = sh.d
    gr.make("patch.w", sh.conv_w)
    gr.make("patch.b", d)
    r.free("g.embin", "patches.wc", "patches.ic")
    if sh.amp:
        gr.finish("patch.w", sh.conv_w)
        gr.finish("patch.b", d)
    else:
        gr.accumulate("patch.w", "patch.b")
    r.free("total_weight", "seed")
