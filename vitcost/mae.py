"""Masked-autoencoder pretraining: Hugging Face's ``ViTMAEForPreTraining``, replayed.

A *model* like ``vitcost.memory``'s ViT, composed of the same pieces: the patch embedding
and the position table, the random masking (``argsort`` of noise, two ``gather``), the
encoder's blocks (Hugging Face's ViT layer, ``vitcost.vit_hf``) on the visible patches and
the class token, its norm; the decoder: a linear into its width, the mask tokens, the
unshuffling ``gather``, its position table, its blocks on every patch, its norm, the pixel
predictor; the loss, the mean squared error of the masked patches' pixels. Every block is
replayed (no lumps), so no program is compiled for it. Sizes in bytes.
"""

from __future__ import annotations

from dataclasses import replace

from vitcost.ops import Grads, Shapes, kernel_sizes, layernorm_backward, layernorm_forward, linear_backward, linear_forward
from vitcost.replay import B, F, G, S, Replay
from vitcost.specs import ViTSpec, Workload

INDEX = 8  # int64 indices
DECODER = 1000  # decoder block j is block DECODER + j: its tensors are named b1000., b1001., ...


def decoder_shapes(spec: ViTSpec, sh: Shapes) -> Shapes:
    """The decoder's sizes: every patch and the class token, at the decoder's width."""
    m = spec.mae
    n = spec.patch_tokens + 1
    return replace(sh, n=n, d=m.decoder_dim, f=m.decoder_mlp_hidden, h=m.decoder_heads,
                   **kernel_sizes(n, m.decoder_dim, m.decoder_heads, sh.cuda, sh.lo))


