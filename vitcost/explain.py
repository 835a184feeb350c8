"""``vitcost explain``: a plan's figures derived step by step, each formula with its numbers
substituted, in the order the tutorials derive them (grid, tokens, the patch embedding,
attention maps, a block's parameters, MACs by component, memory by category).

Pure: every step's value is computed here from the spec and workload by its formula, and
carries the report figure it must equal (``Step.equals``), so that the tests hold every
derivation against the report's own figure. Closed forms are derived for the plain ViT
(timm's and Hugging Face's); for a Swin, an MAE or a video model the derivation stops at the
tokens and lists the report's figures by component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vitcost import memory
from vitcost.estimate import Report
from vitcost.formulas import FROZEN, param_tensors, pos_embed_tokens
from vitcost.memory import UNUSED
from vitcost.replay import _round_up
from vitcost.specs import Mlp, Optimizer, Precision

_SAVED = {
    "patch_embed": "the first block's input: the embeddings, B N D",
    "blocks/norm1": "norm1's mean and rstd (2 B N); under autocast the linear's low-precision copy of its output",
    "blocks/attn/qkv": "the q, k, v the attention reads (SDPA: views of the qkv output, B N 3D; eager: contiguous copies)",
    "blocks/attn/core": "SDPA's output and log-sum-exp; eager's probabilities (B H N^2) and output",
    "blocks/norm2": "the residual sum norm2 reads, its mean and rstd; under autocast the linear's copy",
    "blocks/mlp": "fc1's output (GELU's input) and GELU's output (fc2's input): B N F each",
    "blocks/layer_scale": "the branch outputs LayerScale multiplies (B N D each)",
    "blocks/residual": "every later block's input, saved by its norm1: (depth - 1) x B N D",
    "norm_and_head": "the final norm's input and statistics, the head's input, the loss's log-probabilities",
}


@dataclass(frozen=True)
class Step:
    """One derived figure: what it is, its formula, the formula with the numbers in, the value,
    and the report figure it equals (a path into ``Report.to_dict()``), if any."""

    what: str
    formula: str
    substituted: str
    value: float
    equals: Optional[str] = None


def explain(report: Report) -> list[tuple[str, list[Step]]]:
    """The sections of the derivation, each a list of steps."""
    s, w = report.spec, report.workload
    sections: list[tuple[str, list[Step]]] = []
    H, W, P, C, D, L, heads, F = s.image_h, s.image_w, s.patch, s.channels, s.dim, s.depth, s.heads, s.mlp_hidden
    gh, gw = s.grid_h, s.grid_w
    tokens: list[Step] = []
    if s.patch_stride:
        pad = s.patch_pad
        tokens.append(Step("grid (rows)", "gh = floor((H - P + 2 pad) / S) + 1",
                           f"floor(({H} - {P} + 2 x {pad}) / {s.stride}) + 1", gh, "tokens.grid_h"))
        tokens.append(Step("grid (columns)", "gw = floor((W - P + 2 pad) / S) + 1",
                           f"floor(({W} - {P} + 2 x {pad}) / {s.stride}) + 1", gw, "tokens.grid_w"))
    else:
        tokens.append(Step("grid (rows)", "gh = floor(H / P)", f"floor({H} / {P})", gh, "tokens.grid_h"))
        tokens.append(Step("grid (columns)", "gw = floor(W / P)", f"floor({W} / {P})", gw, "tokens.grid_w"))
    frames = s.frames // s.tubelet
    patches = gh * gw * frames
    tokens.append(Step("patch tokens", "gh x gw" + (" x T/t" if frames > 1 else ""),
                       f"{gh} x {gw}" + (f" x {frames}" if frames > 1 else ""), patches, "tokens.patches"))
    N = s.tokens
    prefix = s.prefix_tokens
    if s.mae is None:
        tokens.append(Step("tokens the blocks see", "N = patches + prefix (class, distillation, registers)",
                           f"{patches} + {prefix}", N, "tokens.total"))
    sections.append(("Tokens", tokens))
    plain = s.swin is None and s.mae is None and not s.video
    if s.swin is not None:
        sections.append(("Stages (Swin)", _swin_stages(report)))
    if not plain:
        sections.append(("By component (the report's figures)", [
            Step(f"params {k}", "-", "-", v, f"params.{k}") for k, v in report.params.items()] + [
            Step(f"forward MACs {k}", "-", "-", v, f"macs.forward_by_component.{k}")
            for k, v in report.macs_forward.items()]))
        sections.append(("Memory", _memory(report)))
        return sections

    attn = [Step("attention map per head", "N^2", f"{N}^2", N * N, "attention_maps.elements_per_head"),
            Step("attention maps per layer", "heads x N^2", f"{heads} x {N * N:,}", heads * N * N,
                 "attention_maps.elements_per_layer")]
    sections.append(("Attention maps", attn))

    par: list[Step] = []
    k = P * P * C * s.tubelet
    par.append(Step("patch embedding", "D (P^2 C + 1)", f"{D} x ({P}^2 x {C}" + (f" x {s.tubelet}" if s.tubelet > 1
               else "") + " + 1)", D * (k + 1), "params.patch_embed"))
    npos = pos_embed_tokens(s)
    if npos:
        par.append(Step("position table", "positions x D", f"{npos} x {D}", npos * D, "params.pos_embed"))
    if prefix:
        par.append(Step("prefix tokens", "prefix x D", f"{prefix} x {D}", prefix * D, "params.prefix_tokens"))
    qb = 3 * D if s.qkv_bias else 0
    attn_params = 3 * D * D + qb + D * D + D
    par.append(Step("attention per block", "q, k, v and proj: 4 D^2 + " + ("4 D" if s.qkv_bias else "D"),
                    f"4 x {D}^2 + {4 if s.qkv_bias else 1} x {D}", attn_params))
    fc1s = 2 if s.mlp == Mlp.swiglu else 1
    mlp = fc1s * (D * F + F) + F * D + D
    par.append(Step("MLP per block", ("2 D F + F + D" if fc1s == 1 else "3 D F + 2 F + D") + f" (F = {F})",
                    f"{fc1s + 1} x {D} x {F} + {fc1s} x {F} + {D}", mlp))
    if F == 4 * D and fc1s == 1:
        par.append(Step("  with F = 4 D", "8 D^2 + 5 D", f"8 x {D}^2 + 5 x {D}", 8 * D * D + 5 * D))
    norms = 2 * 2 * D
    par.append(Step("two LayerNorms per block", "2 x 2 D", f"2 x 2 x {D}", norms))
    extra = 2 * D if s.layer_scale else 0
    if extra:
        par.append(Step("LayerScale per block", "2 D", f"2 x {D}", extra))
    rel = report.params.get("blocks/attn/relative_bias", 0) // L
    if rel:
        par.append(Step("relative bias table per block", "rows x heads", f"{rel // heads} x {heads}", rel))
    block = attn_params + mlp + norms + extra + rel
    par.append(Step("a block", "attention + MLP + norms" + (" + LayerScale" if extra else "") + (" + bias" if rel else ""),
                    f"{attn_params:,} + {mlp:,} + {norms:,}" + (f" + {extra:,}" if extra else "") +
                    (f" + {rel:,}" if rel else ""), block))
    par.append(Step("every block", "depth x block", f"{L} x {block:,}", L * block))
    par.append(Step("final norm", "2 D", f"2 x {D}", 2 * D, "params.norm"))
    heads_n = 1 + int(s.dist_token)
    width = 2 * D if s.pooling.value == "token+avg" else D
    head = heads_n * (width * s.classes + s.classes) if s.classes else 0
    par.append(Step("head", ("2 x " if heads_n == 2 else "") + "(D_in classes + classes)",
                    f"{heads_n} x ({width} x {s.classes} + {s.classes})" if heads_n == 2
                    else f"{width} x {s.classes} + {s.classes}", head, "params.head"))
    mask = D if s.mask_token else 0
    total = D * (k + 1) + npos * D + prefix * D + L * block + 2 * D + head + mask
    par.append(Step("total", "the parts above" + (" + the mask token" if mask else ""), "", total, "params.total"))
    sections.append(("Parameters", par))

    macs: list[Step] = []
    macs.append(Step("patch embedding", "patches x P^2 C x D", f"{patches} x {k} x {D}", patches * k * D,
                     "macs.forward_by_component.patch_embed"))
    macs.append(Step("q, k, v", "depth x N x D x 3D", f"{L} x {N} x {D} x {3 * D}", L * N * D * 3 * D,
                     "macs.forward_by_component.blocks/attn/qkv"))
    macs.append(Step("q kᵀ", "depth x N^2 x D", f"{L} x {N}^2 x {D}", L * N * N * D,
                     "macs.forward_by_component.blocks/attn/q_kT"))
    macs.append(Step("attention x v", "depth x N^2 x D", f"{L} x {N}^2 x {D}", L * N * N * D,
                     "macs.forward_by_component.blocks/attn/attn_v"))
    macs.append(Step("proj", "depth x N x D^2", f"{L} x {N} x {D}^2", L * N * D * D,
                     "macs.forward_by_component.blocks/attn/proj"))
    macs.append(Step("fc1", "depth x N x D x F" + (" x 2" if fc1s == 2 else ""), f"{L} x {N} x {D} x {F}"
                     + (" x 2" if fc1s == 2 else ""), L * N * D * F * fc1s, "macs.forward_by_component.blocks/mlp/fc1"))
    macs.append(Step("fc2", "depth x N x F x D", f"{L} x {N} x {F} x {D}", L * N * F * D,
                     "macs.forward_by_component.blocks/mlp/fc2"))
    head_macs = heads_n * width * s.classes
    macs.append(Step("head", "D_in x classes" + (" x 2 heads" if heads_n == 2 else ""),
                     f"{width} x {s.classes}" + (" x 2" if heads_n == 2 else ""), head_macs,
                     "macs.forward_by_component.head"))
    if F == 4 * D and fc1s == 1:
        macs.append(Step("  a block, with F = 4 D", "12 N D^2 + 2 N^2 D", f"12 x {N} x {D}^2 + 2 x {N}^2 x {D}",
                         12 * N * D * D + 2 * N * N * D))
    fwd = patches * k * D + L * (N * D * 3 * D + 2 * N * N * D + N * D * D + N * D * F * fc1s + N * F * D) + head_macs
    macs.append(Step("forward, per image", "the parts above", "", fwd, "macs.forward_per_image"))
    if w.training:
        rec = report.macs_training_per_image - (3 * fwd - patches * k * D)
        macs.append(Step("training step, per image", "3 x forward - patch embedding (no input gradient)"
                         + (" + the checkpoint's recompute" if rec else ""),
                         f"3 x {fwd:,} - {patches * k * D:,}" + (f" + {rec:,}" if rec else ""),
                         3 * fwd - patches * k * D + rec, "macs.training_per_image"))
        macs.append(Step("training FLOPs per step", "2 x MACs x batch (global)",
                         f"2 x {report.macs_training_per_image:,} x {report.batch}",
                         2 * report.macs_training_per_image * report.batch, "flops.training_per_step"))
    sections.append(("MACs (1 MAC = 1 multiply-add; FLOPs = 2 x MACs)", macs))
    sections.append(("Memory", _memory(report)))
    return sections


def _swin_stages(report: Report) -> list[Step]:
    """Each stage's grid, windows and attention (per image), from its index s."""
    from vitcost.swin import stages

    s = report.spec
    steps = []
    for st in stages(s):
        k = st.index
        i = f"stage {k + 1}"
        steps.append(Step(f"{i}: grid", "gh / 2^s x gw / 2^s", f"{s.grid_h} / {2 ** k} x {s.grid_w} / {2 ** k}",
                          st.tokens, f"stages.{k}.tokens"))
        steps.append(Step(f"{i}: width", "C 2^s", f"{s.dim} x {2 ** k}", st.dim, f"stages.{k}.dim"))
        steps.append(Step(f"{i}: windows", "(gh_s / M) (gw_s / M)", f"({st.grid_h} / {st.window}) x ({st.grid_w} / "
                          f"{st.window})", st.windows, f"stages.{k}.windows"))
        steps.append(Step(f"{i}: maps per block", "heads x windows x (M^2)^2",
                          f"{st.heads} x {st.windows} x {st.window_tokens}^2",
                          st.heads * st.windows * st.window_tokens ** 2, f"stages.{k}.attention_elements_per_block"))
        steps.append(Step(f"{i}: q kᵀ MACs", "blocks x tokens x M^2 x C_s",
                          f"{st.depth} x {st.tokens} x {st.window_tokens} x {st.dim}",
                          st.depth * st.tokens * st.window_tokens * st.dim))
    return steps


