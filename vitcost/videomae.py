"""Hugging Face's VideoMAE (``VideoMAEForVideoClassification``): a video ViT, replayed.

A *model* like ``vitcost.memory``'s ViT and composed of the same pieces: a Conv3d patch
embedding over tubelets of ``t`` frames (``T/t * H/P * W/P`` tokens, no class token), a fixed
sin-cos table copied to the embeddings' dtype every forward, VideoMAE's layer, and the mean
of the tokens under ``fc_norm`` (the average pooling of ``vitcost.memory``).

VideoMAE's layer differs from Hugging Face's ViT layer in what it holds: the normed input
(``hidden_states_norm``) and the attention's output (``attention_output``) live until the
layer returns; the self-attention computes k (without a bias), v, then q, and its q, k, v
die when it returns, before the output projection; the attention weights die with the
attention module; the softmax is a plain one.

Under autocast the stream stays bf16: the conv makes it so and no fp32 parameter meets it.
CPU autocast keeps a bf16 LayerNorm bf16 (fp32 statistics), so no linear casts its input;
CUDA autocast runs LayerNorm in fp32 (``Shapes.ln_upcast``): each norm copies its input up and keeps
the copy, its fp32 output is cast for each linear, and its gradient is cast back (derived from
autocast's policy, not measured). Sizes in bytes.
"""

from __future__ import annotations

