"""Memory of a ViT training step or forward pass, replayed tensor by tensor.

PyTorch keeps alive exactly what the code references: the weights, the optimizer states,
the input batch, the tensors autograd saves for backward, the gradients as they form, and
each operator's outputs until their last user is done. This module writes that down as
a *replay*: for every operator of the reference model (``vitcost.reference_vit``, which
mirrors timm), the tensors it allocates and the ones that die after it, in execution
order, with sizes from closed-form shapes. The peak is the largest live total seen after
any allocation, which is what PyTorch's ``MemTracker`` measures on the CPU and what the
caching allocator's ``max_memory_allocated`` measures on CUDA (there with every tensor
rounded up to 512-byte blocks).

Depth costs nothing: blocks are identical, so the replay runs the first and the last
block in full and moves over the blocks between them in one step, which is exact because
every live total in block ``i`` is affine in ``i`` (the peak of a middle block lies between
those of the two ends).

Categories at the peak follow MemTracker's: weights, gradients, optimizer (states and the
optimizer's own temporaries), activations (the input batch, tensors saved for backward,
forward temporaries, autocast's weight copies) and temporaries (tensors made by backward).

Every size here is in bytes. docs/memory-model.md explains each rule and what measured it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vitcost.formulas import param_tensors, pos_embed_tokens
from vitcost.specs import (
    AttentionKernel,
    Checkpointing,
    Device,
    Optimizer,
    PosEmbed,
    Pooling,
    Precision,
    ViTSpec,
    Workload,
)

# Replay categories: weights, gradients, optimizer states, optimizer temporaries, inputs,
# saved for backward, forward temporaries, backward temporaries, autocast weight copies.
W, G, O, OT, I, S, F, B, WC = range(9)
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")
_REPORTED = ("weights", "gradients", "optimizer", "optimizer", "activations",
             "activations", "activations", "temporaries", "activations")

CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every tensor up to this
INDEX_BYTES = 8  # int64 class labels


@dataclass(frozen=True)
class MemoryResult:
    """What the replay found. Every figure in bytes."""

    weights: int
    gradients: int
    optimizer_states: int
    inputs: int
    activations: int  # saved for backward at the end of the forward pass (0 under no_grad)
    autocast_copies: int  # low-precision weight copies autocast holds at the end of forward
    peak: int
    transient: int  # at the peak: temporaries of forward, backward and the optimizer step
    peak_phase: str
    at_peak: dict[str, int]  # MemTracker's categories live at the peak
    saved_by_component: dict[str, int]  # activations saved for backward, by component


class Replay:
    """Live tensors by name, totals by category, and the peak."""

    __slots__ = ("live", "cat", "total", "peak", "peak_cat", "peak_where", "where", "round_to", "sampling", "totals")

    def __init__(self, round_to: int) -> None:
        self.live: dict[str, tuple[int, int]] = {}
        self.cat = [0] * 9  # live bytes by category
        self.total = 0
        self.peak = 0
        self.peak_cat = self.cat[:]
        self.peak_where = ""
        self.where = ""
        self.round_to = round_to
        self.sampling = True
        self.totals: list[int] = []

    FULL = False  # replay every block (a trace for the allocator), not the first and last only

    def alloc_parts(self, name: str, nbytes: int, parts: tuple[int, ...], cat: int) -> None:
        """Tensors that the replay only ever adds up (every parameter's weight, state or
        gradient): one entry of ``nbytes``; a trace keeps the ``parts`` apart."""
        self.alloc(name, nbytes, cat)

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        if nbytes <= 0:
            return
        if self.round_to != 1:
            nbytes = _round_up(nbytes, self.round_to)
        self.live[name] = (nbytes, cat)
        self.cat[cat] += nbytes
        total = self.total = self.total + nbytes
        if self.sampling:
            self.totals.append(total)
            if total > self.peak:
                self.peak = total
                self.peak_cat = self.cat[:]
                self.peak_where = self.where

    def local(self) -> tuple[int, list[int], str, int, list[int], int]:
        """Start a stretch whose own peak is wanted: returns the state to resume from."""
        saved = (self.peak, self.peak_cat, self.peak_where, self.total, self.cat[:], len(self.totals))
        self.peak = -1
        return saved

    def end_local(self, saved) -> "_Stretch":
        """Close a stretch: its own peak, relative to where it started, and its net change."""
        peak, peak_cat, peak_where, total0, cat0, mark = saved
        stretch = _Stretch(
            peak=self.peak - total0,
            peak_cat=[a - b for a, b in zip(self.peak_cat, cat0)],
            where=self.peak_where,
            totals=[t - total0 for t in self.totals[mark:]],
            change=[a - b for a, b in zip(self.cat, cat0)],
        )
        if peak >= self.peak:
            self.peak, self.peak_cat, self.peak_where = peak, peak_cat, peak_where
        return stretch

    def replay_shifted(self, stretch: "_Stretch", old: str, new: str, after: bool = False) -> None:
        """The same stretch again (an identical block elsewhere, its phase named with ``new``
        for ``old``), from the current state, or with ``after`` from the state the
        stretch's net change leads to the current one."""
        total, cat = self.total, self.cat
        if after:
            total -= sum(stretch.change)
            cat = [a - b for a, b in zip(cat, stretch.change)]
        self.totals.extend(total + t for t in stretch.totals)
        if total + stretch.peak > self.peak:
            self.peak = total + stretch.peak
            self.peak_cat = [a + b for a, b in zip(cat, stretch.peak_cat)]
            self.peak_where = stretch.where.replace(old, new)

    def free(self, *names: str) -> None:
        for name in names:
            entry = self.live.pop(name, None)
            if entry is not None:
                self.cat[entry[1]] -= entry[0]
                self.total -= entry[0]

    def retag(self, name: str, cat: int) -> None:
        entry = self.live.get(name)
        if entry is not None:
            self.cat[entry[1]] -= entry[0]
            self.cat[cat] += entry[0]
            self.live[name] = (entry[0], cat)

    def rename(self, old: str, new: str) -> None:
        self.live[new] = self.live.pop(old)

    def free_matching(self, suffix: str) -> None:
        self.free(*[n for n in self.live if n.endswith(suffix)])


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass
class _Stretch:
    """A stretch of the replay (one block's forward or backward), relative to its start."""

    peak: int
    peak_cat: list[int]
    where: str
    totals: list[int]
    change: list[int]


