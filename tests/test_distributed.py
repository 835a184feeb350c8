"""A step spread over ranks: DDP and ZeRO-1 predicted per rank, held against torch.distributed.

Each measured case runs N real processes (gloo on 127.0.0.1), each wrapping the reference ViT
in DistributedDataParallel (ZeRO-1: its optimizer in ZeroRedundancyOptimizer), and reads
every rank's peak with MemTracker: on the CPU nothing rounds, so the prediction is exact.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest

torch = pytest.importorskip("torch")

import vitcost  # noqa: E402
from vitcost.errors import ConfigError, MeasurementError  # noqa: E402
from vitcost.formulas import param_tensors, zero_partition  # noqa: E402
from vitcost.measure_distributed import measure_ranks  # noqa: E402

from test_cli import invoke, ok  # noqa: E402
from test_fuzz import assert_clean  # noqa: E402

# N = (32/8)^2 + 1 = 17 tokens, D = 64: 114,250 parameters; a rank's step takes well under a second
TINY = dict(image=32, patch=8, dim=64, depth=2, heads=2, mlp_hidden=256, classes=10, device="cpu")


def test_zero_partition_worked_example():
    """Largest first, each to the rank with the fewest elements so far (the lowest on a tie):
    8 (#2) -> r0, 8 (#3) -> r1, 5 (#0) -> r0 (8 = 8: the lower), 3 (#1) -> r1 (11 < 13),
    1 (#4) -> r1 (11 < 13)."""
    assert zero_partition([5, 3, 8, 8, 1], 2) == [[2, 0], [3, 1, 4]]
    assert zero_partition([5, 3, 8, 8, 1], 1) == [[2, 3, 0, 1, 4]]
    assert zero_partition([4], 3) == [[0], [], []]


def test_zero_partition_is_torchs():
    """The partition ZeroRedundancyOptimizer makes of the reference ViT's parameters, at 3 ranks
    (its partitioning only reads ``world_size``: a one-process group, told of 3)."""
    import os

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from vitcost import measure

    report = vitcost.plan("vit-ti", **TINY)
    model = measure.build_model(report.spec)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29431")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4)
        zero.world_size = 3
        zero._partition_parameters_cache = []
        theirs = zero._partition_parameters()
    finally:
        dist.destroy_process_group()
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    got = [[index[id(p)] for group in rank for p in group["params"]] for rank in theirs]
    assert got == zero_partition([n for _, n in param_tensors(report.spec)], 3)


@pytest.mark.parametrize("strategy,ranks,precision", [("ddp", 2, "fp32"), ("zero1", 2, "fp32"),
                                                       ("zero1", 4, "fp32"), ("zero1", 2, "amp-bf16")])
def test_every_rank_is_exact(strategy, ranks, precision):
    report = vitcost.plan("vit-ti", batch=2 * ranks, gpus=ranks, strategy=strategy, precision=precision, **TINY)
    measured = [m["peak_bytes"] for m in measure_ranks(report.spec, report.workload)]
    predicted = json.loads(json.dumps(report.to_dict()))["per_rank_peak_bytes"] or [report.peak_bytes] * ranks
    assert measured == predicted
    if strategy == "ddp":
        # DDP: the single-GPU step plus one flat copy of the gradients (its buckets)
        single = vitcost.plan("vit-ti", batch=2, precision=precision, **TINY)
        assert measured[0] == single.peak_bytes + single.memory.gradients
    else:
        # ZeRO-1 saves optimizer states: every rank under DDP's figure, and the report is the largest
        ddp = vitcost.plan("vit-ti", batch=2 * ranks, gpus=ranks, precision=precision, **TINY)
        assert max(measured) < ddp.peak_bytes and report.peak_bytes == max(measured)


def test_calibrate_nproc_holds_every_rank():
    args = ["calibrate", "--model", "vit-ti", "--image", "32", "--patch", "8", "--dim", "64", "--depth", "2",
            "--heads", "2", "--mlp-hidden", "256", "--classes", "10", "--batch", "8", "--precision", "fp32",
            "--device", "cpu", "--nproc", "4", "--strategy", "zero1", "--json"]
    data = json.loads(ok(*args).stdout)
    (row,) = data["rows"]
    ranks = {f["key"]: f for f in row["figures"] if f["key"].startswith("rank")}
    assert sorted(ranks) == ["rank0_peak_bytes", "rank1_peak_bytes", "rank2_peak_bytes", "rank3_peak_bytes"]
    assert all(f["predicted"] == f["measured"] for f in ranks.values()) and data["ok"]
    assert row["inputs"]["per_gpu_batch"] == 2 and row["inputs"]["strategy"] == "zero1"


def test_a_rank_past_its_time_is_named_and_stopped():
    report = vitcost.plan("vit-ti", batch=4, gpus=2, **TINY)
    with pytest.raises(MeasurementError, match=r"--nproc 2: rank\(s\) 0, 1 did not finish within 0.5 s"):
        measure_ranks(report.spec, report.workload, timeout_seconds=0.5)
    assert multiprocessing.active_children() == []


def test_zero1_times_its_shard_and_the_all_gather():
    """ZeRO-1 steps 1/8 of the parameters on each rank, then sends each rank's share to the
    others: (8 - 1)/8 of the 346,270,624 fp32 parameter bytes at 235 GB/s."""
    ddp = vitcost.plan("vit-b", gpu="8xa100", batch=256).time
    zero = vitcost.plan("vit-b", gpu="8xa100", batch=256, strategy="zero1").time
    assert zero.step.allgather_seconds == pytest.approx(86_567_656 * 4 * 7 / 8 / 235e9, rel=1e-12)
    assert ddp.step.allgather_seconds == 0
    assert zero.step.breakdown_seconds["optimizer"] < ddp.step.breakdown_seconds["optimizer"] / 6
    assert zero.step.breakdown_seconds["matmul"] == ddp.step.breakdown_seconds["matmul"]


def test_gpus_overrides_the_profile():
    one = vitcost.plan("vit-b", gpu="a100", batch=64)
    four = vitcost.plan("vit-b", gpu="a100", batch=64, gpus=4)
    assert four.workload.batch == 16 and four.gpu.gpus == 4 and four.time.gpus == 4
    assert four.ddp_bucket_bytes == four.memory.gradients and one.ddp_bucket_bytes == 0
    assert four.time.step.allreduce_seconds > 0 and four.gpu.max_batch_size % 4 == 0


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "0"], "--gpus 0: a whole number of GPUs from 1 to 65536"),
    (["--strategy", "zero1"], "--strategy zero1 shards over several GPUs"),
    (["--strategy", "zero1", "--gpus", "1"], "--strategy zero1 shards over several GPUs"),
])
def test_bad_distribution_is_one_line(args, needle):
    result = invoke("plan", "--model", "vit-ti", *args)
    assert_clean(result, " ".join(args))
    assert result.exit_code == 1 and needle in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "0"], "--nproc 0: from 1 to 64 processes"),
    (["--nproc", "2", "--meta"], "not with --meta"),
    (["--nproc", "2", "--gpus", "4"], "--gpus 4 with --nproc 2"),
    (["--strategy", "zero1"], "give --nproc N"),
])
def test_bad_calibrate_nproc_is_one_line(args, needle):
    result = invoke("calibrate", "--model", "vit-ti", "--device", "cpu", *args)
    assert_clean(result, " ".join(args))
    assert result.exit_code == 1 and needle in result.stderr


