"""Operator pieces: what each operator of a transformer step allocates, saves and frees.

One source of truth per operator (a linear layer under autocast, LayerNorm, attention by
kernel, LayerScale, gradients, the optimizer step), written against a :class:`Replay`
(``vitcost.replay``) and the sizes of one step (:class:`Shapes`). A model family
(``vitcost.memory`` for the ViT) composes them in its execution order; tensors are named
``<prefix><name>`` so that a model can free what its next operator no longer needs.

docs/memory-model.md explains each rule and what measured it. Every size in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from vitcost.replay import B, F, G, O, OT, S, WC, Replay, _round_up
from vitcost.specs import AttentionKernel, Optimizer, Workload


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
    grads: int  # bytes of the gradients a step makes (of every parameter the forward uses)
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
    def casts(self) -> bool:
        """Under autocast, what reaches a linear from the residual stream is cast down (the
        stream is fp32); VideoMAE's stream is low precision itself, so nothing is cast."""
        return self.amp and self.res != self.lo

    @property
    def ln_upcast(self) -> bool:
        """CUDA autocast runs LayerNorm in fp32: on a low-precision stream (VideoMAE's) each
        norm copies its input up, keeps the copy, and hands the linears an fp32 output to cast.
        (CPU autocast keeps a bf16 norm bf16.)"""
        return self.amp and self.cuda and self.res == self.lo

    @property
    def softmax_fp32(self) -> bool:
        """CUDA autocast runs softmax in fp32; CPU autocast (bf16) does not."""
        return self.amp and self.cuda