@dataclass(frozen=True)
class Shapes:
    """Element sizes and shapes of one step, for one spec and workload."""

    b: int
    n: int
    d: int
    f: int
    h: int
    patches: int  # patch tokens
    image: int  # elements of one input image, C * H * W
    conv_w: int  # patch embedding weight elements, D * C * P * P
    pos: int  # learned position embedding tokens
    classes: int
    registers: int
    lse_n: int  # rows of a fused attention kernel's softmax statistics
    n128: int  # tokens rounded up to 128 (CUDA flash backward workspaces)
    hd32: int  # head width rounded up to 32 (CUDA flash backward workspaces)
    params: int  # bytes of every parameter tensor as allocated
    states: int  # bytes of the optimizer states
    kept: int  # bytes of gradients kept between steps (zero_grad(set_to_none=False))
    opt_tmp: int  # bytes of the optimizer step's temporaries at their most
    one: bool  # batch 1
    one_head: bool
    res: int  # residual stream and LayerNorm output element bytes (fp32 under autocast)
    lo: int  # matmul output element bytes (the low precision under autocast)
    par: int  # parameter and gradient element bytes
    stat: int  # LayerNorm mean / rstd element bytes
    amp: bool
    cuda: bool
    # each tensor of ``params``, ``states``, ``kept`` and ``opt_tmp`` (allocator traces only)
    param_parts: tuple[int, ...] = ()
    state_parts: tuple[int, ...] = ()
    kept_parts: tuple[int, ...] = ()
    opt_tmp_parts: tuple[int, ...] = ()
    first_state_parts: tuple[int, ...] = ()  # states a first step creates (allocator traces only)

    @property
    def tok(self) -> int:  # (B, N, D) in the residual dtype
        return self.b * self.n * self.d * self.res

    @property
    def tok_lo(self) -> int:  # (B, N, D) as a matmul makes it
        return self.b * self.n * self.d * self.lo

    @property
    def hid(self) -> int:  # (B, N, F) MLP hidden
        return self.b * self.n * self.f * self.lo

    @property
    def stats(self) -> int:  # LayerNorm mean or rstd, (B, N, 1)
        return self.b * self.n * self.stat

    @property
    def amap(self) -> int:  # one layer's attention maps, (B, H, N, N)
        return self.b * self.h * self.n * self.n * self.lo

    @property
    def eager_views(self) -> bool:
        """Eager attention's 4-D matmul operands reshape to 3-D as views, not copies, when the
        batch or the head count is 1 (q, k, v keep the (B, N, H, hd) layout of the qkv output)."""
        return self.one or self.one_head

    @property
    def softmax_fp32(self) -> bool:
        """CUDA autocast runs softmax in fp32; CPU autocast (bf16) does not."""
        return self.amp and self.cuda


