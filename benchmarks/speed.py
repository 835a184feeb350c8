"""Speed of vitcost, written to docs/speed.md.

1. `vitcost plan --image 384 --patch 16 --gpu a100` wall time against the floor of its own
   stack (benchmarks/floor_app.py: Typer + pydantic + YAML + one rich table), each the
   median of repeated runs of a fresh interpreter on the same machine. Target: <= 1.5x.
2. 10,000 configurations through the Python API (`vitcost.plan`), a grid of presets,
   images, patches, batches, precisions and attention kernels, each a new report with a
   fit against a GPU profile. Target: < 1 s.

Run: python benchmarks/speed.py [--runs 21] [--out docs/speed.md]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall_times(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)  # warm the file cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def api_grid(n: int) -> list[dict]:
    models = ["vit-ti", "vit-s", "vit-m", "vit-b", "vit-l", "vit-h"]
    images = [224, 256, 288, 320, 384, 448, 512, 640]
    patches = [8, 14, 16, 32]
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    precisions = ["amp-bf16", "bf16", "fp32"]
    attentions = ["sdpa", "eager"]
    grid = itertools.product(models, images, patches, batches, precisions, attentions)
    return [dict(model=m, image=i, patch=p, batch=b, precision=pr, attention=a)
            for m, i, p, b, pr, a in itertools.islice(grid, n)]


def api_time(n: int, gpu: str | None) -> tuple[float, int]:
    sys.path.insert(0, str(ROOT))
    import vitcost

    configs = api_grid(n)
    t0 = time.perf_counter()
    for cfg in configs:
        vitcost.plan(gpu=gpu, **cfg)
    return time.perf_counter() - t0, len(configs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--configs", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "speed.md")
    args = ap.parse_args()

    py = sys.executable
    plan_cmd = [py, "-m", "vitcost", "plan", "--image", "384", "--patch", "16", "--gpu", "a100"]
    floor_cmd = [py, str(ROOT / "benchmarks" / "floor_app.py")]
    floor = wall_times(floor_cmd, args.runs)
    plan = wall_times(plan_cmd, args.runs)
    f_med, p_med = statistics.median(floor), statistics.median(plan)
    api_gpu, n = api_time(args.configs, "a100")
    api_nogpu, _ = api_time(args.configs, None)

    lines = [
        "# Speed",
        "",
        "Written by `python benchmarks/speed.py`; the latest run is committed.",
        "",
        f"Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.system()}; medians of {args.runs} runs of a fresh interpreter each.",
        "",
        "| what | median wall time | ratio to the floor | target |",
        "|---|---|---|---|",
        f"| floor: Typer + pydantic + YAML + one rich table (`benchmarks/floor_app.py`) | {f_med * 1e3:.0f} ms | 1.00 | |",
        f"| `vitcost plan --image 384 --patch 16 --gpu a100` | {p_med * 1e3:.0f} ms | {p_med / f_med:.2f} | <= 1.5 |",
        "",
        f"| Python API | configurations | total | per configuration | target |",
        "|---|---|---|---|---|",
        f"| `vitcost.plan(..., gpu='a100')` (report + fit + largest batch) | {n:,} | {api_gpu:.2f} s | {api_gpu / n * 1e6:.0f} µs | < 1 s |",
        f"| `vitcost.plan(...)` (report, no GPU) | {n:,} | {api_nogpu:.2f} s | {api_nogpu / n * 1e6:.0f} µs | |",
        "",
        "The grid: presets vit-ti ... vit-h x 8 image sizes x patches 8/14/16/32 x batches 1..256 x "
        "amp-bf16/bf16/fp32 x sdpa/eager, in that order, the first "
        f"{n:,} combinations. Each call builds a new report; nothing is cached across calls but "
        "the largest batch that fits and the lines it is solved from (both per configuration without its batch) and the "
        "calibration file.",
        "",
        "## Where the time goes",
        "",
        "A report is one memory replay at the requested batch (about 95-180 tensor allocations "
        "for the first and last block, the prologue, head, loss and optimizer step; ~150 µs in "
        "CPython). The fit against a GPU adds the largest batch that fits: two replays per "
        "configuration-without-batch give every allocation's live total as a line in the batch "
        "size (shared by the nine batches of the grid), and under CUDA's 512-byte rounding an "
        "exact replay settles cases within the rounding bound of the budget.",
        "",
        "The 1 s target for 10,000 configurations is not met: ~0.3 ms per configuration with a "
        "GPU fit. Closing the gap needs the replay compiled once per model structure into the "
        "handful of candidate peak expressions (the lines already are that, per configuration), "
        "so that a report at a new batch is an evaluation, not a replay.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
