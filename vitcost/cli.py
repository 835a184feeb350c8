"""The vitcost command line: parse, call the core, render or print JSON.

This is the only module that knows about exit codes, stdout and stderr. Domain errors
(:class:`vitcost.errors.VitcostError`) and usage errors become one line on stderr: exit 1
for a configuration that cannot be, exit 2 for a malformed command line.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from vitcost.errors import BudgetFileError, VitcostError, shorten
from vitcost.render import escape_control
from vitcost.specs import (Allocator, AttentionKernel, Checkpointing, Device, Impl, Mlp, Mode, Optimizer, Pooling,
                           PosEmbed, Precision, Strategy)

_err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def _fail(message: str, code: int) -> None:
    # a name from the command line or a file may hold control characters: the line stays one line
    _err.print(f"Error: {escape_control(message)}", markup=False)
    sys.exit(code)


def _usage_message(exc: Exception) -> str:
    """A click usage error as one line, without pydantic's "Value error, " (typer converts
    values with pydantic: "Invalid value for '--mode': Value error, 'x' is not one of ...")."""
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    return re.sub(r"(^|: )Value error, ", r"\1", message)


class _OneLineErrors(TyperGroup):
    """Runs the app without click's standalone handling, so every error is one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except BudgetFileError as exc:  # the file is wrong, not the configuration: a usage error
            _fail(str(exc), 2)
        except VitcostError as exc:
            _fail(str(exc), 1)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except typer.Abort:
            _fail("aborted", 1)
        except Exception as exc:
            # click's usage and parameter errors (exit 2), whichever click typer ships
            if hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int):
                message = _usage_message(exc)
                if not message:  # no arguments: the help was printed, nothing went wrong
                    sys.exit(0)
                _fail(message, exc.exit_code)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Will this Vision Transformer configuration fit, and what will it cost, on this GPU?",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # commands inherit it
)


def _version() -> str:
    import vitcost

    version = getattr(vitcost, "__version__", None)
    if version:
        return version
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("vitcost")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"vitcost {_version()}\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


# --- options shared by plan and compare (and the commands built on them) ---------------------

# --image and --patch default to None: a model name may fix them (vit_base_patch16_384); help says so
IMAGE_DEFAULT = "224, or the model name's"
PATCH_DEFAULT = "16, or the model name's"

