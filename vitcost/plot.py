"""Plots, with the ``plot`` extra (matplotlib): ``plan --plot`` draws the memory of one step
over time, the replay's categories stacked, the peak marked; ``compare --plot`` draws memory
and compute against the image (or patch, or batch) size, a line per model and the rest of
what varies, each GPU's usable memory as a line.

The timeline is the replay's own (``vitcost.memory.replay_step``, every block replayed): the
live total after each allocation, with what it is made of. Without matplotlib, a one-line
error says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitcost import memory
from vitcost.errors import ConfigError, ExtraMissingError
from vitcost.replay import B, F, G, I, O, OT, S, W, WC, Replay

FORMATS = (".png", ".svg", ".pdf")
# stacked bands, bottom to top: (label, replay categories)
BANDS = (("weights", (W,)), ("gradients", (G,)), ("optimizer states and step", (O, OT)), ("inputs", (I,)),
         ("autocast weight copies", (WC,)), ("saved for backward", (S,)), ("temporaries", (F, B)))


def check_path(path: str) -> Path:
    """The file a plot goes to: its suffix names the format."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise ConfigError(f"--plot {path}: name a .png, .svg or .pdf file (the suffix picks the format)")
    return p


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExtraMissingError("--plot needs matplotlib: pip install 'vitcost[plot]'") from None
    return plt


class _Timeline(Replay):
    """A replay of every block that keeps, after each allocation, the live bytes by category
    and where the step is."""

    FULL = True
    __slots__ = ("samples",)

    def __init__(self, round_to: int) -> None:
        super().__init__(round_to)
        self.samples: list[tuple[tuple[int, ...], str]] = []

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        super().alloc(name, nbytes, cat)
        if nbytes > 0 and self.sampling:
            self.samples.append((tuple(self.cat), self.where))


def timeline(spec, wl) -> list[tuple[tuple[int, ...], str]]:
    """The step's live bytes by replay category after each allocation, with the phase."""
    sh = memory.shapes_of(spec, wl)
    r = _Timeline(memory.CUDA_BLOCK_BYTES if sh.cuda else 1)
    memory.replay_step(r, spec, wl, sh)
    return r.samples


def plot_step(report, path: str) -> int:
    """``plan --plot``: the step's memory over time; returns the timeline's peak (bytes)."""
    out = check_path(path)
    plt = _pyplot()
    samples = timeline(report.spec, report.workload)
    xs = range(len(samples))
    gib = 2 ** 30
    bands = [[sum(cats[c] for c in members) / gib for cats, _ in samples] for _, members in BANDS]
    totals = [sum(cats) for cats, _ in samples]
    k = max(range(len(totals)), key=totals.__getitem__)
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.stackplot(xs, *bands, labels=[label for label, _ in BANDS], alpha=0.85)
    ax.plot([k], [totals[k] / gib], "k^")
    ax.annotate(f"peak {totals[k] / gib:.2f} GiB\n{samples[k][1]}", (k, totals[k] / gib), textcoords="offset points",
                xytext=(8, -24), fontsize=8)
    start = None
    for i, (_, where) in enumerate(samples):  # the phases: forward, backward, optimizer step
        phase = where.split(":")[0]
        if phase != start:
            ax.axvline(i, color="grey", lw=0.5, ls=":")
            ax.text(i, ax.get_ylim()[1] * 0.98 if i else 0, f" {phase}", fontsize=7, va="top", color="grey")
            start = phase
    s, w = report.spec, report.workload
    ax.set_title(f"{s.name}, {s.image_h}x{s.image_w}/{s.patch}, batch {w.batch}, {w.mode.value}, {w.precision.value}, "
                 f"{w.attention.value}: live memory after each allocation", fontsize=9)
    ax.set_xlabel("allocations, in order")
    ax.set_ylabel("GiB")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save(fig, out, plt)
    return totals[k]


def plot_compare(reports: list, path: str) -> dict[str, Any]:
    """``compare --plot``: peak memory and compute against the varying size; returns what was
    drawn (the x axis, and a line per key)."""
    from vitcost.api import axis_value, varying

    out = check_path(path)
    plt = _pyplot()
    axes = varying(reports)
    x_axis = next((a for a in ("image", "patch", "batch") if a in axes), "image")
    keys = [a for a in ("model", "gpu", "precision", "batch", "patch", "image") if a in axes and a != x_axis]

    def value(r, axis: str) -> Any:  # (an image is drawn and named by its height)
        v = axis_value(r, axis)
        return v[0] if axis == "image" else v

    lines: dict[str, list] = {}
    for r in reports:
        label = ", ".join(f"{value(r, a)}" for a in keys) or reports[0].spec.name
        lines.setdefault(label, []).append(r)
    timed = all(r.time is not None for r in reports)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: value(r, x_axis))
        xs = [value(r, x_axis) for r in rs]
        left.plot(xs, [r.peak_bytes / 2 ** 30 for r in rs], marker="o", label=label)
        right.plot(xs, [r.time.step_seconds * 1e3 if timed else r.macs_forward_per_image / 1e9 for r in rs],
                   marker="o", label=label)
    for gpu in {r.gpu.requested: r.gpu for r in reports if r.gpu}.values():
        left.axhline(gpu.usable_memory_bytes / 2 ** 30, ls="--", lw=1, color="grey")
        left.text(left.get_xlim()[0], gpu.usable_memory_bytes / 2 ** 30, f" {gpu.requested} usable", fontsize=7,
                  va="bottom", color="grey")
    for ax in (left, right):
        ax.set_xlabel({"image": "image side (px)", "patch": "patch (px)", "batch": "batch"}[x_axis])
        if x_axis == "patch":
            ax.invert_xaxis()  # smaller patches, more tokens, to the right
    left.set_ylabel("peak memory (GiB, tensors)")
    right.set_ylabel("ms per step" if timed else "forward GMACs per image")
    left.legend(fontsize=7)
    fig.suptitle("vitcost compare", fontsize=9)
    fig.tight_layout()
    _save(fig, out, plt)
    return {"x": x_axis, "lines": {label: [value(r, x_axis) for r in rs] for label, rs in lines.items()}}


def _save(fig, out: Path, plt) -> None:
    try:
        fig.savefig(out)
    except OSError as exc:
        raise ConfigError(f"--plot {out}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
