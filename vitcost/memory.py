"""The ViT family: memory of a training step or forward pass, replayed tensor by tensor.

This module is a *model*: it composes the operator pieces of ``vitcost.ops`` in the order
a timm-style ViT runs them, on the engine of ``vitcost.replay`` (the live totals, the peak,
the trace the caching allocator reads). Another family or implementation is another such
composition of the same pieces.

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

from dataclasses import replace
from functools import lru_cache
import itertools

from vitcost import mae, sharding, swin, videomae, vit_hf
from vitcost.formulas import FROZEN, param_tensors, pos_embed_tokens, relative_bias_entries, zero_shares
from vitcost.ops import (
    Grads,
    Shapes,
    kernel_sizes,
    attention_core_backward,
    attention_core_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    gelu_mlp_backward,
    layer_scale_backward,
    layer_scale_forward,
    layernorm_backward,
    layernorm_forward,
    linear_backward,
    linear_forward,
    optimizer_state_bytes,
    optimizer_step,
    optimizer_temporary_bytes,
    relative_bias_backward,
    rope_backward,
    rope_forward,
)
from vitcost.replay import (  # noqa: F401 - CATEGORIES, MemoryResult and Replay are read from here too
    CATEGORIES,
    CUDA_BLOCK_BYTES,
    G,
    I,
    O,
    S,
    W,
    WC,
    F,
    B,
    MemoryResult,
    Replay,
    Trace,
    _round_up,
    memory_result,
)
from vitcost.specs import (
    AttentionKernel,
    Checkpointing,
    Device,
    Impl,
    Mlp,
    Optimizer,
    POS_BUFFERS,
    PosEmbed,
    Pooling,
    Precision,
    ViTSpec,
    Workload,
)

INDEX_BYTES = 8  # int64 class labels
UNUSED = frozenset(("mask_token",))  # parameters a classification forward never reads


def _stream_stays_low(spec: ViTSpec) -> bool:
    """Under autocast the residual stream is promoted to fp32 by the first fp32 parameter it
    meets: the position embedding, a prefix token, LayerScale's gamma. With none of them the
    conv's bf16 output is the stream, and stays so (on the CPU, where LayerNorm keeps it)."""
    return (spec.impl == Impl.timm and not spec.pos_table and not spec.prefix_tokens
            and not spec.layer_scale)


def shapes_of(spec: ViTSpec, wl: Workload) -> Shapes:
    """Every number the replay sizes a tensor from; the spec and workload otherwise only
    decide which tensors there are."""
    amp = wl.precision in (Precision.amp_bf16, Precision.amp_fp16)
    e = wl.param_bytes
    lo = 2 if amp else e
    # VideoMAE's stream is made by a low-precision conv and never meets an fp32 parameter:
    # under autocast it stays low, LayerNorm included (on the CPU: its statistics fp32)
    stream = lo if (spec.video or spec.swin or (amp and wl.device != Device.cuda and _stream_stays_low(spec))) else e
    cuda = wl.device == Device.cuda
    round_to = CUDA_BLOCK_BYTES if cuda else 1
    b, n, d = wl.batch, spec.tokens, spec.dim
    master = wl.master_bytes  # (fp32 under FSDP's mixed precision, whose compute is in e)
    params = sum(_param_bytes(spec, master, round_to, world=wl.shard_ranks if wl.fsdp else 1))
    grads = fsdp_buffers(spec, wl, round_to).sharded_grad_bytes if wl.fsdp else \
        sum(_param_bytes(spec, e, round_to, used=True))
    sizes = _optimizer_sizes(spec, wl, master, round_to)
    train = wl.training
    adam = wl.optimizer in (Optimizer.adamw, Optimizer.adam)
    return Shapes(
        b=b, n=n, d=d, f=spec.mlp_hidden, h=spec.heads,
        patches=spec.patch_tokens, image=spec.channels * spec.frames * spec.image_h * spec.image_w,
        conv_w=d * spec.channels * spec.patch * spec.patch * spec.tubelet, pos=pos_embed_tokens(spec),
        classes=spec.classes, registers=spec.registers,
        **kernel_sizes(n, d, spec.heads, cuda, lo),
        params=params, grads=grads,
        states=optimizer_state_bytes(wl, sizes, cuda) if train else 0,
        kept=(grads if wl.fsdp else _kept_grad_bytes(spec, b, e, grads, round_to)) if train and wl.accumulates else 0,
        opt_tmp=optimizer_temporary_bytes(sizes, cuda) if train and adam else 0,
        one=b == 1, one_head=spec.heads == 1,
        res=stream, lo=lo, par=e,
        # LayerNorm keeps its statistics in the input dtype on the CPU, fp32 on CUDA
        stat=4 if cuda else e,
        amp=amp, cuda=cuda,
    )


# --- forward ------------------------------------------------------------------------------


def _prologue_forward(r: Replay, spec: ViTSpec, sh: Shapes, grad: bool, image_elems: int) -> None:
    """Patch embedding, prefix tokens, position embedding; leaves ``b0.in``."""
    if spec.video:
        videomae.prologue_forward(r, spec, sh, grad, image_elems)
        return
    saved = S if grad else F
    r.where = "forward: patch embedding"
    patch_elems = sh.b * sh.patches * sh.d
    linear_forward(r, sh, "", "patches", sh.conv_w, sh.d, image_elems, patch_elems, F, grad)
    cur = "patches"
    if spec.impl == Impl.hf and spec.registers:
        _hf_register_prologue(r, spec, sh, saved)
        return
    has_pos = spec.pos_table
    pos_after_cat = spec.pos_embed == PosEmbed.learned and spec.pos_embed_prefix
    if spec.impl == Impl.timm:  # (timm resamples before the prefix tokens are put in)
        _interpolated_pos(r, spec, sh)
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
        if spec.impl == Impl.hf:
            _interpolated_pos(r, spec, sh)
        r.alloc("b0.in", sh.tok, saved)
        r.free(cur, "pos.i")
        cur = "b0.in"
    if cur != "b0.in":  # no prefix and no position added after: the conv output itself
        r.rename(cur, "b0.in")
        r.retag("b0.in", saved)
    r.free("pos.i")  # (timm's resampled table: a local of _pos_embed until it returns)


def _interpolated_in_fp32(r: Replay, name: str, in_elems: int, out_elems: int, par: int, cat: int,
                          fp32: bool = True) -> None:
    """An interpolation (or its backward) that runs in fp32: below fp32 the input is cast up,
    interpolated, the fp32 input freed and the result cast back; in fp32, or (``fp32`` False)
    in the table's own dtype, just the result."""
    if par == 4 or not fp32:
        r.alloc(name, out_elems * 4, cat)
        return
    r.alloc(f"{name}.in.32", in_elems * 4, cat)
    r.alloc(f"{name}.32", out_elems * 4, cat)
    r.free(f"{name}.in.32")
    r.alloc(name, out_elems * par, cat)
    r.free(f"{name}.32")


