"""Fuzzing the command line: random command lines over ``plan`` and ``compare``, random budget
files through ``check``, random GPU profile files through ``--gpu``. Whatever the input, the
outcome is exit 0 with output, or a non-zero exit with exactly one ``Error:`` line on stderr
and nothing on stdout: never a traceback, never another exception. Bounded to ~30 s."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vitcost.cli import app

from conftest import TEST_PROFILE

runner = CliRunner()

# Values that have broken parsers before, and plain good ones.
WEIRD = ["", " ", "0", "-1", "1", "3", "16", "224", "384x256", "inf", "-inf", "nan", "1e300", "1e-320",
         "9" * 40, "9" * 5000, "３８４", "２", "0x10", "1_000", "\x1b[31m", "a,b", ",", "16,", "8,16,x",
         "../../etc/passwd", "/dev/zero", "vit-b", "vit_base_patch16_38", "a100", "h100", "fp8"]
NUMBERS = st.one_of(st.integers(-5, 2000), st.integers(-(10**30), 10**30).map(str),
                    st.sampled_from(["inf", "nan", "1e308", "9" * 5000, "1.5", "-0"]))
FLAGS = {
    "--model": st.sampled_from(["vit-ti", "vit-b", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224",
                                "vit_large_patch14_reg4_dinov2", "vit-bb", "vit_base_patch16_38", ""]),
    "--image": st.one_of(NUMBERS, st.sampled_from(["224", "64x48", "384,224", "", "x", "３８４"])),
    "--patch": st.one_of(NUMBERS, st.sampled_from(["16", "8,16", "１６", ""])),
    "--batch": NUMBERS, "--depth": NUMBERS, "--dim": NUMBERS, "--heads": NUMBERS,
    "--mlp-ratio": NUMBERS, "--mlp-hidden": NUMBERS, "--registers": NUMBERS, "--classes": NUMBERS,
    "--channels": NUMBERS,
    "--mode": st.sampled_from(["train", "infer", "eval", ""]),
    "--precision": st.sampled_from(["fp32", "bf16", "amp-bf16", "amp-fp16", "fp8"]),
    "--attention": st.sampled_from(["sdpa", "eager", "eager-postscale", "flash"]),
    "--optimizer": st.sampled_from(["adamw", "sgd", "sgd-momentum", "lion"]),
    "--checkpointing": st.sampled_from(["none", "full", "half"]),
    "--gpu": st.sampled_from(["a100", "rtx3090", "8xa100", "h200", "", "a1000", "/dev/zero", "nope.yaml"]),
    "--allocator": st.sampled_from(["native", "expandable", "cached"]),
    "--device": st.sampled_from(["cuda", "cpu", "tpu"]),
    "--pos-embed": st.sampled_from(["learned", "sincos", "sincos-1d", "sincos-2d", "rope-2d", "relative-bias",
                                    "none", "rope"]),
    "--pool": st.sampled_from(["token", "avg", "max", "token+avg"]),
    "--frames": NUMBERS, "--tubelet": NUMBERS, "--patch-stride": NUMBERS, "--window": NUMBERS,
    "--to": st.one_of(NUMBERS, st.sampled_from(["384", "224,320,384", "384x256", "", ",", "x"])), "--to-patch": NUMBERS,
    "--mlp": st.sampled_from(["gelu", "swiglu", "relu"]),
    "--impl": st.sampled_from(["timm", "hf", "jax"]),
    "--strategy": st.sampled_from(["ddp", "zero1", "zero2", "fsdp", "hsdp", "zero3"]),
    "--gpus": NUMBERS, "--nodes": NUMBERS, "--grad-accum": NUMBERS,
    "--epochs": NUMBERS, "--dataset-size": NUMBERS, "--price-per-gpu-hour": NUMBERS,
}
SWITCHES = ["--keep-grads", "--json", "--strict", "--no-class-token", "--dist-token", "--no-qkv-bias", "--layer-scale",
            "--impl=hf", "--pool=token+avg", "--drop-path", "--distillation", "--tf32", "--mixed-precision"]


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(["plan", "compare", "transfer"]))
    args = [command]
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5, unique=True)):
        args += [flag, str(draw(FLAGS[flag]))]
    args += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(WEIRD)))  # a stray argument
    # small sizes keep the allocator's work (the fit) fast
    if "--model" not in args and "--dim" not in args:
        args += ["--model", "vit-ti"]
    return args


def assert_clean(result, args, verdict: bool = False) -> None:
    """Exit 0 with output, or one ``Error:`` line and a non-zero exit; nothing else.
    ``verdict``: exit 1 with the table is a budget that failed (``check``), not an error."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), (args, repr(exc))
    if result.exit_code == 0 or (verdict and result.exit_code == 1 and result.stdout.startswith("Budgets:")):
        assert result.stdout, args
        assert "Traceback" not in result.stdout + result.stderr, args
        return
    assert result.exit_code in (1, 2), (args, result.exit_code)
    assert result.stdout == "", (args, result.stdout[:200])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr[:500])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=command_lines())