def shapes_of(spec: ViTSpec, wl: Workload) -> Shapes:
    """Every number the replay sizes a tensor from; the spec and workload otherwise only
    decide which tensors there are."""
    amp = wl.precision in (Precision.amp_bf16, Precision.amp_fp16)
    e = 2 if wl.precision in (Precision.bf16, Precision.fp16) else 4
    lo = 2 if amp else e
    cuda = wl.device == Device.cuda
    round_to = CUDA_BLOCK_BYTES if cuda else 1
    b, n, d = wl.batch, spec.tokens, spec.dim
    sizes = _param_bytes(spec, e, round_to)
    params = sum(sizes)
    train = wl.training
    adam = wl.optimizer in (Optimizer.adamw, Optimizer.adam)
    return Shapes(
        b=b, n=n, d=d, f=spec.mlp_hidden, h=spec.heads,
        patches=spec.patch_tokens, image=spec.channels * spec.image_h * spec.image_w,
        conv_w=d * spec.channels * spec.patch * spec.patch, pos=pos_embed_tokens(spec),
        classes=spec.classes, registers=spec.registers,
        # CPU flash and CUDA flash keep (B, H, N) statistics; CUDA memory-efficient (fp32
        # inputs) pads N to 32
        lse_n=_round_up(n, 32) if cuda and lo == 4 else n,
        n128=_round_up(n, 128), hd32=_round_up(d // spec.heads, 32),
        params=params,
        states=_optimizer_state_bytes(wl, sizes, cuda) if train else 0,
        kept=_kept_grad_bytes(spec, b, e, params, round_to) if train and wl.keep_grads else 0,
        opt_tmp=_optimizer_temporary_bytes(sizes, cuda) if train and adam else 0,
        one=b == 1, one_head=spec.heads == 1,
        res=e, lo=lo, par=e,
        # LayerNorm keeps its statistics in the input dtype on the CPU, fp32 on CUDA
        stat=4 if cuda else e,
        amp=amp, cuda=cuda,
    )


def _lse_bytes(sh: Shapes) -> int:
    """Per-row softmax statistics a fused attention kernel saves (fp32)."""
    return sh.b * sh.h * sh.lse_n * 4


# --- forward ------------------------------------------------------------------------------


def _linear_forward(r: Replay, sh: Shapes, p: str, name: str, w_elems: int, b_elems: int,
                    in_elems: int, out_elems: int, out_cat: int, grad: bool) -> None:
    """A linear layer. Under autocast: bias and weight copies (cached until autocast exits),
    and a low-precision copy of an fp32 input (``in_elems`` > 0), saved for backward."""
    if sh.amp:
        r.alloc(p + name + ".bc", b_elems * sh.lo, WC)
        r.alloc(p + name + ".wc", w_elems * sh.lo, WC)
        if in_elems:
            r.alloc(p + name + ".ic", in_elems * sh.lo, S if grad else F)
    r.alloc(p + name, out_elems * sh.lo, out_cat)
    if sh.amp and in_elems and not grad:
        r.free(p + name + ".ic")


def _prologue_forward(r: Replay, spec: ViTSpec, sh: Shapes, grad: bool, image_elems: int) -> None:
    """Patch embedding, prefix tokens, position embedding; leaves ``b0.in``."""
    saved = S if grad else F
    r.where = "forward: patch embedding"
    patch_elems = sh.b * sh.patches * sh.d
    _linear_forward(r, sh, "", "patches", sh.conv_w, sh.d, image_elems, patch_elems, F, grad)
    cur = "patches"
    has_pos = spec.pos_embed != PosEmbed.none
    pos_after_cat = spec.pos_embed == PosEmbed.learned and spec.pos_embed_prefix
    if has_pos and not pos_after_cat:
        r.alloc("pos_add", patch_elems * sh.res, F)  # promotes to the fp32 position embedding
        r.free(cur)
        cur = "pos_add"
    if spec.prefix_tokens:
        if sh.amp and cur == "patches":
            r.alloc("patches.32", patch_elems * sh.res, F)  # cat promotes to the fp32 tokens
        last = not (has_pos and pos_after_cat)
        r.alloc("b0.in" if last else "cat", sh.tok, saved if last else F)
        r.free(cur, "patches.32")
        cur = "b0.in" if last else "cat"
    if has_pos and pos_after_cat:
        r.alloc("b0.in", sh.tok, saved)
        r.free(cur)
        cur = "b0.in"
    if cur != "b0.in":  # no prefix and no position added after: the conv output itself
        r.rename(cur, "b0.in")
        r.retag("b0.in", saved)


def _attention_core_forward(r: Replay, sh: Shapes, p: str, kernel: AttentionKernel, grad: bool) -> None:
    t = sh.tok_lo
    keep = S if grad else F
    if kernel == AttentionKernel.sdpa:
        # q, k, v are views of the qkv output, saved by SDPA with its output and statistics;
        # the output is laid out (B, N, H, hd), so transpose + reshape is a view
        r.alloc(p + "attn", t, keep)
        r.alloc(p + "lse", _lse_bytes(sh), keep)
        if not grad:
            r.free(p + "lse")
        return
    views = sh.eager_views
    post = kernel == AttentionKernel.eager_postscale
    if not post:
        # q * scale keeps q's strides; it lives until attention returns, or is saved itself
        r.alloc(p + "qs", t, keep if views else F)
    if not views:
        # matmul copies its 4-D operands (q * scale, or q itself) to contiguous 3-D ones
        r.alloc(p + "qs.c", t, keep)
        r.alloc(p + "kT.c", t, keep)
    r.alloc(p + "scores", sh.amap, F)
    if not grad:
        r.free(p + "qs.c", p + "kT.c")
    if post:
        # (q @ k^T) * scale: the product is a temporary; multiplying by a number saves nothing
        r.alloc(p + "scaled", sh.amap, F)
        r.free(p + "scores")
        r.rename(p + "scaled", p + "scores")
    if sh.softmax_fp32:
        # autocast casts the scores up; softmax saves its fp32 output; the scores themselves
        # stay referenced by the caller until softmax returns
        r.alloc(p + "scores.32", sh.amap * 2, F)
        r.alloc(p + "probs.32", sh.amap * 2, keep)
        r.free(p + "scores.32", p + "scores")
        r.alloc(p + "probs", sh.amap, keep)  # the matmul's low-precision copy
    else:
        r.alloc(p + "probs", sh.amap, keep)  # softmax saves its output, not its input
        r.free(p + "scores")
    if not views:
        r.alloc(p + "v.c", t, keep)
    r.alloc(p + "av", t, F)
    if not grad:
        r.free(p + "v.c")
        if sh.softmax_fp32:
            r.free(p + "probs")  # the cast copy dies with the matmul; the fp32 maps live on
    r.alloc(p + "attn", t, keep)  # transpose(1, 2).reshape copies; proj saves the copy
    r.free(p + "av")


def _layernorm_forward(r: Replay, sh: Shapes, name: str, out_cat: int, stats_cat: int, grad: bool) -> None:
    """A LayerNorm's output and its (B, N) mean and rstd, which only backward keeps."""
    r.alloc(name, sh.tok, out_cat)
    r.alloc(name + ".mean", sh.stats, stats_cat)
    r.alloc(name + ".rstd", sh.stats, stats_cat)
    if not grad:
        r.free(name + ".mean", name + ".rstd")


def _block_forward(r: Replay, i: int, nxt: str, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool,
                   checkpointed: bool = False, recompute: bool = False, label: int | None = None) -> None:
    """One block's forward. ``grad``: autograd saves what backward needs. ``checkpointed``:
    the forward of a checkpointed block, which saves nothing but its input (so it frees like
    a no_grad forward). ``recompute``: that block rerun in backward, stopping, as PyTorch's
    non-reentrant checkpoint does, once the last tensor backward needs (GELU's output) exists.
    """
    p = f"b{i}."
    phase = f"backward: blocks.{label if label is not None else i} (recompute)" if recompute else f"forward: blocks.{i}"
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    keep = S if grad else F
    sdpa = wl.attention == AttentionKernel.sdpa
    # under autocast a LayerNorm output is only an argument: its low-precision copy is saved
    ln_cat = F if (sh.amp or not grad) else S
    r.where = phase + ".attn"
    _layernorm_forward(r, sh, p + "ln1", ln_cat, keep, grad)
    # eager attention saves copies of q, k, v, not the qkv output (unless they are views)
    qkv_cat = S if (grad and (sdpa or sh.eager_views)) else F
    _linear_forward(r, sh, p, "qkv", 3 * d * d, 3 * d if spec.qkv_bias else 0,
                    bn * d if sh.amp else 0, 3 * bn * d, qkv_cat, grad)
    _attention_core_forward(r, sh, p, wl.attention, grad)
    _linear_forward(r, sh, p, "proj", d * d, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "qs", p + "attn", p + "qkv", p + "probs", p + "probs.32", p + "ln1")
    elif not sdpa and not sh.eager_views:
        r.free(p + "qs", p + "qkv")
    if sh.amp:
        r.free(p + "ln1")
    if spec.layer_scale:
        _layer_scale_forward(r, sh, p, "ls1", "proj", grad)
        r.alloc(p + "x1", sh.tok, keep)
        r.free(p + "ls1")
    else:
        r.alloc(p + "x1", sh.tok, keep)
        r.free(p + "proj")
    r.where = phase + ".mlp"
    _layernorm_forward(r, sh, p + "ln2", ln_cat, keep, grad)
    _linear_forward(r, sh, p, "fc1", f * d, f, bn * d if sh.amp else 0, bn * f, keep, grad)
    r.alloc(p + "gelu", sh.hid, keep)
    if recompute:
        if sh.amp:  # fc2 saves a weight copy too: the recompute goes on until it exists
            r.alloc(p + "fc2.bc", d * sh.lo, WC)
            r.alloc(p + "fc2.wc", d * f * sh.lo, WC)
            r.free_matching(".bc")  # the recompute stops; its autocast region ends
            r.free(p + "ln2")
        return
    if not grad:
        r.free(p + "fc1")
    _linear_forward(r, sh, p, "fc2", d * f, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "gelu", p + "ln2")
    elif sh.amp:
        r.free(p + "ln2")
    if spec.layer_scale:
        _layer_scale_forward(r, sh, p, "ls2", "fc2", grad)
        r.alloc(nxt, sh.tok, S if checkpointed else keep)
        r.free(p + "ls2")
    else:
        r.alloc(nxt, sh.tok, S if checkpointed else keep)
        r.free(p + "fc2")
    if not grad:
        r.free(p + "x1")
        if not checkpointed:
            r.free(p + "in")


def _layer_scale_forward(r: Replay, sh: Shapes, p: str, name: str, branch: str, grad: bool) -> None:
    """LayerScale, ``branch * gamma``: a new tensor in the promoted dtype (the fp32 of gamma
    under autocast); the multiplication saves the branch output for gamma's gradient, which
    otherwise dies when the scaled copy exists."""
    r.alloc(p + name, sh.tok, F)
    if grad:
        r.retag(p + branch, S)
    else:
        r.free(p + branch)


def _layer_scale_backward(r: Replay, gr: "_Grads", sh: Shapes, p: str, name: str, branch: str) -> None:
    """MulBackward of ``branch * gamma`` given the residual's gradient: the branch's gradient ``g * gamma`` (cast
    to the branch's low precision under autocast), and gamma's, ``g * branch`` summed to D.
    The branch's gradient is named as the linear below expects its incoming gradient."""
    gc = p + branch + ".gc"
    r.alloc(p + "g." + name + ".x", sh.tok, B)  # g * gamma, in the promoted dtype
    r.alloc(p + "g." + name + ".gamma", sh.tok, B)  # g * branch, before the sum over rows
    if sh.amp:  # the engine casts a gradient to its input's dtype
        r.alloc(gc, sh.tok_lo, B)
        r.free(p + "g." + name + ".x")
    else:
        r.rename(p + "g." + name + ".x", gc)
    gr.make_param(p + name + ".gamma", sh.d)
    r.free(p + "g." + name + ".gamma", p + branch)  # the node is done: its saved branch output goes
    gr.accumulate(p + name + ".gamma")


def _epilogue_forward(r: Replay, spec: ViTSpec, sh: Shapes, grad: bool, checkpointed: bool = False) -> None:
    """Final norm, pooling, head(s), and (training) the cross-entropy loss."""
    keep = S if grad else F
    r.where = "forward: norm + head"
    # the head saves the class-token row, a view that keeps the whole norm output alive
    head_saves_norm = grad and not sh.amp and spec.pooling == Pooling.token
    r.alloc("norm.out", sh.tok, S if head_saves_norm else F)
    r.alloc("norm.mean", sh.stats, keep)
    r.alloc("norm.rstd", sh.stats, keep)
    if not grad:
        r.free("norm.mean", "norm.rstd", "norm.in")
    if spec.classes:
        pooled_elems = sh.b * sh.d
        if spec.pooling == Pooling.avg:
            r.alloc("pooled", pooled_elems * sh.res, S if (grad and not sh.amp) else F)
        heads = ["head"] + (["head_dist"] if spec.dist_token else [])
        for head in heads:
            _linear_forward(r, sh, "", head, sh.classes * sh.d, sh.classes,
                            pooled_elems if sh.amp else 0, sh.b * sh.classes, F, grad)
        logits = sh.b * sh.classes * sh.lo
        if spec.dist_token:
            r.alloc("logits_sum", logits, F)
            r.free("head", "head_dist")
            r.alloc("logits_avg", logits, F)
            r.free("logits_sum")
            r.rename("logits_avg", "head")
    if not head_saves_norm:
        r.free("norm.out")  # forward returns: only what backward saved survives
        if sh.amp or not grad:
            r.free("pooled")
    if not grad:
        r.free_matching(".bc")  # autocast exits: its cache of weight copies goes
        r.free_matching(".wc")
        r.free("mid.wc", "first.wc")
        return
    if not spec.classes:
        return
    logits_hi = sh.b * sh.classes * sh.res
    if sh.amp:
        r.alloc("logits.32", logits_hi, F)  # cross-entropy runs in fp32 under autocast
    r.alloc("logp", logits_hi, S)  # log_softmax saves its output
    r.alloc("loss", sh.res, F)
    r.alloc("total_weight", sh.res, S)
    r.free("logits.32", "head")
    r.free_matching(".bc")  # autocast exits: bias copies go; weight copies stay saved
    r.free("mid.bc", "first.bc")
    if checkpointed:  # ... except in checkpointed blocks, which saved none
        r.free(*[n for n in r.live if n[0] == "b" and n.endswith(".wc")], "mid.wc", "first.wc")
    r.alloc("seed", sh.res, F)  # ones_like(loss), the gradient backward starts from


# --- backward -----------------------------------------------------------------------------


class _Grads:
    """Weight gradients: made by backward as temporaries, then kept as ``.grad``."""

    def __init__(self, r: Replay, sh: Shapes, keep: bool) -> None:
        self.r = r
        self.sh = sh
        self.keep = keep  # zero_grad(set_to_none=False): .grad exists, the new one is added in

    def make(self, name: str, elems: int) -> None:
        """A parameter's gradient, in the dtype the op computes it (low under autocast)."""
        self.r.alloc("g:" + name, elems * self.sh.lo, B)

    def make_param(self, name: str, elems: int) -> None:
        """A gradient computed directly in the parameter's dtype (norms, embeddings)."""
        self.r.alloc("g:" + name, elems * self.sh.par, B)

    def accumulate(self, *names: str) -> None:
        for name in names:
            if self.keep:
                self.r.free("g:" + name)  # param.grad.add_(new); the new one dies
            else:
                self.r.retag("g:" + name, G)

    def finish(self, name: str, elems: int) -> None:
        """Accumulate a gradient; under autocast, first cast it to the fp32 parameter's dtype."""
        if self.sh.amp:
            self.r.alloc("g:" + name + ".32", elems * self.sh.par, B)
            self.r.free("g:" + name)
            name = name + ".32"
        self.accumulate(name)


def _linear_backward(r: Replay, gr: _Grads, sh: Shapes, p: str, name: str, out_elems: int,
                     in_elems: int, w_elems: int, b_elems: int, cast_grad: bool, input_cast: bool,
                     frees: tuple[str, ...], free_first: tuple[str, ...] = (), early: bool = False) -> str:
    """Backward of a linear layer; returns the name of the gradient of its input.

    Under autocast: a gradient arriving in fp32 (from a residual add) is first cast down;
    the input gradient is cast back up when the input was cast down in forward; the
    weight and bias gradients are computed low and cast to fp32.
    """
    gc = p + name + ".gc"
    if sh.amp and cast_grad and gc not in r.live:
        r.alloc(gc, out_elems * sh.lo, B)
        r.free(*free_first)
    gin = f"{p}g.{name}in"
    r.alloc(gin, in_elems * sh.lo, B)  # grad_output @ W
    gr.make(p + name + ".w", w_elems)  # grad_output^T @ input
    if early:
        # a recomputed tensor dies when backward unpacks it, not when the node finishes
        r.free(p + name + ".wc", *frees[-1:])
    gr.make(p + name + ".b", b_elems)  # grad_output summed over rows
    r.free(gc, p + name + ".wc", p + name + ".ic", *frees)
    if not sh.amp:
        gr.accumulate(p + name + ".b", p + name + ".w")
        return gin
    if input_cast:
        r.alloc(gin + ".32", in_elems * sh.res, B)
        r.free(gin)
        gin = gin + ".32"
    gr.finish(p + name + ".w", w_elems)
    gr.finish(p + name + ".b", b_elems)
    return gin


def _layernorm_backward(r: Replay, gr: _Grads, sh: Shapes, p: str, name: str, g_in: str, x: str) -> None:
    """LayerNorm backward: the input gradient and the two parameter gradients; then the
    gradient it was given, its saved input and its statistics go."""
    r.alloc(f"{p}g.{name}in", sh.tok, B)
    gr.make_param(f"{p}{name}.w", sh.d)
    gr.make_param(f"{p}{name}.b", sh.d)
    r.free(g_in, x, f"{p}{name}.mean", f"{p}{name}.rstd")


def _attention_core_backward(r: Replay, sh: Shapes, p: str, gproj: str, kernel: AttentionKernel) -> None:
    t = sh.tok_lo
    if kernel == AttentionKernel.sdpa:
        r.alloc(p + "g.q", t, B)
        r.alloc(p + "g.k", t, B)
        r.alloc(p + "g.v", t, B)
        r.free(gproj, p + "qkv", p + "lse", p + "attn")
        if sh.cuda:
            _cuda_sdpa_backward_workspace(r, p, sh)
        r.alloc(p + "g.stack", 3 * t, B)  # unbind backward: stack
        r.free(p + "g.q", p + "g.k", p + "g.v")
        return
    if not sh.eager_views:
        r.alloc(p + "g.av", t, B)  # the transposed gradient, made contiguous for bmm
        r.free(gproj)
    r.alloc(p + "g.v", t, B)
    r.alloc(p + "g.probs", sh.amap, B)
    r.free(p + "g.av", p + "v.c", gproj)
    if sh.softmax_fp32:
        r.free(p + "probs")  # the low-precision copy, saved by the matmul only
        r.alloc(p + "g.probs.32", 2 * sh.amap, B)
        r.free(p + "g.probs")
        r.alloc(p + "g.scores.32", 2 * sh.amap, B)
        r.free(p + "g.probs.32", p + "probs.32")
        r.alloc(p + "g.scores", sh.amap, B)
        r.free(p + "g.scores.32")
    else:
        r.alloc(p + "g.scores", sh.amap, B)  # softmax backward reads its saved output
        r.free(p + "g.probs", p + "probs")
    if kernel == AttentionKernel.eager_postscale:
        r.alloc(p + "g.raw", sh.amap, B)  # the scale's backward: a new map
        r.free(p + "g.scores")
        r.alloc(p + "g.q", t, B)
        r.alloc(p + "g.kT", t, B)
        r.free(p + "g.raw", p + "qs.c", p + "kT.c")
        if sh.eager_views:
            r.free(p + "qkv")
    else:
        r.alloc(p + "g.qs", t, B)
        r.alloc(p + "g.kT", t, B)
        r.free(p + "g.scores", p + "qs.c", p + "kT.c")
        if sh.eager_views:
            r.free(p + "qkv", p + "qs")
        r.alloc(p + "g.q", t, B)  # times the scale
        r.free(p + "g.qs")
    r.alloc(p + "g.stack", 3 * t, B)
    r.free(p + "g.q", p + "g.kT", p + "g.v")


def _block_backward(r: Replay, i: int, g: str, out: str, sh: Shapes, spec: ViTSpec, wl: Workload, gr: _Grads,
                    label: int | None = None) -> None:
    """One block's backward on block ``i``'s tensors; ``label`` names the block in ``where``."""
    p = f"b{i}."
    label = i if label is None else label
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    amp = sh.amp
    ck = wl.checkpointing == Checkpointing.full
    if ck:
        if amp:  # the residual add casts the gradient down before fc2's node asks for recompute
            r.alloc(p + "fc2.gc", sh.tok_lo, B)
        _block_forward(r, i, "", sh, spec, wl, True, recompute=True, label=label)
    r.where = f"backward: blocks.{label}.mlp"
    if spec.layer_scale:
        _layer_scale_backward(r, gr, sh, p, "ls2", "fc2")
    gfc2 = _linear_backward(r, gr, sh, p, "fc2", bn * d, bn * f, d * f, d, True, False, (p + "gelu",), early=ck)
    r.alloc(p + "g.gelu", sh.hid, B)
    r.free(gfc2, p + "fc1")
    gfc1 = _linear_backward(r, gr, sh, p, "fc1", bn * f, bn * d, f * d, f, False, amp,
                            (p + "g.gelu", p + "ln2"), early=ck)
    _layernorm_backward(r, gr, sh, p, "ln2", gfc1, p + "x1")
    r.alloc(p + "g.x1", sh.tok, B)  # residual: the incoming gradient plus the MLP branch's
    r.free(p + "g.ln2in", g)
    gr.accumulate(p + "ln2.w", p + "ln2.b")
    r.where = f"backward: blocks.{label}.attn"
    sdpa = wl.attention == AttentionKernel.sdpa
    if spec.layer_scale:
        _layer_scale_backward(r, gr, sh, p, "ls1", "proj")
    gproj = _linear_backward(r, gr, sh, p, "proj", bn * d, bn * d, d * d, d, True, False,
                             () if sdpa else (p + "attn",))
    _attention_core_backward(r, sh, p, gproj, wl.attention)
    r.alloc(p + "g.qkv", 3 * sh.tok_lo, B)  # permute backward: a contiguous copy for the linear
    r.free(p + "g.stack")
    gqkv = _linear_backward(r, gr, sh, p, "qkv", 3 * bn * d, bn * d, 3 * d * d,
                            3 * d if spec.qkv_bias else 0, False, amp, (p + "g.qkv", p + "ln1"), early=ck)
    _layernorm_backward(r, gr, sh, p, "ln1", gqkv, p + "in")
    r.alloc(out, sh.tok, B)
    r.free(p + "g.ln1in", p + "g.x1")
    gr.accumulate(p + "ln1.w", p + "ln1.b")


def _cuda_sdpa_backward_workspace(r: Replay, p: str, sh: Shapes) -> None:
    """Buffers the CUDA attention backward allocates inside the kernel call.

    Flash (bf16/fp16): ``dq_accum`` fp32 (B, N rounded to 128, H, head_dim rounded to 32)
    and ``softmax_d`` fp32 (B, H, N rounded to 128). Memory-efficient (fp32): ``delta``
    fp32 (B, H, N). Taken from the kernels' sources; not measured (no GPU here).
    """
    if sh.lo == 2:
        r.alloc(p + "ws.dq", sh.b * sh.n128 * sh.h * sh.hd32 * 4, B)
        r.alloc(p + "ws.d", sh.b * sh.h * sh.n128 * 4, B)
    else:
        r.alloc(p + "ws.d", sh.b * sh.h * sh.n * 4, B)
    r.free(p + "ws.dq", p + "ws.d")


def _epilogue_backward(r: Replay, spec: ViTSpec, sh: Shapes, gr: _Grads) -> str:
    logits_hi = sh.b * sh.classes * sh.res
    r.where = "backward: loss + head"
    r.alloc("g.nll", logits_hi, B)
    r.free("seed")
    r.alloc("g.logits", logits_hi, B)
    r.free("g.nll", "logp")
    heads = ["head"] + (["head_dist"] if spec.dist_token else [])
    if spec.dist_token:
        # (a + b) / 2: DivBackward makes a new tensor, AddBackward hands it to both heads
        r.alloc("g.logits_avg", sh.b * sh.classes * sh.lo, B)
        r.free("g.logits")
        r.rename("g.logits_avg", "g.logits")
    pooled = sh.b * sh.d
    for k, head in enumerate(heads):
        last = k == len(heads) - 1
        frees = ("g.logits", "norm.out", "pooled") if last else ()
        gin = _linear_backward(r, gr, sh, "", head, sh.b * sh.classes, pooled,
                               sh.classes * sh.d, sh.classes, sh.amp and k == 0,
                               sh.amp, frees, free_first=("g.logits",))
        # select_backward (or mean backward): a (B, N, D) tensor per head, summed after
        r.alloc(f"g.sel{k}", sh.tok, B)
        r.free(gin)
    if len(heads) == 1:
        r.rename("g.sel0", "g.norm")
    else:
        r.alloc("g.norm", sh.tok, B)
        r.free(*(f"g.sel{k}" for k in range(len(heads))))
    r.where = "backward: norm"
    _layernorm_backward(r, gr, sh, "", "norm", "g.norm", "norm.in")
    gr.accumulate("norm.w", "norm.b")
    return "g.normin"


def _prologue_backward(r: Replay, spec: ViTSpec, sh: Shapes, g: str, gr: _Grads, image_elems: int) -> None:
    """Position embedding, prefix tokens and patch embedding; ``g`` is the gradient of the
    first block's input.

    A gradient summed over the batch is a new tensor, except at batch 1, where the sum is a
    no-op: a prefix token's gradient is then a slice of ``g``, and AccumulateGrad keeps that
    view as ``.grad``, so all of ``g`` stays alive as a gradient until ``zero_grad``.
    """
    d = sh.d
    r.where = "backward: patch embedding"
    views = _prefix_grads_are_views(spec, sh.one) and not gr.keep
    if spec.pos_embed == PosEmbed.learned:
        if views and sh.amp and not spec.pos_embed_prefix:
            # added to the patches only, its gradient is a slice of ``g`` too; under autocast
            # the patch branch takes a cast copy, leaving the slice to AccumulateGrad alone
            r.retag(g, G)
        else:
            gr.make_param("pos_embed", sh.pos * d)  # summed over the batch
            gr.accumulate("pos_embed")
    patch_elems = sh.b * sh.patches * d
    if sh.amp:
        r.alloc("g.patches.c", patch_elems * sh.lo, B)  # back to the conv's low precision
    for token, n in (("cls_token", int(spec.class_token)), ("dist_token", int(spec.dist_token)),
                     ("reg_token", sh.registers)):
        if n:
            if views:
                r.retag(g, G)
                continue
            gr.make_param(token, n * d)
            gr.accumulate(token)
    if sh.amp and not views:
        r.free(g)
    conv_w = sh.conv_w
    gr.make("patch.w", conv_w)
    gr.make("patch.b", d)
    r.free("g.patches.c", "patches.wc", "patches.ic")
    if not views:
        r.free(g)
    if sh.amp:
        gr.finish("patch.w", conv_w)
        gr.finish("patch.b", d)
    else:
        gr.accumulate("patch.w", "patch.b")
    r.free("total_weight")


def _prefix_grads_are_views(spec: ViTSpec, batch_one: bool) -> bool:
    return batch_one and spec.prefix_tokens > 0


def _kept_grad_bytes(spec: ViTSpec, batch: int, e: int, grads_total: int, round_to: int) -> int:
    """Gradients held between steps under ``zero_grad(set_to_none=False)``, ``e``-byte elements.

    They were made by the first step; at batch 1 the prefix tokens' ``.grad`` is then a
    view of the first block's whole input gradient (see ``_prologue_backward``), and that
    storage is what stays.
    """
    if not _prefix_grads_are_views(spec, batch == 1):
        return grads_total
    d = spec.dim
    storage = batch * spec.tokens * d * e
    per_token = [int(spec.class_token) * d, int(spec.dist_token) * d, spec.registers * d]
    return grads_total - sum(_round_up(n * e, round_to) for n in per_token if n) + _round_up(storage, round_to)


# --- optimizer ------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _param_bytes(spec: ViTSpec, pb: int, round_to: int) -> tuple[int, ...]:
    """Bytes of each parameter tensor as allocated, in ``parameters()`` order."""
    return tuple(_round_up(n * pb, round_to) for _, n in param_tensors(spec))


def _optimizer_state_bytes(wl: Workload, sizes: tuple[int, ...], cuda: bool) -> int:
    total = sum(sizes)
    if wl.optimizer in (Optimizer.adamw, Optimizer.adam):
        # exp_avg and exp_avg_sq, plus a fp32 ``step`` per tensor that PyTorch keeps on the
        # CPU unless the optimizer is capturable or fused: none of it on a GPU
        return 2 * total + (0 if cuda else 4 * len(sizes))
    if wl.optimizer == Optimizer.sgd_momentum:
        return total
    return 0


def _optimizer_temporary_bytes(sizes: tuple[int, ...], cuda: bool) -> int:
    """The most ``optimizer.step()`` of an Adam-type optimizer holds in temporaries.

    Single-tensor Adam (PyTorch's default on the CPU) computes, per parameter ``k``,
    ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``: two tensors of the
    parameter's size, while the previous parameter's ``denom`` lives until the name is
    rebound, so the most it holds is ``max_k 2 s_k + s_(k-1)`` in ``parameters()`` order.
    The foreach implementation (PyTorch's default on CUDA) makes ``exp_avg_sq.sqrt()`` for
    every parameter at once.
    """
    if cuda:
        return sum(sizes)
    return max(2 * s + prev for s, prev in zip(sizes, (0,) + sizes[:-1]))


def _optimizer_step(r: Replay, sh: Shapes) -> None:
    """Temporaries of ``optimizer.step()``: only Adam-type optimizers make any."""
    r.where = "optimizer step"
    if sh.first_state_parts:  # a first step creates the states
        r.alloc_parts("opt.states", sum(sh.first_state_parts), sh.first_state_parts, O)
    r.alloc_parts("opt.temporaries", sh.opt_tmp, sh.opt_tmp_parts, OT)
    r.free("opt.temporaries")


# --- the whole step ---------------------------------------------------------------------------


_COMPONENT_OF = {
    "b0.in": "patch_embed",
    **{k: "blocks/norm1" for k in ("ln1", "ln1.mean", "ln1.rstd", "qkv.ic")},
    **{k: "blocks/attn/qkv" for k in ("qkv", "qs", "qs.c", "kT.c", "v.c")},
    **{k: "blocks/attn/core" for k in ("attn", "lse", "probs", "probs.32")},
    **{k: "blocks/norm2" for k in ("x1", "ln2", "ln2.mean", "ln2.rstd", "fc1.ic")},
    **{k: "blocks/mlp" for k in ("fc1", "gelu")},
    **{k: "blocks/layer_scale" for k in ("proj", "fc2")},  # branch outputs LayerScale saves
    "in": "blocks/residual",
    **{k: "norm_and_head" for k in ("norm.in", "norm.out", "norm.mean", "norm.rstd", "pooled",
                                  "logp", "total_weight", "head.ic", "head_dist.ic")},
    "patches.ic": "patch_embed",
}


def _saved_by_component(r: Replay, depth: int, layer_scale: bool) -> dict[str, int]:
    """Saved activations at the end of the forward pass, by component, summed over depth.

    Block 0's tensors stand for every block's (the others are held as lumps of the same
    sizes); its input stands for the patch embedding's output and, once per later block,
    for the residual stream.
    """
    out = dict.fromkeys(dict.fromkeys(_COMPONENT_OF.values()), 0)
    if not layer_scale:
        del out["blocks/layer_scale"]
    for name, (nbytes, cat) in r.live.items():
        if cat != S or name.startswith(("mid.", "first.")):
            continue
        if name == "b0.in":
            out["patch_embed"] += nbytes
            out["blocks/residual"] += (depth - 1) * nbytes
        elif name.startswith("b0."):
            out[_COMPONENT_OF[name[3:]]] += depth * nbytes
        else:
            out[_COMPONENT_OF[name]] += nbytes
    return out


def _extend_forward(r: Replay, depth: int) -> None:
    """The state after the last block's forward, without replaying blocks 1 .. depth-1.

    Every block leaves what block 0 left: its saved tensors (with its input), under
    autocast its weight and bias copies, and the next block's input. From here on block 0's
    named tensors stand for the last block's, which backward reaches first; block 0's own
    set is held as the lump ``first.*`` and the blocks between as ``mid.*``.
    """
    per_block = [0, 0, 0]  # saved for backward, weight copies, bias copies
    for name, (nbytes, cat) in r.live.items():
        if name.startswith("b0."):
            if cat == S:
                per_block[0] += nbytes
            elif cat == WC:
                per_block[1 if name.endswith(".wc") else 2] += nbytes
    r.sampling = False
    r.rename("b1.in", "norm.in")
    for lump, count in (("first", 1), ("mid", depth - 2)):
        r.alloc(lump + ".saved", count * per_block[0], S)
        r.alloc(lump + ".wc", count * per_block[1], WC)
        r.alloc(lump + ".bc", count * per_block[2], WC)
    r.sampling = True


def _finish_block_backward(r: Replay, g: str, change: list[int]) -> str:
    """Block 0's backward, after its totals were replayed: its saved tensors and weight
    copies go, its gradients come, and the gradient of its input replaces the one it was
    given (the same size)."""
    r.sampling = False
    r.free("first.saved", "first.wc")
    r.alloc("first.grads", change[G], G)
    r.rename(g, "g.b0.in")
    r.sampling = True
    return "g.b0.in"


def _skip_backward(r: Replay, depth: int, change: list[int]) -> None:
    """Blocks depth-2 .. 1 backward: their saved tensors and weight copies go, and their
    gradients come (each block's: what the replayed block's backward left, ``change``)."""
    r.sampling = False
    r.free("mid.saved", "mid.wc")
    r.alloc("mid.grads", (depth - 2) * change[G], G)
    r.sampling = True


def replay_step(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes) -> tuple:
    """Replay one steady-state training step (or one no_grad forward) into ``r``.

    Returns what the step's result reads besides the peak: weights, gradients, optimizer
    states, inputs, saved activations and autocast copies at the end of the forward pass,
    and the saved activations by component.
    """
    train = wl.training
    r.where = "weights"
    r.alloc_parts("weights", sh.params, sh.param_parts, W)
    if spec.pos_embed == PosEmbed.sincos:
        r.alloc("sincos", sh.patches * sh.d * sh.par, W)  # a buffer, moved with the model
    weights = r.cat[W]
    r.alloc_parts("opt.states", sh.states, sh.state_parts, O)
    r.alloc_parts("grads.kept", sh.kept, sh.kept_parts, G)
    image_elems = sh.b * sh.image
    r.where = "forward: input batch"
    r.alloc("x", image_elems * sh.res, I)  # images arrive in fp32 under autocast
    r.alloc("y", sh.b * INDEX_BYTES if train else 0, I)
    inputs = r.cat[I]
    depth = spec.depth
    _prologue_forward(r, spec, sh, train, image_elems)
    ck = train and wl.checkpointing == Checkpointing.full
    if r.FULL:
        for i in range(depth):
            _block_forward(r, i, f"b{i + 1}.in" if i < depth - 1 else "norm.in", sh, spec, wl, train and not ck,
                           checkpointed=ck)
    else:
        state = r.local()
        _block_forward(r, 0, "b1.in" if depth > 1 else "norm.in", sh, spec, wl, train and not ck, checkpointed=ck)
        block = r.end_local(state)
        if depth > 1:
            _extend_forward(r, depth)
            r.replay_shifted(block, "blocks.0", f"blocks.{depth - 1}", after=True)
    _epilogue_forward(r, spec, sh, train, checkpointed=ck)
    saved = r.cat[S]
    copies = r.cat[WC]
    components = _saved_by_component(r, depth, spec.layer_scale) if train and not r.FULL else {}
    if train and spec.classes:
        gr = _Grads(r, sh, wl.keep_grads)
        g = _epilogue_backward(r, spec, sh, gr)
        if r.FULL:
            for i in reversed(range(depth)):
                _block_backward(r, i, g, f"g.b{i}.in", sh, spec, wl, gr)
                g = f"g.b{i}.in"
            _prologue_backward(r, spec, sh, g, gr, image_elems)
            _optimizer_step(r, sh)
            return (weights, sh.params if train else 0, sh.states, inputs, saved, copies), components
        last = depth - 1
        state = r.local()
        _block_backward(r, 0, g, f"g.b{last}.in", sh, spec, wl, gr, label=last)
        block = r.end_local(state)
        g = f"g.b{last}.in"
        if depth > 2:
            _skip_backward(r, depth, block.change)
        if depth > 1:
            r.replay_shifted(block, f"blocks.{last}", "blocks.0")
            g = _finish_block_backward(r, g, block.change)
        _prologue_backward(r, spec, sh, g, gr, image_elems)
        _optimizer_step(r, sh)
    return (weights, sh.params if train else 0, sh.states, inputs, saved, copies), components


def replay_memory(spec: ViTSpec, wl: Workload) -> tuple[MemoryResult, tuple[int, ...]]:
    """The replay itself: the step's memory, and the live total after each allocation in
    replay order. ``estimate_memory`` gives the same result without replaying."""
    sh = shapes_of(spec, wl)
    r = Replay(CUDA_BLOCK_BYTES if sh.cuda else 1)
    figures, components = replay_step(r, spec, wl, sh)
    return memory_result(figures, r.peak, r.peak_cat, r.peak_where, components), tuple(r.totals)


def memory_result(figures, peak: int, peak_cat, peak_where: str, components: dict[str, int]) -> MemoryResult:
    weights, gradients, states, inputs, saved, copies = figures
    at_peak = dict.fromkeys(CATEGORIES, 0)
    for cat, nbytes in enumerate(peak_cat):
        at_peak[_REPORTED[cat]] += nbytes
    return MemoryResult(
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        inputs=inputs,
        activations=saved,
        autocast_copies=copies,
        peak=peak,
        transient=peak_cat[F] + peak_cat[B] + peak_cat[OT],
        peak_phase=peak_where,
        at_peak=at_peak,
        saved_by_component=components,
    )



# --- a trace for the allocator ----------------------------------------------------------------

# Tensors that outlive a step: made once, before or in the first step, and kept.
PERSISTENT = frozenset(("weights", "sincos", "opt.states", "grads.kept", "x", "y"))


class Trace(Replay):
    """A replay of every block that writes down each allocation and free in order, as
    ``(key, bytes)`` events (bytes 0: free ``key``), for ``vitcost.allocator``. Parameters,
    optimizer states and kept gradients are one tensor each, as PyTorch allocates them.
    Allocations of the ``skip`` names (tensors an earlier step made) are not written down."""

    FULL = True
    __slots__ = ("events", "keys", "parts", "counter", "skip")

    def __init__(self, round_to: int, counter, skip: frozenset = frozenset()) -> None:
        super().__init__(round_to)
        self.sampling = False  # the allocator reads the events; no totals or peak are kept here
        self.events: list[tuple[int, int]] = []
        self.keys: dict[str, int] = {}
        self.parts: dict[str, list[str]] = {}
        self.counter = counter
        self.skip = skip

    def alloc_parts(self, name: str, nbytes: int, parts: tuple[int, ...], cat: int) -> None:
        if not parts:
            self.alloc(name, nbytes, cat)
            return
        names = self.parts[name] = [f"{name}#{k}" for k in range(len(parts))]
        for part_name, part in zip(names, parts):
            self.alloc(part_name, part, cat)

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        if nbytes <= 0:
            return
        super().alloc(name, nbytes, cat)
        if name.partition("#")[0] not in self.skip:
            key = self.keys[name] = next(self.counter)
            self.events.append((key, self.live[name][0]))

    def free(self, *names: str) -> None:
        for name in names:
            parts = self.parts.pop(name, None)
            if parts:
                self.free(*parts)
                continue
            key = self.keys.pop(name, None)
            if key is not None and name in self.live:
                self.events.append((key, 0))
            super().free(name)

    def rename(self, old: str, new: str) -> None:
        super().rename(old, new)
        if old in self.keys:
            self.keys[new] = self.keys.pop(old)

    def end_step(self, keep: tuple[int, ...] = ()) -> None:
        """The step is over: every tensor but the persistent ones (and categories ``keep``) goes."""
        for name, (_, cat) in list(self.live.items()):
            if name.partition("#")[0] not in PERSISTENT and cat not in keep:
                self.free(name)


def _trace_shapes(spec: ViTSpec, wl: Workload) -> Shapes:
    """``shapes_of`` with every parameter, optimizer state and kept gradient as its own tensor."""
    from dataclasses import replace

    sh = shapes_of(spec, wl)
    sizes = _param_bytes(spec, sh.par, CUDA_BLOCK_BYTES if sh.cuda else 1)
    if not wl.training:
        return replace(sh, param_parts=sizes)
    if wl.optimizer in (Optimizer.adamw, Optimizer.adam):
        # per parameter, as the first step creates them: (a CPU ``step``), exp_avg, exp_avg_sq
        states = tuple(x for s in sizes for x in ((s, s) if sh.cuda else (4, s, s)))
        tmp = sizes if sh.cuda else (sh.opt_tmp,)
    else:
        states = sizes if wl.optimizer == Optimizer.sgd_momentum else ()
        tmp = ()
    kept = () if not sh.kept else (sh.kept,) if _prefix_grads_are_views(spec, sh.one) else sizes
    return replace(sh, param_parts=sizes, state_parts=states, kept_parts=kept, opt_tmp_parts=tmp)


def trace(spec: ViTSpec, wl: Workload, extra_bytes: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The allocations and frees of a first step from a fresh start, and of a steady step.

    The first training step differs from the rest: no optimizer state exists before its
    ``optimizer.step()``, and no gradient before its backward (with ``--keep-grads`` the
    gradients it makes are the ones kept). The steady step is the one the replay describes,
    with the persistent tensors (weights, states, kept gradients, the input batch) already
    in place, as a benchmark that feeds one batch repeatedly has them; it frees every tensor
    it makes, so it can be run again and again. ``extra_bytes``: one more tensor, made first
    and kept (DDP's gradient buckets). Sizes are as requested: the allocator rounds.
    """
    from dataclasses import replace
    from itertools import count

    sh = _trace_shapes(spec, wl)
    keys = count()
    extra = [(next(keys), extra_bytes)] if extra_bytes > 0 else []
    first_sh = replace(sh, states=0, state_parts=(), kept=0, kept_parts=(),
                       first_state_parts=sh.state_parts if wl.training else ())
    first = Trace(1, keys)
    replay_step(first, spec, wl.model_copy(update={"keep_grads": False}) if wl.keep_grads else wl, first_sh)
    first.end_step(keep=(G,) if wl.keep_grads else ())
    steady = Trace(1, keys, skip=PERSISTENT)
    replay_step(steady, spec, wl, sh)
    steady.end_step()
    return extra + first.events, steady.events