def _pos_rows_kept(spec: ViTSpec) -> int:
    """Rows of a table interpolated every forward that are kept as they are: Hugging Face's
    class row, timm's prefix rows (none with no_embed_class)."""
    if spec.impl == Impl.hf:
        return 1
    return spec.prefix_tokens if spec.pos_embed_prefix else 0


def _interpolates_in_fp32(spec: ViTSpec) -> bool:
    """timm and DINOv2 interpolate the table in fp32; Hugging Face's ViT in its own dtype."""
    return spec.impl == Impl.timm or spec.layer_scale


def _interpolated_pos(r: Replay, spec: ViTSpec, sh: Shapes) -> None:
    """A model built for another image (``pos_grid``) interpolates its patch positions to the
    image's grid every forward (bicubic; timm's ``dynamic_img_size`` antialiased, before the
    prefix tokens are put in; Hugging Face's after), and puts the kept rows back in front:
    ``pos.i``, which the add reads. (timm's antialiased output is channels-last like its
    input, so laying it out as rows again makes no copy.)"""
    if not spec.pos_grid:
        return
    _interpolated_in_fp32(r, "pos.up", spec.pos_grid ** 2 * sh.d, sh.patches * sh.d, sh.par, F,
                          fp32=_interpolates_in_fp32(spec))
    kept = _pos_rows_kept(spec)
    if not kept:
        r.rename("pos.up", "pos.i")
        return
    r.alloc("pos.i", (sh.patches + kept) * sh.d * sh.par, F)
    r.free("pos.up")


def _interpolated_pos_backward(r: Replay, gr: Grads, spec: ViTSpec, sh: Shapes, cast: str = "") -> None:
    """The interpolated table's gradient: summed over the batch, through the interpolation
    back to the grid's, each of the two slices put into a zero table, added. ``cast``: under
    autocast timm's patch gradient is cast back to the conv's dtype between the sum and the
    interpolation (that node was made after the table's)."""
    table = sh.pos * sh.d * sh.par
    kept = _pos_rows_kept(spec)
    if not sh.one:  # (at batch 1 the sum over the batch is the gradient itself, a view)
        r.alloc("g.pos.i", (sh.patches + kept) * sh.d * sh.par, B)
    if cast:
        r.alloc(cast, sh.b * sh.patches * sh.d * sh.lo, B)
    _interpolated_in_fp32(r, "g.pos.grid", sh.patches * sh.d, spec.pos_grid ** 2 * sh.d, sh.par, B,
                          fp32=_interpolates_in_fp32(spec))
    if not kept:  # the whole table was resampled: reshape's backward copies the grid's gradient to rows
        r.free("g.pos.i")
        gr.make_param("pos_embed", sh.pos * sh.d)
        r.free("g.pos.grid")
        gr.accumulate("pos_embed")
        return
    r.alloc("g.pos.rows", table, B)  # each slice's gradient put into a zero table, then added
    r.free("g.pos.grid")
    r.alloc("g.pos.first", table, B)
    r.free("g.pos.i")
    gr.make_param("pos_embed", sh.pos * sh.d)
    r.free("g.pos.rows", "g.pos.first")
    gr.accumulate("pos_embed")


def _positioned_prefix(spec: ViTSpec) -> int:
    """Prefix tokens with a position (Hugging Face: all but the registers)."""
    return int(spec.class_token) + int(spec.dist_token)


def _hf_register_prologue(r: Replay, spec: ViTSpec, sh: Shapes, saved: int) -> None:
    """Hugging Face's DINOv2 with registers: the class token and the patches, plus the
    position embedding, then the registers put in after the class token (a third tensor)."""
    elems = sh.b * (sh.patches + _positioned_prefix(spec)) * sh.d
    if sh.amp:
        r.alloc("patches.32", sh.b * sh.patches * sh.d * sh.res, F)  # cat promotes to the fp32 tokens
    r.alloc("cat", elems * sh.res, F)
    r.free("patches", "patches.32")
    _interpolated_pos(r, spec, sh)
    r.alloc("pos_add", elems * sh.res, F)
    r.free("cat", "pos.i")
    r.alloc("b0.in", sh.tok, saved)
    r.free("pos_add")


def _block_forward(r: Replay, i: int, nxt: str, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool,
                   checkpointed: bool = False, recompute: bool = False, label: int | None = None,
                   keep_input: bool = False) -> None:
    """One block's forward. ``grad``: autograd saves what backward needs. ``checkpointed``:
    the forward of a checkpointed block, which saves nothing but its input (so it frees like
    a no_grad forward). ``recompute``: that block rerun in backward, stopping, as PyTorch's
    non-reentrant checkpoint does, once the last tensor backward needs (GELU's output) exists.
    ``keep_input``: the caller still holds the block's input when it returns.
    """
    if spec.video:
        videomae.block_forward(r, i, nxt, sh, spec, wl, grad, checkpointed, recompute, label, keep_input)
        return
    p = f"b{i}."
    phase = f"backward: blocks.{label if label is not None else i} (recompute)" if recompute else f"forward: blocks.{i}"
    r.where = phase + ".attn"
    _ATTENTION[spec.impl][0](r, p, sh, spec, wl, grad)
    keep = S if grad else F
    dp = _drops_path(spec, wl, i)
    if spec.layer_scale:
        layer_scale_forward(r, sh, p, "ls1", "proj", grad)
    branch = _drop_path_forward(r, sh, p, "ls1" if spec.layer_scale else "proj", "dp1", spec, grad) if dp else \
        ("ls1" if spec.layer_scale else "proj")
    r.alloc(p + "x1", sh.tok, _x1_cat(spec, keep, recompute))
    r.free(p + branch)
    r.where = phase + ".mlp"
    if _mlp_forward(r, p, sh, spec, grad, recompute):
        return
    if spec.layer_scale:
        layer_scale_forward(r, sh, p, "ls2", "fc2", grad)
    branch = _drop_path_forward(r, sh, p, "ls2" if spec.layer_scale else "fc2", "dp2", spec, grad) if dp else \
        ("ls2" if spec.layer_scale else "fc2")
    r.alloc(nxt, sh.tok, S if checkpointed else keep)
    r.free(p + branch)
    if not grad:
        r.free(p + "x1", p + "probs", p + "probs.32")  # (what a Hugging Face layer holds until it returns)
        if not checkpointed and not keep_input:
            r.free(p + "in")


def _drops_path(spec: ViTSpec, wl: Workload, i: int) -> bool:
    """timm's stochastic depth acts in training, on every block but the first (its rate rises
    linearly from 0 there)."""
    return spec.drop_path and wl.training and i > 0