def test_fuzzed_command_lines(args):
    assert_clean(runner.invoke(app, args), args)


# --- files -------------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.integers(-(10**400), 10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["vit-b", "a100", "train", "amp-bf16", "1e308", ".inf", "\x1b[2J"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
ENTRY_KEYS = ["name", "model", "image", "patch", "batch", "mode", "precision", "attention", "optimizer", "gpu",
              "keep_grads", "checkpointing", "limits", "dim", "depth", "heads", "mlp_ratio", "classes"]
LIMIT_KEYS = ["peak_memory_gib", "peak_memory_bytes", "peak_memory_percent", "min_headroom_gib", "must_fit",
              "max_gmacs_per_image", "min_max_batch_size"]


def _yaml(data) -> str:
    try:
        return yaml.safe_dump(data, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError):  # something PyYAML itself cannot write
        return "budgets: []\n"


@st.composite
def budget_texts(draw):
    entries = []
    for _ in range(draw(st.integers(0, 2))):
        entry = {"name": draw(st.text(min_size=1, max_size=10)), "model": "vit-ti", "image": 64, "patch": 16}
        for key in draw(st.lists(st.sampled_from(ENTRY_KEYS), max_size=3, unique=True)):
            entry[key] = draw(VALUES)
        if draw(st.booleans()):
            entry["limits"] = {k: draw(st.one_of(VALUES, st.floats(), st.integers(-(10**400), 10**400)))
                               for k in draw(st.lists(st.sampled_from(LIMIT_KEYS), max_size=3, unique=True))}
        entries.append(entry)
    data = {"version": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "budgets": entries}
    text = _yaml(data)
    # deep nesting takes PyYAML a second to refuse: drawn now and then (test_inputs.py holds it)
    broken = st.sampled_from(["[" * 3000, "a: 9" + "9" * 5000, text.replace(": ", ":"), text + "budgets: []\n"])
    return draw(st.one_of(st.just(text), st.just(text), st.just(text), broken))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=budget_texts(), as_json=st.booleans())
def test_fuzzed_budget_files(tmp_path, text, as_json):
    path = tmp_path / ("b.json" if as_json else "b.yaml")
    if as_json:
        try:
            import json

            text = json.dumps(yaml.safe_load(text))
        except Exception:
            text = "{" * 3000
    path.write_text(text)
    args = ["check", str(path)]
    assert_clean(runner.invoke(app, args), args, verdict=True)