SHARED: list[tuple[str, Any, Any]] = [
    ("model", Annotated[Optional[str], typer.Option(help="Preset (vit-ti ... vit-G) or timm-style name (vit_base_patch16_384).", rich_help_panel="Model", show_default="vit-b")], None),
    ("batch", Annotated[int, typer.Option(help="Global batch size (split over the GPUs of a multi-GPU profile).", rich_help_panel="Workload")], 8),
    ("mode", Annotated[Mode, typer.Option(help="train: a full optimizer step; infer: a no_grad forward.", rich_help_panel="Workload")], Mode.train),
    ("precision", Annotated[Precision, typer.Option(help="fp32/bf16/fp16: everything in that dtype; amp-*: fp32 weights, autocast matmuls.", rich_help_panel="Workload")], Precision.amp_bf16),
    ("attention", Annotated[AttentionKernel, typer.Option(help="eager keeps the N x N maps for backward; sdpa is fused.", rich_help_panel="Workload")], AttentionKernel.sdpa),
    ("optimizer", Annotated[Optimizer, typer.Option(help="adamw/adam: two states; sgd-momentum: one; sgd: none.", rich_help_panel="Workload")], Optimizer.adamw),
    ("keep_grads", Annotated[bool, typer.Option("--keep-grads", help="zero_grad(set_to_none=False): gradients stay allocated between steps.", rich_help_panel="Workload")], False),
    ("checkpointing", Annotated[Checkpointing, typer.Option(help="Activation checkpointing per block.", rich_help_panel="Workload")], Checkpointing.none),
    ("gpu", Annotated[Optional[str], typer.Option(help="GPU profile name, alias or path to a YAML profile (see 'vitcost gpus').", rich_help_panel="Workload")], None),
    ("gpus", Annotated[Optional[int], typer.Option(help="GPUs the step is spread over (overrides the profile's count; each runs its share of --batch).", rich_help_panel="Workload", show_default="the profile's")], None),
    ("nodes", Annotated[Optional[int], typer.Option(help="Nodes the GPUs are spread over (a node profile's count times this, unless --gpus): the all-reduce then runs at the slower of the node's bus and its links out together.", rich_help_panel="Workload", show_default="1")], None),
    ("grad_accum", Annotated[int, typer.Option(help="Gradient accumulation: micro-steps per optimizer step (--batch is split into so many; DDP syncs the last).", rich_help_panel="Workload")], 1),
    ("mixed_precision", Annotated[bool, typer.Option("--mixed-precision", help="With zero2, fsdp or hsdp and --precision bf16|fp16: FSDP's MixedPrecisionPolicy (param_dtype the precision's, reduce_dtype fp32): fp32 sharded weights, gradients and optimizer states.", rich_help_panel="Workload")], False),
    ("strategy", Annotated[Strategy, typer.Option(help="ddp: every GPU holds everything, plus DDP's gradient buckets; zero1: ZeroRedundancyOptimizer, each GPU keeps the optimizer states of its share; zero2, fsdp: FSDP2 fully_shard per block (parameters, gradients and states sharded; fsdp also reshards each block after forward); hsdp: fsdp within each node (--nodes), replicated across nodes.", rich_help_panel="Workload")], Strategy.ddp),
    ("allocator", Annotated[Allocator, typer.Option(help="CUDA caching allocator the fit is decided on: native, or expandable (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).", rich_help_panel="Workload")], Allocator.native),
    ("device", Annotated[Optional[Device], typer.Option(help="Replay rules: cuda (autocast's CUDA policy, 512-byte blocks) or cpu.", rich_help_panel="Workload", show_default="cuda, or the --gpu profile's device")], None),
    ("tf32", Annotated[bool, typer.Option("--tf32", help="fp32 matmuls on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32): priced at the TF32 rate.", rich_help_panel="Time")], False),
    ("epochs", Annotated[Optional[float], typer.Option(help="Epochs of a training run (with --dataset-size): its wall time and GPU-hours.", rich_help_panel="Time")], None),
    ("dataset_size", Annotated[Optional[int], typer.Option(help="Samples per epoch (with --epochs).", rich_help_panel="Time")], None),
    ("price_per_gpu_hour", Annotated[Optional[float], typer.Option(help="Price of one GPU-hour: the run's cost (with --epochs and --dataset-size).", rich_help_panel="Time")], None),
    ("json_out", Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema: docs/json-schema.md).")], False),
    ("strict", Annotated[bool, typer.Option("--strict", help="Error out when the image is not divisible by the patch.", rich_help_panel="Model")], False),
    ("dim", Annotated[Optional[int], typer.Option(help="Width D.", rich_help_panel="Model")], None),
    ("depth", Annotated[Optional[int], typer.Option(help="Number of blocks.", rich_help_panel="Model")], None),
    ("heads", Annotated[Optional[int], typer.Option(help="Attention heads (must divide D).", rich_help_panel="Model")], None),
    ("mlp_ratio", Annotated[Optional[float], typer.Option(help="MLP hidden width as a multiple of D.", rich_help_panel="Model")], None),
    ("mlp_hidden", Annotated[Optional[int], typer.Option(help="MLP hidden width.", rich_help_panel="Model")], None),
    ("channels", Annotated[Optional[int], typer.Option(help="Image channels.", rich_help_panel="Model")], None),
    ("class_token", Annotated[Optional[bool], typer.Option("--class-token/--no-class-token", help="Class token.", rich_help_panel="Model")], None),
    ("dist_token", Annotated[Optional[bool], typer.Option("--dist-token/--no-dist-token", help="DeiT distillation token (and second head).", rich_help_panel="Model")], None),
    ("registers", Annotated[Optional[int], typer.Option(help="Register tokens.", rich_help_panel="Model")], None),
    ("pos_embed", Annotated[Optional[PosEmbed], typer.Option(help="Position embedding.", rich_help_panel="Model")], None),
    ("pos_embed_prefix", Annotated[Optional[bool], typer.Option("--pos-embed-prefix/--no-pos-embed-prefix", help="Whether prefix tokens get a learned position.", rich_help_panel="Model")], None),
    ("pool", Annotated[Optional[Pooling], typer.Option(help="Head on the class token or on the mean of the patch tokens.", rich_help_panel="Model")], None),
    ("classes", Annotated[Optional[int], typer.Option(help="Classes of the head (0: no head).", rich_help_panel="Model")], None),
    ("qkv_bias", Annotated[Optional[bool], typer.Option("--qkv-bias/--no-qkv-bias", help="Bias on the fused qkv projection.", rich_help_panel="Model")], None),
    ("layer_scale", Annotated[Optional[bool], typer.Option("--layer-scale/--no-layer-scale", help="LayerScale on both residual branches (DINOv2, DeiT III).", rich_help_panel="Model")], None),
    ("distillation", Annotated[Optional[bool], typer.Option("--distillation/--no-distillation", help="DeiT's hard distillation in training (with --dist-token): each head its cross-entropy; the teacher's own forward is not counted.", rich_help_panel="Model")], None),
    ("drop_path", Annotated[Optional[bool], typer.Option("--drop-path/--no-drop-path", help="timm's stochastic depth in training (rates rising from 0 at the first block): a per-sample mask per branch.", rich_help_panel="Model")], None),
    ("frames", Annotated[Optional[int], typer.Option(help="Video frames (Hugging Face's VideoMAE, --impl hf; with --tubelet).", rich_help_panel="Model", show_default="1")], None),
    ("tubelet", Annotated[Optional[int], typer.Option(help="Frames per patch (VideoMAE's tubelet size).", rich_help_panel="Model", show_default="1")], None),
    ("patch_stride", Annotated[Optional[int], typer.Option(help="An overlapping patch embedding: the conv's stride (below --patch), padded by (patch - stride) / 2; tokens per side floor((H - P + 2 pad) / S) + 1.", rich_help_panel="Model", show_default="the patch")], None),
    ("window", Annotated[Optional[int], typer.Option(help="A Swin's attention windows: M x M tokens (swin-* models; 7 at 224, 12 at 384).", rich_help_panel="Model", show_default="the model's")], None),
    ("mlp", Annotated[Optional[Mlp], typer.Option(help="gelu: fc1, GELU, fc2; swiglu: down(silu(gate(x)) * up(x)) (Hugging Face's DINOv2-giant; --impl hf).", rich_help_panel="Model", show_default="gelu")], None),
    ("impl", Annotated[Optional[Impl], typer.Option(help="Whose code runs the model: timm (vitcost's reference mirrors it) or hf (Hugging Face transformers).", rich_help_panel="Model", show_default="timm")], None),
]