def _drop_path_forward(r: Replay, sh: Shapes, p: str, branch: str, name: str, spec: ViTSpec, grad: bool) -> str:
    """``branch * mask``: a per-sample (B, 1, 1) mask in the branch's dtype, which the product
    saves, and the product; the branch itself goes (nothing else saved it). Returns the name
    of the product, which the residual add reads."""
    e = sh.res if branch.startswith("ls") else sh.lo  # LayerScale's output is in the promoted dtype
    r.alloc(p + name + ".mask", sh.b * e, S if grad else F)
    r.alloc(p + name, sh.b * sh.n * sh.d * e, F)
    r.free(p + branch)
    if not grad:
        r.free(p + name + ".mask")
    return name


def _drop_path_backward(r: Replay, sh: Shapes, p: str, g: str, name: str, branch: str) -> str:
    """The product's backward: ``g * mask`` in the promoted dtype, cast to the branch's dtype
    (named as the layer below expects its incoming gradient); the mask goes."""
    r.alloc(p + "g." + name, sh.tok, B)
    target = p + branch + ".gc"
    if not branch.startswith("ls") and sh.lo != sh.res:
        r.alloc(target, sh.tok_lo, B)
        r.free(p + "g." + name)
    else:
        r.rename(p + "g." + name, target)
    r.free(p + name + ".mask")
    return target


def _x1_cat(spec: ViTSpec, keep: int, recompute: bool) -> int:
    """Hugging Face checkpoints a layer's ``forward``, not its call: recomputed, the residual
    add (made by the layer itself, in no submodule) is a temporary of backward to MemTracker."""
    return B if recompute and spec.impl == Impl.hf else keep


def _timm_attention_forward(r: Replay, p: str, sh: Shapes, spec: ViTSpec, wl: Workload, grad: bool) -> None:
    """timm's attention half up to the projection: norm1, the fused qkv linear, the kernel, proj."""
    d, bn = sh.d, sh.b * sh.n
    keep = S if grad else F
    sdpa = wl.attention == AttentionKernel.sdpa
    layernorm_forward(r, sh, p + "ln1", _ln_cat(sh, grad), keep, grad)
    # eager attention saves copies of q, k, v, not the qkv output (unless they are views)
    qkv_cat = S if (grad and (sdpa or sh.eager_views)) else F
    linear_forward(r, sh, p, "qkv", 3 * d * d, 3 * d if spec.qkv_bias else 0,
                    bn * d if sh.casts else 0, 3 * bn * d, qkv_cat, grad)
    if spec.pos_embed == PosEmbed.rope_2d:
        for name in ("q", "k"):
            rope_forward(r, p + name, sh, keep)
    bias = sh.h * sh.n * sh.n * sh.par if spec.pos_embed == PosEmbed.relative_bias else 0
    attention_core_forward(r, sh, p, wl.attention, grad, bias_bytes=bias)
    linear_forward(r, sh, p, "proj", d * d, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "qs", p + "attn", p + "qkv", p + "probs", p + "probs.32", p + "ln1", p + "q.r", p + "k.r")
    elif not sdpa and not sh.eager_views:
        r.free(p + "qs", p + "qkv")
    if sh.casts:
        r.free(p + "ln1")


def _ln_cat(sh: Shapes, grad: bool) -> int:
    """Under autocast a LayerNorm output is only an argument: its low-precision copies are saved."""
    return F if (sh.casts or not grad) else S


def _swiglu_forward(r: Replay, p: str, sh: Shapes, grad: bool) -> None:
    """``down(silu(gate(x)) * up(x))`` up to down's input (named ``gelu``, as the GELU MLP's):
    silu saves the gate, the product saves both its factors (each linear casts x itself)."""
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    keep = S if grad else F
    linear_forward(r, sh, p, "gate", f * d, f, bn * d if sh.casts else 0, bn * f, keep, grad)
    r.alloc(p + "act", sh.hid, keep)
    if not grad:
        r.free(p + "gate")
    linear_forward(r, sh, p, "up", f * d, f, bn * d if sh.casts else 0, bn * f, keep, grad)
    r.alloc(p + "gelu", sh.hid, keep)
    if not grad:
        r.free(p + "act", p + "up")


def _swiglu_backward(r: Replay, gr: Grads, p: str, sh: Shapes, ck: bool) -> str:
    """The product's, up's, silu's and gate's backward; returns the normed input's gradient."""
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    r.alloc(p + "g.act", sh.hid, B)  # g * up
    r.alloc(p + "g.up", sh.hid, B)  # g * silu(gate)
    r.free(p + "g.fc2in", p + "act", p + "up")  # the product's node is done: both factors go
    gup = linear_backward(r, gr, sh, p, "up", bn * f, bn * d, f * d, f, False, sh.casts, (p + "g.up",), early=ck)
    r.alloc(p + "g.gate", sh.hid, B)  # silu backward reads the gate
    r.free(p + "g.act", p + "gate")
    return linear_backward(r, gr, sh, p, "gate", bn * f, bn * d, f * d, f, False, sh.casts,
                           (p + "g.gate", p + "ln2"), early=ck, into=gup)


def _mlp_forward(r: Replay, p: str, sh: Shapes, spec: ViTSpec, grad: bool, recompute: bool) -> bool:
    """norm2, fc1, GELU, fc2 (timm's and Hugging Face's alike). True when a recompute stops here."""
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    keep = S if grad else F
    layernorm_forward(r, sh, p + "ln2", _ln_cat(sh, grad), keep, grad)
    if spec.mlp == Mlp.swiglu:
        _swiglu_forward(r, p, sh, grad)
    else:
        linear_forward(r, sh, p, "fc1", f * d, f, bn * d if sh.casts else 0, bn * f, keep, grad)
        r.alloc(p + "gelu", sh.hid, keep)
    if recompute:
        if spec.layer_scale:  # LayerScale saves fc2's output: the recompute runs fc2 too
            linear_forward(r, sh, p, "fc2", d * f, d, 0, bn * d, S, True)
            if sh.amp:
                r.free_matching(".bc")
            if sh.casts:
                r.free(p + "ln2")
        elif sh.amp:  # fc2 saves a weight copy too: the recompute goes on until it exists
            r.alloc(p + "fc2.bc", d * sh.lo, WC)
            r.alloc(p + "fc2.wc", d * f * sh.lo, WC)
            r.free_matching(".bc")  # the recompute stops; its autocast region ends
            if sh.casts:
                r.free(p + "ln2")
        return True
    if not grad:
        r.free(p + "fc1")
    linear_forward(r, sh, p, "fc2", d * f, d, 0, bn * d, F, grad)
    if not grad:
        r.free(p + "gelu", p + "ln2")
    elif sh.casts:
        r.free(p + "ln2")
    return False


def _distillation_loss(r: Replay, sh: Shapes, logits_hi: int) -> None:
    """DeiT's hard distillation: ``0.5 * CE(head, labels) + 0.5 * CE(head_dist, teacher's)``,
    each cross-entropy saving its log-probabilities; the logits go once the sum exists."""
    for k, head in enumerate(("head", "head_dist")):
        if sh.amp:
            r.alloc(f"logits{k}.32", logits_hi, F)
        r.alloc(f"logp{k}", logits_hi, S)
        r.alloc(f"loss{k}", sh.par, F)
        r.alloc(f"total_weight{k}", sh.par, S)
        r.free(f"logits{k}.32")
        r.alloc(f"scaled{k}", sh.par, F)  # * 0.5
        r.free(f"loss{k}")
    r.alloc("loss", sh.par, F)
    r.free("scaled0", "scaled1", "head", "head_dist")