def test_rank_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="rank 2 is not one of the 2 ranks"):
        from vitcost.specs import make_workload

        make_workload(ranks=2, rank=2)


# --- gradient accumulation -----------------------------------------------------------------------


@pytest.mark.parametrize("accum", [2, 3])
def test_gradient_accumulation_is_exact(accum):
    """From the second micro-step on, backward adds into gradients that exist, and the
    optimizer steps after the last: the peak is the kept-gradients step's at the micro-batch."""
    from vitcost import measure

    report = vitcost.plan("vit-ti", batch=2 * accum, grad_accum=accum, precision="fp32", **TINY)
    assert report.workload.batch == 2
    assert report.peak_bytes == measure.measure_cpu(report.spec, report.workload, warmup=2).peak_bytes
    kept = vitcost.plan("vit-ti", batch=2, keep_grads=True, precision="fp32", **TINY)
    assert report.peak_bytes == kept.peak_bytes > vitcost.plan("vit-ti", batch=2, precision="fp32", **TINY).peak_bytes


@pytest.mark.parametrize("strategy,accum", [("ddp", 2), ("zero1", 3)])
def test_gradient_accumulation_over_ranks_is_exact(strategy, accum):
    report = vitcost.plan("vit-ti", batch=4 * accum, gpus=2, grad_accum=accum, strategy=strategy, precision="fp32",
                          **TINY)
    measured = [m["peak_bytes"] for m in measure_ranks(report.spec, report.workload)]
    assert measured == (report.to_dict()["per_rank_peak_bytes"] or [report.peak_bytes] * 2)