def forward(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, grad: bool, image_elems: int, block) -> None:
    """Embeddings and masking, the encoder (``block(i, nxt, shapes, keep_input)`` runs one
    block), the decoder and the loss; leaves what backward needs."""
    m = spec.mae
    b, d, L, K = sh.b, sh.d, spec.patch_tokens, spec.kept_patches
    keep = S if grad else F
    r.where = "forward: patch embedding + masking"
    linear_forward(r, sh, "", "patches", sh.conv_w, d, image_elems, b * L * d, F, grad)
    r.alloc("emb", b * L * d * sh.res, keep)  # + the position table's patch rows (gather saves it)
    r.free("patches")
    r.alloc("noise", b * L * 4, F)  # torch.rand: fp32 whatever the model's dtype
    r.alloc("sorted", b * L * 4, F)  # argsort is sort: values (dropped) and indices
    r.alloc("ids_shuffle", b * L * INDEX, F)
    r.free("sorted")
    r.alloc("sorted", b * L * INDEX, F)
    r.alloc("ids_restore", b * L * INDEX, F)
    r.free("sorted")
    r.alloc("index", b * K * d * INDEX, keep)  # ids_keep repeated over D, gather's index
    r.alloc("visible", b * K * d * sh.res, F)
    if not grad:
        r.free("index")
    r.alloc("mask0", b * L * 4, F)  # torch.ones
    r.alloc("zero", 4, F)  # mask[:, :len_keep] = 0 lifts the 0 to a tensor
    r.free("zero")
    r.alloc("mask", b * L * 4, keep)  # gather(mask, ids_restore)
    r.free("mask0", "noise", "ids_shuffle")
    if not grad:
        r.free("emb")
    r.alloc("cls", d * sh.res, F)  # cls_token + its position
    r.alloc("b0.in", sh.tok, keep)  # cat((cls, visible))
    r.free("visible", "cls")
    for i in range(spec.depth):
        block(i, f"b{i + 1}.in" if i < spec.depth - 1 else "norm.in", sh, i == 0)
    r.where = "forward: norm"
    layernorm_forward(r, sh, "norm", keep if not sh.amp else F, keep, grad)
    if not grad:
        r.free("norm.in", "b0.in")
    # the decoder
    dsh = decoder_shapes(spec, sh)
    dd, n_vis = m.decoder_dim, K + 1
    r.where = "forward: decoder embedding"
    linear_forward(r, sh, "", "dembed", dd * d, dd, b * n_vis * d if sh.amp else 0, b * n_vis * dd, F, grad)
    r.alloc("mask_tokens", b * (L - K) * dd * sh.par, F)  # mask_token.repeat: the parameter's dtype
    if sh.amp:
        r.alloc("dembed.32", b * K * dd * sh.res, F)  # cat promotes the visible rows to fp32
    r.alloc("dcat", b * L * dd * sh.res, keep)  # cat(visible rows, mask tokens): gather saves it
    r.free("dembed.32")
    r.alloc("dindex", b * L * dd * INDEX, keep)  # ids_restore repeated over the decoder width
    r.alloc("unshuffled", b * L * dd * sh.res, F)
    if not grad:
        r.free("dindex", "dcat")
    if sh.amp:
        r.alloc("dembed.32", b * dd * sh.res, F)  # the class row, promoted too
    r.alloc("dcat2", b * (L + 1) * dd * sh.res, F)  # cat(class row, unshuffled)
    r.free("dembed.32", "dembed")
    first = f"b{DECODER}."
    r.alloc(first + "in", dsh.tok, keep)  # + the decoder's position table
    r.free("dcat2")
    for j in range(m.decoder_depth):
        i = DECODER + j
        block(i, f"b{i + 1}.in" if j < m.decoder_depth - 1 else "dnorm.in", dsh, False)
    r.where = "forward: decoder norm + prediction"
    layernorm_forward(r, dsh, "dnorm", keep if not sh.amp else F, keep, grad)
    if not grad:
        r.free("dnorm.in")
    pixels = spec.patch * spec.patch * spec.channels
    rows = b * (L + 1)
    linear_forward(r, dsh, "", "pred", pixels * dd, pixels, rows * dd if sh.amp else 0, rows * pixels, F, grad)
    if sh.amp or not grad:
        r.free("dnorm")
    r.free("mask_tokens", "unshuffled")  # the decoder returns
    # the loss: the squared error of every patch's pixels, averaged over the masked ones
    r.where = "forward: loss"
    xe = 4 if sh.amp else sh.res  # the images' dtype
    r.alloc("target", b * L * pixels * xe, F)  # patchify: a permuted copy of the images
    if m.norm_pix_loss:  # (target - mean) / (var + eps) ** 0.5, per patch: nothing of it needs a gradient
        r.alloc("pix.mean", b * L * xe, F)
        r.alloc("pix.var", b * L * xe, F)
        r.alloc("pix.centred", b * L * pixels * xe, F)
        r.alloc("pix.eps", b * L * xe, F)
        r.alloc("pix.std", b * L * xe, F)
        r.free("pix.eps")
        r.alloc("target.norm", b * L * pixels * xe, F)
        r.free("pix.centred", "pix.std", "target")
        r.rename("target.norm", "target")
    diff_e = max(sh.lo, xe)  # logits - target: the larger of the two dtypes
    r.alloc("diff", b * L * pixels * diff_e, keep)  # ** 2 saves it
    r.alloc("sq", b * L * pixels * diff_e, F)
    if not grad:
        r.free("diff")  # ``loss = (logits - target) ** 2`` rebinds: nothing saved it
    r.alloc("per_patch", b * L * diff_e, F)  # .mean(-1)
    r.free("sq")
    r.alloc("masked", b * L * 4, F)  # * mask (fp32)
    r.alloc("loss.sum", 4, F)
    r.free("masked")
    r.alloc("mask.sum", 4, keep)  # the division saves its divisor
    r.alloc("loss", 4, F)
    r.free("loss.sum", "per_patch", "target", "pix.mean", "pix.var")
    r.free("pred", "ids_restore")  # the output goes once its loss (or logits) is read
    if sh.amp or not grad:
        r.free("norm")  # the encoder's output (``latent``) was held until the forward returned
    if not grad:
        r.free("diff", "mask", "mask.sum")