def _distillation_loss_backward(r: Replay, sh: Shapes, logits_hi: int) -> None:
    """Each head's loss backward: 0.5 times the seed, the NLL's and log-softmax's gradients."""
    for k in (0, 1):
        r.alloc(f"g.scaled{k}", sh.par, B)
        r.alloc(f"g.nll{k}", logits_hi, B)
        r.free(f"g.scaled{k}", f"total_weight{k}")
        r.alloc(f"g.logits{k}", logits_hi, B)
        r.free(f"g.nll{k}", f"logp{k}")


def _head_casts(spec: ViTSpec, sh: Shapes) -> bool:
    """Under autocast the head casts its input: fp32 unless the stream is low precision and
    the norm before the head keeps it so (VideoMAE under CPU autocast)."""
    return sh.casts or sh.ln_upcast


def _fc_norm(spec: ViTSpec) -> bool:
    """timm's average pooling normalises the pooled vector, not the tokens."""
    return spec.classes > 0 and spec.pooling == Pooling.avg


def _head_width(spec: ViTSpec) -> int:
    """The head's input in widths D: 2 for the class token and mean concatenated."""
    return 2 if spec.pooling == Pooling.token_avg else 1


def _epilogue_forward(r: Replay, spec: ViTSpec, sh: Shapes, grad: bool, checkpointed: bool = False,
                      fsdp: sharding.Fsdp | None = None) -> None:
    """Final norm, pooling, head(s), and (training) the cross-entropy loss; ``fsdp``: told
    when the model's forward returns, before the loss."""
    keep = S if grad else F
    r.where = "forward: norm + head"
    # the head saves the class-token row, a view that keeps the whole norm output alive
    head_saves_norm = grad and not sh.casts and spec.pooling == Pooling.token
    fc_norm = _fc_norm(spec)
    if fc_norm:
        # timm's average pooling: no norm on the tokens; their mean, then the norm on it
        # (fc_norm, which saves its input); the features live until the forward returns
        up = sh.ln_upcast  # (a norm on a bf16 stream under CUDA autocast: VideoMAE's)
        if not grad or up:
            r.free("b0.in", "emb")
        pooled_elems = sh.b * sh.d
        r.alloc("mean", pooled_elems * sh.res, F if up else keep)
        layernorm_forward(r, sh, "norm", S if (grad and not (sh.casts or up)) else F, keep, grad, rows=sh.b,
                          upcast=up)
        if not grad or up:
            r.free("mean")
    else:
        if not grad and spec.impl == Impl.timm and not spec.video:
            # timm's blocks are a Sequential whose input (the embedding) goes when it returns;
            # Hugging Face's model holds its embedding output through the final norm
            r.free("b0.in", "emb")
        r.alloc("norm.out", sh.tok, S if head_saves_norm else F)
        r.alloc("norm.mean", sh.stats, keep)
        r.alloc("norm.rstd", sh.stats, keep)
        if not grad:
            r.free("norm.mean", "norm.rstd", "norm.in", "b0.in", "emb")
    if spec.classes:
        pooled_elems = sh.b * sh.d
        if fc_norm:
            r.rename("norm", "pooled")
        elif spec.pooling == Pooling.token_avg:
            # cat([x[:, 0], x[:, 1:].mean(1)], 1): the mean, then the concatenation the head reads
            r.alloc("mean", pooled_elems * sh.res, F)
            pooled_elems *= 2
            r.alloc("pooled", pooled_elems * sh.res, S if (grad and not sh.casts) else F)
            r.free("mean")
        heads = ["head"] + (["head_dist"] if spec.dist_token else [])
        for head in heads:
            linear_forward(r, sh, "", head, sh.classes * sh.d * _head_width(spec), sh.classes,
                            pooled_elems if _head_casts(spec, sh) else 0, sh.b * sh.classes, F, grad)
        logits = sh.b * sh.classes * sh.lo
        if spec.dist_token and not (spec.distillation and grad):
            # Hugging Face's output holds both heads' logits until the forward returns
            held = spec.impl == Impl.hf
            r.alloc("logits_sum", logits, F)
            if not held:  # timm's ``out = (out + head_dist(...)) / 2``: the second head's output is the sum's temporary
                r.free("head_dist")
            r.alloc("logits_avg", logits, F)
            r.free("logits_sum", "head", "head_dist")
            r.rename("logits_avg", "head")
    if not head_saves_norm:
        r.free("norm.out")  # forward returns: only what backward saved survives
        if _head_casts(spec, sh) or not grad:
            r.free("pooled")
    if fc_norm:
        r.free("norm.in")
    if not grad:
        r.free_matching(".bc")  # autocast exits: its cache of weight copies goes
        r.free_matching(".wc")
        r.free("mid.wc", "first.wc")
        return
    if not spec.classes:
        return
    if fsdp:
        fsdp.root_returns(r)
    logits_hi = sh.b * sh.classes * sh.par  # the loss runs in fp32 under autocast
    if spec.distillation:
        _distillation_loss(r, sh, logits_hi)
    else:
        cross_entropy_forward(r, sh, "head")
    r.free_matching(".bc")  # autocast exits: bias copies go; weight copies stay saved
    r.free("mid.bc", "first.bc")
    if checkpointed:  # ... except in checkpointed blocks, which saved none
        r.free(*[n for n in r.live if n[0] == "b" and n.endswith(".wc")], "mid.wc", "first.wc")
    r.alloc("seed", sh.par, F)  # ones_like(loss), the gradient backward starts from


# --- backward -----------------------------------------------------------------------------


