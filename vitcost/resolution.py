"""Resolution transfer: a model trained at one image size, run or fine-tuned at another.

A learned position table holds one row per patch of the grid it was trained on (plus the
prefix tokens' rows). At another image the grid changes, and the patch rows are resampled
(bicubic, over the grid as an image of D channels; the prefix rows are kept), either once
when the checkpoint is loaded (timm's ``resample_abs_pos_embed``; the model is then built at
the new size) or in every forward (timm's ``dynamic_img_size``, Hugging Face's
``interpolate_pos_encoding=True``, DINOv2
always): then the table keeps the old grid's rows and each step pays the interpolation,
and its backward when training. Everything else that changes (tokens, MACs, memory, the
largest batch, the step time) is ``plan``'s at each size.

Bicubic interpolation reads 4 x 4 input rows for each output row: 16 multiply-adds per
output element, ``16 * D * gh' * gw'`` MACs (its backward spreads each output gradient over
the same 16 rows: as many again). A count of the kernel's weighted taps; FlopCounterMode
counts none of it. Pure: no torch, typer or rich.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vitcost.estimate import Report
from vitcost.formulas import pos_embed_tokens
from vitcost.specs import PosEmbed

BICUBIC_TAPS = 16  # input rows (4 x 4) each output element of a bicubic resample weighs


@dataclass(frozen=True)
class Interpolation:
    """The patch rows of the table resampled from one grid to another."""

    from_grid: tuple[int, int]
    to_grid: tuple[int, int]
    dim: int
    prefix_rows: int  # rows kept as they are (the class token's, ...)

    @property
    def macs(self) -> int:
        return BICUBIC_TAPS * self.dim * self.to_grid[0] * self.to_grid[1]

    @property
    def bytes_fp32(self) -> int:
        """The grid's rows read and the new grid's written, in fp32."""
        return 4 * self.dim * (self.from_grid[0] * self.from_grid[1] + self.to_grid[0] * self.to_grid[1])


@dataclass(frozen=True)
class Target:
    """One resolution transferred to: the model built there (its table resampled once), and,
    where Hugging Face's code can run it, the same model keeping the old table and
    interpolating it every forward (``per_forward``), or why not."""

    report: Report
    interpolation: Optional[Interpolation]
    per_forward: Optional[Report] = None
    resized_hf: Optional[Report] = None  # Hugging Face's code at the new size, table resized: the baseline
    per_forward_reason: Optional[str] = None
    # timm's dynamic_img_size: the old table resampled every forward on timm's code (its
    # baseline is ``report``, the model built at the new size)
    per_forward_timm: Optional[Report] = None

    @property
    def per_forward_timm_extra_peak_bytes(self) -> Optional[int]:
        """What timm's every-forward resampling adds to the step's peak against resizing once."""
        if self.per_forward_timm is None:
            return None
        return self.per_forward_timm.peak_bytes - self.report.peak_bytes

    @property
    def per_forward_extra_peak_bytes(self) -> Optional[int]:
        """What interpolating every forward adds to the step's peak, on Hugging Face's code."""
        if self.per_forward is None or self.resized_hf is None:
            return None
        return self.per_forward.peak_bytes - self.resized_hf.peak_bytes

    @property
    def per_step_interpolation_macs(self) -> int:
        """Interpolating every forward: once per forward, and its backward when training."""
        if self.interpolation is None:
            return 0
        return self.interpolation.macs * (2 if self.report.workload.training else 1)


@dataclass(frozen=True)
class TransferReport:
    source: Report
    targets: tuple[Target, ...]

    @property
    def worst(self) -> Target:
        """Multi-scale training over the targets: the one whose step needs the most."""
        return max(self.targets, key=lambda t: t.report.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.to_dict(),
            "targets": [_target_dict(t, self.source) for t in self.targets],
            "multi_scale": None if len(self.targets) < 2 else {
                "worst_image": _image(self.worst.report), "worst_peak_bytes": self.worst.report.peak_bytes,
                "worst_peak_reserved_bytes": self.worst.report.gpu.peak_reserved_bytes if self.worst.report.gpu else None,
                "fits": self.worst.report.gpu.fits if self.worst.report.gpu else None,
            },
        }


def interpolation(source: Report, target: Report) -> Optional[Interpolation]:
    """The resample a learned table needs from the source's grid to the target's; None when
    there is no learned table, or the grid is the same."""
    s, t = source.spec, target.spec
    if s.pos_embed != PosEmbed.learned or t.pos_embed != PosEmbed.learned:
        return None
    from_grid, to_grid = (s.grid_h, s.grid_w), (t.grid_h, t.grid_w)
    if from_grid == to_grid:
        return None
    prefix = pos_embed_tokens(s) - s.grid_h * s.grid_w
    return Interpolation(from_grid=from_grid, to_grid=to_grid, dim=s.dim, prefix_rows=prefix)


def _image(report: Report) -> str:
    s = report.spec
    return f"{s.image_h}x{s.image_w}/{s.patch}"


def _target_dict(t: Target, source: Report) -> dict[str, Any]:
    i = t.interpolation
    return {
        "image": _image(t.report),
        "positions_before": pos_embed_tokens(source.spec),
        "positions_after": pos_embed_tokens(t.report.spec),
        "interpolation": None if i is None else {
            "from_grid": list(i.from_grid), "to_grid": list(i.to_grid), "prefix_rows_kept": i.prefix_rows,
            "mode": "bicubic", "macs": i.macs, "bytes_fp32": i.bytes_fp32,
            "per_step_macs_if_every_forward": t.per_step_interpolation_macs,
        },
        "every_forward": None if t.per_forward is None else {
            "impl": "hf", "peak_bytes": t.per_forward.peak_bytes, "resized_peak_bytes": t.resized_hf.peak_bytes,
            "extra_peak_bytes": t.per_forward_extra_peak_bytes,
            "params": t.per_forward.params_total, "resized_params": t.resized_hf.params_total,
        },
        "every_forward_reason": t.per_forward_reason,
        "every_forward_timm": None if t.per_forward_timm is None else {
            "impl": "timm", "peak_bytes": t.per_forward_timm.peak_bytes, "resized_peak_bytes": t.report.peak_bytes,
            "extra_peak_bytes": t.per_forward_timm_extra_peak_bytes, "params": t.per_forward_timm.params_total,
            "resized_params": t.report.params_total,
        },
        "report": t.report.to_dict(),
    }
