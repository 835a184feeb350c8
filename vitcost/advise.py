"""``vitcost advise``: which configurations to consider for a task on a GPU.

The tutorials vitcost grew from end in a decision matrix (a patch size per application) and
a patch-size helper; this is that helper with real figures. A task names a starting point
and a search space (``TASKS``): models, patches, images; every combination with each
precision and checkpointing is planned (``vitcost.plan``: replayed, and compiled once per
structure), those that cannot fit are dropped, and what is left is cut to its Pareto front
over three axes: detail (tokens per image, more), capacity (parameters, more) and speed
(step time on the GPU, or MACs without a time model, less). Memory is the constraint: for
each model, image and patch the precision and checkpointing kept are the fastest whose step
fits (the tensor peak first, then the caching allocator's ``fits``). Each row says why it is
there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from vitcost.errors import ConfigError


@dataclass(frozen=True)
class Task:
    """A task's starting point (the tutorials' choice) and the space searched around it."""

    default: tuple[str, int, int]  # model, image, patch: the tutorials' recommendation
    why: str  # what the tutorials say
    models: tuple[str, ...]
    images: tuple[int, ...]
    patches: tuple[int, ...]


TASKS = {
    "classification": Task(("vit-b", 224, 16), "ImageNet-style classification: patch 16 (14 for ViT-H)",
                           ("vit-ti", "vit-s", "vit-b", "vit-l"), (224, 256, 384), (32, 16, 14)),
    "fine-detail": Task(("vit-b", 224, 8), "fine detail: patch 8", ("vit-s", "vit-b", "vit-l"),
                        (224, 384, 512), (16, 8)),
    "medical": Task(("vit-b", 512, 8), "medical imaging: patch 8 or 4, high resolution", ("vit-s", "vit-b"),
                    (224, 384, 512), (16, 8, 4)),
    "satellite": Task(("vit-b", 1024, 32), "satellite and aerial: patch 32 on large tiles", ("vit-s", "vit-b", "vit-l"),
                      (512, 768, 1024), (32, 16)),
    "detection": Task(("swin-b", 448, 4), "detection: variable or hierarchical patches (Swin)",
                      ("swin-t", "swin-s", "swin-b", "vit-b"), (224, 448, 896), (16, 4)),
    "face": Task(("vit-b", 224, 16), "face recognition: patch 16 or 8", ("vit-s", "vit-b"), (112, 224), (16, 8)),
    "mobile": Task(("vit-ti", 224, 32), "mobile and edge: patch 32 or more, small models", ("vit-ti", "vit-s"),
                   (160, 224), (32, 16)),
}
PRECISIONS = ("amp-bf16", "fp32")
CHECKPOINTING = ("none", "full")


@dataclass
class Advice:
    """The front, and what was searched."""

    task: Optional[str]
    gpu: str
    rows: list[dict[str, Any]]  # each: the report, its axes and why it is on the front
    searched: int
    fitting: int
    seconds: float
    batch: int  # the global batch every configuration was planned at
    default: Optional[dict[str, Any]] = None
    constraints: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> list[dict[str, Any]]:
        return [{**row["report"].to_dict(), "advise": {k: v for k, v in row.items() if k != "report"}}
                for row in self.rows]


def capacity(report) -> int:
    """A model's size for the front: its parameters but the embeddings' (the patch projection
    and position table grow with the patch and the image, not with the model)."""
    return report.params_total - report.params.get("pos_embed", 0) - report.params.get("patch_embed", 0)


def _axes(report, use_time: bool) -> tuple[float, float, float]:
    """(detail, capacity, speed), each larger-is-better: tokens per image, ``capacity``, and
    the step time (MACs without a time model) negated."""
    cost = report.time.step_seconds if use_time else report.macs_training_per_image \
        if report.workload.training else report.macs_forward_per_image
    return (report.tokens["patches"], capacity(report), -cost)


def _front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats or ties on every axis while beating on one."""
    out = []
    for a in rows:
        if not any(all(x >= y for x, y in zip(b["axes"], a["axes"])) and b["axes"] != a["axes"] for b in rows):
            out.append(a)
    return out


