"""The vitcost command line: parse, call the core, render or print JSON.

This is the only module that knows about exit codes, stdout and stderr. Domain errors
(:class:`vitcost.errors.VitcostError`) and usage errors become one line on stderr: exit 1
for a configuration that cannot be, exit 2 for a malformed command line.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from vitcost.errors import BudgetFileError, VitcostError
from vitcost.specs import AttentionKernel, Checkpointing, Device, Mode, Optimizer, Pooling, PosEmbed, Precision

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    _err.print(f"Error: {message}", markup=False)
    sys.exit(code)


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
                _fail(" ".join(exc.format_message().split()), exc.exit_code)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Will this Vision Transformer configuration fit, and what will it cost, on this GPU?",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# --- options shared by plan and compare (and the commands built on them) ---------------------

SHARED: list[tuple[str, Any, Any]] = [
    ("model", Annotated[Optional[str], typer.Option(help="Preset (vit-ti ... vit-G) or timm-style name (vit_base_patch16_384).", rich_help_panel="Model")], None),
    ("batch", Annotated[int, typer.Option(help="Global batch size (split over the GPUs of a multi-GPU profile).", rich_help_panel="Workload")], 8),
    ("mode", Annotated[Mode, typer.Option(help="train: a full optimizer step; infer: a no_grad forward.", rich_help_panel="Workload")], Mode.train),
    ("precision", Annotated[Precision, typer.Option(help="fp32/bf16/fp16: everything in that dtype; amp-*: fp32 weights, autocast matmuls.", rich_help_panel="Workload")], Precision.amp_bf16),
    ("attention", Annotated[AttentionKernel, typer.Option(help="eager keeps the N x N maps for backward; sdpa is fused.", rich_help_panel="Workload")], AttentionKernel.sdpa),
    ("optimizer", Annotated[Optimizer, typer.Option(help="adamw/adam: two states; sgd-momentum: one; sgd: none.", rich_help_panel="Workload")], Optimizer.adamw),
    ("keep_grads", Annotated[bool, typer.Option("--keep-grads", help="zero_grad(set_to_none=False): gradients stay allocated between steps.", rich_help_panel="Workload")], False),
    ("checkpointing", Annotated[Checkpointing, typer.Option(help="Activation checkpointing per block.", rich_help_panel="Workload")], Checkpointing.none),
    ("gpu", Annotated[Optional[str], typer.Option(help="GPU profile name, alias or path to a YAML profile (see 'vitcost gpus').", rich_help_panel="Workload")], None),
    ("device", Annotated[Device, typer.Option(help="Replay rules: cuda (autocast's CUDA policy, 512-byte blocks) or cpu.", rich_help_panel="Workload")], Device.cuda),
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
]


def shared_options(func: Callable) -> Callable:
    """Add the shared options to a command's signature; the command gets them as ``opts``."""
    own = inspect.signature(func)
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
    for key in ("mode", "precision", "attention", "optimizer", "checkpointing", "device", "pos_embed", "pooling"):
        if kw.get(key) is not None:
            kw[key] = kw[key].value
    return kw


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _console() -> Console:
    # piped output is read whole: don't wrap tables at a terminal's default 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 120)


# --- commands ---------------------------------------------------------------------------------


@app.command()
@shared_options
def plan(
    image: Annotated[Optional[str], typer.Option(help="Image size: 384 or HxW (384x256).", rich_help_panel="Model")] = None,
    patch: Annotated[Optional[int], typer.Option(help="Patch size in pixels.", rich_help_panel="Model")] = None,
    opts: Any = None,
) -> None:
    """Tokens, parameters, MACs/FLOPs, attention maps and memory of one configuration; fit on a GPU."""
    from vitcost.api import plan as run_plan
    from vitcost.render import render_plan

    report = run_plan(image=image, patch=patch, **plan_kwargs(opts))
    if opts["json_out"]:
        print_json(report.to_dict())
    else:
        render_plan(report, _console())


def _int_list(text: Optional[str], flag: str) -> list[Optional[int]]:
    if text is None:
        return [None]
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a whole number", param_hint=flag) from None
    return values


@app.command()
@shared_options
def compare(
    image: Annotated[Optional[str], typer.Option(help="Image sizes, comma-separated: 224,384,512 (each may be HxW).", rich_help_panel="Model")] = None,
    patch: Annotated[Optional[str], typer.Option(help="Patch sizes, comma-separated: 8,14,16,32.", rich_help_panel="Model")] = None,
    opts: Any = None,
) -> None:
    """One table, a row per (image, patch) combination, with ratios to the first row."""
    from vitcost.api import compare as run_compare
    from vitcost.render import render_compare

    images = [s.strip() for s in image.split(",")] if image else None
    reports = run_compare(image=images, patch=_int_list(patch, "--patch"), **plan_kwargs(opts))
    if opts["json_out"]:
        print_json([r.to_dict() for r in reports])
    else:
        render_compare(reports, _console())