@st.composite
def profile_texts(draw):
    data = dict(TEST_PROFILE)
    for key in draw(st.lists(st.sampled_from(sorted(TEST_PROFILE) + ["allocator_reserve_fraction", "name"]),
                             max_size=3, unique=True)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(st.one_of(VALUES, st.floats(), st.integers(-(10**400), 10**400)))
    return _yaml(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=profile_texts())
def test_fuzzed_profile_files(tmp_path, text):
    data = _plan_with_profile(tmp_path, text)
    if data is not None:
        assert math.isfinite(data["gpu"]["step_seconds_lower_bound"])


def _plan_with_profile(tmp_path, text: str):
    """``plan --gpu FILE --json`` on a fuzzed profile: a clean exit either way, and whatever was
    accepted prints valid JSON (no Infinity, no NaN), returned parsed; None when refused."""
    import json

    path = tmp_path / "card.yaml"
    path.write_text(text)
    args = ["plan", "--model", "vit-ti", "--image", "64", "--gpu", str(path), "--json"]
    result = runner.invoke(app, args)
    assert_clean(result, args)
    if result.exit_code != 0:
        return None
    return json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


# a small valid config of each modelled architecture; the fuzzer breaks them
HF_CONFIGS = [
    {"architectures": ["ViTForImageClassification"], "hidden_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 2, "intermediate_size": 256, "image_size": 64, "patch_size": 16, "num_channels": 3,
     "qkv_bias": True, "hidden_act": "gelu", "id2label": {"0": "a", "1": "b"}},
    {"architectures": ["Dinov2WithRegistersModel"], "hidden_size": 64, "num_hidden_layers": 2,
     "num_attention_heads": 2, "mlp_ratio": 4, "image_size": 56, "patch_size": 14, "num_channels": 3,
     "qkv_bias": True, "hidden_act": "gelu", "num_register_tokens": 4, "use_swiglu_ffn": False},
    {"architectures": ["ViTMAEForPreTraining"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
     "intermediate_size": 256, "image_size": 64, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
     "hidden_act": "gelu", "mask_ratio": 0.75, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
     "decoder_num_attention_heads": 2, "decoder_intermediate_size": 128, "norm_pix_loss": False},
    {"architectures": ["SwinForImageClassification"], "embed_dim": 32, "depths": [2, 2], "num_heads": [1, 2],
     "window_size": 4, "mlp_ratio": 4.0, "image_size": 64, "patch_size": 4, "num_channels": 3, "qkv_bias": True,
     "hidden_act": "gelu", "use_absolute_embeddings": False, "id2label": {"0": "a", "1": "b"}},
]


@st.composite
def hf_config_texts(draw):
    import json

    data = dict(draw(st.sampled_from(HF_CONFIGS)))
    for key in draw(st.lists(st.sampled_from(sorted({k for c in HF_CONFIGS for k in c})), max_size=3, unique=True)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(st.one_of(VALUES, st.integers(-(10**30), 10**30)))
    try:
        return json.dumps(data)
    except (TypeError, ValueError):
        return "{"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=hf_config_texts(), mode=st.sampled_from(["train", "infer"]))
def test_fuzzed_hf_configs(tmp_path, text, mode):
    path = tmp_path / "config.json"
    path.write_text(text)
    args = ["plan", "--hf-config", str(path), "--mode", mode, "--device", "cpu"]
    assert_clean(runner.invoke(app, args), args)


# a profile's time section (and a probed CPU's keys), broken a key at a time
TIME_SECTION = {"compute_units": 8, "memory_bandwidth_efficiency": 0.9, "attention_efficiency": 0.5,
                "attention_efficiency_low": 0.4, "kernel_overhead_us": 2, "host_overhead_us": 10, "matmul_tile": 128,
                "attention_tile": 128, "pointwise_elements_per_s": {"gelu/4": 1e9, "softmax/2": 2e9},
                "source": "made up for a test"}


@st.composite
def timed_profile_texts(draw):
    data = {**TEST_PROFILE, "time": dict(TIME_SECTION)}
    if draw(st.booleans()):
        data["device"] = draw(st.sampled_from(["cpu", "cuda", "tpu", 1, None]))
    for key in draw(st.lists(st.sampled_from(sorted(TIME_SECTION) + ["typo_us"]), max_size=3, unique=True)):
        if draw(st.booleans()):
            data["time"].pop(key, None)
        else:
            data["time"][key] = draw(st.one_of(
                VALUES, st.floats(), st.integers(-(10**400), 10**400),
                st.dictionaries(st.sampled_from(["gelu/4", "gelu/3", "gelu", "/4", "softmax/2"]),
                                st.one_of(st.floats(), st.integers(-5, 10**20), st.text(max_size=3)), max_size=3)))
    return _yaml(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=timed_profile_texts())
def test_fuzzed_time_sections(tmp_path, text):
    data = _plan_with_profile(tmp_path, text)
    if data is not None:  # a priced step is finite, and a refused section says why in one line
        if data["time"] is not None:
            assert math.isfinite(data["time"]["step_seconds"]) and data["time"]["step_seconds"] > 0
        else:
            assert "\n" not in data["time_reason"]


# --- the design commands ----------------------------------------------------------------------

SMALL = st.sampled_from(["64", "96", "64,96", "0", "-1", "x", "", "1e9", "9" * 400, "３８４"])
DESIGN_FLAGS = {
    "advise": {"--task": st.sampled_from(["classification", "mobile", "face", "cooking", ""]), "--batch": NUMBERS,
               "--min-batch": NUMBERS, "--min-tokens": NUMBERS, "--max-patch": NUMBERS, "--max-step-ms": NUMBERS,
               "--models": st.sampled_from(["vit-ti", "vit-ti,vit-s", "nope", "", ",", "swin-t"]), "--image": SMALL,
               "--patch": st.sampled_from(["16", "8,16", "0", "x", "", "-4"]),
               "--mode": st.sampled_from(["train", "infer", "eval"])},
    "tiers": {"--model": st.sampled_from(["vit-ti", "swin-t", "nope", "", "vit-ti,,"]), "--batch": NUMBERS,
              "--image": SMALL, "--patch": NUMBERS, "--precision": st.sampled_from(["fp32", "fp8"])},
    "explain": {"--model": st.sampled_from(["vit-ti", "swin-t", "deit_tiny_distilled_patch16_224", "nope"]),
                "--image": SMALL, "--patch": NUMBERS, "--batch": NUMBERS, "--window": NUMBERS,
                "--mode": st.sampled_from(["train", "infer", ""])},
    "compare": {"--model": st.sampled_from(["vit-ti,vit-s", "vit-ti,", "swin-t,vit-ti", "x"]),
                "--batch": st.sampled_from(["8,16", "0,8", "x", "", "8,,8"]), "--precision": st.sampled_from(
                    ["fp32,amp-bf16", "fp64", ",", ""]), "--gpu": st.sampled_from(["a100,rtx4090", "a100,nope", ""]),
                "--image": SMALL},
}


@st.composite
def design_lines(draw):
    command = draw(st.sampled_from(sorted(DESIGN_FLAGS)))
    args = [command]
    for flag in draw(st.lists(st.sampled_from(sorted(DESIGN_FLAGS[command])), max_size=4, unique=True)):
        args += [flag, str(draw(DESIGN_FLAGS[command][flag]))]
    if command in ("advise", "tiers"):
        args += ["--gpu", draw(st.sampled_from(["a100", "rtx3090", "nope", ""]))]
    if command == "advise" and "--models" not in args:
        args += ["--models", "vit-ti"]  # (a small search keeps each example fast)
    if command == "tiers" and "--model" not in args:
        args += ["--model", "vit-ti"]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--json", "--plot", "x.gif", "--plot=/nonexistent/dir/x.png"])))
    return args


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=design_lines())
def test_fuzzed_design_commands(args):
    assert_clean(runner.invoke(app, args), args)


@given(match=st.text(max_size=20))
@settings(max_examples=30, deadline=None)
def test_fuzzed_models_filter(match):
    args = ["models", match, "--json"] if not match.startswith("-") else ["models", "--json"]
    assert_clean(runner.invoke(app, args), args)