def test_gradient_accumulation_time():
    """4 micro-steps of 64: four forwards and backwards, one optimizer step; the all-reduce
    hides behind the last backward only; model FLOPs are the 256 images'."""
    one = vitcost.plan("vit-b", gpu="8xa100", batch=512).time
    four = vitcost.plan("vit-b", gpu="8xa100", batch=2048, grad_accum=4).time
    for part in ("matmul", "attention", "memory"):
        assert four.step.breakdown_seconds[part] == pytest.approx(4 * one.step.breakdown_seconds[part], rel=1e-12)
    assert four.step.breakdown_seconds["optimizer"] == pytest.approx(one.step.breakdown_seconds["optimizer"])
    assert four.step.breakdown_seconds["communication"] == pytest.approx(one.step.breakdown_seconds["communication"])
    assert four.model_flops_per_step == 4 * one.model_flops_per_step
    assert four.samples_per_s > one.samples_per_s  # the optimizer step is paid once per 4


@pytest.mark.parametrize("args,needle", [
    (["--grad-accum", "3", "--batch", "8"], "--grad-accum 3 does not divide --batch 8"),
    (["--grad-accum", "2", "--mode", "infer"], "it needs --mode train"),
    (["--grad-accum", "0"], "--grad-accum 0: a whole number of micro-steps from 1 to 4096"),
])
def test_bad_grad_accum_is_one_line(args, needle):
    result = invoke("plan", "--model", "vit-ti", *args)
    assert_clean(result, " ".join(args))
    assert result.exit_code == 1 and needle in result.stderr


# --- nodes, and the search where a step does not fit ---------------------------------------------


def test_nodes_run_the_ring_at_the_links_between_them():
    """Across nodes a ring crosses each node's edge once per channel, a channel per link out of
    the node. DGX A100: 8 x 25 GB/s HDR = 200 GB/s together, under the 235 GB/s inside the node:
    4 nodes all-reduce 2 x 31/32 of the gradients at 200 GB/s. DGX H100: 8 x 50 = 400 GB/s,
    over its 360 inside: the node's own bus still decides."""
    grads = 4 * vitcost.plan("vit-l").params_total
    a100 = vitcost.plan("vit-l", gpu="8xa100", batch=1024, nodes=4)
    assert a100.workload.ranks == 32 and a100.workload.batch == 32
    assert a100.time.step.allreduce_seconds == pytest.approx(grads * 2 * 31 / 32 / 200e9, rel=1e-12)
    h100 = vitcost.plan("vit-l", gpu="8xh100", batch=1024, nodes=4)
    assert h100.time.step.allreduce_seconds == pytest.approx(grads * 2 * 31 / 32 / 360e9, rel=1e-12)
    one = vitcost.plan("vit-l", gpu="8xh100", batch=256)
    assert one.time.step.allreduce_seconds == pytest.approx(grads * 2 * 7 / 8 / 360e9, rel=1e-12)
    assert a100.to_dict()["inputs"]["nodes"] == 4


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "a100", "--nodes", "2"], "profile a100-80gb has no node_interconnect"),
    (["--gpu", "8xa100", "--nodes", "3", "--gpus", "8"], "8 is not a multiple of 3"),
    (["--gpus", "2", "--nodes", "4"], "--nodes 4 is more than the 2 GPUs"),
    (["--nodes", "0"], "--nodes 0: a whole number of nodes"),
])
def test_bad_nodes_are_one_line(args, needle):
    result = invoke("plan", "--model", "vit-ti", *args)
    assert_clean(result, " ".join(args))
    assert result.exit_code == 1 and needle in result.stderr