def _block_backward(r: Replay, i: int, g: str, out: str, sh: Shapes, spec: ViTSpec, wl: Workload, gr: Grads,
                    label: int | None = None) -> None:
    """One block's backward on block ``i``'s tensors; ``label`` names the block in ``where``."""
    if spec.video:
        videomae.block_backward(r, i, g, out, sh, spec, wl, gr, label)
        return
    p = f"b{i}."
    label = i if label is None else label
    d, f, bn = sh.d, sh.f, sh.b * sh.n
    casts = sh.casts  # (under autocast, whether the stream is fp32 and cast for each linear)
    ck = wl.checkpointing == Checkpointing.full
    if ck:
        if casts and not spec.layer_scale:
            # the residual add casts the gradient down before fc2's node asks for recompute
            r.alloc(p + "fc2.gc", sh.tok_lo, B)
        _block_forward(r, i, "", sh, spec, wl, True, recompute=True, label=label)
    r.where = f"backward: blocks.{label}.mlp"
    if spec.layer_scale:
        if _drops_path(spec, wl, i):
            _drop_path_backward(r, sh, p, g, "dp2", "ls2")
        layer_scale_backward(r, gr, sh, p, "ls2", "fc2")
        r.free(p + "ls2.gc")
    elif _drops_path(spec, wl, i):
        _drop_path_backward(r, sh, p, g, "dp2", "fc2")
    gfc2 = linear_backward(r, gr, sh, p, "fc2", bn * d, bn * f, d * f, d, sh.casts, False, (p + "gelu",), early=ck)
    if spec.mlp == Mlp.swiglu:
        gfc1 = _swiglu_backward(r, gr, p, sh, ck)
    else:
        gfc1 = gelu_mlp_backward(r, gr, sh, p, gfc2, casts, ck)
    layernorm_backward(r, gr, sh, p, "ln2", gfc1, p + "x1")
    r.alloc(p + "g.x1", sh.tok, B)  # residual: the incoming gradient plus the MLP branch's
    r.free(p + "g.ln2in", g)
    gr.accumulate(p + "ln2.w", p + "ln2.b")
    r.where = f"backward: blocks.{label}.attn"
    if spec.layer_scale:
        if _drops_path(spec, wl, i):
            _drop_path_backward(r, sh, p, p + "g.x1", "dp1", "ls1")
        layer_scale_backward(r, gr, sh, p, "ls1", "proj")
        r.free(p + "ls1.gc")
    elif _drops_path(spec, wl, i):
        _drop_path_backward(r, sh, p, p + "g.x1", "dp1", "proj")
    gln1 = _ATTENTION[spec.impl][1](r, gr, p, sh, spec, wl)
    layernorm_backward(r, gr, sh, p, "ln1", gln1, p + "in")
    r.alloc(out, sh.tok, B)
    r.free(p + "g.ln1in", p + "g.x1")
    gr.accumulate(p + "ln1.w", p + "ln1.b")


def _timm_attention_backward(r: Replay, gr: Grads, p: str, sh: Shapes, spec: ViTSpec, wl: Workload) -> str:
    """proj, the kernel and the fused qkv linear backward; returns the gradient of norm1's output."""
    d, bn = sh.d, sh.b * sh.n
    sdpa = wl.attention == AttentionKernel.sdpa
    ck = wl.checkpointing == Checkpointing.full
    gproj = linear_backward(r, gr, sh, p, "proj", bn * d, bn * d, d * d, d, sh.casts, False,
                             () if sdpa else (p + "attn",))
    rope = spec.pos_embed == PosEmbed.rope_2d

    def table_grad() -> None:
        relative_bias_backward(r, gr, sh, p, relative_bias_entries(spec) * sh.h)

    attention_core_backward(r, sh, p, gproj, wl.attention, qkv=("qkv", "q.r", "k.r") if rope else ("qkv",),
                            bias_grad=table_grad if spec.pos_embed == PosEmbed.relative_bias else None)
    if rope:
        for name in ("k", "q"):  # (k's nodes were made last: backward reaches them first)
            rope_backward(r, p + "g." + name, sh)
    r.alloc(p + "g.stack", 3 * sh.tok_lo, B)  # unbind backward: stack
    r.free(p + "g.q", p + "g.k", p + "g.kT", p + "g.v")
    r.alloc(p + "g.qkv", 3 * sh.tok_lo, B)  # permute backward: a contiguous copy for the linear
    r.free(p + "g.stack")
    return linear_backward(r, gr, sh, p, "qkv", 3 * bn * d, bn * d, 3 * d * d,
                           3 * d if spec.qkv_bias else 0, False, sh.casts, (p + "g.qkv", p + "ln1"), early=ck)


_ATTENTION = {
    Impl.timm: (_timm_attention_forward, _timm_attention_backward),
    Impl.hf: (vit_hf.attention_forward, vit_hf.attention_backward),
}


def _epilogue_backward(r: Replay, spec: ViTSpec, sh: Shapes, gr: Grads, fsdp: sharding.Fsdp | None = None) -> str:
    """The loss, head(s) and final norm; ``fsdp``: told when the gradient of the model's
    output (the logits, low under autocast) is ready."""
    logits_hi = sh.b * sh.classes * sh.par
    r.where = "backward: loss + head"
    heads = ["head"] + (["head_dist"] if spec.dist_token else [])
    if spec.distillation:
        _distillation_loss_backward(r, sh, logits_hi)
        for k, head in enumerate(heads):
            gin = linear_backward(r, gr, sh, "", head, sh.b * sh.classes, sh.b * sh.d, sh.classes * sh.d,
                                  sh.classes, sh.amp, _head_casts(spec, sh),
                                  (f"g.logits{k}",) + (("norm.out",) if k == 1 else ()), free_first=(f"g.logits{k}",))
            r.alloc(f"g.sel{k}", sh.tok, B)
            r.free(gin)
        r.alloc("g.norm", sh.tok, B)
        r.free("g.sel0", "g.sel1")  # (the seed, read by both halves of the sum, stays to the end)
        r.where = "backward: norm"
        layernorm_backward(r, gr, sh, "", "norm", "g.norm", "norm.in")
        gr.accumulate("norm.w", "norm.b")
        return "g.normin"
    cross_entropy_backward(r, sh)
    if spec.dist_token:
        # (a + b) / 2: DivBackward makes a new tensor, AddBackward hands it to both heads
        r.alloc("g.logits_avg", sh.b * sh.classes * sh.lo, B)
        r.free("g.logits")
        r.rename("g.logits_avg", "g.logits")
    if fsdp:
        if sh.amp:  # the loss's cast back to the head's dtype (``linear_backward`` then skips it)
            r.alloc("head.gc", sh.b * sh.classes * sh.lo, B)
            r.free("g.logits")
        fsdp.root_pre_backward(r)
    width = _head_width(spec)
    pooled = sh.b * sh.d * width
    if _fc_norm(spec):
        gin = linear_backward(r, gr, sh, "", "head", sh.b * sh.classes, pooled, sh.classes * sh.d, sh.classes,
                              sh.amp, _head_casts(spec, sh), ("g.logits", "pooled"), free_first=("g.logits",))
        r.where = "backward: norm"
        layernorm_backward(r, gr, sh, "", "norm", gin, "mean", rows=sh.b,
                           upcast=sh.ln_upcast)
        gr.accumulate("norm.w", "norm.b")
        # the mean's backward: the gradient spread over the patch tokens (B, P, D); put into
        # a zero (B, N, D) tensor when prefix tokens were sliced off
        r.alloc("g.mean", sh.b * sh.patches * sh.d * sh.res, B)
        r.free("g.normin")
        if not spec.prefix_tokens:
            r.rename("g.mean", "g.features")
            return "g.features"
        r.alloc("g.features", sh.tok, B)
        r.free("g.mean")
        return "g.features"
    for k, head in enumerate(heads):
        last = k == len(heads) - 1
        frees = ("g.logits", "norm.out", "pooled") if last else ()
        gin = linear_backward(r, gr, sh, "", head, sh.b * sh.classes, pooled,
                               sh.classes * sh.d * width, sh.classes, sh.amp and k == 0,
                               _head_casts(spec, sh), frees, free_first=("g.logits",))
        if spec.pooling == Pooling.token_avg:
            # the mean's half: its backward (B, P, D), then the slice's, a (B, N, D) tensor
            r.alloc("g.mean", sh.b * sh.patches * sh.d * sh.res, B)
            r.alloc("g.slice", sh.tok, B)
            r.free("g.mean")
        # select_backward (or mean backward): a (B, N, D) tensor per head, summed after
        r.alloc(f"g.sel{k}", sh.tok, B)
        r.free(gin)
    if len(heads) == 1 and spec.pooling != Pooling.token_avg:
        r.rename("g.sel0", "g.norm")
    else:
        r.alloc("g.norm", sh.tok, B)
        r.free(*(f"g.sel{k}" for k in range(len(heads))), "g.slice")
    r.where = "backward: norm"
    layernorm_backward(r, gr, sh, "", "norm", "g.norm", "norm.in")
    gr.accumulate("norm.w", "norm.b")
    return "g.normin"


