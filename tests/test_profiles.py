"""GPU profiles: shipped figures against the vendor datasheets (see docs/gpus.md), resolution, errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitcost.errors import ProfileError, UnknownNameError
from vitcost.profiles import GPUProfile, ResolvedProfile, list_profiles, load_profile

SHIPPED = ["8xa100", "8xh100", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm", "h200", "l40s", "rtx-pro-6000-maxq",
           "rtx3090", "rtx4090", "rtx5090"]

# A small valid profile, written to tmp_path and then broken one key at a time.
from conftest import TEST_PROFILE  # noqa: E402

VALID = TEST_PROFILE


def write(tmp_path: Path, data, name: str = "foo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_key(**changes):
    return {**VALID, **changes}


# --- shipped profiles ---------------------------------------------------------------------


def test_every_shipped_profile_loads_sorted_by_name():
    profiles = list_profiles()
    assert [p.name for p in profiles] == SHIPPED
    for p in profiles:
        assert load_profile(p.name).profile == p
        assert p.source and p.display_name
        assert 0 < p.usable_memory_bytes < p.memory_bytes


# (name, memory MiB, GB/s, fp32, tf32, bf16, fp16 TFLOP/s dense, interconnect GB/s per direction)
# straight from the table in the vendor datasheets (see docs/gpus.md).
REFERENCE = [
    # GeForce: FP32-accumulate tensor rate is half the advertised 142 (FP16 accumulate).
    ("rtx3090", 24576, 936, 35.6, 35.6, 71, 71, 31.5),
    # Same half-rate rule: 165.2, not 330.
    ("rtx4090", 24564, 1008, 82.6, 82.6, 165.2, 165.2, 31.5),
    # A100: dense figures are half the datasheet's sparse ones; NVLink3 300 per direction.
    ("a100-40gb", 40960, 1555, 19.5, 156, 312, 312, 300),
    ("a100-80gb", 81920, 2039, 19.5, 156, 312, 312, 300),
    # H100 SXM bf16 dense = 989, not 1979 (the sparse figure); NVLink4 450 per direction.
    ("h100-sxm", 81559, 3350, 67, 495, 989, 989, 450),
    # H100 PCIe: PCIe 5.0 x16 ~63 GB/s; memory MiB assumed equal to the SXM part.
    ("h100-pcie", 81559, 2000, 51, 378, 756, 756, 63),
    # DGX A100: per-GPU figures of the A100 80GB; NVSwitch 300 per direction per pair.
    ("8xa100", 81920, 2039, 19.5, 156, 312, 312, 300),
    # DGX H100: per-GPU figures of the H100 SXM; NVSwitch 450 per direction per GPU.
    ("8xh100", 81559, 3350, 67, 495, 989, 989, 450),
    # H200: the H100 SXM's compute with 141 GB of HBM3e at 4.8 TB/s.
    ("h200", 143771, 4800, 67, 495, 989, 989, 450),
    # L40S: sparse tensor rates printed (366 TF32, 733 BF16); dense is half.
    ("l40s", 46068, 864, 91.6, 183, 362, 362, 31.5),
    # RTX 5090: GeForce half rate for FP32 accumulation, as the 4090.
    ("rtx5090", 32607, 1792, 104.8, 104.8, 209.5, 209.5, 63),
    # RTX PRO 6000 Max-Q: 3511 FP4 sparse TOPS / 2 / 4 = 439 dense BF16 (full-rate FP32 accumulate).
    ("rtx-pro-6000-maxq", 97887, 1792, 110, 110, 439, 439, 63),
]


@pytest.mark.parametrize("name, mib, gbps, fp32, tf32, bf16, fp16, link", REFERENCE)
def test_figures_match_reference(name, mib, gbps, fp32, tf32, bf16, fp16, link):
    p = load_profile(name).profile
    assert p.memory_mib == mib
    assert p.memory_bandwidth_gb_per_s == gbps
    assert p.peak_flops_per_s("fp32") == pytest.approx(fp32 * 1e12)
    assert p.peak_flops_per_s("tf32") == pytest.approx(tf32 * 1e12)
    assert p.peak_flops_per_s("bf16") == pytest.approx(bf16 * 1e12)
    assert p.peak_flops_per_s("fp16") == pytest.approx(fp16 * 1e12)
    assert p.interconnect.gb_per_s_per_direction == link


def test_sparse_and_fp16_accumulate_figures_are_not_used():
    assert load_profile("h100-sxm").profile.peak_flops_per_s("bf16") == 989e12  # not 1979e12
    assert load_profile("rtx4090").profile.peak_flops_per_s("bf16") == pytest.approx(165.2e12)  # not 330e12
    assert load_profile("rtx3090").profile.peak_flops_per_s("fp16") == 71e12  # not 142e12


def test_efficiency_and_multi_gpu_figures():
    # gpus.md: 87% of peak on A100 SXM (271 of 312), about 80% on H100 SXM (~795 of 989).
    assert load_profile("a100-80gb").profile.matmul_efficiency == 0.87
    assert load_profile("h100-sxm").profile.matmul_efficiency == 0.80
    # 0.87 * 312e12 = 271.44e12
    assert load_profile("a100").profile.achievable_flops_per_s("bf16") == pytest.approx(271.44e12)
    node = load_profile("8xa100").profile
    assert node.gpus == 8
    assert node.allreduce_bus_gb_per_s == 235  # measured NCCL bus bandwidth, ~80% of 300
    assert node.node_interconnect is not None
    assert node.node_interconnect.gb_per_s_per_direction == 25  # 200 Gb/s HDR IB = 25 GB/s
    dgx = load_profile("8xh100").profile
    assert dgx.gpus == 8 and dgx.node_interconnect.gb_per_s_per_direction == 50  # 400 Gb/s NDR = 50 GB/s
    assert dgx.allreduce_bus_gb_per_s == 360  # assumed: 80% of 450, as 235 of 300 on DGX A100
    assert all(p.gpus == 1 and p.node_interconnect is None for p in list_profiles() if not p.name.startswith("8x"))


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="fp8"):
        load_profile("h100").profile.peak_flops_per_s("fp8")


# --- memory arithmetic --------------------------------------------------------------------


def test_usable_memory_of_a100_80gb():
    p = load_profile("a100-80gb").profile
    assert p.memory_bytes == 85_899_345_920  # 81920 * 2**20
    assert p.cuda_context_bytes == 536_870_912  # 512 * 2**20
    assert p.workspace_bytes == 8_519_680  # cuBLAS: 4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB
    # (81920 - 512 - 8.125) MiB = 85_362_475_008 - 8_519_680 bytes
    assert p.usable_memory_bytes == 85_353_955_328


def test_usable_memory_of_a_small_profile(tmp_path):
    p = load_profile(str(write(tmp_path, VALID))).profile
    # (1024 - 24 - 8) MiB = 992 * 2**20 = 1_040_187_392 bytes
    assert p.usable_memory_bytes == 1_040_187_392
    assert isinstance(p.usable_memory_bytes, int)


# --- names and aliases --------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, canonical",
    [
        ("a100", "a100-80gb"),
        ("A100", "a100-80gb"),
        ("a100-40", "a100-40gb"),
        ("h100", "h100-sxm"),
        ("H100-SXM", "h100-sxm"),
        ("3090", "rtx3090"),
        ("4090", "rtx4090"),
        ("dgx-a100", "8xa100"),
        ("a100_80gb", "a100-80gb"),
    ],
)
def test_aliases_resolve(requested, canonical):
    r = load_profile(requested)
    assert isinstance(r, ResolvedProfile)
    assert (r.requested, r.canonical, r.profile.name) == (requested, canonical, canonical)
    assert r.path.name == f"{canonical}.yaml"


def test_label_shows_alias_resolution():
    assert load_profile("a100").label == "a100 -> a100-80gb"
    assert load_profile("a100-80gb").label == "a100-80gb"


def test_aliases_are_unique_and_never_shadow_a_name():
    names = {p.name for p in list_profiles()}
    aliases = [a for p in list_profiles() for a in p.aliases]
    assert len(aliases) == len(set(aliases))
    assert not names & set(aliases)


def test_unknown_name_suggests_nearest():
    with pytest.raises(UnknownNameError) as err:
        load_profile("rtx3080")
    msg = str(err.value)
    assert "'rtx3080'" in msg and "rtx3090" in msg and "(see 'vitcost gpus')" in msg
    assert "\n" not in msg


def test_unknown_name_without_close_match_still_hints():
    with pytest.raises(UnknownNameError, match=r"unknown GPU profile 'zzzz' \(see 'vitcost gpus'\)"):
        load_profile("zzzz")


# --- loading from a path and bad files ----------------------------------------------------


def test_load_from_path(tmp_path):
    for suffix in (".yaml", ".yml"):
        path = write(tmp_path, VALID, name=f"my-gpu{suffix}")
        r = load_profile(str(path))
        assert (r.canonical, r.profile.name, r.path, r.label) == ("my-gpu", "my-gpu", path, "my-gpu")
        assert r.profile.peak_flops_per_s("bf16") == 4e12


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found: .*nope.yaml"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_names_file(tmp_path):
    path = write(tmp_path, "memory_mib: [1\ngpus: 1\n")
    with pytest.raises(ProfileError, match=r"profile .*foo\.yaml: malformed YAML"):
        load_profile(str(path))


def test_not_a_mapping(tmp_path):
    with pytest.raises(ProfileError, match=r"foo\.yaml: expected a mapping"):
        load_profile(str(write(tmp_path, "- a\n- b\n")))


@pytest.mark.parametrize(
    "data, expected",
    [
        (with_key(colour="red"), "unknown key 'colour'"),
        (with_key(memry_mib=1), "unknown key 'memry_mib' (did you mean 'memory_mib'?)"),
        (with_key(name="x"), "unknown key 'name'"),
        ({k: v for k, v in VALID.items() if k != "memory_mib"}, "missing key 'memory_mib'"),
        (with_key(dense_tflops={"fp32": 1, "tf32": 2, "bf16": 4}), "missing key 'dense_tflops.fp16'"),
        (with_key(dense_tflops={**VALID["dense_tflops"], "bf16": -4}), "dense_tflops.bf16: Input should be greater than or equal to 0.01"),
        (with_key(memory_mib=-1), "memory_mib: Input should be greater than 0"),
        (with_key(allocator_reserve_fraction=0.05), "key 'allocator_reserve_fraction' is no longer read"),
        ({k: v for k, v in VALID.items() if k != "cuda_context_mib"}, "missing key 'cuda_context_mib'"),
        ({k: v for k, v in VALID.items() if k != "library_workspace_mib"}, "missing key 'library_workspace_mib'"),
        ({k: v for k, v in VALID.items() if k != "overheads_source"}, "missing key 'overheads_source'"),
        (with_key(library_workspace_mib=-1), "library_workspace_mib: Input should be greater than or equal to 0"),
        (with_key(matmul_efficiency=0), "matmul_efficiency: Input should be greater than or equal to 0.01"),
        # non-finite, denormal and absurd figures (step >= inf ms, Infinity in --json)
        (with_key(matmul_efficiency=1e-320), "matmul_efficiency: Input should be greater than or equal to 0.01"),
        (with_key(memory_bandwidth_gb_per_s=float("inf")), "memory_bandwidth_gb_per_s: Input should be a finite number"),
        (with_key(dense_tflops={**VALID["dense_tflops"], "fp32": float("nan")}), "dense_tflops.fp32: Input should be a finite number"),
        (with_key(memory_mib=10**400), "memory_mib: Input should be less than or equal to 16777216"),
        (with_key(library_workspace_mib=1e308), "library_workspace_mib: Input should be less than or equal to 16777216"),
        (with_key(gpus=True), "gpus: Input should be a valid integer"),
        (with_key(cuda_context_mib=2048), "cuda_context_mib 2048 + library_workspace_mib 8 is not less than memory_mib 1024"),
    ],
)
def test_bad_profile_names_file_and_key(tmp_path, data, expected):
    with pytest.raises(ProfileError) as err:
        load_profile(str(write(tmp_path, data)))
    msg = str(err.value)
    assert msg.startswith("profile ") and "foo.yaml: " in msg and expected in msg
    assert "\n" not in msg
    # no pydantic or yaml traceback chained underneath
    assert err.value.__context__ is None or err.value.__suppress_context__


@pytest.mark.parametrize("text, expected", [
    ("memory_mib: 1024\nmemory_mib: 2048\n", "duplicate key 'memory_mib'"),
    ("memory_mib: " + "9" * 5000 + "\n", "more digits than any figure can have"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    (b"display_name: \xff\xfe\n", "not UTF-8 text"),
])
def test_profile_files_past_pythons_limits_are_one_line(tmp_path, text, expected):
    path = tmp_path / "foo.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    assert "\n" not in str(err.value) and expected in str(err.value) and "foo.yaml" in str(err.value)


def test_profile_that_is_no_regular_file_is_refused_unread(tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(ProfileError, match="not a regular file"):
        load_profile(str(fifo))
    with pytest.raises(ProfileError, match="not a regular file"):
        load_profile("/dev/zero")  # a device: read, it never ends
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (5 << 20))
    with pytest.raises(ProfileError, match="larger than"):
        load_profile(str(big))


def test_model_forbids_unknown_keys_and_is_frozen():
    p = load_profile("h100").profile
    assert GPUProfile.model_config["extra"] == "forbid"
    with pytest.raises(Exception):
        p.memory_mib = 1  # type: ignore[misc]


# --- import hygiene -----------------------------------------------------------------------


def test_import_is_light_and_lazy():
    code = (
        "import sys, vitcost.profiles as p;"
        "assert p._catalog.cache_info().currsize == 0, 'read at import';"
        "bad = {'torch', 'typer', 'rich'} & set(sys.modules);"
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_shipped_files_found_from_a_checkout():
    from vitcost.profiles import _profiles_dir

    names = sorted(e.name for e in _profiles_dir().iterdir() if e.name.endswith(".yaml"))
    assert names == sorted(f"{n}.yaml" for n in SHIPPED)