def advise(task: Optional[str] = None, *, gpu: str, batch: Optional[int] = None, min_batch: Optional[int] = None,
           min_tokens: Optional[int] = None, max_patch: Optional[int] = None, models: Optional[list[str]] = None,
           images: Optional[list[int]] = None, patches: Optional[list[int]] = None, mode: str = "train",
           max_step_seconds: Optional[float] = None, **options: Any) -> Advice:
    """The front of what fits ``gpu`` for ``task`` (or the constraints): for each model, image
    and patch, the fastest precision and checkpointing whose step fits (at ``batch``, or with a
    largest batch of at least ``min_batch``), then the Pareto front of those over detail,
    capacity and speed."""
    from vitcost.api import plan

    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    if task is None and not (min_tokens or max_patch or models):
        raise ConfigError("advise needs --task, or constraints: --min-tokens, --max-patch, --models")
    if batch is not None and min_batch is not None:
        raise ConfigError("give --batch (every row runs it) or --min-batch (every row fits at least it), not both")
    for flag, value in (("--batch", batch), ("--min-batch", min_batch), ("--min-tokens", min_tokens),
                        ("--max-patch", max_patch)):
        if value is not None and not (isinstance(value, int) and 1 <= value <= 1 << 24):
            raise ConfigError(f"{flag} {value}: expected a whole number from 1 to {1 << 24:,}")
    if max_step_seconds is not None and not max_step_seconds > 0:
        raise ConfigError(f"--max-step-ms {max_step_seconds * 1e3:g}: a time budget must be above 0")
    t = TASKS.get(task) if task else None
    models = models or list(t.models if t else ("vit-ti", "vit-s", "vit-b", "vit-l"))
    images = images or list(t.images if t else (224, 384, 512))
    patches = patches or list(t.patches if t else (32, 16, 14, 8))
    if max_patch:
        patches = [p for p in patches if p <= max_patch]
        if not patches:
            raise ConfigError(f"--max-patch {max_patch}: no patch searched is that small")
    run_batch = batch or min_batch or 8
    started = time.perf_counter()
    searched, groups = 0, []
    for model in models:
        for image in images:
            for patch in patches if not model.startswith("swin") else (None,):
                variants = []
                for precision in PRECISIONS:
                    for ck in CHECKPOINTING if mode == "train" else ("none",):
                        searched += 1
                        try:
                            r = plan(model, image=image, patch=patch, batch=run_batch, gpu=gpu, mode=mode,
                                     precision=precision, checkpointing=ck, **options)
                        except ConfigError:
                            continue  # (a Swin whose windows do not cut the grid, say)
                        if min_tokens and r.tokens["patches"] < min_tokens:
                            continue
                        if r.peak_bytes > r.gpu.usable_memory_bytes:
                            continue  # the tensors alone do not fit; the allocator only adds to them
                        if max_step_seconds and r.time is not None and r.time.step_seconds > max_step_seconds:
                            continue
                        variants.append({"report": r, "model": r.spec.name, "image": image, "patch": r.spec.patch,
                                         "precision": precision, "checkpointing": ck})
                groups.append(variants)
    # one speed unit for the whole search: step seconds where every step is priced, else MACs
    use_time = bool(groups) and all(v["report"].time is not None for variants in groups for v in variants)
    chosen = {}
    for variants in groups:
        for v in sorted(variants, key=lambda v: -_axes(v["report"], use_time)[2]):  # the fastest that fits
            rep = v["report"]
            if rep.gpu.fits and (not min_batch or rep.gpu.max_batch_size >= min_batch):
                v["axes"] = _axes(rep, use_time)
                chosen[(v["model"], v["image"], v["patch"])] = v
                break
    if not chosen:
        raise ConfigError(f"nothing searched fits {gpu} at {'at least ' if min_batch else ''}batch {run_batch}"
                          + (f" with at least {min_tokens} tokens" if min_tokens else "")
                          + ": try a smaller --batch, other --models or another --gpu")
    front = _front(list(chosen.values()))
    front.sort(key=lambda c: (-c["axes"][0], -c["axes"][1], -c["axes"][2]))
    _why(front)
    default = None
    if t:
        m, img, p = t.default
        default = {"model": m, "image": img, "patch": p, "why": t.why, "fits": False, "beaten_by": None}
        mine = next((c for key, c in chosen.items() if (key[0], key[1], c["patch"]) == (m, img, p)), None)
        if mine is not None:
            default["fits"] = True
            beaten = [c for c in front if all(x >= y for x, y in zip(c["axes"], mine["axes"]))
                      and c["axes"] != mine["axes"]]
            if beaten:
                b = beaten[0]
                default["beaten_by"] = {"model": b["model"], "image": b["image"], "patch": b["patch"]}
    rows = [{k: v for k, v in c.items() if k != "axes"} for c in front]
    for row in rows:
        rep = row["report"]
        row.update(tokens=rep.tokens["patches"], params=rep.params_total, capacity_params=capacity(rep),
                   peak_bytes=rep.peak_bytes,
                   peak_reserved_bytes=rep.gpu.peak_reserved_bytes, max_batch=rep.gpu.max_batch_size,
                   step_seconds=rep.time.step_seconds if rep.time else None,
                   task_default=bool(default) and (rep.spec.name, row["image"], rep.spec.patch)
                   == (default["model"], default["image"], default["patch"]))
    return Advice(task=task, gpu=gpu, rows=rows, searched=searched, fitting=len(chosen),
                  seconds=time.perf_counter() - started, batch=run_batch, default=default,
                  constraints={"batch": batch, "min_batch": min_batch, "min_tokens": min_tokens,
                               "max_patch": max_patch, "max_step_seconds": max_step_seconds, "mode": mode})


def _why(front: list[dict[str, Any]]) -> None:
    """Say why each row is on the front: the best on an axis, or a trade none beats."""
    names = ("the most detail", "the largest model", "the fastest")
    best = [max(c["axes"][axis] for c in front) for axis in range(3)]
    for c in front:
        why = [name for axis, name in enumerate(names) if c["axes"][axis] == best[axis]]
        c["why"] = "; ".join(why) or "a trade-off none beats on all three"