def _prologue_backward(r: Replay, spec: ViTSpec, sh: Shapes, g: str, gr: Grads, image_elems: int,
                       fsdp: sharding.Fsdp | None = None) -> None:
    """Position embedding, prefix tokens and patch embedding; ``g`` is the gradient of the
    first block's input. ``fsdp``: told when backward ends (before its seed goes).

    A gradient summed over the batch is a new tensor, except at batch 1, where the sum is a
    no-op: a prefix token's gradient is then a slice of ``g``, and AccumulateGrad keeps that
    view as ``.grad``, so all of ``g`` stays alive as a gradient until ``zero_grad``.
    """
    d = sh.d
    r.where = "backward: patch embedding"
    views = _prefix_grads_are_views(spec, sh.one) and not gr.keep
    if spec.impl == Impl.hf and spec.registers:
        g = _hf_register_prologue_backward(r, spec, sh, g, gr, views)
    # timm's resampled table: the patch branch's cast is made inside the position backward
    cast_in_pos = sh.casts and spec.impl == Impl.timm and spec.pos_grid
    if spec.pos_grid:
        _interpolated_pos_backward(r, gr, spec, sh, "g.patches.c" if cast_in_pos else "")
    elif spec.pos_embed == PosEmbed.learned:
        if views and sh.amp and not spec.pos_embed_prefix:
            # added to the patches only, its gradient is a slice of ``g`` too; under autocast
            # the patch branch takes a cast copy, leaving the slice to AccumulateGrad alone
            r.retag(g, G)
        else:
            gr.make_param("pos_embed", sh.pos * d)  # summed over the batch
            gr.accumulate("pos_embed")
    patch_elems = sh.b * sh.patches * d
    if sh.casts and not cast_in_pos:
        r.alloc("g.patches.c", patch_elems * sh.lo, B)  # back to the conv's low precision
    hf_registers = spec.impl == Impl.hf and spec.registers  # done above
    # (the prefix tokens were expanded in this order: backward reaches the last first)
    for token, n in (("reg_token", 0 if hf_registers else sh.registers), ("dist_token", int(spec.dist_token)),
                     ("cls_token", int(spec.class_token))):
        if n:
            if views:
                r.retag(g, G)
                continue
            gr.make_param(token, n * d)
            gr.accumulate(token)
    if sh.casts and not views:
        r.free(g)
    conv_w = sh.conv_w
    gr.make("patch.w", conv_w)
    gr.make("patch.b", d)
    r.free("g.patches.c", "patches.wc", "patches.ic")
    if not views:
        r.free(g)
    r.free("x.lo")  # (FSDP's mixed precision: the images' cast copy, saved by the conv)
    if sh.amp:
        gr.finish("patch.w", conv_w)
        gr.finish("patch.b", d)
    else:
        gr.accumulate("patch.w", "patch.b")
    if fsdp:
        fsdp.end_backward(r)
    r.free("total_weight", "seed")


def _hf_register_prologue_backward(r: Replay, spec: ViTSpec, sh: Shapes, g: str, gr: Grads, views: bool) -> str:
    """The registers' concatenation backward: the registers' gradient (summed over the batch;
    at batch 1 a slice of ``g`` that keeps it alive), and the two slices around them, each
    put back in a zero tensor and added; returns the gradient of the class token and
    patches with the position embedding added."""
    elems = sh.b * (sh.patches + _positioned_prefix(spec)) * sh.d * sh.res
    r.alloc("g.rest", elems, B)
    if views:
        r.retag(g, G)
    else:
        gr.make_param("reg_token", sh.registers * sh.d)
        gr.accumulate("reg_token")
    r.alloc("g.first", elems, B)
    if not views:
        r.free(g)
    r.alloc("g.emb", elems, B)
    r.free("g.rest", "g.first")
    return "g.emb"


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
def _optimizer_sizes(spec: ViTSpec, wl: Workload, pb: int, round_to: int) -> tuple[int, ...]:
    """Bytes of each parameter the optimizer keeps states for, in the order its step visits
    them: every used parameter in ``parameters()`` order; under ZeRO-1, this rank's share
    (``formulas.zero_shares``, the ones without a gradient skipped)."""
    if wl.fsdp:  # each parameter's unpadded chunk on this rank (none: a zero-size tensor)
        return tuple(_round_up(n * pb, round_to) for (name, _), n in
                     zip(param_tensors(spec), sharding.shards(spec, wl.shard_ranks, wl.shard_rank))
                     if not (name in UNUSED or name.endswith(FROZEN)))
    if not wl.shards_optimizer:
        return _param_bytes(spec, pb, round_to, used=True)
    return tuple(_round_up(n * pb, round_to) for name, n in zero_shares(spec, wl.ranks)[wl.rank]
                 if not (name in UNUSED or name.endswith(FROZEN)))


@lru_cache(maxsize=4096)
def _param_bytes(spec: ViTSpec, pb: int, round_to: int, used: bool = False, world: int = 1) -> tuple[int, ...]:
    """Bytes of each parameter tensor as allocated, in ``parameters()`` order; ``used``: only
    those the forward uses, which get gradients and optimizer states; ``world`` > 1: the
    padded shard each rank stores under FSDP."""
    sizes = param_tensors(spec) if world == 1 else zip((name for name, _ in param_tensors(spec)),
                                                       sharding.padded_shards(spec, world))
    return tuple(_round_up(n * pb, round_to) for name, n in sizes
                 if not (used and (name in UNUSED or name.endswith(FROZEN))))


_MAPS = frozenset(("scores", "scaled", "scores.b", "scores.32", "probs", "probs.32"))  # a layer's (.., N, N) maps


