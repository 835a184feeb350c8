"""Rich tables from reports. No math here: every figure comes from the report.

Display units only: bytes are shown in GiB/MiB (2**30, 2**20), MACs in G (1e9).
"""

from __future__ import annotations

import re
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from vitcost.estimate import SEARCH_GPUS, SEARCH_STRATEGIES, Report
from vitcost.formulas import COMPONENT_ORDER

# plan's defaults, as (setting, value): the header names those a report was left at
DEFAULTS = (("model", "vit-b"), ("batch", 8), ("mode", "train"), ("precision", "amp-bf16"), ("attention", "sdpa"),
            ("optimizer", "adamw"))


def defaults_in_effect(report: Report) -> list[str]:
    """The settings of ``report`` that are plan's defaults (the optimizer only when training)."""
    w = report.workload
    values = {"model": report.spec.name, "batch": report.batch, "mode": w.mode.value,
              "precision": w.precision.value, "attention": w.attention.value,
              "optimizer": w.optimizer.value if w.training else None}
    return [f"{key} {value}" for key, value in DEFAULTS if values[key] == value]

# C0 (ESC among them), DEL and C1 control characters, and what no terminal, UTF-8 stream or XML
# document can take (lone surrogates, the non-characters U+FFFE and U+FFFF)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: object) -> str:
    """``text`` with every control character written as a visible escape (ESC as ``\\x1b``).

    For what a user's file or command line names (profile and display names, budget entries,
    paths): such a string must not move the cursor, colour the terminal or break a line."""
    return _UNPRINTABLE.sub(_escape_char, str(text))


def plain(text: object, style: str = "") -> Text:
    """A table cell or title from untrusted text: control characters escaped, no rich markup
    (a name such as ``[red]x`` is shown as written)."""
    return Text(escape_control(text), style=style)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 2**30:
        return f"{sign}{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{sign}{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{sign}{n / 2**10:.1f} KiB"
    return f"{sign}{n} B"