def kernel_sizes(n: int, d: int, h: int, cuda: bool, lo: int) -> dict[str, int]:
    """What the fused attention kernels pad: CPU flash and CUDA flash keep (B, H, N)
    statistics, CUDA memory-efficient (fp32 inputs) pads N to 32; CUDA flash backward's
    workspaces round N to 128 and the head width to 32."""
    return dict(lse_n=_round_up(n, 32) if cuda and lo == 4 else n, n128=_round_up(n, 128),
                hd32=_round_up(d // h, 32))


def lse_bytes(sh: Shapes) -> int:
    """Per-row softmax statistics a fused attention kernel saves (fp32)."""
    return sh.b * sh.h * sh.lse_n * 4


def linear_forward(r: Replay, sh: Shapes, p: str, name: str, w_elems: int, b_elems: int,
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


def attention_core_forward(r: Replay, sh: Shapes, p: str, kernel: AttentionKernel, grad: bool,
                           explicit32: bool = False, bias_bytes: int = 0, bias_given: bool = False,
                           math: bool = False, call_temps: tuple[str, ...] = ()) -> None:
    """q, k, v to the attention output ``attn`` (B, N, D), by kernel.

    The softmax runs in fp32 and its output is cast back to the matmul's precision under
    CUDA autocast (its policy), or always with ``explicit32``: Hugging Face's
    ``softmax(dtype=float32).to(dtype)``, one expression, so the low-precision scores die
    only after the cast. Under no_grad the attention weights (``probs``, and ``probs.32``
    when autocast made them) are left to the caller, which may hold them. ``bias_bytes``: a
    relative position bias of so many bytes, (1, H, N, N) in the table's dtype, gathered from
    its table and added to the scores (eager only): in a wider dtype (fp32 under autocast) the
    sum, and so the softmax, are in it, and the matmul then takes a low-precision copy.
    ``bias_given``: such a bias made by the caller (Swin's, gathered before q and k exist), which
    the caller frees. ``math``: SDPA's math fallback (``_sdpa_math_forward``), the CPU's for a
    mask that needs a gradient. ``call_temps``: what the call's arguments made (autocast's
    casts), freed when the kernel returns.
    """
    t = sh.tok_lo
    widened = bool(bias_bytes or bias_given) and sh.par > sh.lo
    softmax32 = explicit32 or sh.softmax_fp32 or widened
    keep = S if grad else F
    if math:
        _sdpa_math_forward(r, sh, p, grad, call_temps)
        return
    if kernel == AttentionKernel.sdpa:
        # q, k, v are views of the qkv output, saved by SDPA with its output and statistics;
        # the output is laid out (B, N, H, hd), so transpose + reshape is a view
        r.alloc(p + "attn", t, keep)
        r.alloc(p + "lse", lse_bytes(sh), keep)
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
    if bias_bytes:
        relative_bias_forward(r, sh, p, bias_bytes)
    if bias_bytes or bias_given:
        r.alloc(p + "scores.b", sh.amap * sh.par // sh.lo if widened else sh.amap, F)
        r.free(p + "scores", *(() if bias_given else (p + "bias",)))
        # widened, the sum is the softmax's fp32 input (no cast of the scores is made)
        r.rename(p + "scores.b", p + ("scores.32" if widened else "scores"))
    if softmax32 and sh.lo == 2:
        # the scores are cast up; softmax saves its fp32 output; the scores themselves
        # stay referenced by the caller until softmax returns
        if not widened:
            r.alloc(p + "scores.32", sh.amap * 2, F)
        r.alloc(p + "probs.32", sh.amap * 2, keep)
        if not (widened and explicit32):  # (widened, the fp32 sum is the caller's, held like the scores)
            r.free(p + "scores.32")
        if not explicit32:
            r.free(p + "scores")
        r.alloc(p + "probs", sh.amap, keep)  # the matmul's low-precision copy
        r.free(p + "scores", p + "scores.32")  # (an explicit cast back is in softmax's expression: they die now)
        if explicit32 and not grad:
            r.free(p + "probs.32")  # a temporary of that expression
    else:
        r.alloc(p + "probs", sh.amap, keep)  # softmax saves its output, not its input
        r.free(p + "scores")
    if not views:
        r.alloc(p + "v.c", t, keep)
    r.alloc(p + "av", t, F)
    if not grad:
        r.free(p + "v.c")
        if softmax32 and not explicit32:
            r.free(p + "probs")  # the cast copy dies with the matmul; the fp32 maps live on
    r.alloc(p + "attn", t, keep)  # transpose(1, 2).reshape copies; proj saves the copy
    r.free(p + "av")


def relative_bias_forward(r: Replay, sh: Shapes, p: str, bias_bytes: int) -> None:
    """A relative position bias gathered from its table by the index (``table[index]``,
    (N N, H)), permuted to (H, N, N) and made contiguous: a copy, but with one head, whose
    permuted table is contiguous already. Leaves ``bias``."""
    r.alloc(p + "bias.g", bias_bytes, F)
    if sh.h > 1:
        r.alloc(p + "bias", bias_bytes, F)
        r.free(p + "bias.g")
    else:
        r.rename(p + "bias.g", p + "bias")


def relative_bias_backward(r: Replay, gr: "Grads", sh: Shapes, p: str, entries: int) -> None:
    """The gathered bias's gradient (``g.bias``, summed over the batch) put, accumulated, into
    a zero table of ``entries`` (``index_put``): the table's gradient."""
    r.alloc(p + "g.bias.zeros", entries * sh.par, B)
    gr.make_param(p + "rel", entries)
    r.free(p + "g.bias.zeros", p + "g.bias")
    gr.accumulate(p + "rel")


def rope_forward(r: Replay, x: str, sh: Shapes, keep: int) -> None:
    """RoPE-2D on q or k (``vitcost.reference_vit.apply_rope``): ``x * cos`` and
    ``cat(-x2, x1) * sin`` in the dtype x meets the (parameter-dtype) tables in (fp32 under
    autocast), added, and cast back to x's: ``x.r``, which attention saves; the products save
    only the tables, which exist."""
    e = sh.b * sh.n * sh.d  # (B, H, N, hd)
    wide = sh.par  # x's dtype promoted by the tables': fp32 under autocast
    r.alloc(x + ".cos", e * wide, F)
    r.alloc(x + ".neg", e // 2 * sh.lo, F)
    r.alloc(x + ".rot", e * sh.lo, F)
    r.free(x + ".neg")
    r.alloc(x + ".sin", e * wide, F)
    r.free(x + ".rot")
    r.alloc(x + ".r", e * wide, keep if wide == sh.lo else F)
    r.free(x + ".sin", x + ".cos")
    if wide != sh.lo:  # .type_as(x)
        r.alloc(x + ".r.lo", e * sh.lo, keep)
        r.free(x + ".r")
        r.rename(x + ".r.lo", x + ".r")


def rope_backward(r: Replay, g: str, sh: Shapes) -> None:
    """RoPE-2D's backward from the gradient ``g`` of ``x.r`` to x's, left under the name ``g``:
    through the cast, each product's gradient (the rotated one cast to x's dtype first), the
    negation's, the halves put together, the two branches added."""
    e = sh.b * sh.n * sh.d
    wide = sh.par
    if wide != sh.lo:
        r.alloc(g + ".32", e * wide, B)
        r.free(g)
        g32 = g + ".32"
    else:
        g32 = g
    for branch in ("rot", "x"):  # the add's two inputs: the rotated half's product first
        if wide != sh.lo:
            r.alloc(f"{g}.{branch}.32", e * wide, B)
            r.alloc(f"{g}.{branch}", e * sh.lo, B)
            r.free(f"{g}.{branch}.32")
        else:
            r.alloc(f"{g}.{branch}", e * sh.lo, B)
        if branch == "rot":
            r.alloc(g + ".neg", e // 2 * sh.lo, B)
    r.free(g32)
    r.alloc(g + ".halves", e * sh.lo, B)  # chunk's backward: the two halves' gradients side by side
    r.free(g + ".rot", g + ".neg")
    r.alloc(g + ".sum", e * sh.lo, B)
    r.free(g + ".x", g + ".halves")
    r.rename(g + ".sum", g)


def gelu_mlp_backward(r: Replay, gr: "Grads", sh: Shapes, p: str, gfc2: str, cast_in: bool,
                      early: bool = False) -> str:
    """GELU's backward (from ``gfc2``, fc2's input gradient; it reads fc1's output, which
    goes) and fc1's, whose input (the second norm's output, ``ln2``) it saved; returns that
    input's gradient. ``cast_in``: fc1 cast its input down under autocast."""
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    r.alloc(p + "g.gelu", sh.hid, B)
    r.free(gfc2, p + "fc1")
    return linear_backward(r, gr, sh, p, "fc1", bn * f, bn * d, f * d, f, False, cast_in,
                           (p + "g.gelu", p + "ln2"), early=early)


def cross_entropy_forward(r: Replay, sh: Shapes, logits: str) -> None:
    """``F.cross_entropy`` of the (B, classes) ``logits``, which go once the loss exists: under
    autocast an fp32 copy first; log_softmax saves its output, the NLL its total weight."""
    logits_hi = sh.b * sh.classes * sh.par  # the loss runs in fp32 under autocast
    if sh.amp:
        r.alloc("logits.32", logits_hi, F)
    r.alloc("logp", logits_hi, S)
    r.alloc("loss", sh.par, F)
    r.alloc("total_weight", sh.par, S)
    r.free("logits.32", logits)


def cross_entropy_backward(r: Replay, sh: Shapes) -> None:
    """From the seed (``ones_like(loss)``) to ``g.logits`` (in the loss's dtype)."""
    logits_hi = sh.b * sh.classes * sh.par
    r.alloc("g.nll", logits_hi, B)
    r.free("seed")
    r.alloc("g.logits", logits_hi, B)
    r.free("g.nll", "logp")


def _sdpa_math_forward(r: Replay, sh: Shapes, p: str, grad: bool, call_temps: tuple[str, ...]) -> None:
    """SDPA's math fallback (``_scaled_dot_product_attention_math``), which the CPU runs for a
    mask that needs a gradient: low-precision q, k and v are copied to fp32 and everything is
    computed there; q and k are each scaled by the scale's square root; the sum with the mask
    (``bias``, the caller's) and a softmax that saves its output; the weights (cast back, in
    low precision: the function returns them, SDPA drops them) and the output cast back; then
    the (B, N, D) copy the projection reads, ``attn``."""
    keep = S if grad else F
    up = sh.lo == 2
    t = sh.tok_lo
    t32 = t * 2 if up else t
    maps = sh.amap * 2 if up else sh.amap
    views = sh.eager_views
    if up:
        for x in ("q", "k", "v"):
            r.alloc(f"{p}{x}.32", t32, keep if (views and x == "v") else F)
    r.alloc(p + "qs", t32, keep if views else F)  # q * sqrt(scale)
    r.alloc(p + "ks", t32, keep if views else F)
    if not views:
        r.alloc(p + "qs.c", t32, keep)  # matmul's contiguous 3-D copies
        r.alloc(p + "kT.c", t32, keep)
    r.alloc(p + "scores", maps, F)
    if not views:
        r.free(p + "ks")
    r.alloc(p + "scores.b", maps, F)  # + the mask
    r.free(p + "scores")
    r.alloc(p + "probs", maps, keep)
    r.free(p + "scores.b")
    if up:
        r.alloc(p + "probs.lo", sh.amap, F)  # the weights the function returns, cast back
    if not views:
        r.alloc(p + "v.c", t32, keep)
    r.alloc(p + "av", t32, F)
    out = p + "av"
    if up:
        r.alloc(p + "av.lo", t, F)
        r.free(p + "q.32", p + "k.32", p + "v.32", p + "probs.lo", p + "av")
        out = p + "av.lo"
    if not views:
        r.free(p + "qs")
    if not grad:
        r.free(p + "qs.c", p + "kT.c", p + "v.c", p + "probs", p + "v.32", p + "qs", p + "ks")
    r.free(*call_temps)  # SDPA returns
    r.alloc(p + "attn", t, keep)  # transpose(1, 2).reshape copies; the projection saves the copy
    r.free(out)


def layernorm_forward(r: Replay, sh: Shapes, name: str, out_cat: int, stats_cat: int, grad: bool,
                      rows=None, upcast: bool = False) -> None:
    """A LayerNorm's output and its (B, N) mean and rstd, which only backward keeps;
    ``rows``: over so many rows of D instead of B N (a pooled (B, D) vector). ``upcast``: CUDA
    autocast runs LayerNorm in fp32 on a low-precision input: it copies the input up first
    (the copy is what backward keeps), and the output is fp32."""
    elems = (sh.b * sh.n if rows is None else rows) * sh.d
    if upcast:
        r.alloc(name + ".in32", elems * 4, stats_cat)
    r.alloc(name, elems * (4 if upcast else sh.res), out_cat)
    r.alloc(name + ".mean", sh.stats if rows is None else rows * sh.stat, stats_cat)
    r.alloc(name + ".rstd", sh.stats if rows is None else rows * sh.stat, stats_cat)
    if not grad:
        r.free(name + ".mean", name + ".rstd", name + ".in32")


def layer_scale_forward(r: Replay, sh: Shapes, p: str, name: str, branch: str, grad: bool) -> None:
    """LayerScale, ``branch * gamma``: a new tensor in the promoted dtype (the fp32 of gamma
    under autocast); the multiplication saves the branch output for gamma's gradient, which
    otherwise dies when the scaled copy exists."""
    r.alloc(p + name, sh.tok, F)
    if grad:
        r.retag(p + branch, S)
    else:
        r.free(p + branch)


def layer_scale_backward(r: Replay, gr: "Grads", sh: Shapes, p: str, name: str, branch: str) -> None:
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


class Grads:
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


def linear_backward(r: Replay, gr: Grads, sh: Shapes, p: str, name: str, out_elems: int,
                     in_elems: int, w_elems: int, b_elems: int, cast_grad: bool, input_cast: bool,
                     frees: tuple[str, ...], free_first: tuple[str, ...] = (), early: bool = False,
                     into: str = "") -> str:
    """Backward of a linear layer; returns the name of the gradient of its input.

    Under autocast: a gradient arriving in fp32 (from a residual add) is first cast down;
    the input gradient is cast back up when the input was cast down in forward; the
    weight and bias gradients are computed low and cast to fp32. ``into``: the gradient
    the input already has from another layer that reads it; the engine adds the two as soon
    as this one is ready, before the weight's and bias's gradients are done.
    """
    gc = p + name + ".gc"
    if sh.amp and cast_grad and gc not in r.live:
        r.alloc(gc, out_elems * sh.lo, B)
        r.free(*free_first)
    gin = f"{p}g.{name}in"
    if not b_elems:  # without a bias the linear is a matmul, whose backward makes the weight's first
        gr.make(p + name + ".w", w_elems)
    r.alloc(gin, in_elems * sh.lo, B)  # grad_output @ W
    if b_elems:
        gr.make(p + name + ".w", w_elems)  # grad_output^T @ input
    if early:
        # a recomputed tensor dies when backward unpacks it, not when the node finishes
        r.free(p + name + ".wc", *frees[-1:])
    gr.make(p + name + ".b", b_elems)  # grad_output summed over rows
    r.free(gc, p + name + ".wc", p + name + ".ic", *frees)
    if sh.amp and input_cast:
        r.alloc(gin + ".32", in_elems * sh.res, B)
        r.free(gin)
        gin = gin + ".32"
    if into:
        r.alloc(gin + ".sum", in_elems * (sh.res if sh.amp and input_cast else sh.lo), B)
        r.free(into, gin)
        gin = gin + ".sum"
    if not sh.amp:
        gr.accumulate(p + name + ".b", p + name + ".w")
        return gin
    gr.finish(p + name + ".w", w_elems)
    gr.finish(p + name + ".b", b_elems)
    return gin


def layernorm_backward(r: Replay, gr: Grads, sh: Shapes, p: str, name: str, g_in: str, x: str,
                       rows=None, upcast: bool = False) -> None:
    """LayerNorm backward: the input gradient and the two parameter gradients; then the
    gradient it was given, its saved input and its statistics go (``rows``, ``upcast``: as
    forward; an upcast LayerNorm's input gradient is then cast back down)."""
    elems = (sh.b * sh.n if rows is None else rows) * sh.d
    gin = f"{p}g.{name}in"
    r.alloc(gin, elems * (4 if upcast else sh.res), B)
    gr.make_param(f"{p}{name}.w", sh.d)
    gr.make_param(f"{p}{name}.b", sh.d)
    r.free(g_in, f"{p}{name}.in32" if upcast else x, f"{p}{name}.mean", f"{p}{name}.rstd")
    if upcast:
        r.alloc(gin + ".c", elems * sh.res, B)
        r.free(gin)
        r.rename(gin + ".c", gin)


def attention_core_backward(r: Replay, sh: Shapes, p: str, gproj: str, kernel: AttentionKernel,
                            explicit32: bool = False, qkv: tuple[str, ...] = ("qkv",),
                            bias_grad: Optional[Callable[[], None]] = None, bias_later: bool = False,
                            math: bool = False, mask_cast: bool = False) -> None:
    """The gradients ``g.q``, ``g.k`` (sdpa) or ``g.kT`` (eager), ``g.v`` from the output's;
    ``qkv``: the tensors q, k and v are views of (freed once the kernel's backward is done
    with them). ``bias_grad``: with a relative position bias, the sum's backward also sums
    the scores' gradient over the batch, ``g.bias``, which ``bias_grad()`` takes to its table
    (its nodes were made after the scores': backward reaches them first). ``bias_later``: the
    bias reached the scores through a sum made before q and k (Swin's bias plus its mask, of
    the scores' size): that node, made earlier, runs after q's and k's gradients, and holds the
    scores' gradient until then. ``math``: SDPA's math fallback (``_sdpa_math_backward``; the bias
    is its mask, ``mask_cast``: cast for it by autocast), which leaves ``g.k``, not ``g.kT``."""
    t = sh.tok_lo
    widened = bias_grad is not None and sh.par > sh.lo
    softmax32 = explicit32 or sh.softmax_fp32 or widened
    qkv = tuple(p + name for name in qkv)
    if math:
        _sdpa_math_backward(r, sh, p, gproj, qkv, bias_later, mask_cast)
        bias_grad()
        return
    if kernel == AttentionKernel.sdpa:
        r.alloc(p + "g.q", t, B)
        r.alloc(p + "g.k", t, B)
        r.alloc(p + "g.v", t, B)
        r.free(gproj, *qkv, p + "lse", p + "attn")
        if sh.cuda:
            cuda_sdpa_backward_workspace(r, p, sh)
        return
    if not sh.eager_views:
        r.alloc(p + "g.av", t, B)  # the transposed gradient, made contiguous for bmm
        r.free(gproj)
    r.alloc(p + "g.v", t, B)
    r.alloc(p + "g.probs", sh.amap, B)
    r.free(p + "g.av", p + "v.c", gproj)
    if sh.eager_views and len(qkv) == 3:
        r.free(qkv[2])  # v apart from q and k (a tensor of its own): its matmul is done with it
    if softmax32 and sh.lo == 2:
        r.free(p + "probs")  # the low-precision copy, saved by the matmul only
        r.alloc(p + "g.probs.32", 2 * sh.amap, B)
        r.free(p + "g.probs")
        r.alloc(p + "g.scores.32", 2 * sh.amap, B)
        r.free(p + "g.probs.32", p + "probs.32")
        r.alloc(p + "g.scores", sh.amap, B)
        if not widened:
            r.free(p + "g.scores.32")
        if bias_grad is not None and not bias_later:  # the bias's share, summed over the batch (fp32 if widened)
            r.alloc(p + "g.bias", sh.h * sh.n * sh.n * (4 if widened else sh.lo), B)
        if widened and not bias_later:
            r.free(p + "g.scores.32")
    else:
        r.alloc(p + "g.scores", sh.amap, B)  # softmax backward reads its saved output
        r.free(p + "g.probs", p + "probs")
        if bias_grad is not None and not bias_later:  # the same gradient for the bias, summed over the batch
            r.alloc(p + "g.bias", sh.h * sh.n * sh.n * sh.lo, B)
    # the gradient the bias's node holds until it runs
    held = p + ("g.scores.32" if widened else "g.scores") if bias_later else ""
    if bias_grad is not None and not bias_later:
        bias_grad()
    if kernel == AttentionKernel.eager_postscale:
        r.alloc(p + "g.raw", sh.amap, B)  # the scale's backward: a new map
        if held != p + "g.scores":
            r.free(p + "g.scores")
        r.alloc(p + "g.q", t, B)
        r.alloc(p + "g.kT", t, B)
        r.free(p + "g.raw", p + "qs.c", p + "kT.c")
        if sh.eager_views:
            r.free(*qkv)
        if held:
            r.alloc(p + "g.bias", sh.h * sh.n * sh.n * (4 if widened else sh.lo), B)
            r.free(held)
            bias_grad()
    else:
        r.alloc(p + "g.qs", t, B)
        r.alloc(p + "g.kT", t, B)
        if held != p + "g.scores":
            r.free(p + "g.scores")
        r.free(p + "qs.c", p + "kT.c")
        if sh.eager_views:
            r.free(*qkv, p + "qs")
        r.alloc(p + "g.q", t, B)  # times the scale
        r.free(p + "g.qs")
        if held:
            r.alloc(p + "g.bias", sh.h * sh.n * sh.n * (4 if widened else sh.lo), B)
            r.free(held)
            bias_grad()


def _sdpa_math_backward(r: Replay, sh: Shapes, p: str, gproj: str, qkv: tuple[str, ...], bias_later: bool,
                        mask_cast: bool) -> None:
    """The math fallback's backward (``_sdpa_math_forward``), to ``g.q``, ``g.k``, ``g.v`` and
    the mask's gradient summed over the batch, ``g.bias``. Low precision: the output's
    gradient cast up, everything in fp32, q's, k's and v's gradients cast back; the mask's
    share cast to its dtype, after a sum over the batch for a broadcast mask; under autocast
    (``mask_cast``) cast back up to the fp32 bias's. ``bias_later``: the mask was the sum of
    the bias and another mask (Swin's), whose node, made earlier, sums it after q's and k's
    gradients exist."""
    up = sh.lo == 2
    t = sh.tok_lo
    t32 = 2 * t if up else t
    maps32 = 2 * sh.amap if up else sh.amap
    table = sh.h * sh.n * sh.n  # (1, H, N, N)
    views = sh.eager_views
    g = gproj
    if up:
        r.alloc(p + "g.av.32", t32, B)
        r.free(g)
        g = p + "g.av.32"
    if not views:
        r.alloc(p + "g.av", t32, B)  # made contiguous for bmm
        r.free(g)
        g = p + "g.av"
    r.alloc(p + "g.v.32", t32, B)
    r.alloc(p + "g.probs", maps32, B)
    r.free(g, p + "v.c")
    r.alloc(p + "g.scores", maps32, B)  # softmax backward reads its saved output
    r.free(p + "g.probs", p + "probs")
    if up:  # the mask's share in its (low) dtype: summed first when it was broadcast
        if bias_later:
            r.alloc(p + "g.mask", sh.amap, B)
        else:
            r.alloc(p + "g.mask.32", table * 4, B)
            r.alloc(p + "g.mask", table * sh.lo, B)
            r.free(p + "g.mask.32")
    elif not bias_later:
        r.alloc(p + "g.bias", table * sh.lo, B)
    r.alloc(p + "g.qs", t32, B)
    r.alloc(p + "g.kT", t32, B)
    if up or not bias_later:
        r.free(p + "g.scores")
    r.free(p + "qs.c", p + "kT.c")
    if views:
        r.free(*qkv, p + "qs", p + "ks", p + "q.32", p + "k.32", p + "v.32")
    r.alloc(p + "g.q.32", t32, B)  # times the scale's root
    r.free(p + "g.qs")
    r.alloc(p + "g.k.32", t32, B)
    r.free(p + "g.kT")
    for x in ("q", "k", "v"):
        if up:
            r.alloc(f"{p}g.{x}", t, B)
            r.free(f"{p}g.{x}.32")
        else:
            r.rename(f"{p}g.{x}.32", f"{p}g.{x}")
    if up:
        if mask_cast:  # autocast's cast of the fp32 mask, undone
            if bias_later:
                r.alloc(p + "g.comb", maps32, B)
                r.free(p + "g.mask")
                r.alloc(p + "g.bias", table * 4, B)
                r.free(p + "g.comb")
            else:
                r.alloc(p + "g.bias", table * 4, B)
                r.free(p + "g.mask")
        elif bias_later:
            r.alloc(p + "g.bias", table * sh.lo, B)
            r.free(p + "g.mask")
        else:
            r.rename(p + "g.mask", p + "g.bias")
    elif bias_later:
        r.alloc(p + "g.bias", table * sh.lo, B)
        r.free(p + "g.scores")


def cuda_sdpa_backward_workspace(r: Replay, p: str, sh: Shapes) -> None:
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


def optimizer_state_bytes(wl: Workload, sizes: tuple[int, ...], cuda: bool) -> int:
    total = sum(sizes)
    if wl.optimizer in (Optimizer.adamw, Optimizer.adam):
        # exp_avg and exp_avg_sq, plus a fp32 ``step`` per tensor that PyTorch keeps on the
        # CPU unless the optimizer is capturable or fused: none of it on a GPU
        return 2 * total + (0 if cuda else 4 * len(sizes))
    if wl.optimizer == Optimizer.sgd_momentum:
        return total
    return 0


def optimizer_temporary_bytes(sizes: tuple[int, ...], cuda: bool) -> int:
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


def optimizer_step(r: Replay, sh: Shapes) -> None:
    """Temporaries of ``optimizer.step()``: only Adam-type optimizers make any."""
    r.where = "optimizer step"
    if sh.first_state_parts:  # a first step creates the states
        r.alloc_parts("opt.states", sum(sh.first_state_parts), sh.first_state_parts, O)
    r.alloc_parts("opt.temporaries", sh.opt_tmp, sh.opt_tmp_parts, OT)
    r.free("opt.temporaries")