def shared_options(func: Callable) -> Callable:
    """Add the shared options to a command's signature; the command gets them as ``opts``."""
    own = inspect.signature(func, eval_str=True)  # typer reads the annotations, not strings
    params = [p for p in own.parameters.values() if p.name != "opts"]
    names = {p.name for p in params}
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
             for n, a, d in SHARED if n not in names]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        opts = {n: kwargs.pop(n) for n, _, _ in SHARED if n in kwargs and n not in names}
        return func(opts=opts, **kwargs)

    wrapper.__signature__ = own.replace(parameters=params + extra)  # type: ignore[attr-defined]
    return wrapper


def plan_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Shared CLI options as keyword arguments of :func:`vitcost.plan`."""
    kw = dict(opts)
    kw.pop("json_out", None)
    kw["pooling"] = kw.pop("pool", None)
    for key in ("mode", "precision", "attention", "optimizer", "checkpointing", "device", "pos_embed", "pooling",
                "allocator", "impl", "mlp", "strategy"):
        if kw.get(key) is not None:
            kw[key] = kw[key].value
    return kw


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _write(path: str, flag: str, text: str) -> None:
    """Write an output file; one that cannot be written is a usage error (exit 2), never
    mistaken for a failed check or calibration (exit 1)."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        _fail(f"{flag} {path}: cannot be written ({exc.strerror or exc})", 2)


def _console() -> Console:
    """stdout's console: COLUMNS wide when COLUMNS is set; else the terminal's width, or 120
    columns when piped (read whole: no need to wrap at a terminal's default 80)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        width: Optional[int] = int(columns)
    else:
        width = None if sys.stdout.isatty() else 120
    return Console(highlight=False, width=width)


# --- commands ---------------------------------------------------------------------------------

# plan's and explain's one configuration
ImageOption = Annotated[Optional[str], typer.Option(help="Image size: 384 or HxW (384x256).", rich_help_panel="Model",
                                                    show_default=IMAGE_DEFAULT)]
PatchOption = Annotated[Optional[int], typer.Option(help="Patch size in pixels.", rich_help_panel="Model",
                                                    show_default=PATCH_DEFAULT)]
HfConfigOption = Annotated[Optional[str], typer.Option(
    "--hf-config", help="A Hugging Face config.json (ViT, DeiT distilled, DINOv2 with or without registers, VideoMAE, "
    "ViTMAE pretraining, Swin): the architecture, run by Hugging Face's code (--impl hf); other model options override "
    "it.", rich_help_panel="Model")]


@app.command()
@shared_options
def plan(
    image: ImageOption = None,
    patch: PatchOption = None,
    hf_config: HfConfigOption = None,
    plot: Annotated[Optional[str], typer.Option(help="Draw the step's memory over time (categories stacked, the peak marked) to this .png, .svg or .pdf file (the 'plot' extra: pip install 'vitcost[plot]').")] = None,
    opts: Any = None,
) -> None:
    """Tokens, parameters, MACs/FLOPs, attention maps and memory of one configuration; fit and step time on a GPU."""
    from vitcost.api import plan as run_plan
    from vitcost.render import render_plan

    _plot_path(plot)
    report = run_plan(image=image, patch=patch, hf_config=hf_config, **plan_kwargs(opts))
    if plot:  # drawn first: a plot that cannot be written leaves no half of the output
        from vitcost.plot import plot_step

        plot_step(report, plot)
    if opts["json_out"]:
        print_json(report.to_dict())
    else:
        render_plan(report, _console())
        if plot:
            _console().print(f"plot: {escape_control(plot)}")


def _plot_path(path: Optional[str]) -> None:
    """A --plot file's suffix is checked before anything is computed."""
    if path is None:
        return
    from vitcost.plot import FORMATS

    if not path.lower().endswith(FORMATS):
        raise typer.BadParameter(f"{shorten(path, quote=True)}: name a .png, .svg or .pdf file", param_hint="--plot")


@app.command()
@shared_options
def explain(
    image: ImageOption = None,
    patch: PatchOption = None,
    hf_config: HfConfigOption = None,
    opts: Any = None,
) -> None:
    """plan's figures derived step by step: each formula with the numbers in (grid, tokens, parameters, MACs, memory)."""
    from vitcost.api import plan as run_plan
    from vitcost.explain import explain as run_explain
    from vitcost.render import render_explain

    report = run_plan(image=image, patch=patch, hf_config=hf_config, **plan_kwargs(opts))
    sections = run_explain(report)
    if opts["json_out"]:
        print_json([{"section": title, "steps": [{"what": st.what, "formula": st.formula, "substituted": st.substituted,
                                                   "value": st.value, "equals": st.equals} for st in steps]}
                    for title, steps in sections])
    else:
        render_explain(report, sections, _console())


def _int_list(text: Optional[str], flag: str) -> list[Optional[int]]:
    if text is None:
        return [None]
    values = []
    for part in text.split(","):
        part = part.strip()
        # ASCII digits only, as plan's own integer options take them (int() also reads '１６')
        if not re.fullmatch(r"-?[0-9]{1,9}", part):
            raise typer.BadParameter(f"{shorten(part, quote=True)} is not a whole number", param_hint=flag)
        values.append(int(part))
    return values


def _name_list(text: Optional[str], flag: str) -> list[Optional[str]]:
    """``--model vit-s,vit-b``: names between commas (an empty one is an error)."""
    if text is None:
        return [None]
    parts = [s.strip() for s in text.split(",")]
    if not all(parts):
        raise typer.BadParameter(f"{shorten(text, quote=True)}: a name between every comma", param_hint=flag)
    return parts