def test_a_step_that_does_not_fit_gets_the_fewest_gpus_that_do():
    """ViT-g/14 training at a global batch of 256 does not fit one A100 80GB: each strategy's
    row is the fewest GPUs on which it does, and one GPU fewer does not."""
    report = vitcost.plan("vit-g", gpu="a100", batch=256, patch=14)
    assert not report.gpu.fits
    rows = report.alternatives
    assert [r["strategy"] for r in rows] == ["ddp", "zero1", "zero2", "fsdp"]
    for r in rows:
        fits = vitcost.plan("vit-g", gpu="a100", batch=256, patch=14, gpus=r["gpus"], strategy=r["strategy"])
        assert fits.gpu.fits and fits.peak_bytes == r["peak_bytes"] and r["per_gpu_batch"] == 256 // r["gpus"]
        assert fits.time.step_seconds == r["step_seconds"]
        if r["gpus"] > 2:  # (on 1, the report itself: it does not fit)
            fewer = vitcost.plan("vit-g", gpu="a100", batch=256, patch=14, gpus=r["gpus"] // 2,
                                 strategy=r["strategy"])
            assert not fewer.gpu.fits
    assert rows[1]["peak_bytes"] < rows[0]["peak_bytes"]  # ZeRO-1 keeps a quarter of the states per rank
    assert rows[3]["gpus"] < rows[0]["gpus"]  # FSDP shards the weights too: fewer GPUs hold the step
    assert vitcost.plan("vit-ti", gpu="a100").alternatives is None  # it fits: nothing to search
    text = " ".join(ok("plan", "--model", "vit-g", "--gpu", "a100", "--batch", "256", "--patch", "14").stdout.split())
    assert "does not fit on 1 GPU(s): the fewest that fit, per strategy" in text


def test_largest_batch_counts_every_micro_step():
    """With 2 micro-steps the largest global batch is twice the kept-gradients step's: each
    micro-step holds what that step holds, and the optimizer sees both."""
    accum = vitcost.plan("vit-b", gpu="8xa100", batch=256, grad_accum=2)
    kept = vitcost.plan("vit-b", gpu="8xa100", batch=128, keep_grads=True)
    assert accum.peak_bytes == kept.peak_bytes
    assert accum.gpu.max_batch_size == 2 * kept.gpu.max_batch_size
    assert "(1183 per GPU x 8 x 2 micro-steps)" in ok("plan", "--model", "vit-b", "--gpu", "8xa100", "--batch", "256",
                                                         "--grad-accum", "2").stdout


def test_budget_entries_take_the_strategy(tmp_path):
    budget = tmp_path / "budgets.yaml"
    budget.write_text("version: 1\nbudgets:\n  - name: zero1\n    model: vit-b\n    batch: 256\n    gpu: 8xa100\n"
                      "    strategy: zero1\n    grad_accum: 2\n    limits:\n      must_fit: true\n"
                      "  - name: bad\n    model: vit-b\n    strategy: zero2\n")
    result = invoke("check", str(budget))
    assert_clean(result, "budget strategy")
    assert result.exit_code == 2 and "strategy" in result.stderr  # zero2 is not a strategy vitcost models yet
    budget.write_text(budget.read_text().split("  - name: bad")[0])
    assert "passed: 1 entry" in ok("check", str(budget)).stdout