from vitcost.ops import (
    Grads,
    Shapes,
    attention_core_backward,
    attention_core_forward,
    gelu_mlp_backward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from vitcost.replay import B, F, S, WC, Replay
from vitcost.specs import AttentionKernel, Checkpointing, ViTSpec, Workload

ORDER = ("k", "v", "q")  # VideoMAESelfAttention's order


def prologue_forward(r: Replay, spec: ViTSpec, sh: Shapes, grad: bool, image_elems: int) -> None:
    """The tubelet embedding and the table; leaves ``b0.in``."""
    r.where = "forward: patch embedding"
    patch_elems = sh.b * sh.patches * sh.d
    linear_forward(r, sh, "", "patches", sh.conv_w, sh.d, image_elems, patch_elems, F, grad)
    # ``table.detach().type_as(x).to(device, copy=True)``: a cast when the dtypes differ, and a copy
    table = sh.patches * sh.d
    if sh.lo != 4:
        r.alloc("table.cast", table * sh.lo, F)
    r.alloc("table.copy", table * sh.lo, F)
    r.free("table.cast")
    r.alloc("b0.in", sh.tok, S if grad else F)
    r.free("table.copy", "patches")


def block_forward(r: Replay, i: int, nxt: str, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool,
                  checkpointed: bool = False, recompute: bool = False, label: int | None = None,
                  keep_input: bool = False) -> None:
    p = f"b{i}."
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    keep = S if grad else F
    phase = f"backward: blocks.{label if label is not None else i} (recompute)" if recompute else f"forward: blocks.{i}"
    r.where = phase + ".attn"
    sdpa = wl.attention == AttentionKernel.sdpa
    up = sh.ln_upcast
    cast = sh.casts or up  # the linears after a norm cast its output down
    ln_cat = F if (cast or not grad) else S
    layernorm_forward(r, sh, p + "ln1", ln_cat, keep, grad, upcast=up)
    out_cat = S if (grad and (sdpa or sh.eager_views)) else F
    for name in ORDER:
        bias = d if (name != "k" and spec.qkv_bias) else 0
        linear_forward(r, sh, p, name, d * d, bias, bn * d if cast else 0, bn * d, out_cat, grad)
    attention_core_forward(r, sh, p, AttentionKernel.sdpa if sdpa else AttentionKernel.eager_postscale, grad)
    if not grad or not (sdpa or sh.eager_views):
        r.free(*(p + n for n in ORDER))  # the self-attention returns
    linear_forward(r, sh, p, "proj", d * d, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "attn", p + "probs", p + "probs.32")  # the attention module returns
    # attention_output + hidden_states; the layer holds both (recomputed, the layer's own add is
    # a backward temporary to MemTracker: checkpointing wraps the layer's forward, not its call)
    # (upcast, the norms keep fp32 copies, so nothing keeps the stream's own tensors)
    r.alloc(p + "x1", sh.tok, B if recompute else F if up else keep)
    r.where = phase + ".mlp"
    layernorm_forward(r, sh, p + "ln2", ln_cat, keep, grad, upcast=up)
    linear_forward(r, sh, p, "fc1", f * d, f, bn * d if cast else 0, bn * f, keep, grad)
    r.alloc(p + "gelu", sh.hid, keep)
    if recompute:
        if sh.amp:  # fc2 saves a weight copy too: the recompute goes on until it exists
            r.alloc(p + "fc2.bc", d * sh.lo, WC)
            r.alloc(p + "fc2.wc", d * f * sh.lo, WC)
            r.free_matching(".bc")
        r.free(p + "proj", *([p + "x1"] if up else []))
        if cast:
            r.free(p + "ln1", p + "ln2")
        return
    if not grad:
        r.free(p + "fc1", p + "ln2")  # the intermediate returns: its input is rebound
    elif cast:
        r.free(p + "ln2")
    linear_forward(r, sh, p, "fc2", d * f, d, 0, bn * d, F, grad)
    r.alloc(nxt, sh.tok, S if checkpointed else F if up else keep)
    r.free(p + "fc2", p + "proj")  # the layer returns: what it held goes
    if up:
        r.free(p + "x1")
    if cast or not grad:
        r.free(p + "ln1")
    if not grad:
        r.free(p + "gelu", p + "x1")
    if (up or not grad) and not checkpointed and not keep_input:
        r.free(p + "in")  # the caller rebinds it (nothing saved it)


def block_backward(r: Replay, i: int, g: str, out: str, sh: Shapes, spec: ViTSpec, wl: Workload, gr: Grads,
                   label: int | None = None) -> None:
    p = f"b{i}."
    label = i if label is None else label
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    casts = sh.casts
    up = sh.ln_upcast
    ck = wl.checkpointing == Checkpointing.full
    if ck:
        if casts:
            r.alloc(p + "fc2.gc", sh.tok_lo, B)
        block_forward(r, i, "", sh, spec, wl, True, recompute=True, label=label)
    r.where = f"backward: blocks.{label}.mlp"
    gfc2 = linear_backward(r, gr, sh, p, "fc2", bn * d, bn * f, d * f, d, casts, False, (p + "gelu",), early=ck)
    gfc1 = gelu_mlp_backward(r, gr, sh, p, gfc2, casts or up, ck)
    layernorm_backward(r, gr, sh, p, "ln2", gfc1, p + "x1", upcast=up)
    r.alloc(p + "g.x1", sh.tok, B)
    r.free(p + "g.ln2in", g)
    gr.accumulate(p + "ln2.w", p + "ln2.b")
    r.where = f"backward: blocks.{label}.attn"
    sdpa = wl.attention == AttentionKernel.sdpa
    # the gradient of x1 reaches the projection and the residual alike: it is not freed here
    gproj = linear_backward(r, gr, sh, p, "proj", bn * d, bn * d, d * d, d, casts, False,
                            () if sdpa else (p + "attn",))
    kernel = AttentionKernel.sdpa if sdpa else AttentionKernel.eager_postscale
    attention_core_backward(r, sh, p, gproj, kernel, qkv=ORDER)
    grads = {"q": p + "g.q", "k": p + ("g.k" if sdpa else "g.kT"), "v": p + "g.v"}
    total = ""
    for k, name in enumerate(reversed(ORDER)):  # q, v, k: the reverse of the forward
        g_name = grads[name]
        if not sdpa and not sh.one_head and not (name == "k" and sh.one):
            r.alloc(p + "g." + name + ".c", sh.tok_lo, B)
            r.free(g_name)
            g_name = p + "g." + name + ".c"
        last = k == 2
        bias = d if (name != "k" and spec.qkv_bias) else 0
        total = linear_backward(r, gr, sh, p, name, bn * d, bn * d, d * d, bias, False, casts or up,
                                (g_name, p + "ln1") if last else (g_name,), early=ck and last, into=total)
    layernorm_backward(r, gr, sh, p, "ln1", total, p + "in", upcast=up)
    r.alloc(out, sh.tok, B)
    r.free(p + "g.ln1in", p + "g.x1")
    gr.accumulate(p + "ln1.w", p + "ln1.b")