def _precision_list(text: str) -> list[str]:
    parts = [s.strip() for s in text.split(",")]
    known = [p.value for p in Precision]
    bad = [p for p in parts if p not in known]
    if bad:
        raise typer.BadParameter(f"{shorten(bad[0], quote=True)} is not one of {', '.join(known)}",
                                 param_hint="--precision")
    return parts


def _image_list(text: Optional[str], flag: str = "--image") -> Optional[list[str]]:
    """``--image 224,384``: every part a size (an empty one is an error, not the default)."""
    if text is None:
        return None
    parts = [s.strip() for s in text.split(",")]
    if not all(parts):
        raise typer.BadParameter(f"{text!r}: a size like 384 or 384x256 between every comma", param_hint=flag)
    return parts


@app.command()
@shared_options
def compare(
    image: Annotated[Optional[str], typer.Option(help="Image sizes, comma-separated: 224,384,512 (each may be HxW).", rich_help_panel="Model", show_default=IMAGE_DEFAULT)] = None,
    patch: Annotated[Optional[str], typer.Option(help="Patch sizes, comma-separated: 8,14,16,32.", rich_help_panel="Model", show_default=PATCH_DEFAULT)] = None,
    model: Annotated[Optional[str], typer.Option(help="Models, comma-separated: vit-s,vit-b,swin-t (presets or timm-style names).", rich_help_panel="Model", show_default="vit-b")] = None,
    batch: Annotated[str, typer.Option(help="Global batch sizes, comma-separated: 8,32.", rich_help_panel="Workload")] = "8",
    precision: Annotated[str, typer.Option(help="Precisions, comma-separated: fp32,amp-bf16 (fp32, bf16, fp16, amp-bf16, amp-fp16).", rich_help_panel="Workload")] = "amp-bf16",
    gpu: Annotated[Optional[str], typer.Option(help="GPU profiles, comma-separated: rtx4090,a100 (see 'vitcost gpus').", rich_help_panel="Workload")] = None,
    plot: Annotated[Optional[str], typer.Option(help="Draw peak memory and compute (or step time) against the varying size, a line per model, each GPU's usable memory drawn, to this .png, .svg or .pdf file (the 'plot' extra).")] = None,
    opts: Any = None,
) -> None:
    """One table, a row per combination of the lists given (models, GPUs, precisions, batches, images, patches), with ratios to the first row."""
    from vitcost.api import compare as run_compare
    from vitcost.render import render_compare

    _plot_path(plot)
    images = _image_list(image)
    lists = dict(model=_name_list(model, "--model"), gpu=_name_list(gpu, "--gpu"),
                 precision=_precision_list(precision), batch=_int_list(batch, "--batch"))
    reports = run_compare(image=images, patch=_int_list(patch, "--patch"), **lists, **plan_kwargs(opts))
    if plot:  # drawn first: a plot that cannot be written leaves no half of the output
        from vitcost.plot import plot_compare

        plot_compare(reports, plot)
    if opts["json_out"]:
        print_json([r.to_dict() for r in reports])
    else:
        render_compare(reports, _console())
        if plot:
            _console().print(f"plot: {escape_control(plot)}")


@app.command()
@shared_options
def transfer(
    to: Annotated[str, typer.Option(help="Image size(s) to move to, comma-separated: 384 or 224,320,384 (several: multi-scale training, its worst step reported).", rich_help_panel="Model")],
    to_patch: Annotated[Optional[int], typer.Option("--to-patch", help="Patch size at the new resolution.", rich_help_panel="Model", show_default="the same patch")] = None,
    image: Annotated[Optional[str], typer.Option(help="The image size the model was trained at: 224 or HxW.", rich_help_panel="Model", show_default=IMAGE_DEFAULT)] = None,
    patch: Annotated[Optional[int], typer.Option(help="Patch size in pixels.", rich_help_panel="Model", show_default=PATCH_DEFAULT)] = None,
    opts: Any = None,
) -> None:
    """A model trained at one image size, run or fine-tuned at another: its position table, the interpolation (once, or every forward), and what changes."""
    from vitcost.api import transfer as run_transfer
    from vitcost.render import render_transfer

    kw = plan_kwargs(opts)
    result = run_transfer(to=_image_list(to, "--to"), to_patch=to_patch, image=image, patch=patch, **kw)
    if opts["json_out"]:
        print_json(result.to_dict())
    else:
        render_transfer(result, _console())


@app.command()
@shared_options
def tiers(
    model: Annotated[str, typer.Option(help="Models, comma-separated.", rich_help_panel="Model")] = "vit-s,vit-b,vit-l",
    gpu: Annotated[Optional[str], typer.Option(help="GPU profiles, comma-separated (every shipped one when left out).", rich_help_panel="Workload", show_default="every profile")] = None,
    image: Annotated[str, typer.Option(help="The image the smallest patch is searched at.", rich_help_panel="Model")] = "224",
    patch: Annotated[int, typer.Option(help="The patch the largest image is searched at.", rich_help_panel="Model")] = 16,
    opts: Any = None,
) -> None:
    """The hardware tiers, worked out: per GPU and model, the largest image and the smallest patch whose step fits at the batch."""
    from vitcost.api import tiers as run_tiers
    from vitcost.render import render_tiers

    kw = plan_kwargs(opts)
    for name in ("gpus", "nodes", "hf_config"):
        kw.pop(name, None)
    rows = run_tiers([m for m in _name_list(model, "--model")], gpus=_name_list(gpu, "--gpu") if gpu else None,
                     image=image, patch=patch, **kw)
    if opts["json_out"]:
        print_json(rows)
    else:
        render_tiers(rows, _console())


