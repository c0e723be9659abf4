"""What the verbs share: options whose defaults live in the Python API, and `-o/--output`.

Every option that has an API counterpart defaults to None on the command line, and the command passes
on only the options that were given (`given`). The default therefore lives in exactly one place, the API
function or configuration dataclass, and `train --resume` can tell "not given" from "given the default".
`--help` still shows that default: `ApiOption` reads it from the API when help is drawn, not when the
verb module is imported, because reading it imports the API's module (torch, for train and export).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import click

MISSING = object()

# Where each verb's defaults live ("module:qualified.name").
TRAIN_CONFIG = "anytime.training.config:TrainConfig"
EXPORT_BUNDLE = "anytime.export.bundle:export_bundle"
LOAD = "anytime.runtime.model:load"
PROFILE = "anytime.runtime.model:AnytimeModel.profile"
PREDICT = "anytime.runtime.model:AnytimeModel.predict_batches"
CALIBRATE = "anytime.runtime.model:AnytimeModel.calibrate"
EVALUATE = "anytime.runtime.evaluation:evaluate"
SAVE_REPORT = "anytime.runtime.reports:save_report"


def resolve(spec: str) -> Any:
    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def api_default(spec: str, name: str | None) -> Any:
    """The default of parameter or field `name` of the API object `spec`; the object itself when
    `name` is None (a module constant); MISSING when it has none."""
    obj = resolve(spec)
    if name is None:
        return obj
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
                return MISSING
        raise LookupError(f"{spec} has no field {name!r}")
    parameters = inspect.signature(obj).parameters
    if name not in parameters:
        raise LookupError(f"{spec} has no parameter {name!r}")
    default = parameters[name].default
    return MISSING if default is inspect.Parameter.empty else default


def format_default(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class ApiOption(click.Option):
    """An option mapped onto an API parameter: click default None, `--help` shows the API's default.

    `api`: the API object ("module:qualname"); `api_name`: its parameter or field (the option's own
    name when omitted; None with `constant=True` when `api` names the default value itself).
    `help_suffix`: text computed when help is drawn (e.g. the registered method names).
    """

    def __init__(
        self,
        param_decls: Sequence[str] | None = None,
        *,
        api: str | None = None,
        api_name: str | None = None,
        constant: bool = False,
        help_suffix: Callable[[], str] | None = None,
        **attrs: Any,
    ) -> None:
        attrs.setdefault("default", None)
        super().__init__(param_decls, **attrs)
        self.api = api
        self.api_name = None if constant else (api_name or self.name)
        self.help_suffix = help_suffix

    def api_default(self) -> Any:
        if self.api is None:
            return MISSING
        return api_default(self.api, self.api_name)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        opts, text = record
        extra = []
        try:
            if self.help_suffix is not None:
                extra.append(self.help_suffix())
            default = self.api_default()
        except ImportError:
            # A runtime-only installation still gets help, without the training side's defaults.
            default = MISSING
        if (
            default is not MISSING
            and default is not None
            and not (self.is_flag and not self.secondary_opts and default is False)
        ):
            if self.is_flag and self.secondary_opts:
                shown = (self.opts if default else self.secondary_opts)[0].lstrip("-")
            else:
                shown = format_default(default)
            extra.append(f"[default: {shown}]")
        return opts, "  ".join([t for t in (text, " ".join(extra)) if t])


def api_option(*decls: str, **attrs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*decls, cls=ApiOption, **attrs)


def given(**values: Any) -> dict[str, Any]:
    """Only the options that were given, so that the API's defaults apply to the others."""
    return {k: v for k, v in values.items() if v is not None and v != ()}


def output_option(
    help: str, *, type: click.ParamType | None = None, metavar: str = "PATH", deprecated_out: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`-o/--output`, the same name in every verb that writes something.

    `deprecated_out`: also accept the old `--out` (train and export had it), hidden from `--help`, so
    that existing scripts keep working; it prints a one-line deprecation note.
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        target = f
        if deprecated_out:

            @functools.wraps(f)
            def target(*args: Any, **kwargs: Any) -> Any:
                old = kwargs.pop("deprecated_out")
                if old is not None:
                    if kwargs.get("output") is not None:
                        raise click.UsageError("give -o/--output once (--out is its old name)")
                    click.echo("Warning: --out is deprecated; use -o/--output.", err=True)
                    kwargs["output"] = old
                return f(*args, **kwargs)

            target = click.option("--out", "deprecated_out", type=type, default=None, hidden=True)(target)
        return click.option("-o", "--output", "output", type=type, metavar=metavar, default=None, help=help)(target)

    return decorate


def runtime_device_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--device, --providers, --threads, --thread-pool: where `anytime.load` runs the bundle (serve, calibrate,
    eval, profile)."""
    # Not an api_option: the command line's own default. A shared pool is process-wide (onnxruntime then
    # refuses per-session pools), so `anytime.load` does not make one unasked; a verb's process is its own.
    f = click.option(
        "--thread-pool",
        type=click.Choice(["shared", "session"]),
        default="shared",
        show_default=True,
        envvar="ANYTIME_THREAD_POOL",
        help="shared: one onnxruntime intra-op pool of --threads for every stage, whose workers spin (much faster "
        "on the small batches early exit leaves, at 2 threads and more); session: a pool per stage session "
        "(the Python API's default). Env: ANYTIME_THREAD_POOL.",
    )(f)
    f = api_option(
        "--threads",
        type=click.IntRange(min=0),
        api=LOAD,
        help="onnxruntime intra-op threads (default: its own choice).",
    )(f)
    f = api_option(
        "--providers", api=LOAD, help="Explicit onnxruntime providers, comma-separated (overrides --device)."
    )(f)
    f = api_option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        api=LOAD,
        help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.",
    )(f)
    return f


def profile_options(f: Callable[..., Any] | None = None, *, per_model: bool = False) -> Any:
    """--profile, --cost-mode: budgets in time from a latency profile (serve, calibrate, eval).

    `per_model` (eval, which takes several models): --profile is repeatable, one per model in order.
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = api_option(
            "--cost-mode",
            type=click.Choice(["auto", "full-batches", "per-batch"]),
            api=LOAD,
            help="With --profile, how calibrate and eval count a policy's time: every stage on full batches (the "
            "refilling scheduler, with its own work) or each batch compacted stage by stage (--strict always fits "
            "this way); auto (default): as serve runs by default, full batches on a GPU, per batch on CPU.",
        )(f)
        f = api_option(
            "--profile",
            type=click.Path(dir_okay=False),
            api=LOAD,
            metavar="FILE",
            multiple=per_model,
            help="Latency profile (written by `anytime profile`): budgets become time per image (0.3ms, 300us; "
            "40% of the full network's measured time)."
            + (" Repeat it to give one per model, in the order of MODELS." if per_model else ""),
        )(f)
        return f

    return decorate(f) if f is not None else decorate


def load_bundle(bundle: str | None, **options: Any) -> Any:
    """`anytime.load` with only the runtime options that were given (serve, calibrate)."""
    from anytime.runtime.model import load

    return load(bundle, **given(**options))
