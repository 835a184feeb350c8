"""Hugging Face transformers' ViT layer: the attention half of a block, as its code runs it.

The MLP half, the embeddings, the final norm and the classifier allocate as timm's do
(``vitcost.memory`` composes them); the attention differs (``ViTAttention`` and
``eager_attention_forward`` in ``transformers/models/vit/modeling_vit.py``):

* q, k and v are three linear layers on the same normed input, so under autocast that
  input is cast three times, and each cast is saved;
* the eager kernel scales the N x N scores after ``q @ kᵀ``; ViT's and DeiT's run the
  softmax in fp32 (``softmax(dtype=float32).to(dtype)``): in bf16 both the fp32 and the cast
  maps are kept (DINOv2's, the layer with LayerScale, is a plain softmax);
* the layer holds the attention weights the attention returns (``hidden_states, _ =``)
  until it returns, so under no_grad they live through the MLP;
* in backward, the three input gradients are added one by one (under autocast, each cast
  back to fp32 first), and the eager kernel's q, k, v gradients are made contiguous before
  their linear layers read them.

Every size in bytes.
"""

from __future__ import annotations

from vitcost.ops import (
    Grads,
    Shapes,
    attention_core_backward,
    attention_core_forward,
    layernorm_forward,
    linear_backward,
    linear_forward,
)
from vitcost.replay import B, F, S, Replay
from vitcost.specs import AttentionKernel, Checkpointing, ViTSpec, Workload

QKV = ("q", "k", "v")


def _explicit32(spec: ViTSpec) -> bool:
    """ViT's and DeiT's eager softmax runs in fp32 and casts back; DINOv2's (the layer with
    LayerScale) is a plain softmax, fp32 under CUDA autocast only."""
    return not spec.layer_scale


def attention_forward(r: Replay, p: str, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool) -> None:
    """``layernorm_before``, q/k/v projections, the kernel, ``o_proj`` (named ``proj``)."""
    d, bn = sh.d, sh.b * sh.n
    keep = S if grad else F
    sdpa = wl.attention == AttentionKernel.sdpa
    layernorm_forward(r, sh, p + "ln1", F if (sh.casts or not grad) else S, keep, grad)
    # SDPA saves q, k, v themselves; eager matmuls save contiguous copies unless they are views
    out_cat = S if (grad and (sdpa or sh.eager_views)) else F
    for name in QKV:
        linear_forward(r, sh, p, name, d * d, d if spec.qkv_bias else 0, bn * d if sh.casts else 0, bn * d,
                       out_cat, grad)
    kernel = AttentionKernel.sdpa if sdpa else AttentionKernel.eager_postscale
    attention_core_forward(r, sh, p, kernel, grad, explicit32=_explicit32(spec))
    # the layer holds the weights it is returned (``hidden_states, _ = ...``) until it returns
    linear_forward(r, sh, p, "proj", d * d, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "attn", *(p + n for n in QKV), p + "ln1")
        return
    if not sdpa and not sh.eager_views:
        r.free(*(p + n for n in QKV))  # locals of the attention: they go when it returns
    if sh.casts:
        r.free(p + "ln1")


def attention_backward(r: Replay, gr: Grads, p: str, sh: Shapes, spec: ViTSpec, wl: Workload) -> str:
    """``o_proj``, the kernel, then v, k, q projections; returns the gradient of the normed input."""
    d, bn = sh.d, sh.b * sh.n
    sdpa = wl.attention == AttentionKernel.sdpa
    ck = wl.checkpointing == Checkpointing.full
    kernel = AttentionKernel.sdpa if sdpa else AttentionKernel.eager_postscale
    gproj = linear_backward(r, gr, sh, p, "proj", bn * d, bn * d, d * d, d, sh.casts, False,
                            () if sdpa else (p + "attn",))
    attention_core_backward(r, sh, p, gproj, kernel, explicit32=_explicit32(spec), qkv=QKV)
    return qkv_backward(r, gr, sh, p, spec.qkv_bias, p + "ln1", eager=not sdpa, cast=sh.casts, early=ck)


def qkv_backward(r: Replay, gr: Grads, sh: Shapes, p: str, qkv_bias: bool, saved_input: str, eager: bool,
                 cast: bool, early: bool = False, kT: bool = True) -> str:
    """The v, k and q projections' backward (the reverse of the forward), the three gradients
    of their input added as they come; returns the sum's name. ``eager``: the kernel left each
    gradient (B, H, N, hd), transposed back, so it is copied to (B, N, D) for the linear;
    ``kT``: k's is (B H, hd, N), from q @ kᵀ, which at batch 1 is a transposed matrix the
    linear reads as is. ``saved_input``: what the projections saved, freed with the last."""
    d, bn = sh.d, sh.b * sh.n
    total = ""
    for k, name in enumerate(("v", "k", "q")):
        g = p + ("g.kT" if name == "k" and eager and kT else "g." + name)
        if eager and not sh.one_head and not (name == "k" and kT and sh.one):
            r.alloc(p + "g." + name + ".c", sh.tok_lo, B)
            r.free(g)
            g = p + "g." + name + ".c"
        last = k == 2
        total = linear_backward(r, gr, sh, p, name, bn * d, bn * d, d * d, d if qkv_bias else 0, False, cast,
                                (g, saved_input) if last else (g,), early=early and last, into=total)
    return total