class _MapWatch(Replay):
    """A replay of one block that follows its attention maps: the most alive at once, and
    what is left saved for backward when the block is done."""

    __slots__ = ("maps", "most")

    def __init__(self) -> None:
        super().__init__(1)
        self.maps = 0
        self.most = 0

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        super().alloc(name, nbytes, cat)
        if nbytes > 0 and name.partition(".")[2] in _MAPS:
            self.maps += nbytes
            self.most = max(self.most, self.maps)

    def free(self, *names: str) -> None:
        for name in names:
            if name in self.live and name.partition(".")[2] in _MAPS:
                self.maps -= self.live[name][0]
            super().free(name)

    def rename(self, old: str, new: str) -> None:
        was, now = old.partition(".")[2] in _MAPS, new.partition(".")[2] in _MAPS
        if was != now:
            self.maps += self.live[old][0] * (1 if now else -1)
            self.most = max(self.most, self.maps)
        super().rename(old, new)

    def kept(self) -> int:
        return sum(n for name, (n, cat) in self.live.items() if cat == S and name.partition(".")[2] in _MAPS)


def attention_map_bytes(spec: ViTSpec, wl: Workload) -> list[tuple[int, int, int]]:
    """What one layer's attention maps take, as the replay allocates them: per kind of block
    (a Swin's stages; one for the other families), (blocks, bytes kept for backward, bytes
    alive at once). A fused kernel (SDPA) keeps none; eager attention keeps its probabilities
    (in fp32 beside a low-precision copy where the softmax runs in fp32)."""
    sh = shapes_of(spec, wl)
    grad = wl.saves_activations
    out = []
    if spec.swin is not None:
        for st in swin.stages(spec):
            r = _MapWatch()
            ssh = swin.stage_shapes(sh, st, wl.batch)
            r.alloc("b0.in", ssh.tok, S if grad else F)
            swin.block_forward(r, 0, min(1, st.depth - 1), st, ssh, spec, wl, grad, "b1.in")
            out.append((st.depth, r.kept(), r.most))
        return out
    stacks = [(spec.depth, sh)] + ([(spec.mae.decoder_depth, mae.decoder_shapes(spec, sh))] if spec.mae else [])
    for depth, ssh in stacks:
        r = _MapWatch()
        r.alloc("b0.in", ssh.tok, S if grad else F)
        _block_forward(r, 0, "b1.in", ssh, spec, wl, grad)
        out.append((depth, r.kept(), r.most))
    return out