def backward(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, gr: Grads, block) -> None:
    """The loss, the decoder and the encoder, in reverse; ``block(i, g, out, shapes)`` runs
    one block's backward."""
    m = spec.mae
    b, d, L, K = sh.b, sh.d, spec.patch_tokens, spec.kept_patches
    dsh = decoder_shapes(spec, sh)
    dd, n_vis = m.decoder_dim, K + 1
    pixels = spec.patch * spec.patch * spec.channels
    xe = 4 if sh.amp else sh.res
    diff_e = max(sh.lo, xe)
    r.where = "backward: loss"
    r.alloc("seed", 4, F)  # ones_like(loss)
    r.alloc("g.loss.sum", 4, B)  # / mask.sum() (kept by the graph until backward ends)
    r.free("seed")
    r.alloc("g.per_patch", b * L * 4, B)  # * mask, promoted to the fp32 mask
    if diff_e != 4:
        r.alloc("g.per_patch.c", b * L * diff_e, B)  # back to the per-patch losses' dtype
        r.free("g.per_patch")
        r.rename("g.per_patch.c", "g.per_patch")
    r.free("g.loss.sum", "mask")
    r.alloc("g.sq", b * L * pixels * diff_e, B)  # the mean's backward
    r.free("g.per_patch")
    r.alloc("pow1", b * L * pixels * diff_e, B)  # 2 * diff ** 1 * g
    r.alloc("pow2", b * L * pixels * diff_e, B)
    r.alloc("g.diff", b * L * pixels * diff_e, B)
    r.free("pow1", "pow2", "g.sq", "diff")
    rows = b * (L + 1)
    r.alloc("g.pred", rows * pixels * diff_e, B)  # the logits were rows 1: of the prediction
    r.free("g.diff")
    r.where = "backward: decoder prediction + norm"
    gin = linear_backward(r, gr, dsh, "", "pred", rows * pixels, rows * dd, pixels * dd, pixels, sh.amp,
                          sh.amp, ("g.pred", "dnorm"), free_first=("g.pred",))
    layernorm_backward(r, gr, dsh, "", "dnorm", gin, "dnorm.in")
    gr.accumulate("dnorm.w", "dnorm.b")
    g = "g.dnormin"
    for j in reversed(range(m.decoder_depth)):
        i = DECODER + j
        out = f"g.b{i}.in"
        block(i, g, out, dsh, j)
        g = out
    r.where = "backward: decoder embedding"
    first = b * n_vis * dd * sh.lo
    r.alloc("g.dembed.first", first if not sh.amp else b * n_vis * dd * sh.res, B)  # the class row's slice
    r.alloc("g.zeros", b * L * dd * sh.res, B)  # gather's backward: scatter_add into zeros
    r.alloc("g.dcat", b * L * dd * sh.res, B)
    r.free("g.zeros", g, "dindex", "dcat")
    r.alloc("g.dembed.rest", b * n_vis * dd * sh.res, B)  # the visible rows' slice
    r.alloc("g.dembed", b * n_vis * dd * sh.res, B)
    r.free("g.dembed.first", "g.dembed.rest")
    gr.make_param("decoder.mask_token", dd)  # repeat's backward: summed
    gr.accumulate("decoder.mask_token")
    r.free("g.dcat")
    gin = linear_backward(r, gr, sh, "", "dembed", b * n_vis * dd, b * n_vis * d, dd * d, dd, sh.amp, sh.amp,
                          ("g.dembed", "norm"), free_first=("g.dembed",))
    r.where = "backward: norm"
    layernorm_backward(r, gr, sh, "", "norm", gin, "norm.in")
    gr.accumulate("norm.w", "norm.b")
    g = "g.normin"
    for i in reversed(range(spec.depth)):
        out = f"g.b{i}.in"
        block(i, g, out, sh, i)
        g = out
    r.where = "backward: patch embedding + masking"
    if sh.one and not gr.keep:
        r.retag(g, G)  # at batch 1 the class token's gradient is a slice of it, kept as .grad
    else:
        gr.make_param("cls_token", d)
        gr.accumulate("cls_token")
    r.alloc("g.zeros", b * L * d * sh.res, B)
    r.alloc("g.emb", b * L * d * sh.res, B)
    r.free("g.zeros")
    if not (sh.one and not gr.keep):
        r.free(g)
    r.free("index", "emb")
    if sh.amp:
        r.alloc("g.patches.c", b * L * d * sh.lo, B)
        r.free("g.emb")
    gr.make("patch.w", sh.conv_w)
    gr.make("patch.b", d)
    r.free("g.patches.c", "patches.wc", "patches.ic", "g.emb")
    if sh.amp:
        gr.finish("patch.w", sh.conv_w)
        gr.finish("patch.b", d)
    else:
        gr.accumulate("patch.w", "patch.b")
    r.free("mask.sum")  # the graph goes with the backward

