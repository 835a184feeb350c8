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
block in full and moves over the blocks between them in one step per block, which is
exact because every live total in block ``i`` is affine in ``i`` (the peak of the middle
blocks lies between those of the two ends).

Categories (``CATEGORIES``) follow MemTracker's at the peak: weights, gradients, optimizer
(states and the optimizer's own temporaries), activations (the input batch, tensors
saved for backward and forward temporaries) and temporaries (tensors made by backward).

Every size here is in bytes. Where the replay follows a rule of a particular PyTorch
kernel (which tensors it saves), the rule is named beside it; docs/memory-model.md
explains each one and what has been measured.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# Replay categories, and the MemTracker category each one is reported under.
W, G, O, OT, I, S, F, B = "W", "G", "O", "OT", "I", "S", "F", "B"
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")
_REPORTED = {W: "weights", G: "gradients", O: "optimizer", OT: "optimizer", I: "activations",
             S: "activations", F: "activations", B: "temporaries"}

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
    peak: int
    transient: int  # peak minus what is held for the whole step or saved for backward
    peak_phase: str
    at_peak: dict[str, int]  # MemTracker categories live at the peak
    saved_by_component: dict[str, int]  # activations saved for backward, by component


class _Replay:
    """Live tensors by name, totals by category, and the peak."""

    __slots__ = ("live", "cat", "total", "peak", "peak_cat", "peak_where", "where", "round_to", "sampling")

    def __init__(self, round_to: int) -> None:
        self.live: dict[str, tuple[int, str]] = {}
        self.cat = dict.fromkeys((W, G, O, OT, I, S, F, B), 0)
        self.total = 0
        self.peak = 0
        self.peak_cat: dict[str, int] = dict(self.cat)
        self.peak_where = ""
        self.where = ""
        self.round_to = round_to
        self.sampling = True

    def alloc(self, name: str, nbytes: int, cat: str) -> None:
        if nbytes <= 0:
            return
        r = self.round_to
        if r > 1:
            nbytes = -(-nbytes // r) * r
        self.live[name] = (nbytes, cat)
        self.cat[cat] += nbytes
        self.total += nbytes
        if self.sampling and self.total > self.peak:
            self.peak = self.total
            self.peak_cat = dict(self.cat)
            self.peak_where = self.where

    def free(self, *names: str) -> None:
        for name in names:
            entry = self.live.pop(name, None)
            if entry is not None:
                self.cat[entry[1]] -= entry[0]
                self.total -= entry[0]

    def retag(self, name: str, cat: str) -> None:
        entry = self.live.get(name)
        if entry is not None:
            self.cat[entry[1]] -= entry[0]
            self.cat[cat] += entry[0]
            self.live[name] = (entry[0], cat)

    def bytes_of(self, prefix: str) -> int:
        return sum(b for n, (b, _) in self.live.items() if n.startswith(prefix))


@dataclass(frozen=True)
class _Shapes:
    """Byte sizes of the tensors one step makes, for one spec and workload."""

    b: int
    n: int
    d: int
    f: int
    h: int
    c: int
    act: int  # activation element bytes
    par: int  # parameter / gradient element bytes
    stat: int  # LayerNorm mean / rstd element bytes
    cuda: bool

    @property
    def tok(self) -> int:  # one token tensor (B, N, D)
        return self.b * self.n * self.d * self.act

    @property
    def hid(self) -> int:  # one MLP hidden tensor (B, N, F)
        return self.b * self.n * self.f * self.act

    @property
    def stats(self) -> int:  # LayerNorm mean or rstd, (B, N, 1)
        return self.b * self.n * self.stat

    @property
    def amap(self) -> int:  # attention maps of one layer, (B, H, N, N)
        return self.b * self.h * self.n * self.n * self.act


def _element_bytes(precision: Precision) -> int:
    return 2 if precision in (Precision.bf16, Precision.fp16) else 4


def _lse_bytes(sh: _Shapes, spec: ViTSpec) -> int:
    """Per-row softmax statistics a fused attention kernel saves (fp32).

    CPU flash and CUDA flash: (B, H, N); CUDA memory-efficient (fp32 inputs): N padded to 32.
    """
    n = sh.n
    if sh.cuda and sh.act == 4:
        n = -(-n // 32) * 32
    return sh.b * sh.h * n * 4


# --- forward -------------------------------------------------------------------------


def _prologue_forward(r: _Replay, spec: ViTSpec, sh: _Shapes, grad: bool) -> None:
    """Patch embedding, prefix tokens, position embedding; leaves ``b0.in``."""
    cat_ = S if grad else F
    patches = sh.b * spec.patch_tokens * sh.d * sh.act
    r.alloc("patches", patches, F)  # conv output; the conv saves its input, not this
    has_pos = spec.pos_embed != PosEmbed.none
    pos_after_cat = spec.pos_embed == PosEmbed.learned and spec.pos_embed_prefix
    cur = "patches"
    if has_pos and not pos_after_cat:
        r.alloc("pos_add", patches, F)
        r.free(cur)
        cur = "pos_add"
    if spec.prefix_tokens:
        last = not (has_pos and pos_after_cat)
        r.alloc("b0.in" if last else "cat", sh.tok, cat_ if last else F)
        r.free(cur)
        cur = "b0.in" if last else "cat"
    if has_pos and pos_after_cat:
        r.alloc("b0.in", sh.tok, cat_)
        r.free(cur)
        cur = "b0.in"
    if cur != "b0.in":  # no prefix and no position added after: the conv output itself
        entry = r.live.pop(cur)
        r.live["b0.in"] = (entry[0], entry[1])
        r.retag("b0.in", cat_)


def _attention_forward_train(r: _Replay, p: str, sh: _Shapes, spec: ViTSpec, kernel: AttentionKernel) -> None:
    t = sh.tok
    if kernel == AttentionKernel.sdpa:
        r.alloc(p + "qkv", 3 * t, S)  # q, k, v are views of it, saved by SDPA
        r.alloc(p + "attn", t, S)  # SDPA output, laid out (B, N, H, hd): the reshape is a view
        r.alloc(p + "lse", _lse_bytes(sh, spec), S)
        r.alloc(p + "proj", t, F)
        return
    r.alloc(p + "qkv", 3 * t, F)  # not saved: matmul saves the reshaped copies below
    r.alloc(p + "qs", t, F)  # q * scale keeps q's strides; lives until attention returns
    r.alloc(p + "qs.c", t, S)  # matmul copies the 4-D operands to contiguous 3-D
    r.alloc(p + "kT.c", t, S)
    r.alloc(p + "scores", sh.amap, F)
    r.alloc(p + "probs", sh.amap, S)  # softmax saves its output, not its input
    r.free(p + "scores")
    r.alloc(p + "v.c", t, S)
    r.alloc(p + "av", t, F)
    r.alloc(p + "attn", t, S)  # transpose(1, 2).reshape copies; proj saves the copy
    r.free(p + "av")
    r.alloc(p + "proj", t, F)
    r.free(p + "qs", p + "qkv")


def _block_forward_train(r: _Replay, i: int, nxt: str, sh: _Shapes, spec: ViTSpec, wl: Workload) -> None:
    p = f"b{i}."
    t, st = sh.tok, sh.stats
    r.where = f"forward: blocks.{i}"
    r.alloc(p + "ln1", t, S)
    r.alloc(p + "ln1.mean", st, S)
    r.alloc(p + "ln1.rstd", st, S)
    _attention_forward_train(r, p, sh, spec, wl.attention)
    r.alloc(p + "x1", t, S)
    r.free(p + "proj")
    r.alloc(p + "ln2", t, S)
    r.alloc(p + "ln2.mean", st, S)
    r.alloc(p + "ln2.rstd", st, S)
    r.alloc(p + "fc1", sh.hid, S)
    r.alloc(p + "gelu", sh.hid, S)
    r.alloc(p + "fc2", t, F)
    r.alloc(nxt, t, S)
    r.free(p + "fc2")


def _block_forward_infer(r: _Replay, i: int, nxt: str, sh: _Shapes, spec: ViTSpec, wl: Workload) -> None:
    p = f"b{i}."
    t, st = sh.tok, sh.stats
    r.where = f"forward: blocks.{i}"
    r.alloc(p + "ln1", t, F)
    r.alloc(p + "ln1.mean", st, F)
    r.alloc(p + "ln1.rstd", st, F)
    r.free(p + "ln1.mean", p + "ln1.rstd")
    r.alloc(p + "qkv", 3 * t, F)
    if wl.attention == AttentionKernel.sdpa:
        r.alloc(p + "attn", t, F)
        r.alloc(p + "lse", _lse_bytes(sh, spec), F)
        r.free(p + "lse")
        r.alloc(p + "proj", t, F)
        r.free(p + "attn", p + "qkv", p + "ln1")
    else:
        r.alloc(p + "qs", t, F)
        r.alloc(p + "qs.c", t, F)
        r.alloc(p + "kT.c", t, F)
        r.alloc(p + "scores", sh.amap, F)
        r.free(p + "qs.c", p + "kT.c")
        r.alloc(p + "probs", sh.amap, F)
        r.free(p + "scores")
        r.alloc(p + "v.c", t, F)
        r.alloc(p + "av", t, F)
        r.free(p + "v.c")
        r.alloc(p + "attn", t, F)
        r.free(p + "av")
        r.alloc(p + "proj", t, F)
        r.free(p + "qs", p + "attn", p + "qkv", p + "probs", p + "ln1")
    r.alloc(p + "x1", t, F)
    r.free(p + "proj")
    r.alloc(p + "ln2", t, F)
    r.alloc(p + "ln2.mean", st, F)
    r.alloc(p + "ln2.rstd", st, F)
    r.free(p + "ln2.mean", p + "ln2.rstd")
    r.alloc(p + "fc1", sh.hid, F)
    r.alloc(p + "gelu", sh.hid, F)
    r.free(p + "fc1")
    r.alloc(p + "fc2", t, F)
    r.free(p + "gelu", p + "ln2")
    r.alloc(nxt, t, F)
    r.free(p + "fc2", p + "x1", p + "in")


def _epilogue_forward(r: _Replay, spec: ViTSpec, sh: _Shapes, grad: bool) -> None:
    """Final norm, pooling, head(s), and (training) the cross-entropy loss."""
    saved = S if grad else F
    logits = sh.b * spec.classes * sh.act
    r.where = "forward: norm + head"
    r.alloc("norm.out", sh.tok, saved)
    r.alloc("norm.mean", sh.stats, saved)
    r.alloc("norm.rstd", sh.stats, saved)
    if not grad:
        r.free("norm.mean", "norm.rstd", "norm.in")
    if not spec.classes:
        return
    if spec.pooling == Pooling.avg:
        r.alloc("pooled", sh.b * sh.d * sh.act, saved)  # mean over the patch tokens
        if not grad:
            r.free("norm.out")
    r.alloc("logits", logits, F)
    if spec.dist_token:
        r.alloc("logits_dist", logits, F)
        r.alloc("logits_sum", logits, F)
        r.free("logits", "logits_dist")
        r.alloc("logits_avg", logits, F)
        r.free("logits_sum")
        r.live["logits"] = r.live.pop("logits_avg")
    if not grad:
        if spec.pooling == Pooling.token:
            r.free("norm.out")
        return
    r.alloc("logp", logits, S)  # log_softmax saves its output
    r.alloc("loss", sh.act, F)
    r.alloc("total_weight", sh.act, S)
    r.free("logits")
    r.alloc("seed", sh.act, F)  # ones_like(loss), the gradient backward starts from


# --- backward ------------------------------------------------------------------------


class _Grads:
    """Weight gradients: made by backward as temporaries, then kept as ``.grad``."""

    def __init__(self, r: _Replay, keep: bool) -> None:
        self.r = r
        self.keep = keep  # zero_grad(set_to_none=False): .grad exists, the new one is added in

    def make(self, name: str, nbytes: int) -> None:
        self.r.alloc("g:" + name, nbytes, B)

    def accumulate(self, *names: str) -> None:
        for name in names:
            if self.keep:
                self.r.retag("g:" + name, G)
                self.r.free("g:" + name)  # param.grad.add_(new); the new one dies
            else:
                self.r.retag("g:" + name, G)


def _epilogue_backward(r: _Replay, spec: ViTSpec, sh: _Shapes, gr: _Grads) -> str:
    d, pb = sh.d, sh.par
    logits = sh.b * spec.classes * sh.act
    r.where = "backward: loss + head"
    r.alloc("g.nll", logits, B)
    r.free("seed")
    r.alloc("g.logits", logits, B)
    r.free("g.nll", "logp")
    heads = ["head"] + (["head_dist"] if spec.dist_token else [])
    if spec.dist_token:
        # (a + b) / 2: DivBackward makes a new tensor, AddBackward passes it on to both heads
        r.alloc("g.logits_avg", logits, B)
        r.free("g.logits")
        r.live["g.logits"] = r.live.pop("g.logits_avg")
    for k, head in enumerate(heads):
        r.alloc(f"g.{head}in", sh.b * d * sh.act, B)
        gr.make(head + ".w", spec.classes * d * pb)
        gr.make(head + ".b", spec.classes * pb)
        if k == len(heads) - 1:
            r.free("g.logits")
            r.free("norm.out" if spec.pooling == Pooling.token else "pooled")
        gr.accumulate(head + ".b", head + ".w")
    if spec.pooling == Pooling.avg:
        r.alloc("g.norm", sh.tok, B)  # mean backward: expand then divide, one (B, N, D) tensor
        r.free("g.headin")
    else:
        r.alloc("g.norm", sh.tok, B)  # select_backward: zeros with the class row(s) filled
        for head in heads:
            r.free(f"g.{head}in")
    r.where = "backward: norm"
    r.alloc("g.normin", sh.tok, B)
    gr.make("norm.w", d * pb)
    gr.make("norm.b", d * pb)
    r.free("g.norm", "norm.in", "norm.mean", "norm.rstd")
    gr.accumulate("norm.w", "norm.b")
    if spec.pooling == Pooling.avg:
        r.free("norm.out")
    return "g.normin"


def _linear_backward(r: _Replay, gr: _Grads, p: str, name: str, gin_bytes: int, w_elems: int, b_elems: int, pb: int) -> str:
    gin = f"{p}g.{name}in"
    r.alloc(gin, gin_bytes, B)  # grad_output @ W
    gr.make(p + name + ".w", w_elems * pb)  # grad_output^T @ input
    gr.make(p + name + ".b", b_elems * pb)  # grad_output summed over rows
    return gin


def _block_backward(r: _Replay, i: int, g: str, out: str, sh: _Shapes, spec: ViTSpec, wl: Workload, gr: _Grads) -> None:
    p = f"b{i}."
    t, d, f, pb = sh.tok, sh.d, sh.f, sh.par
    r.where = f"backward: blocks.{i}.mlp"
    gfc2 = _linear_backward(r, gr, p, "fc2", sh.hid, d * f, d, pb)
    r.free(p + "gelu")
    gr.accumulate(p + "fc2.b", p + "fc2.w")
    r.alloc(p + "g.gelu", sh.hid, B)
    r.free(gfc2, p + "fc1")
    gfc1 = _linear_backward(r, gr, p, "fc1", t, f * d, f, pb)
    r.free(p + "g.gelu", p + "ln2")
    gr.accumulate(p + "fc1.b", p + "fc1.w")
    r.alloc(p + "g.ln2in", t, B)
    gr.make(p + "ln2.w", d * pb)
    gr.make(p + "ln2.b", d * pb)
    r.free(gfc1, p + "x1", p + "ln2.mean", p + "ln2.rstd")
    r.alloc(p + "g.x1", t, B)  # residual: the incoming gradient plus the MLP branch's
    r.free(p + "g.ln2in", g)
    gr.accumulate(p + "ln2.w", p + "ln2.b")
    r.where = f"backward: blocks.{i}.attn"
    gproj = _linear_backward(r, gr, p, "proj", t, d * d, d, pb)
    if wl.attention == AttentionKernel.sdpa:
        gr.accumulate(p + "proj.b", p + "proj.w")
        r.alloc(p + "g.q", t, B)
        r.alloc(p + "g.k", t, B)
        r.alloc(p + "g.v", t, B)
        r.free(gproj, p + "qkv", p + "lse", p + "attn")
        if sh.cuda:
            _cuda_sdpa_backward_workspace(r, p, sh)
        r.alloc(p + "g.stack", 3 * t, B)  # unbind backward: stack
        r.free(p + "g.q", p + "g.k", p + "g.v")
    else:
        r.free(p + "attn")
        gr.accumulate(p + "proj.b", p + "proj.w")
        r.alloc(p + "g.av", t, B)  # the transposed gradient, made contiguous for bmm
        r.free(gproj)
        r.alloc(p + "g.v", t, B)
        r.alloc(p + "g.probs", sh.amap, B)
        r.free(p + "g.av", p + "v.c")
        r.alloc(p + "g.scores", sh.amap, B)
        r.free(p + "g.probs", p + "probs")
        r.alloc(p + "g.qs", t, B)
        r.alloc(p + "g.kT", t, B)
        r.free(p + "g.scores", p + "qs.c", p + "kT.c")
        r.alloc(p + "g.q", t, B)  # times the scale
        r.free(p + "g.qs")
        r.alloc(p + "g.stack", 3 * t, B)
        r.free(p + "g.q", p + "g.kT", p + "g.v")
    r.alloc(p + "g.qkv", 3 * t, B)  # permute backward: a contiguous copy for the linear
    r.free(p + "g.stack")
    gqkv = _linear_backward(r, gr, p, "qkv", t, 3 * d * d, 3 * d if spec.qkv_bias else 0, pb)
    r.free(p + "g.qkv", p + "ln1")
    gr.accumulate(p + "qkv.b", p + "qkv.w")
    r.alloc(p + "g.ln1in", t, B)
    gr.make(p + "ln1.w", d * pb)
    gr.make(p + "ln1.b", d * pb)
    r.free(gqkv, p + "in", p + "ln1.mean", p + "ln1.rstd")
    r.alloc(out, t, B)
    r.free(p + "g.ln1in", p + "g.x1")
    gr.accumulate(p + "ln1.w", p + "ln1.b")


def _cuda_sdpa_backward_workspace(r: _Replay, p: str, sh: _Shapes) -> None:
    """Buffers the CUDA attention backward allocates inside the kernel call.

    Flash (bf16/fp16): ``dq_accum`` fp32 (B, N rounded to 128, H, head_dim rounded to 32)
    and ``softmax_d`` fp32 (B, H, N rounded to 128). Memory-efficient (fp32): ``delta``
    fp32 (B, H, N). Taken from the kernels' sources; not measured (no GPU here).
    """
    n128 = -(-sh.n // 128) * 128
    hd = sh.d // sh.h
    if sh.act == 2:
        hd32 = -(-hd // 32) * 32
        r.alloc(p + "ws.dq", sh.b * n128 * sh.h * hd32 * 4, B)
        r.alloc(p + "ws.d", sh.b * sh.h * n128 * 4, B)
    else:
        r.alloc(p + "ws.d", sh.b * sh.h * sh.n * 4, B)
    r.free(p + "ws.dq", p + "ws.d")


def _prologue_backward(r: _Replay, spec: ViTSpec, sh: _Shapes, g: str, gr: _Grads) -> None:
    pb, d = sh.par, sh.d
    r.where = "backward: patch embedding"
    names = []
    if spec.pos_embed == PosEmbed.learned:
        names.append(("pos_embed", pos_embed_tokens(spec) * d))
    for token, n in (("cls_token", int(spec.class_token)), ("dist_token", int(spec.dist_token)), ("reg_token", spec.registers)):
        if n:
            names.append((token, n * d))
    for name, elems in names:  # sums over the batch of the gradient slices
        gr.make(name, elems * pb)
        gr.accumulate(name)
    gr.make("patch.w", d * spec.channels * spec.patch * spec.patch * pb)
    gr.make("patch.b", d * pb)
    r.free(g)
    gr.accumulate("patch.w", "patch.b")
    r.free("total_weight")


# --- optimizer ------------------------------------------------------------------------


def _optimizer_state_bytes(spec: ViTSpec, wl: Workload, pb: int) -> int:
    tensors = param_tensors(spec)
    total = sum(n for _, n in tensors) * pb
    if wl.optimizer in (Optimizer.adamw, Optimizer.adam):
        return 2 * total + 4 * len(tensors)  # exp_avg, exp_avg_sq, and a fp32 step per tensor
    if wl.optimizer == Optimizer.sgd_momentum:
        return total
    return 0


def _optimizer_step(r: _Replay, spec: ViTSpec, wl: Workload, pb: int, foreach: bool) -> None:
    """Temporaries of ``optimizer.step()``: only Adam-type optimizers make any.

    Single-tensor Adam (PyTorch's default on the CPU) computes, per parameter,
    ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``: two tensors of the
    parameter's size, plus the previous parameter's ``denom`` until the name is rebound.
    The foreach implementation (default on CUDA) makes ``exp_avg_sq.sqrt()`` for every
    parameter at once.
    """
    r.where = "optimizer step"
    if wl.optimizer not in (Optimizer.adamw, Optimizer.adam):
        return
    tensors = param_tensors(spec)
    if foreach:
        r.alloc("opt.sqrt", sum(n for _, n in tensors) * pb, OT)
        r.free("opt.sqrt")
        return
    prev = None
    for k, (_, n) in enumerate(tensors):
        r.alloc("opt.sqrt", n * pb, OT)
        r.alloc(f"opt.denom{k}", n * pb, OT)
        r.free("opt.sqrt")
        if prev:
            r.free(prev)
        prev = f"opt.denom{k}"
    if prev:
        r.free(prev)


# --- the whole step ----------------------------------------------------------------------


def _shapes(spec: ViTSpec, wl: Workload) -> _Shapes:
    e = _element_bytes(wl.precision)
    cuda = wl.device == Device.cuda
    return _Shapes(
        b=wl.batch,
        n=spec.tokens,
        d=spec.dim,
        f=spec.mlp_hidden,
        h=spec.heads,
        c=spec.channels,
        act=e,
        par=e,
        stat=4 if cuda else e,  # CUDA keeps LayerNorm statistics in fp32 for 16-bit inputs
        cuda=cuda,
    )


def _saved_by_component(r: _Replay, spec: ViTSpec) -> dict[str, int]:
    """Saved activations at the end of the forward pass, grouped by component path."""
    groups = {
        "patch_embed": ("b0.in",),
        "blocks/norm1": ("ln1", "ln1.mean", "ln1.rstd"),
        "blocks/attn/qkv": ("qkv", "qs.c", "kT.c", "v.c"),
        "blocks/attn/core": ("attn", "lse", "probs"),
        "blocks/norm2": ("x1", "ln2", "ln2.mean", "ln2.rstd"),
        "blocks/mlp": ("fc1", "gelu"),
        "blocks/residual": ("in",),
        "norm + head": ("norm.in", "norm.out", "norm.mean", "norm.rstd", "pooled", "logp", "total_weight"),
    }
    out = dict.fromkeys(groups, 0)
    for name, (nbytes, cat) in r.live.items():
        if cat != S:
            continue
        key = name.split(".", 1)[1] if name[0] == "b" and name[1].isdigit() else name
        for group, members in groups.items():
            if key in members or name in members:
                out[group] += nbytes
                break
    return out


def estimate_memory(spec: ViTSpec, wl: Workload) -> MemoryResult:
    """Replay one steady-state training step (or one no_grad forward) and return its memory."""
    sh = _shapes(spec, wl)
    r = _Replay(CUDA_BLOCK_BYTES if sh.cuda else 1)
    pb = sh.par
    tensors = param_tensors(spec)
    for k, (_, n) in enumerate(tensors):
        r.alloc(f"w{k}", n * pb, W)
    if spec.pos_embed == PosEmbed.sincos:
        r.alloc("sincos", spec.patch_tokens * sh.d * pb, W)  # a buffer, moved with the model
    weights = r.cat[W]
    grads_total = sum(-(-n * pb // r.round_to) * r.round_to for _, n in tensors)
    train = wl.training
    state_bytes = _optimizer_state_bytes(spec, wl, pb) if train else 0
    if train:
        r.alloc("opt.states", state_bytes, O)
        if wl.keep_grads:
            r.alloc("grads.kept", grads_total, G)
    inputs = sh.b * sh.c * spec.image_h * spec.image_w * sh.act + (sh.b * INDEX_BYTES if train else 0)
    r.where = "forward: input batch"
    r.alloc("x", sh.b * sh.c * spec.image_h * spec.image_w * sh.act, I)
    if train:
        r.alloc("y", sh.b * INDEX_BYTES, I)
    depth = spec.depth
    fwd = _block_forward_train if train else _block_forward_infer
    _prologue_forward(r, spec, sh, train)
    last_in = "norm.in"
    for i in _ends(depth):
        nxt = f"b{i + 1}.in" if i < depth - 1 else last_in
        fwd(r, i, nxt, sh, spec, wl)
        if i == 0 and depth > 2:
            _skip_forward(r, depth, train)
    _epilogue_forward(r, spec, sh, train)
    saved_components = _saved_by_component(r, spec) if train else {}
    saved = r.cat[S]
    if train:
        gr = _Grads(r, wl.keep_grads)
        g = _epilogue_backward(r, spec, sh, gr)
        for i in reversed(_ends(depth)):
            out = f"g.b{i}.in"
            _block_backward(r, i, g, out, sh, spec, wl, gr)
            g = out
            if i == depth - 1 and depth > 2:
                g = _skip_backward(r, depth, g, sh, spec, wl, gr)
        _prologue_backward(r, spec, sh, g, gr)
        _optimizer_step(r, spec, wl, pb, foreach=sh.cuda)
    at_peak = dict.fromkeys(CATEGORIES, 0)
    for cat, nbytes in r.peak_cat.items():
        at_peak[_REPORTED[cat]] += nbytes
    return MemoryResult(
        weights=weights,
        gradients=grads_total if train else 0,
        optimizer_states=state_bytes,
        inputs=inputs,
        activations=saved,
        peak=r.peak,
        transient=r.peak_cat[F] + r.peak_cat[B] + r.peak_cat[OT],
        peak_phase=r.peak_where,
        at_peak=at_peak,
        saved_by_component=saved_components,
    )


def _ends(depth: int) -> list[int]:
    """The blocks replayed in full: the first and the last."""
    return [0] if depth == 1 else [0, depth - 1]


def _skip_forward(r: _Replay, depth: int, train: bool) -> None:
    """Blocks 1 .. depth-2 forward: each leaves the same saved set as block 0 did."""
    if not train:
        # under no_grad nothing is kept: the next block's input replaces this one's
        r.live[f"b{depth - 1}.in"] = r.live.pop("b1.in")
        return
    saved0 = [(n[3:], b) for n, (b, c) in r.live.items() if n.startswith("b0.") and c == S and n != "b0.in"]
    inp = r.live["b1.in"][0]
    r.sampling = False  # totals only grow here: the last block's forward peaks higher
    for i in range(1, depth - 1):
        for name, nbytes in saved0:
            r.alloc(f"b{i}.{name}", nbytes, S)
        r.alloc(f"b{i + 1}.in", inp, S)
    r.sampling = True


def _skip_backward(r: _Replay, depth: int, g: str, sh: _Shapes, spec: ViTSpec, wl: Workload, gr: _Grads) -> str:
    """Blocks depth-2 .. 1 backward: free their saved tensors, add their gradients."""
    r.sampling = False
    block_grad_bytes = [n * sh.par for _, n in _block_param_elems(spec)]
    for i in range(depth - 2, 0, -1):
        for name in [n for n in r.live if n.startswith(f"b{i}.")]:
            r.free(name)
        for k, nbytes in enumerate(block_grad_bytes):
            gr.make(f"b{i}.p{k}", nbytes)
            gr.accumulate(f"b{i}.p{k}")
    r.sampling = True
    r.live[f"g.b{0}.out"] = r.live.pop(g)
    return f"g.b{0}.out"


def _block_param_elems(spec: ViTSpec) -> list[tuple[str, int]]:
    from vitcost.formulas import block_param_tensors

    return block_param_tensors(spec)