def position_buffer_bytes(spec: ViTSpec, sh: Shapes) -> int:
    """The position encoding's fixed tables, buffers moved with the model (in the parameters'
    dtype; an index stays int64): a sin-cos table of the patches, RoPE's (N, head width) cos
    and sin, or the relative bias's (N, N) index into every block's table."""
    if spec.pos_embed in POS_BUFFERS:
        return sh.patches * sh.d * sh.par
    if spec.pos_embed == PosEmbed.rope_2d:
        return 2 * sh.n * (sh.d // sh.h) * sh.par
    if spec.pos_embed == PosEmbed.relative_bias:
        return sh.n * sh.n * INDEX_BYTES
    if spec.swin is not None:  # every Swin block's (M^2 M^2) index into its table
        return spec.depth * spec.swin.window ** 4 * INDEX_BYTES
    return 0


def fsdp_buffers(spec: ViTSpec, wl: Workload, round_to: int | None = None) -> sharding.Fsdp:
    """FSDP's buffers on a rank, as the replay allocates them: rounded as the device's
    allocator rounds them, or to ``round_to`` (1: the bytes a collective moves)."""
    if round_to is None:
        round_to = CUDA_BLOCK_BYTES if wl.device == Device.cuda else 1
    return sharding.Fsdp(spec, wl, round_to, UNUSED)


# --- the whole step ---------------------------------------------------------------------------


_COMPONENT_OF = {
    "b0.in": "patch_embed",
    **{k: "blocks/norm1" for k in ("ln1", "ln1.in32", "ln1.mean", "ln1.rstd", "qkv.ic", "q.ic", "k.ic", "v.ic")},
    **{k: "blocks/attn/qkv" for k in ("qkv", "q", "k", "v", "qs", "qs.c", "kT.c", "v.c", "q.r", "k.r")},
    **{k: "blocks/attn/core" for k in ("attn", "lse", "probs", "probs.32")},
    **{k: "blocks/norm2" for k in ("x1", "ln2", "ln2.in32", "ln2.mean", "ln2.rstd", "fc1.ic", "gate.ic", "up.ic")},
    **{k: "blocks/mlp" for k in ("fc1", "gelu", "gate", "act", "up")},
    **{k: "blocks/layer_scale" for k in ("proj", "fc2")},  # branch outputs LayerScale saves
    "in": "blocks/residual",
    **{k: "norm_and_head" for k in ("norm.in", "norm.out", "norm.mean", "norm.rstd", "norm.in32", "pooled", "mean",
                                  "logp0", "logp1", "total_weight0", "total_weight1",
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
    if spec.video:
        # VideoMAE's table is a plain attribute: it stays in fp32 on the CPU, where the step
        # reads it (a GPU holds only the step's copy of it)
        if not sh.cuda:  # (MemTracker counts it with the activations once the step reads it)
            r.alloc("sincos", sh.patches * sh.d * 4, I)
    else:
        r.alloc("pos.buffers", position_buffer_bytes(spec, sh), W)
    weights = r.cat[W]
    r.alloc_parts("opt.states", sh.states, sh.state_parts, O)
    r.alloc_parts("grads.kept", sh.kept, sh.kept_parts, G)
    image_elems = sh.b * sh.image
    r.where = "forward: input batch"
    # images arrive in fp32 under autocast and under FSDP's mixed precision
    r.alloc("x", image_elems * (4 if wl.mixed_precision else sh.par), I)
    # the labels (with distillation, the teacher's too)
    r.alloc("y", sh.b * INDEX_BYTES * (2 if spec.distillation else 1) if train and spec.mae is None else 0, I)
    inputs = r.cat[I]
    if spec.mae is not None:
        return _replay_mae(r, spec, wl, sh, image_elems, weights, inputs)
    if spec.swin is not None:
        return _replay_swin(r, spec, wl, sh, image_elems, weights, inputs)
    depth = spec.depth
    fs = fsdp_buffers(spec, wl, r.round_to) if wl.fsdp else None
    if fs:
        if wl.mixed_precision:  # the root casts the (fp32) images to the compute dtype: the conv saves it
            r.alloc("x.lo", image_elems * sh.par, S if train else F)
        fs.pre_forward(r, "root")
    _prologue_forward(r, spec, sh, train, image_elems)
    ck = train and wl.checkpointing == Checkpointing.full
    # timm's ``self.blocks(x)`` (an nn.Sequential) and Hugging Face's encoder
    # (``embedding_output``) hold their input until the last block returns
    keeps_embedding = not train or sh.ln_upcast  # (then no norm saves the stream: it is held)
    # (the first block has no drop path: the blocks differ, none is lumped; nor are FSDP's,
    # whose buffers differ at the first and last block)
    full = r.FULL or spec.drop_path or fs
    if full:
        for i in range(depth):
            if fs:
                fs.pre_forward(r, f"b{i}")
            _block_forward(r, i, f"b{i + 1}.in" if i < depth - 1 else "norm.in", sh, spec, wl, train and not ck,
                           checkpointed=ck, keep_input=keeps_embedding and i == 0)
            if fs:
                fs.post_forward(r, f"b{i}")
    else:
        state = r.local()
        _block_forward(r, 0, "b1.in" if depth > 1 else "norm.in", sh, spec, wl, train and not ck, checkpointed=ck,
                       keep_input=keeps_embedding and depth == 1)
        block = r.end_local(state)
        if keeps_embedding and depth > 1:
            # block 0 stands for every block, each of which frees its input: block 0's is
            # held again, with no total taken in between, which is the same as never freed
            r.sampling = False
            r.alloc("emb", sh.tok, F)
            r.sampling = True
        if depth > 1:
            _extend_forward(r, depth)
            r.replay_shifted(block, "blocks.0", f"blocks.{depth - 1}", after=True)
    _epilogue_forward(r, spec, sh, train, checkpointed=ck, fsdp=fs)
    saved = r.cat[S]
    copies = r.cat[WC]
    components = _saved_by_component(r, depth, spec.layer_scale) if train and not full else {}
    if train and spec.classes:
        # (under FSDP backward makes each unsharded gradient anew; the sharded ones accumulate)
        gr = Grads(r, sh, wl.accumulates and not fs)
        g = _epilogue_backward(r, spec, sh, gr, fsdp=fs)
        if full:
            for i in reversed(range(depth)):
                if fs:
                    fs.pre_backward(r, i)
                _block_backward(r, i, g, f"g.b{i}.in", sh, spec, wl, gr)
                if fs:
                    fs.post_backward(r, f"b{i}")
                g = f"g.b{i}.in"
            _prologue_backward(r, spec, sh, g, gr, image_elems, fsdp=fs)
            optimizer_step(r, sh)
            return (weights, sh.grads if train else 0, sh.states, inputs, saved, copies), components
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
        optimizer_step(r, sh)
    return (weights, sh.grads if train else 0, sh.states, inputs, saved, copies), components


def _replay_mae(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, image_elems: int, weights: int,
                inputs: int) -> tuple:
    """``vitcost.mae``'s step, its blocks this module's (every one replayed)."""
    train = wl.training
    ck = train and wl.checkpointing == Checkpointing.full

    def forward(i: int, nxt: str, shapes: Shapes, keep_input: bool) -> None:
        _block_forward(r, i, nxt, shapes, spec, wl, train and not ck, checkpointed=ck,
                       keep_input=keep_input and not train)

    mae.forward(r, spec, wl, sh, train, image_elems, forward)
    r.free_matching(".bc")  # autocast exits: bias copies go; weight copies stay saved (none in no_grad)
    if not train or ck:
        r.free(*[n for n in r.live if n.endswith(".wc") and (not train or n[0] == "b")])
    saved, copies = r.cat[S], r.cat[WC]
    figures = (weights, sh.grads if train else 0, sh.states, inputs, saved, copies)
    if not train:
        return figures, {}
    gr = Grads(r, sh, wl.accumulates)

    def backward(i: int, g: str, out: str, shapes: Shapes, label: int) -> None:
        _block_backward(r, i, g, out, shapes, spec, wl, gr, label=label)

    mae.backward(r, spec, wl, sh, gr, backward)
    optimizer_step(r, sh)
    return figures, {}


def _replay_swin(r: Replay, spec: ViTSpec, wl: Workload, sh: Shapes, image_elems: int, weights: int,
                 inputs: int) -> tuple:
    """``vitcost.swin``'s step."""
    train = wl.training
    swin.forward(r, spec, wl, sh, train, image_elems)
    figures = (weights, sh.grads if train else 0, sh.states, inputs, r.cat[S], r.cat[WC])
    if train:
        swin.backward(r, spec, wl, sh, Grads(r, sh, wl.accumulates))
        optimizer_step(r, sh)
    return figures, {}


def replay_memory(spec: ViTSpec, wl: Workload) -> tuple[MemoryResult, tuple[int, ...]]:
    """The replay itself: the step's memory, and the live total after each allocation in
    replay order. ``estimate_memory`` gives the same result without replaying."""
    sh = shapes_of(spec, wl)
    r = Replay(CUDA_BLOCK_BYTES if sh.cuda else 1)
    figures, components = replay_step(r, spec, wl, sh)
    return memory_result(figures, r.peak, r.peak_cat, r.peak_where, components), tuple(r.totals)


# --- a trace for the allocator ----------------------------------------------------------------

# Tensors that outlive a step: made once, before or in the first step, and kept.
PERSISTENT = frozenset(("weights", "sincos", "pos.buffers", "opt.states", "grads.kept", "x", "y"))


def _trace_shapes(spec: ViTSpec, wl: Workload) -> Shapes:
    """``shapes_of`` with every parameter, optimizer state and kept gradient as its own tensor."""
    sh = shapes_of(spec, wl)
    parts = _param_bytes(spec, sh.par, CUDA_BLOCK_BYTES if sh.cuda else 1)
    sizes = _optimizer_sizes(spec, wl, sh.par, CUDA_BLOCK_BYTES if sh.cuda else 1)
    if not wl.training:
        return replace(sh, param_parts=parts)
    if wl.optimizer in (Optimizer.adamw, Optimizer.adam):
        # per parameter, as the first step creates them: (a CPU ``step``), exp_avg, exp_avg_sq
        states = tuple(x for s in sizes for x in ((s, s) if sh.cuda else (4, s, s)))
        tmp = sizes if sh.cuda else (sh.opt_tmp,)
    else:
        states = sizes if wl.optimizer == Optimizer.sgd_momentum else ()
        tmp = ()
    kept = () if not sh.kept else (sh.kept,) if _prefix_grads_are_views(spec, sh.one) else sizes
    return replace(sh, param_parts=parts, state_parts=states, kept_parts=kept, opt_tmp_parts=tmp)


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
    sh = _trace_shapes(spec, wl)
    keys = itertools.count()
    extra = [(next(keys), extra_bytes)] if extra_bytes > 0 else []
    first_sh = replace(sh, states=0, state_parts=(), kept=0, kept_parts=(),
                       first_state_parts=sh.state_parts if wl.training else ())
    first = Trace(keys)
    replay_step(first, spec, wl.model_copy(update={"keep_grads": False, "grad_accum": 1}) if wl.accumulates else wl,
                first_sh)
    first.end_step(PERSISTENT, keep=(G,) if wl.accumulates else ())
    steady = Trace(keys, skip=PERSISTENT)
    replay_step(steady, spec, wl, sh)
    steady.end_step(PERSISTENT)
    return extra + first.events, steady.events
