"""``vitcost probe``: measure this machine with torch and write it as a profile.

The figures come from ``vitcost.measure.probe_cpu`` (a few seconds): the best matmul rate
over ViT-shaped and square matmuls (the profile's peak) and the median of the ViT shapes over
it (its matmul efficiency), the bandwidth of a large copy, a fused attention kernel's rate,
and what PyTorch takes to dispatch one small operator. The profile says ``device: cpu``:
``plan --gpu probe.yaml`` then plans a CPU step and prices it on these figures, and
``calibrate --device cpu --gpu probe.yaml`` holds that price against the wall clock.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import yaml


def _ram_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 1024


def profile_of(figures: dict[str, float], torch_version: str) -> dict[str, Any]:
    """The profile's keys from the probe's figures (rates in the profile's units); fp16's
    pointwise rates are bf16's (not probed)."""
    pointwise = dict(figures["pointwise"])
    fp32, bf16 = figures["fp32_flops_per_s"], figures["bf16_flops_per_s"]
    eff = figures["fp32_efficiency"]
    # one matmul_efficiency serves every dtype: bf16's peak is written so that peak x efficiency
    # is what bf16 reached on the ViT shapes
    bf16_rate = bf16 * figures["bf16_efficiency"] / eff
    threads = int(figures["threads"])
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "display_name": f"this machine's CPU ({threads} threads, probed)",
        "device": "cpu",
        "gpus": 1,
        "memory_mib": _ram_mib(),
        "cuda_context_mib": 0,
        "library_workspace_mib": 0,
        "overheads_source": "a CPU: no CUDA context and no library workspaces",
        "memory_bandwidth_gb_per_s": round(figures["bandwidth_bytes_per_s"] / 1e9, 3),
        "dense_tflops": {"fp32": round(fp32 / 1e12, 5), "tf32": round(fp32 / 1e12, 5),
                         "bf16": round(bf16_rate / 1e12, 5), "fp16": round(bf16_rate / 1e12, 5)},
        "matmul_efficiency": round(min(1.0, max(0.01, eff)), 4),
        "interconnect": {"name": "none (one machine)", "gb_per_s_per_direction": 1.0},
        "time": {
            "compute_units": threads,
            "memory_bandwidth_efficiency": 1.0,
            "attention_efficiency": round(min(1.0, max(0.01, figures["fp32_attention_efficiency"])), 4),
            # bf16's peak is written scaled (see source): its attention efficiency is over that figure
            "attention_efficiency_low": round(min(1.0, max(0.01, figures["bf16_attention_efficiency"] * bf16
                                                            / bf16_rate)), 4),
            "kernel_overhead_us": 0.0,
            "host_overhead_us": round(figures["op_seconds"] * 1e6, 3),
            "matmul_tile": 0,
            "attention_tile": 0,
            "pointwise_elements_per_s": {k: round(v, 1) for k, v in sorted(pointwise.items())},
            "source": (f"measured by 'vitcost probe' at {stamp} with torch {torch_version}: bandwidth of a 128 MiB "
                       "copy (read + write, already achieved: efficiency 1); attention: "
                       "scaled_dot_product_attention at 2x3x197x64 over each dtype's peak; pointwise operators "
                       "on ViT-Ti-sized operands at batch 2; host_overhead_us: one in-place add on a "
                       "65,536-element tensor (PyTorch's parallel path)"),
        },
        "source": (f"measured by 'vitcost probe' at {stamp} with torch {torch_version}, {threads} threads: "
                   "dense_tflops fp32 and bf16 are the best rate over the linears of ViT-Ti/S/B (forward, "
                   "input and weight gradients) and the attention bmm; matmul_efficiency is the median of "
                   "those rates over the fp32 best (bf16's peak is scaled so that peak x efficiency is bf16's "
                   "median); tf32 = fp32, fp16 = bf16 (not probed)"),
    }


def probe(out: str) -> dict[str, Any]:
    """Measure this machine and write its profile to ``out`` (validated before it is written)."""
    from vitcost import measure
    from vitcost.errors import ConfigError
    from vitcost.profiles import _parse

    if not out.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"--out {out}: a profile is a .yaml or .yml file")
    figures = measure.probe_cpu()
    data = profile_of(figures, measure.torch.__version__)
    text = "# written by 'vitcost probe': this machine, measured with torch\n" + yaml.safe_dump(data, sort_keys=False)
    name = os.path.basename(out).rsplit(".", 1)[0]
    _parse(text, name=name, where=out)  # what is written loads
    tmp = out + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be written ({exc.strerror or exc})") from None
    return {"path": out, "figures": figures, "profile": data}