def fmt_count(n: int | float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


def header(report: Report) -> Text:
    s, w = report.spec, report.workload
    gpu = report.gpu
    where = (f" on {escape_control(gpu.requested)}"
             + (f" -> {escape_control(gpu.name)}" if gpu.requested != gpu.name else "") if gpu else "")
    text = Text()
    text.append(f"vitcost: {escape_control(s.name)}", style="bold")
    if s.swin is not None:
        sw = s.swin
        text.append(f" (Swin: D={s.dim} doubling per stage, blocks {'/'.join(map(str, sw.depths))}, heads "
                    f"{'/'.join(map(str, sw.heads))}, window {sw.window}, MLP ratio {sw.mlp_ratio:g})")
    else:
        text.append(f" (D={s.dim}, depth {s.depth}, {s.heads} heads, MLP {s.mlp_hidden})")
    stride = f" at stride {s.stride} (overlapping, padded {s.patch_pad})" if s.patch_stride else ""
    text.append(f"  image {s.image_h}x{s.image_w}, patch {s.patch}{stride}, batch {report.batch}"
                + (f" ({w.batch} per GPU x {w.ranks})" if w.ranks > 1 else "") + ", "
                f"{w.mode.value}, {w.precision.value}, {w.attention.value}")
    if w.training:
        text.append(f", {w.optimizer.value}, zero_grad(set_to_none={not w.keep_grads}), "
                    f"checkpointing {w.checkpointing.value}")
        if w.ranks > 1:
            text.append(f", {w.strategy.value} over {w.ranks} GPUs")
            if w.replicas > 1:
                text.append(f" ({w.replicas} nodes of {w.shard_ranks}, sharded within each)")
            if w.mixed_precision:
                text.append(" with MixedPrecisionPolicy (fp32 shards)")
        if w.grad_accum > 1:
            text.append(f", {w.grad_accum} micro-steps of {w.batch} per GPU")
    text.append(f"{where}\n", style="bold")
    at_default = defaults_in_effect(report)
    text.append((f"left at their defaults: {', '.join(at_default)}; " if at_default else "")
                + f"device rules: {w.device.value}", style="dim")
    return text


NO_MAPS = "none: the fused kernel (sdpa) keeps no maps"


def stages_table(report: Report) -> Table:
    """A Swin's stages: where its tokens, windows and attention maps are."""
    b = report.workload.batch
    table = Table(title=f"Stages (attention within M x M windows; map bytes for a batch of {b}, "
                        f"{'kept for backward' if report.workload.saves_activations else 'alive at once'})",
                  title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    for col in ("stage", "blocks", "width", "heads", "grid", "tokens", "window\nM/shift", "windows",
                "maps per\nblock", "map\nbytes"):
        table.add_column(col, justify="right", no_wrap=True)
    for st in report.stages:
        maps = st["attention_bytes_per_block"]
        table.add_row(str(st["stage"]), str(st["blocks"]), f"{st['dim']:,}", str(st["heads"]),
                      f"{st['grid_h']}x{st['grid_w']}", f"{st['tokens']:,}", f"{st['window']}/{st['shift']}",
                      f"{st['windows']:,}", f"{st['attention_elements_per_block']:,}",
                      fmt_bytes(maps) if maps else "none")
    table.caption = "; ".join(f"{name}: {value}" for name, value in _patch_rows(report))
    if not any(st["attention_bytes_per_block"] for st in report.stages):
        table.caption += "; " + NO_MAPS
    table.caption_justify = "left"
    return table


def tokens_table(report: Report) -> Table:
    if report.spec.swin is not None:
        return stages_table(report)
    t = report.tokens
    a = report.attention_maps
    table = Table(title="Tokens and attention maps", show_header=False, title_justify="left")
    table.add_column("what", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_row("grid (h x w)", f"{t['grid_h']} x {t['grid_w']}")
    table.add_row("patch tokens", f"{t['patches']:,}")
    table.add_row("prefix tokens", f"{t['prefix']}")
    table.add_row("tokens N", f"{t['total']:,}")
    table.add_row("attention map per head (N^2)", f"{a['elements_per_head']:,} elements")
    table.add_row("attention maps per layer", f"{a['elements_per_layer']:,} elements")
    table.add_row(*_map_bytes_row(report))
    for row in _patch_rows(report):
        table.add_row(*row)
    return table


def _patch_rows(report: Report) -> list[tuple[str, str]]:
    """What the patch size buys and costs (``Report.patch_metrics``)."""
    m = report.patch_metrics
    gh, gw = m["effective_resolution"]
    return [("pixels per token (P^2; x C values)", f"{m['pixels_per_token']:,} ({m['values_per_token']:,} values)"),
            ("effective resolution (tokens per side)", f"{gh} x {gw}"),
            ("forward MACs per pixel", f"{m['macs_per_pixel']:,.0f}"),
            ("attention products' share of MACs", f"{m['attention_share_of_macs']:.1%}")]


def _map_bytes_row(report: Report) -> tuple[str, str]:
    """What the step gives one layer's maps, as the replay allocates them."""
    kept = report.workload.saves_activations
    label = "  kept for backward per layer (batch)" if kept else "  alive at once per layer (batch)"
    value = report.attention_maps["bytes_per_layer"]
    if not value:
        return label, NO_MAPS
    return label, fmt_bytes(value)


def compute_table(report: Report) -> Table:
    """Parameters and MACs by component; FLOPs = 2 x MACs."""
    table = Table(title="Parameters and compute per image (1 MAC = 1 multiply-add; FLOPs = 2 x MACs)",
                  title_justify="left")
    table.add_column("component", overflow="fold")
    for col in ("params", "forward\nMACs", "forward\nFLOPs", "train\nMACs"):
        table.add_column(col, justify="right", no_wrap=True)
    rows = [c for c in COMPONENT_ORDER if c in report.params or c in report.macs_forward]
    train = report.workload.training
    for path in rows:
        fwd = report.macs_forward.get(path)
        table.add_row(
            path,
            f"{report.params[path]:,}" if path in report.params else "",
            fmt_count(fwd) if fwd is not None else "",
            fmt_count(2 * fwd) if fwd is not None else "",
            fmt_count(report.macs_training[path]) if train and path in report.macs_training else "",
        )
    table.add_row(
        "total", f"{report.params_total:,}", fmt_count(report.macs_forward_per_image),
        fmt_count(2 * report.macs_forward_per_image),
        fmt_count(report.macs_training_per_image) if train else "", style="bold",
    )
    table.caption = _position_text(report.position_encoding)
    table.caption_justify = "left"
    return table


_POSITION_WHAT = {
    "learned": "a learned table added to the tokens",
    "sincos": "a fixed 2-D sin-cos table added to the patches",
    "sincos-1d": "a fixed 1-D sin-cos table added to the patches",
    "rope-2d": "q and k rotated in every block by fixed (N, head width) cos and sin tables",
    "relative-bias": "a learned bias per head and relative offset (BEiT) added to every block's scores",
    "none": "no position information",
    "swin-relative-bias": "a learned bias per head and offset within the window, added to every block's scores",
}


def _position_text(pos: dict[str, Any]) -> str:
    parts = [f"position encoding {pos['kind']}: {_POSITION_WHAT.get(pos['kind'], '')}",
             f"{pos['params']:,} parameters"]
    if pos["buffer_bytes"]:
        parts.append(f"tables {fmt_bytes(pos['buffer_bytes'])}")
    if pos["saved_per_block_bytes"]:
        what = "the rotated q and k" if pos["kind"] == "rope-2d" else "fp32 attention maps as well"
        parts.append(f"each block saves {what}: {fmt_bytes(pos['saved_per_block_bytes'])}")
    return "; ".join(parts)


def memory_table(report: Report) -> Table:
    """Each category as held, and what of it is live at the peak: the second column adds up
    to the peak (the first does not: not every category is whole at that moment; under FSDP
    the gathered parameters count as weights)."""
    m = report.memory
    gpu = report.gpu
    usable = gpu.usable_memory_bytes if gpu else None
    title = "Memory per GPU" if gpu and gpu.gpus > 1 else "Memory"
    table = Table(title=f"{title} ({'peak of a steady-state training step' if report.workload.training else 'peak of a no_grad forward'})",
                  title_justify="left")
    table.add_column("category", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("at the peak", justify="right", no_wrap=True)
    table.add_column("", justify="right", no_wrap=True)
    if usable:
        table.add_column("of usable", justify="right", no_wrap=True)
    at = report.memory_at_peak
    rows = [
        ("weights", m.weights, at["weights"]),
        ("gradients", m.gradients, at["gradients"]),
        ("optimizer states", m.optimizer_states, at["optimizer_states"]),
        ("input batch + labels", m.inputs, at["inputs"]),
        ("activations saved for backward", m.activations, at["saved"]),
        ("autocast weight copies", m.autocast_copies, at["autocast_copies"]),
        ("forward temporaries", None, at["forward_temporaries"]),
        ("backward temporaries", None, at["backward_temporaries"]),
        ("optimizer step temporaries", None, at["optimizer_temporaries"]),
    ]
    if report.ddp_bucket_bytes:
        rows.append(("DDP gradient buckets", report.ddp_bucket_bytes, at["ddp_buckets"]))

    def cells(name: str, full, peak: int) -> list[str]:
        out = [name, "-" if full is None else f"{full:,}", f"{peak:,}", fmt_bytes(peak)]
        if usable:
            out.append(f"{100 * peak / usable:.1f}%")
        return out

    for name, full, peak in rows:
        if full or peak:
            table.add_row(*cells(name, full, peak))
    table.add_row(*cells("peak (tensors: max_memory_allocated)", report.peak_bytes, report.peak_bytes), style="bold")
    if gpu:
        table.add_row(*cells(f"peak reserved ({gpu.allocator} allocator: max_memory_reserved)",
                             gpu.peak_reserved_bytes, gpu.peak_reserved_bytes), style="bold")
    fsdp = report.sharding
    if fsdp:  # each one group's: what a rank holds of them depends on the moment (within the rows above)
        for name, value in (("FSDP root, unsharded (whole step)", fsdp["root_unsharded_bytes"]),
                            ("FSDP all-gather output, a block", fsdp["block_allgather_bytes"]),
                            ("FSDP unsharded params, a block", fsdp["block_unsharded_bytes"]),
                            ("FSDP reduce-scatter input, a block", fsdp["block_reduce_scatter_bytes"])):
            table.add_row(f"  of which {name}", f"{value:,}", "", fmt_bytes(value), *([""] if usable else []),
                          style="dim")
    table.caption = (f"peak reached in {m.peak_phase}. 'at the peak': what is live then, adding up to the peak; "
                     "'size': each category as held (gradients once all exist, activations at the end of forward)")
    if report.per_rank_peak_bytes:
        peaks = report.rank_peaks_bytes
        table.caption += (f"\n{report.workload.strategy.value}: the figures are rank {report.workload.rank}'s, "
                          f"the largest of {len(peaks)} (from {fmt_bytes(min(peaks))} to {fmt_bytes(max(peaks))})")
    return table


def fit_text(report: Report) -> Text:
    gpu = report.gpu
    text = Text()
    if gpu is None:
        text.append("No GPU given: pass --gpu NAME (see 'vitcost gpus') to check the fit.", style="dim")
        return text
    verdict, style = ("FITS", "bold green") if gpu.fits else ("DOES NOT FIT", "bold red")
    text.append(f"{verdict} ", style=style)
    text.append(f"on {escape_control(gpu.display_name)}: reserved peak {fmt_bytes(gpu.peak_reserved_bytes)} "
                f"(tensors {fmt_bytes(gpu.peak_bytes)}) of {fmt_bytes(gpu.usable_memory_bytes)} usable; "
                f"headroom {fmt_bytes(gpu.headroom_bytes)}\n")
    text.append(f"fit rests on: {fmt_bytes(gpu.memory_bytes)} memory - CUDA context {fmt_bytes(gpu.context_bytes)} - "
                f"library workspaces {fmt_bytes(gpu.workspace_bytes)} ({escape_control(gpu.usable_memory_source)}); "
                f"the {gpu.allocator} "
                "caching allocator's segments, over a first step and the steady ones, must fit\n", style="dim")
    per = ""
    if gpu.gpus > 1 or gpu.grad_accum > 1:
        per = (f" ({gpu.max_batch_size // gpu.gpus // gpu.grad_accum} per GPU x {gpu.gpus}"
               + (f" x {gpu.grad_accum} micro-steps" if gpu.grad_accum > 1 else "") + ")")
    text.append(f"largest batch that fits: {gpu.max_batch_size:,}{per}", style="bold")
    return text


_GROUP_LABELS = {
    "matmul": "matmul (linears, patch embedding, head)",
    "attention": "attention (fused kernel, or the eager maps and their matmuls)",
    "memory": "memory-bound (LayerNorm, GELU, residual adds, casts, loss)",
    "optimizer": "optimizer step",
    "communication": "communication not hidden (all-reduce, ZeRO-1's all-gather)",
    "launch": "kernel launches",
}


def time_parts(report: Report) -> list[Any]:
    """The step's time, where it goes, and a run's wall time, GPU-hours and cost."""
    t = report.time
    if t is None:
        if report.gpu is None:
            return []
        return [Text(f"time: not priced: {escape_control(report.time_reason or '')}", style="yellow")]
    step = t.step_seconds
    per = f" ({report.workload.batch:,} per GPU x {t.gpus})" if t.gpus > 1 else ""
    head = Text()
    head.append(f"time: {fmt_seconds(step)} per step of {t.global_batch:,}{per} -> {t.samples_per_s:,.0f} samples/s; "
                f"MFU {t.mfu:.0%}", style="bold")
    head.append(f" (model FLOPs/s over the {t.matmul_dtype} dense peak, "
                f"{fmt_count(t.peak_flops_per_s, 'FLOP/s')})", style="dim")
    if t.calibrated:
        head.append(f"\nprices scaled by the step-time ratio measured on this GPU ({escape_control(t.calibrated)})",
                    style="dim")
    where = "per GPU" if t.device == "cuda" else "on this CPU"
    table = Table(title=f"where the time goes ({where})", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("part")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for group, seconds in t.step.breakdown_seconds.items():
        if seconds or group in ("matmul", "memory"):
            table.add_row(_GROUP_LABELS[group], f"{seconds * 1e3:,.2f}", f"{100 * seconds / step:.1f}%")
    table.add_row("step", f"{step * 1e3:,.2f}", "100.0%", style="bold")
    notes = [f"{t.step.launches:,} kernel launches"]
    if t.step.allreduce_seconds:
        notes.append(f"all-reduce {fmt_seconds(t.step.allreduce_seconds)}, overlapped with backward")
    if t.step.allgather_seconds:
        notes.append(f"parameters' all-gather {fmt_seconds(t.step.allgather_seconds)} after the step, not overlapped")
    if t.step.fsdp_gather_seconds:
        notes.append(f"FSDP all-gathers {fmt_seconds(t.step.fsdp_gather_seconds)} and reduce-scatters "
                     f"{fmt_seconds(t.step.fsdp_reduce_seconds)} per micro-step, overlapped with compute")
    table.caption = "; ".join(notes)
    parts: list[Any] = [head, table]
    if t.run is not None:
        run = t.run
        line = (f"run: {t.options.epochs:g} epochs x {t.options.dataset_size:,} samples = {run.steps:,} steps: "
                f"{fmt_seconds(run.run_seconds)} wall, {run.run_gpu_hours:,.1f} GPU-hours")
        if run.run_cost is not None:
            line += f", cost {run.run_cost:,.2f} at {t.options.price_per_gpu_hour:g} per GPU-hour"
        parts.append(Text(line, style="bold"))
    return parts


def alternatives_parts(report: Report) -> list[Any]:
    """Where the step does not fit: what does, per strategy, on more GPUs."""
    rows = report.alternatives
    if rows is None:
        return []
    if not rows:
        return [Text(f"no strategy vitcost models ({', '.join(SEARCH_STRATEGIES)}) fits it on up to {max(SEARCH_GPUS)} GPUs at this batch; "
                     "a smaller batch, --grad-accum, --checkpointing full or a larger GPU", style="yellow")]
    table = Table(title=f"does not fit on {report.workload.ranks} GPU(s): the fewest that fit, per strategy "
                        f"(global batch {report.batch:,})", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("strategy", "GPUs", "batch per GPU", "peak per rank", "reserved", "ms/step", "samples/s"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for r in rows:
        table.add_row(r["strategy"], f"{r['gpus']:,}", f"{r['per_gpu_batch']:,}", fmt_bytes(r["peak_bytes"]),
                      fmt_bytes(r["peak_reserved_bytes"]),
                      "-" if r["step_seconds"] is None else f"{r['step_seconds'] * 1e3:,.1f}",
                      "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:,.0f}")
    return [table]


def fmt_seconds(seconds: float) -> str:
    """Seconds for reading: ms under a second, s under a minute, then h:mm:ss-style units."""
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render_plan(report: Report, console: Console) -> None:
    parts = [header(report), tokens_table(report), compute_table(report), memory_table(report), fit_text(report),
             *time_parts(report), *alternatives_parts(report)]
    for w in report.warnings:
        parts.append(Text(f"warning: {escape_control(w)}", style="yellow"))
    console.print(Group(*parts))


def _with_ratio(text: str, value: float, ref: float, first: bool) -> Text:
    """A figure, and on a line of its own its ratio to the first row's: the cell stays as
    narrow as the figure, so the table fits 80 columns without cutting either."""
    cell = Text(text)
    if ref and not first:
        cell.append(f"\n{value / ref:.3g}x", style="dim")
    return cell


def render_compare(reports: list[Report], console: Console) -> None:
    from vitcost.api import varying

    axes = varying(reports)
    what = Text(f"{len(reports)} rows" + (f", varying {', '.join(axes)}" if axes else "")
                + "; the header is the first row's", style="dim")
    console.print(Group(header(reports[0]), what, *compare_parts(reports)))
    for r in reports:
        for w in r.warnings:
            console.print(Text(f"warning: {escape_control(w)}", style="yellow"))


def compare_parts(reports: list[Report]) -> list[Any]:
    """The compare table (and, with a GPU, the time table), ratios to the first report."""
    from vitcost.api import varying

    base = reports[0]
    has_gpu = base.gpu is not None
    axes = varying(reports)
    labels = [axis for axis in axes if axis not in ("image", "patch")]
    # image and patch are shown when they vary, or when nothing else does (compare's first use)
    sizes = [axis for axis in ("image", "patch") if axis in axes or not labels]
    # numbers are never wrapped or cut; the table is dense (no outer edge, collapsed padding)
    # so that even a GPU's two columns fit 80 columns; names fold onto a second line
    table = Table(title="vitcost compare (second lines: ratio to the first row)", title_justify="left",
                  box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    if labels:
        table.add_column(_axis_header(labels), justify="left", no_wrap=True)
    for col in (*sizes, "tokens", "attn map\nper head", "GMACs\n/image", "saved for\nbackward", "peak"):
        table.add_column(col, justify="right", no_wrap=True)
    if has_gpu:  # whether the batch fits is told by the largest batch: marked where it is smaller
        table.add_column("max\nbatch", justify="right", no_wrap=True)
        if not all(r.gpu.fits for r in reports):
            table.caption = f"x: batch {base.batch:,} does not fit"
            table.caption_justify = "left"
    for r in reports:
        first = r is base
        row = [*_axis_cells(r, labels), *_size_cells(r, sizes),
            _with_ratio(f"{r.spec.tokens:,}", r.spec.tokens, base.spec.tokens, first),
            _with_ratio(f"{r.attention_maps['elements_per_head']:,}", r.attention_maps["elements_per_head"],
                        base.attention_maps["elements_per_head"], first),
            _with_ratio(f"{r.macs_forward_per_image / 1e9:.2f}", r.macs_forward_per_image,
                        base.macs_forward_per_image, first),
            _with_ratio(fmt_bytes(r.memory.activations), r.memory.activations, base.memory.activations, first),
            _with_ratio(fmt_bytes(r.peak_bytes), r.peak_bytes, base.peak_bytes, first),
        ]
        if has_gpu:
            row.append(Text(f"{r.gpu.max_batch_size:,}" + ("" if r.gpu.fits else " x"),
                            style="" if r.gpu.fits else "bold red"))
        table.add_row(*row)
    parts: list[Any] = [table]
    if any(r.time is not None for r in reports):
        parts.append(_compare_time_table(reports, labels, sizes))
    return parts


def _axis_text(r: Report, axis: str) -> str:
    """A report's value on a compare axis (``api.axis_value``), as a cell shows it."""
    from vitcost.api import axis_value

    value = axis_value(r, axis)
    if axis == "image":
        return f"{value[0]}x{value[1]}" if value[0] != value[1] else str(value[0])
    if value is None:
        return "-"
    return f"{value:,}" if axis == "batch" else escape_control(str(value))


def _size_cells(r: Report, sizes: list[str]) -> list[Text]:
    """A compare row's image and patch, those of them shown."""
    return [Text(_axis_text(r, axis)) for axis in sizes]


def _axis_header(axes: list[str]) -> str:
    """The varying axes' column: the first on one line, the others on the next (each row is
    two lines already: figures, then ratios)."""
    return axes[0] + ("\n" + " ".join(axes[1:]) if len(axes) > 1 else "")


def _axis_cells(r: Report, axes: list[str]) -> list[Text]:
    """A compare row's model, GPU, precision and batch, for the axes that vary: one cell, laid
    out as ``_axis_header``."""
    if not axes:
        return []
    shown = [_axis_text(r, axis) for axis in axes]
    return [Text(shown[0] + ("\n" + " ".join(shown[1:]) if len(shown) > 1 else ""))]


def render_transfer(tr: Any, console: Console) -> None:
    """``vitcost transfer``: the position table before and after, its interpolation once or
    every forward, then what changes between the sizes (``compare``'s tables)."""
    from vitcost.formulas import pos_embed_tokens

    src = tr.source
    s = src.spec
    before = pos_embed_tokens(s)
    intro = Text(f"trained at {s.image_h}x{s.image_w}, patch {s.patch}: a {s.grid_h}x{s.grid_w} grid, "
                 f"{before:,} learned positions ({before * s.dim:,} parameters)\n" if before else
                 f"trained at {s.image_h}x{s.image_w}, patch {s.patch}: no learned position table "
                 f"({s.pos_embed.value}): nothing to interpolate\n")
    table = Table(title="position table at each size", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("to", "grid", "positions", "bicubic MACs", "every forward (timm / Hugging Face)"):
        table.add_column(col, justify="left" if col in ("to", "every forward (timm / Hugging Face)") else "right")
    for t in tr.targets:
        ts = t.report.spec
        i = t.interpolation
        after = pos_embed_tokens(ts)
        lines = []
        for who, extra in (("timm", t.per_forward_timm_extra_peak_bytes), ("HF", t.per_forward_extra_peak_bytes)):
            if extra is not None:
                lines.append(f"{who}: +{fmt_count(t.per_step_interpolation_macs)} MACs/step; peak "
                             f"{'+' if extra >= 0 else '-'}{fmt_bytes(abs(extra))} vs resizing once")
        if t.per_forward is None:
            lines.append(escape_control(t.per_forward_reason or ""))
        every = "\n".join(line for line in lines if line)
        table.add_row(f"{ts.image_h}x{ts.image_w}/{ts.patch}", f"{s.grid_h}x{s.grid_w} -> {ts.grid_h}x{ts.grid_w}",
                      f"{before:,} -> {after:,}", fmt_count(i.macs) if i else "-", every)
    table.caption = ("once at load (timm's resample_abs_pos_embed): the patch rows resampled bicubic, the prefix "
                     "rows kept, and the model built at the new size, as below. Every forward (timm's dynamic_img_size, "
                     "antialiased, in fp32; Hugging Face's interpolate_pos_encoding=True): the old table kept and "
                     "resampled each step, and its "
                     "backward when training (16 multiply-adds per output element each way); its peak against "
                     "the same code with the table resized once (fewer parameters, states and gradients, plus "
                     "the interpolation's buffers).")
    table.caption_justify = "left"
    parts: list[Any] = [header(src), intro, table, *compare_parts([src] + [t.report for t in tr.targets])]
    if len(tr.targets) > 1:
        w = tr.worst.report
        line = (f"multi-scale over {', '.join(f'{t.report.spec.image_h}x{t.report.spec.image_w}' for t in tr.targets)}: "
                f"the worst step is at {w.spec.image_h}x{w.spec.image_w}, peak {fmt_bytes(w.peak_bytes)}")
        if w.gpu:
            line += (f" (reserved {fmt_bytes(w.gpu.peak_reserved_bytes)}): "
                     + ("fits" if w.gpu.fits else "does not fit") + f" on {escape_control(w.gpu.display_name)}")
        parts.append(Text(line))
    console.print(Group(*parts))
    for r in [src] + [t.report for t in tr.targets]:
        for w in r.warnings:
            console.print(Text(f"warning: {escape_control(w)}", style="yellow"))


def _compare_time_table(reports: list[Report], labels: list[str], sizes: list[str]) -> Table:
    """The rows' speed: time per step, samples/s and MFU on the GPU, with ratios to the first."""
    base = reports[0]
    where = "each row's GPU" if "gpu" in labels else escape_control(base.gpu.display_name)
    table = Table(title=f"time per step on {where} (second lines: ratio to the first row)",
                  title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    if labels:
        table.add_column(_axis_header(labels), justify="left", no_wrap=True)
    for col in (*sizes, "ms/step", "samples/s", "MFU", "matmul", "attention", "memory-bound"):
        table.add_column(col, justify="right", no_wrap=True)
    t0 = base.time
    for r in reports:
        t = r.time
        cells = [*_axis_cells(r, labels), *_size_cells(r, sizes)]
        if t is None:
            cells += [Text("-")] * 6
        else:
            first = r is base or t0 is None
            parts = t.step.breakdown_seconds
            cells += [_with_ratio(f"{t.step_seconds * 1e3:,.1f}", t.step_seconds, t0.step_seconds if t0 else 0, first),
                      _with_ratio(f"{t.samples_per_s:,.0f}", t.samples_per_s, t0.samples_per_s if t0 else 0, first),
                      Text(f"{t.mfu:.0%}")]
            cells += [Text(f"{100 * parts[g] / t.step_seconds:.0f}%") for g in ("matmul", "attention", "memory")]
        table.add_row(*cells)
    return table


def render_explain(report: Report, sections: list, console: Console) -> None:
    """``vitcost explain``: each section a table of what, formula = numbers = value."""
    parts: list[Any] = [header(report)]
    for title, steps in sections:
        table = Table(title=title, title_justify="left", box=None, show_header=False, pad_edge=False)
        table.add_column("what", overflow="fold", style="bold", max_width=28)
        table.add_column("derivation", overflow="fold")
        for st in steps:
            value = f"{st.value:,.0f}" if float(st.value).is_integer() else f"{st.value:,.4g}"
            if st.equals and st.equals.startswith("memory_bytes"):
                value += f" ({fmt_bytes(st.value)})"
            terms = [t for t in (st.formula if st.formula != "-" else "", st.substituted if st.substituted != "-"
                                 else "") if t]
            table.add_row(escape_control(st.what), " = ".join([*terms, value]))
        parts.append(table)
    console.print(Group(*parts))


def render_advice(advice: Any, console: Console) -> None:
    """``vitcost advise``: the front, most detail first, and what was searched."""
    c = advice.constraints
    batch = f"at least batch {c['min_batch']}" if c["min_batch"] else f"batch {advice.batch}"
    title = (f"{advice.task or 'constraints'} on {escape_control(advice.gpu)}, {c['mode']}, {batch}: the Pareto front "
             "over detail (tokens), model size and step time; each row the fastest precision and checkpointing that fits")
    table = Table(title=title, title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("model\nimage/patch", overflow="fold")
    for col in ("tokens", "step\nms", "max\nbatch", "reserved"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("precision\ncheckpoint", no_wrap=True)
    table.add_column("why", overflow="fold")
    for r in advice.rows:
        name = Text(escape_control(r["model"]), style="bold")
        name.append(f"\n{r['image']}/{r['patch']}" + (" (task default)" if r["task_default"] else ""), style="dim")
        table.add_row(name, f"{r['tokens']:,}", "-" if r["step_seconds"] is None else f"{r['step_seconds'] * 1e3:,.1f}",
                      f"{r['max_batch']:,}", fmt_bytes(r["peak_reserved_bytes"]),
                      f"{r['precision']}\n{r['checkpointing']}", r["why"])
    console.print(table)
    notes = [f"searched {advice.searched:,} configurations in {advice.seconds:.1f} s; {advice.fitting:,} model, image "
             f"and patch choices fit; {len(advice.rows)} on the front"]
    if advice.default:
        d = advice.default
        on = any(r["task_default"] for r in advice.rows)
        b = d["beaten_by"]
        status = ("" if on else ": it does not fit" if not d["fits"] else
                  f": it fits, but {b['model']} at {b['image']}/{b['patch']} has as much detail and as large a model "
                  "and is as fast or faster" if b else "")
        notes.append(f"the tutorials' starting point: {d['model']} at {d['image']}/{d['patch']} ({d['why']})" + status)
    console.print(Text("\n".join(notes), style="dim"))


def render_tiers(rows: list[dict[str, Any]], console: Console) -> None:
    """``vitcost tiers``: per GPU and model, the largest image and smallest patch that fit."""
    first = rows[0]
    table = Table(title=f"Hardware tiers at batch {first['batch']:,} (global): the largest image at patch "
                        f"{first['patch']}, the smallest patch at {first['image']} px",
                  title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("GPU\nusable", overflow="fold")
    table.add_column("model", overflow="fold")
    for col in ("largest\nimage", "smallest\npatch", "max batch\nat both", "reserved\nat both"):
        table.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in rows:
        gpu = Text("")
        if r["gpu"] != last:
            gpu = Text(escape_control(r["gpu"]) + (f" ({r['gpus']} GPUs)" if r["gpus"] > 1 else ""), style="bold")
            gpu.append("\n" + fmt_bytes(r["usable_memory_bytes"]), style="dim")
            last = r["gpu"]
        image = "none" if r["largest_image"] is None else str(r["largest_image"]) + (
            "+" if r["largest_image"] == _tier_images()[-1] else "")
        patch = "none" if r["smallest_patch"] is None else f"{r['smallest_patch']} (own)" if r["patch_fixed"] else (
            "<=" if r["smallest_patch"] == _tier_patches()[-1] else "") + str(r["smallest_patch"])
        table.add_row(gpu, escape_control(r["model"]), image, patch, f"{r['max_batch']:,}",
                      fmt_bytes(r["peak_reserved_bytes"]))
    console.print(table)
    console.print(Text(f"images tried: {', '.join(map(str, _tier_images()))}; patches: "
                       f"{', '.join(map(str, _tier_patches()))}; a fit is the caching allocator's, over a first "
                       "and the steady steps, within the profile's usable memory", style="dim"))


def _tier_images() -> tuple:
    from vitcost.api import TIER_IMAGES

    return TIER_IMAGES


def _tier_patches() -> tuple:
    from vitcost.api import TIER_PATCHES

    return TIER_PATCHES


def render_models(rows: list[dict[str, Any]], console: Console) -> None:
    """``vitcost models``: a row per name, its sizes under it, figures to the right."""
    table = Table(title="Models (peaks of one step at batch 1: amp-bf16, sdpa, AdamW, CUDA rules)",
                  title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("name\nimage/patch, D x depth, heads", overflow="fold")
    for col in ("params", "GMACs\n/image", "fp16\nweights", "train\npeak", "infer\npeak"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        depth = "+".join(map(str, r["stages"])) if r["stages"] else str(r["depth"])
        name = Text(escape_control(r["name"]), style="bold")
        name.append(f"\n{r['image']}/{r['patch']}, {r['dim']} x {depth}, {r['heads']}", style="dim")
        table.add_row(name, f"{r['params'] / 1e6:,.1f}M", f"{r['gmacs_forward_per_image']:,.2f}",
                      fmt_bytes(r["fp16_weight_bytes"]), fmt_bytes(r["train_peak_bytes_batch1"]),
                      fmt_bytes(r["infer_peak_bytes_batch1"]))
    console.print(table)
    console.print(Text("a Swin's width doubles each stage (the first stage's is shown, its blocks per stage); "
                       "vitcost plan --model NAME for the rest", style="dim"))


def render_gpus(rows: list[tuple[Any, int, str]], console: Console) -> None:
    """The GPU profiles: ``rows`` of (profile, usable bytes, where the usable figure comes from).

    Fits 80 columns: the display name sits under the profile name (which is never cut), memory
    and usable memory share a column, and the aliases follow the table, one profile a line."""
    table = Table(title="GPU profiles (figures per GPU; dense peaks, FP32 accumulate)", title_justify="left")
    table.add_column("name\nGPU", overflow="fold")
    table.add_column("memory\nusable", justify="right", no_wrap=True)
    table.add_column("GB/s", justify="right", no_wrap=True)
    table.add_column("bf16\nTFLOP/s", justify="right", no_wrap=True)
    table.add_column("fp32\nTFLOP/s", justify="right", no_wrap=True)
    table.add_column("link\nGB/s/dir", justify="right", no_wrap=True)
    calibrated = False
    for p, usable, source in rows:
        name = Text(escape_control(p.name), style="bold")
        name.append("\n" + escape_control(p.display_name), style="dim")
        memory = f"{fmt_bytes(p.memory_bytes)}\n{fmt_bytes(usable)}"
        if source != "profile":
            memory += "*"
            calibrated = True
        table.add_row(name, Text(memory), f"{p.memory_bandwidth_gb_per_s:g}", f"{p.dense_tflops.bf16:g}",
                      f"{p.dense_tflops.fp32:g}", f"{p.interconnect.gb_per_s_per_direction:g}")
    if calibrated:
        table.caption = "* usable memory from a saved calibration (vitcost calibrate --save)"
    console.print(table)
    aliases = [(p.name, p.aliases) for p, _, _ in rows if p.aliases]
    if aliases:
        grid = Table.grid(padding=(0, 1), pad_edge=True)
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for name, names in aliases:
            grid.add_row(escape_control(name) + ":", ", ".join(escape_control(a) for a in names))
        console.print(Text("aliases (--gpu takes these too)", style="bold"), grid)