@app.command()
def advise(
    gpu: Annotated[str, typer.Option(help="GPU profile name, alias or YAML file (see 'vitcost gpus').", rich_help_panel="Workload")],
    task: Annotated[Optional[str], typer.Option(help="classification, fine-detail, medical, satellite, detection, face or mobile: the tutorials' starting point and a search space around it.", rich_help_panel="Model")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Every configuration must run this global batch.", rich_help_panel="Workload", show_default="8")] = None,
    min_batch: Annotated[Optional[int], typer.Option("--min-batch", help="Every configuration must fit at least this batch (its largest is shown).", rich_help_panel="Workload")] = None,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", help="At least so many patch tokens (the detail needed).", rich_help_panel="Model")] = None,
    max_patch: Annotated[Optional[int], typer.Option("--max-patch", help="Patches no larger than this.", rich_help_panel="Model")] = None,
    models: Annotated[Optional[str], typer.Option(help="Models to search, comma-separated.", rich_help_panel="Model", show_default="the task's")] = None,
    image: Annotated[Optional[str], typer.Option(help="Image sizes to search, comma-separated.", rich_help_panel="Model", show_default="the task's")] = None,
    patch: Annotated[Optional[str], typer.Option(help="Patch sizes to search, comma-separated.", rich_help_panel="Model", show_default="the task's")] = None,
    mode: Annotated[Mode, typer.Option(help="train or infer.", rich_help_panel="Workload")] = Mode.train,
    max_step_ms: Annotated[Optional[float], typer.Option("--max-step-ms", help="A time budget: steps no slower than this (ms, by the time model).", rich_help_panel="Time")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the front as a list of plan reports, each with an 'advise' key.")] = False,
) -> None:
    """What to run for a task on a GPU: the configurations that fit, cut to their Pareto front over detail, model size and speed, with why each is there."""
    from vitcost.advise import advise as run_advise
    from vitcost.render import render_advice

    if image is not None and not all(re.fullmatch(r"[0-9]{1,5}", p.strip()) for p in image.split(",")):
        raise typer.BadParameter(f"{shorten(image, quote=True)}: square sizes like 224,384", param_hint="--image")
    result = run_advise(task, gpu=gpu, batch=batch, min_batch=min_batch, min_tokens=min_tokens, max_patch=max_patch,
                        models=_name_list(models, "--models") if models else None,
                        images=[int(p) for p in image.split(",")] if image else None,
                        patches=[p for p in _int_list(patch, "--patch")] if patch else None, mode=mode.value,
                        max_step_seconds=None if max_step_ms is None else max_step_ms / 1e3)
    if json_out:
        print_json(result.to_dict())
    else:
        render_advice(result, _console())


@app.command()
def models(
    match: Annotated[Optional[str], typer.Argument(help="List only the names containing this (e.g. swin, dinov2).", show_default="every name")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Every preset and known timm or Hugging Face name: sizes, parameters, GMACs, fp16 weights and batch-1 peaks."""
    from vitcost.api import models as run_models
    from vitcost.render import render_models

    rows = run_models(match)
    if json_out:
        print_json(rows)
    else:
        render_models(rows, _console())


@app.command()
def gpus(json_out: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False) -> None:
    """List the GPU profiles vitcost ships, with aliases and usable memory."""
    from vitcost.api import usable_memory
    from vitcost.profiles import list_profiles, load_profile
    from vitcost.render import render_gpus

    rows = []
    for p in list_profiles():
        usable, source = usable_memory(load_profile(p.name))
        rows.append((p, usable, source))
    if json_out:
        print_json([{**p.model_dump(mode="json"), "name": p.name, "usable_memory_bytes": u,
                     "usable_memory_source": s} for p, u, s in rows])
        return
    render_gpus(rows, _console())


# --- calibrate: prediction against a real torch step ----------------------------------------


class MeasureOn(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def probe(
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE", help="Where the profile goes (.yaml).")] = "probe.yaml",
    json_out: Annotated[bool, typer.Option("--json", help="Print the measured figures as JSON.")] = False,
) -> None:
    """Measure this machine's matmul rates, memory bandwidth and dispatch cost with torch (a few
    seconds) and write them as a profile: plan --gpu FILE prices a CPU step on them."""
    from vitcost.probe import probe as run_probe

    result = run_probe(out)
    if json_out:
        print_json(result)
        return
    f = result["figures"]
    console = _console()
    console.print(f"fp32 matmul: {f['fp32_flops_per_s'] / 1e9:,.1f} GFLOP/s at best, the ViT shapes at "
                  f"{f['fp32_efficiency']:.0%} of it; bf16: {f['bf16_flops_per_s'] / 1e9:,.1f} GFLOP/s "
                  f"({f['bf16_efficiency']:.0%})", markup=False, highlight=False)
    console.print(f"memory bandwidth (copy): {f['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s; fused attention at "
                  f"{f['fp32_attention_efficiency']:.0%} of the fp32 peak, {f['bf16_attention_efficiency']:.0%} of "
                  f"bf16's; one operator's dispatch: {f['op_seconds'] * 1e6:.2f} us", markup=False, highlight=False)
    console.print("pointwise (million elements/s): " + ", ".join(
        f"{k} {v / 1e6:,.0f}" for k, v in sorted(f["pointwise"].items())), markup=False, highlight=False)
    _err.print(f"wrote the profile to {escape_control(out)}: vitcost plan --gpu {escape_control(out)} prices a step "
               "on this machine", markup=False)


@app.command()
@shared_options
def calibrate(
    image: Annotated[Optional[str], typer.Option(help="Image sizes, comma-separated (each may be HxW): every combination is run.", rich_help_panel="Model", show_default=IMAGE_DEFAULT)] = None,
    patch: Annotated[Optional[str], typer.Option(help="Patch sizes, comma-separated: 8,16,32.", rich_help_panel="Model", show_default=PATCH_DEFAULT)] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated: 1,8.", rich_help_panel="Workload")] = "8",
    device: Annotated[MeasureOn, typer.Option(help="Where the step runs (and whose rules predict it): auto = CUDA when torch sees a GPU.", rich_help_panel="Calibrate")] = MeasureOn.auto,
    steps: Annotated[Optional[int], typer.Option(min=0, help="Warm-up steps before the measured one.", rich_help_panel="Calibrate", show_default="1 on the CPU, 2 on CUDA")] = None,
    tolerance: Annotated[float, typer.Option(min=0, help="Largest error allowed on any figure, in percent; exit 1 beyond it.", rich_help_panel="Calibrate")] = 2.0,
    meta: Annotated[bool, typer.Option("--meta", help="Trace on fake tensors instead of running: no memory, any size; traced, not measured.", rich_help_panel="Calibrate")] = False,
    model_factory: Annotated[Optional[str], typer.Option("--model-factory", metavar="MODULE:CALLABLE", help="Build your model instead of the reference ViT (timm:create_model, mypkg.models:make_vit).", rich_help_panel="Calibrate")] = None,
    factory_kwargs: Annotated[Optional[str], typer.Option("--factory-kwargs", metavar="JSON", help="Keyword arguments for the factory, a JSON object: '{\"model_name\": \"vit_base_patch16_224\"}'.", rich_help_panel="Calibrate")] = None,
    out: Annotated[Optional[str], typer.Option("--out", metavar="FILE", help="Also write every row as JSON to FILE.", rich_help_panel="Calibrate")] = None,
    save: Annotated[bool, typer.Option("--save", help="Keep what the GPU told (CUDA context, reserved/allocated) for --gpu PROFILE: plan and compare then use it.", rich_help_panel="Calibrate")] = False,
    nproc: Annotated[int, typer.Option(help="Processes: N > 1 runs the step under torch.distributed on the CPU (gloo), one rank each, with --strategy; every rank's peak against its prediction.", rich_help_panel="Calibrate")] = 1,
    opts: Any = None,
) -> None:
    """Run the configuration in torch and set every predicted figure beside the measured one."""
    from vitcost.calibrate import NOT_RUN
    from vitcost.calibrate import calibrate as run_calibrate

    if save and not opts.get("gpu"):
        raise typer.BadParameter("keys the calibration by GPU profile: add --gpu PROFILE (see 'vitcost gpus')",
                                 param_hint="--save")
    images = _image_list(image)
    kw = plan_kwargs(opts)
    with _calibrate_progress() as bar:
        task = bar.add_task("calibrating", total=None)

        def progress(done: int, total: int, doing: str) -> None:
            bar.update(task, completed=done, total=total, description=doing)

        run = run_calibrate(image=images, patch=_int_list(patch, "--patch"), batch=_int_list(batch, "--batch"),
                            device=device.value, steps=steps, meta=meta, model_factory=model_factory,
                            factory_kwargs=factory_kwargs, tolerance=tolerance / 100, save=save, nproc=nproc,
                            progress=progress, **kw)
    data = run.to_dict() if (opts["json_out"] or out) else None
    if opts["json_out"]:
        print_json(data)
    else:
        _render_calibration(run, _console())
    if out:
        _write(out, "--out", json.dumps(data, indent=2) + "\n")
        _err.print(f"wrote {len(run.results)} row(s) to {escape_control(out)}", markup=False)
    if run.saved_to:
        _err.print(f"saved the GPU calibration for {escape_control(opts['gpu'])} to {escape_control(run.saved_to)}: "
                   "plan and compare now use it (marked calibrated)", markup=False)
    if not run.ok:
        bad = sum(len(r.failures) for r in run.results)
        cal, fig = run.worst
        _fail(f"{bad} figure(s) off by more than {tolerance:g}%: worst {fig.name} {_pct(fig.error)} "
              f"({cal.label})", 1)
    # the RAM guard held a step back: its memory figures were never held against torch's
    skipped = [r for r in run.results if r.status == NOT_RUN]
    if skipped:
        first = skipped[0]
        _fail(f"{len(skipped)} of {len(run.results)} configuration(s) not measured: {first.label}: "
              f"{first.message.removeprefix('not run: ')}", 1)


def _calibrate_progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _pct(error: Optional[float]) -> str:
    return "n/a (measured 0)" if error is None else f"{100 * error:+.2f}%"


def _render_calibration(run: Any, console: Console) -> None:
    from rich.text import Text

    from vitcost.render import fmt_bytes, header

    first = run.results[0]
    console.print(header(first.report))
    if first.method == "traced":
        console.print(Text("TRACED, not measured: the step ran on fake CPU tensors (FakeTensorMode + MemTracker); "
                           "nothing was allocated or computed. Prediction under the CPU rules.", style="bold yellow"))
    elif first.device == "cuda":
        console.print(Text("measured on CUDA: caching allocator counters after warm-up; MACs by FlopCounterMode "
                           "(meta device)", style="dim"))
    else:
        console.print(Text("measured on the CPU: PyTorch's MemTracker over one steady-state step after warm-up "
                           "(the CPU allocator does not round: exact); MACs by FlopCounterMode (meta device)",
                           style="dim"))
    if first.model_source != "reference":
        console.print(Text(f"model from {escape_control(first.model_source.removeprefix('factory '))}: how far the "
                           "analytic figures (reference ViT) are from this implementation", style="bold"))
    tol = f"±{100 * run.tolerance:g}%"
    if len(run.results) == 1:
        _calibration_table(first, console, tol, fmt_bytes)
    else:
        _calibration_summary(run, console, tol, fmt_bytes)
    for r in run.results:
        if r.time:
            t = r.time
            console.print(Text(f"step time{'' if len(run.results) == 1 else ' (' + escape_control(r.label) + ')'}: "
                               f"predicted {t['predicted_seconds'] * 1e3:,.1f} ms, measured min "
                               f"{t['min_seconds'] * 1e3:,.1f} / median {t['median_seconds'] * 1e3:,.1f} ms over "
                               f"{len(t['measured_seconds'])} steps ({_pct(t['error_vs_min'])} / "
                               f"{_pct(t['error_vs_median'])})", style="bold"))
    for note in dict.fromkeys(w for r in run.results for w in r.warnings):
        console.print(Text(f"note: {escape_control(note)}", style="yellow"))
    worst = run.worst
    summary = f"{len(run.results)} configuration(s) in {run.seconds:.1f} s"
    unrun = [r for r in run.results if r.status not in ("ok", "off")]
    if unrun:
        summary += f"; {len(unrun)} without a {'trace' if first.method == 'traced' else 'measurement'} of memory"
    if worst and worst[1].error == 0:
        summary += "; every figure torch gave matches the prediction exactly"
    elif worst:
        summary += f"; worst: {worst[1].name} {_pct(worst[1].error)} ({escape_control(worst[0].label)})"
    console.print(Text(summary, style="bold green" if run.ok else "bold red"))


def _value(n: Optional[int], unit: str, fmt_bytes: Callable[[int], str], sep: str = " ") -> str:
    if n is None:
        return "-"
    if unit == "bytes":
        return f"{n:,}{sep}({fmt_bytes(n)})"
    return f"{n:,}"


def _status(cal: Any) -> Any:
    from rich.text import Text

    if cal.status == "ok":
        return Text("ok", style="green")
    if cal.status == "off":
        return Text("OFF", style="bold red")
    return Text(cal.status, style="yellow")  # out of memory, not run: the message follows the table


def _narrow(console: Console, table: Table) -> bool:
    """Whether ``table`` is wider than the console (and so would be wrapped or cut)."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width


def _calibration_table(cal: Any, console: Console, tol: str, fmt_bytes: Callable[[int], str]) -> None:
    from rich.text import Text

    what = "traced" if cal.method == "traced" else "measured"

    def build(sep: str) -> Table:
        table = Table(title=Text(f"Predicted against {what} ({escape_control(cal.label)}, {cal.device})"),
                      title_justify="left")
        table.add_column("figure", overflow="fold")
        for col in ("predicted", what, "difference"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("error", justify="right", overflow="fold")
        table.add_column(tol, justify="center", no_wrap=True)
        for f in cal.figures:
            diff = f.difference
            table.add_row(
                f.name, _value(f.predicted, f.unit, fmt_bytes, sep), _value(f.measured, f.unit, fmt_bytes, sep),
                "-" if diff is None else f"{diff:+,}",
                "-" if f.measured is None else _pct(f.error),
                "-" if f.measured is None else ("[green]ok[/]" if f.within(cal.tolerance) else "[bold red]OFF[/]"),
            )
        if cal.status in ("ok", "off"):
            table.caption = ("bytes at the peak by MemTracker category; 'end of forward' is what is live before "
                             "backward" if cal.device == "cpu"
                             else "CUDA: tensors rounded to 512-byte blocks, as the allocator does")
        return table

    # a byte figure and its size in MiB on one line; on two where one line would not fit
    table = build(" ")
    if _narrow(console, table):
        table = build("\n")
    console.print(table)
    if cal.status not in ("ok", "off"):
        console.print(Text(escape_control(cal.message), style="bold yellow"))
    if cal.cuda:
        c = cal.cuda
        console.print(Text(f"{escape_control(c['device_name'])}: reserved peak "
                           f"{fmt_bytes(c['max_memory_reserved_bytes'])} "
                           f"({c['reserved_over_allocated']:.3f}x allocated); outside the allocator (CUDA context, "
                           f"workspaces, other processes) {fmt_bytes(c['non_allocator_bytes'])} of "
                           f"{fmt_bytes(c['total_bytes'])}"))


def _calibration_summary(run: Any, console: Console, tol: str, fmt_bytes: Callable[[int], str]) -> None:
    from rich import box
    from rich.text import Text

    first = run.results[0]
    what = "traced" if first.method == "traced" else "measured"
    # dense, as compare's table: the figures keep their width at 80 columns, the text wraps
    table = Table(title=f"Predicted against {what}, every combination ({first.device}; tolerance {tol})",
                  title_justify="left", box=box.MINIMAL_HEAVY_HEAD, show_edge=False, collapse_padding=True)
    for col in ("image", "patch", "batch", "tokens", "predicted\npeak", f"{what}\npeak"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("peak\nerror", justify="right", overflow="fold")
    table.add_column("worst figure", overflow="fold")
    table.add_column("status", overflow="fold")
    for r in run.results:
        s = r.report.spec
        peak = next((f for f in r.figures if f.key == "peak_bytes"), None)
        worst = r.worst
        table.add_row(
            str(s.image_h) if s.image_h == s.image_w else f"{s.image_h}x{s.image_w}", str(s.patch),
            str(r.report.workload.batch), f"{s.tokens:,}",
            fmt_bytes(r.report.memory.peak), fmt_bytes(peak.measured) if peak and peak.measured is not None else "-",
            _pct(peak.error) if peak and peak.measured is not None else "-",
            "-" if not worst else ("all exact" if worst.error == 0 else f"{worst.name} {_pct(worst.error)}"),
            _status(r),
        )
    console.print(table)
    for r in run.results:
        if r.status not in ("ok", "off"):
            console.print(Text(f"{escape_control(r.label)}: {escape_control(r.message)}", style="yellow"))


# --- CI budgets: export and check -------------------------------------------------------------

BudgetArg = Annotated[str, typer.Argument(metavar="BUDGETS", help="Budget file (YAML or JSON; see docs/ci.md).", show_default=False)]


@app.command()
def export(
    budget_file: BudgetArg,
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="FILE", help="Write the JSON here instead of stdout.")] = None,
) -> None:
    """Evaluate every entry of a budget file and write the figures: a baseline for 'check --baseline'."""
    from vitcost.budgets import export as run_export

    data = run_export(budget_file)
    if out is None:
        print_json(data)
        return
    _write(out, "--out", json.dumps(data, indent=2) + "\n")
    _err.print(f"wrote {len(data['entries'])} entries to {escape_control(out)}", markup=False)


def _regression(text: Optional[str]) -> Optional[float]:
    from vitcost.budgets import parse_fraction

    if text is None:
        return None
    try:
        return parse_fraction(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def check(
    budget_file: BudgetArg,
    baseline: Annotated[Optional[str], typer.Option(metavar="FILE", help="A committed 'vitcost export' JSON: also fail when a figure grew past --max-regression.")] = None,
    max_regression: Annotated[Optional[str], typer.Option(metavar="PCT", callback=_regression, help="Allowed growth against --baseline: 5% or 0.05 (default 0: any growth fails).")] = None,
    measured: Annotated[Optional[str], typer.Option(metavar="FILE", help="Measured peaks ('vitcost calibrate --out' JSON), held to the same memory limits.")] = None,
    junit: Annotated[Optional[str], typer.Option(metavar="FILE", help="Also write a JUnit XML report here: a test case per entry.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Exit 1 when an entry of a budget file breaks a limit (or regresses); 2 when the file is malformed."""
    from vitcost.budgets import check as run_check
    from vitcost.budgets import junit_xml

    if max_regression is not None and baseline is None:
        raise typer.BadParameter("needs --baseline", param_hint="--max-regression")
    result = run_check(budget_file, baseline=baseline, max_regression=max_regression or 0.0, measured=measured)
    if junit:  # before any output: an unwritable report is one line on stderr, exit 2
        _write(junit, "--junit", junit_xml(result))
    if json_out:
        print_json(result.to_dict())
    else:
        _render_check(result, _console())
    if not result.passed:
        raise typer.Exit(1)


def _render_check(result: Any, console: Console) -> None:
    from rich.text import Text

    from vitcost.render import fmt_bytes, plain

    measured = result.measured is not None
    table = Table(title=plain(f"Budgets: {result.budget_file}"), title_justify="left")
    table.add_column("entry", overflow="fold")
    for col in ("peak", "limit", *(["measured"] if measured else []), "fits", "GMACs", "max\nbatch", "status"):
        table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    for e in result.entries:
        r = e.evaluated.report
        table.add_row(
            plain(e.name), fmt_bytes(r["memory_bytes"]["peak"]), fmt_bytes(e.peak_limit_bytes),
            *([fmt_bytes(e.measured_peak_bytes)] if measured else []),
            "-" if r["fits"] is None else ("yes" if r["fits"] else "NO"),
            f"{r['macs']['forward_per_image'] / 1e9:.2f}",
            "-" if r["max_batch_size"] is None else str(r["max_batch_size"]),
            Text("pass", style="green") if e.passed else Text("FAIL", style="bold red"),
        )
    console.print(table)
    if result.violations:
        vt = Table(title="Violations", title_justify="left")
        vt.add_column("entry", overflow="fold")
        vt.add_column("figure", overflow="fold")
        for col in ("actual", "limit", "by"):
            vt.add_column(col, justify="right", no_wrap=True)
        for v in result.violations:
            vt.add_row(plain(v.entry), plain(v.figure),
                       *(_figure_text(x, v.unit, fmt_bytes) for x in (v.actual, v.limit, v.excess)))
        console.print(vt)
        for v in result.violations:
            console.print(plain(f"{v.entry}: {v.message}"))
    for note in result.notes:
        console.print(plain(f"note: {note}", style="dim"))
    failed = sum(not e.passed for e in result.entries)
    if failed:
        console.print(f"FAILED: {len(result.violations)} violation(s) in {failed} of {len(result.entries)} entries",
                      style="bold red", markup=False)
    else:
        n = len(result.entries)
        console.print(f"passed: {n} {'entry' if n == 1 else 'entries'} within their limits", style="green", markup=False)


def _figure_text(value: Optional[float], unit: str, fmt_bytes: Callable[[int], str]) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return fmt_bytes(round(value))
    if unit == "MACs":
        return f"{value / 1e9:.2f} GMACs"
    if unit == "images":
        return f"{value:g}"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.2f} {unit}"

def main() -> None:  # pragma: no cover - the console script
    app(prog_name="vitcost")