@app.command()
def gpus(json_out: Annotated[bool, typer.Option("--json", help="Print the profiles as JSON.")] = False) -> None:
    """List the GPU profiles vitcost ships, with aliases and usable memory."""
    from vitcost.api import usable_memory
    from vitcost.profiles import list_profiles, load_profile
    from vitcost.render import fmt_bytes

    rows = []
    for p in list_profiles():
        usable, source = usable_memory(load_profile(p.name))
        rows.append((p, usable, source))
    if json_out:
        print_json([{**p.model_dump(mode="json"), "name": p.name, "usable_memory_bytes": u,
                     "usable_memory_source": s} for p, u, s in rows])
        return
    table = Table(title="GPU profiles (figures per GPU; dense peaks, FP32 accumulate)", title_justify="left")
    for col in ("name", "aliases", "GPU", "memory", "usable", "GB/s", "bf16 TFLOP/s", "fp32 TFLOP/s", "link GB/s/dir"):
        table.add_column(col)
    for p, usable, source in rows:
        table.add_row(
            p.name, ", ".join(p.aliases), p.display_name,
            fmt_bytes(p.memory_bytes), fmt_bytes(usable) + (" (calibrated)" if source != "profile" else ""),
            f"{p.memory_bandwidth_gb_per_s:g}", f"{p.dense_tflops.bf16:g}", f"{p.dense_tflops.fp32:g}",
            f"{p.interconnect.gb_per_s_per_direction:g}",
        )
    _console().print(table)


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
    try:
        with open(out, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        _fail(f"--out {out}: cannot be written ({exc.strerror})", 1)
    _err.print(f"wrote {len(data['entries'])} entries to {out}", markup=False)


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
    if junit:
        try:
            with open(junit, "w") as fh:
                fh.write(junit_xml(result))
        except OSError as exc:
            _fail(f"--junit {junit}: cannot be written ({exc.strerror})", 1)
    if json_out:
        print_json(result.to_dict())
    else:
        _render_check(result, _console())
    if not result.passed:
        raise typer.Exit(1)


def _render_check(result: Any, console: Console) -> None:
    from vitcost.render import fmt_bytes

    measured = result.measured is not None
    table = Table(title=f"Budgets: {result.budget_file}", title_justify="left")
    table.add_column("entry", overflow="fold")
    for col in ("peak", "limit", *(["measured"] if measured else []), "fits", "GMACs", "max\nbatch"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("status")
    for e in result.entries:
        r = e.evaluated.report
        table.add_row(
            e.name, fmt_bytes(r["memory_bytes"]["peak"]), fmt_bytes(e.peak_limit_bytes),
            *([fmt_bytes(e.measured_peak_bytes)] if measured else []),
            "-" if r["fits"] is None else ("yes" if r["fits"] else "NO"),
            f"{r['macs']['forward_per_image'] / 1e9:.2f}",
            "-" if r["max_batch_size"] is None else str(r["max_batch_size"]),
            "[green]pass[/]" if e.passed else "[bold red]FAIL[/]",
        )
    console.print(table)
    if result.violations:
        vt = Table(title="Violations", title_justify="left")
        vt.add_column("entry", overflow="fold")
        vt.add_column("figure", overflow="fold")
        for col in ("actual", "limit", "by"):
            vt.add_column(col, justify="right", no_wrap=True)
        for v in result.violations:
            vt.add_row(v.entry, v.figure, *(_figure_text(x, v.unit, fmt_bytes) for x in (v.actual, v.limit, v.excess)))
        console.print(vt)
        for v in result.violations:
            console.print(f"{v.entry}: {v.message}", markup=False, highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="dim", markup=False)
    failed = sum(not e.passed for e in result.entries)
    if failed:
        console.print(f"FAILED: {len(result.violations)} violation(s) in {failed} of {len(result.entries)} entries",
                      style="bold red", markup=False)
    else:
        n = len(result.entries)
        console.print(f"passed: {n} {'entry' if n == 1 else 'entries'} within their limits", style="green", markup=False)


def _figure_text(value: float, unit: str, fmt_bytes: Callable[[int], str]) -> str:
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