def _memory(report: Report) -> list[Step]:
    s, w, m = report.spec, report.workload, report.memory
    cuda = w.device.value == "cuda"
    e = w.param_bytes
    params = report.params_total
    sharded = w.fsdp or w.shards_optimizer
    block = 512 if cuda else 1
    tensors = param_tensors(s)
    trained = [n for name, n in tensors if not (name in UNUSED or name.endswith(FROZEN))]
    rounded = "; each tensor rounded up to 512 bytes (CUDA's caching allocator)" if cuda else ""
    buffers = memory.position_buffer_bytes(s, memory.shapes_of(s, w))
    steps = [Step("weights", f"parameters x {e} bytes" + rounded + (" + the position encoding's buffers" if buffers
                  else ""), f"{params:,} x {e}" + (f" + {buffers:,}" if buffers else ""),
                  m.weights if sharded else sum(_round_up(n * e, block) for _, n in tensors) + _round_up(buffers, block),
                  None if sharded else "memory_bytes.weights")]
    if w.training:
        steps.append(Step("gradients", f"one per trained parameter, {e} bytes" + rounded,
                          f"{sum(trained):,} x {e}", m.gradients if sharded or w.keep_grads
                          else sum(_round_up(n * e, block) for n in trained),
                          None if sharded or w.keep_grads else "memory_bytes.gradients"))
        states = {Optimizer.adamw: 2, Optimizer.adam: 2, Optimizer.sgd_momentum: 1}.get(w.optimizer, 0)
        if states:
            cpu_steps = 4 * len(trained) if states == 2 and not cuda else 0
            steps.append(Step("optimizer states", ("exp_avg + exp_avg_sq: 2 x " if states == 2 else "momentum: ")
                              + f"trained parameters x {w.master_bytes} bytes"
                              + (" + a 4-byte step per tensor (on the CPU)" if cpu_steps else "") + rounded,
                              f"{states} x {sum(trained):,} x {w.master_bytes}" + (f" + 4 x {len(trained)}"
                                                                                   if cpu_steps else ""),
                              m.optimizer_states if sharded else
                              states * sum(_round_up(n * w.master_bytes, block) for n in trained) + cpu_steps,
                              None if sharded else "memory_bytes.optimizer_states"))
    x = 4 if w.precision in (Precision.amp_bf16, Precision.amp_fp16) or w.mixed_precision else e
    images = w.batch * s.channels * s.frames * s.image_h * s.image_w
    labels = 8 * w.batch * (2 if s.distillation else 1) if w.training and s.mae is None else 0
    steps.append(Step("input batch + labels", f"B C H W x {x} bytes" + (" + B x 8 (int64 labels)" if labels else ""),
                      f"{w.batch} x {s.channels * s.frames} x {s.image_h} x {s.image_w} x {x}"
                      + (f" + {labels}" if labels else ""), _round_up(images * x, block) + _round_up(labels, block),
                      None if s.video else "memory_bytes.inputs"))
    if w.training:
        for component, value in m.saved_by_component.items():
            steps.append(Step(f"saved: {component}", _SAVED.get(component, ""), "", value,
                              f"activations_bytes_by_component.{component}"))
        steps.append(Step("activations saved for backward", ("the components above" if m.saved_by_component
                          else "every tensor autograd saves") + " (at the end of forward)", "",
                          m.activations, "memory_bytes.activations"))
    if m.autocast_copies:
        steps.append(Step("autocast weight copies", "each matmul weight's low-precision copy, cached through the "
                          "forward (kept for backward)", "", m.autocast_copies, "memory_bytes.autocast_weight_copies"))
    at = report.memory_at_peak
    steps.append(Step(f"peak, in {m.peak_phase}", "what is live then: "
                      + " + ".join(k.replace("_", " ") for k, v in at.items() if v), " + ".join(f"{v:,}" for v in at.values() if v),
                      report.peak_bytes, "memory_bytes.peak"))
    return steps


def figure(data: dict[str, Any], path: str) -> Any:
    """The report figure at ``path`` (dots between keys; a component's slashes kept)."""
    head, _, rest = path.partition(".")
    node = data[head]
    if isinstance(node, list):
        index, _, rest = rest.partition(".")
        return figure({"item": node[int(index)]}, f"item.{rest}")
    if rest in node:
        return node[rest]
    key, _, rest2 = rest.partition(".")
    return node[key] if not rest2 else figure({key: node[key]}, f"{key}.{rest2}")
