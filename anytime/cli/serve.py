"""`anytime serve`: budgeted batch prediction with real early exit (torch-free: only the runtime)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from anytime.errors import ConfigError
from anytime.runtime.bundle import SAMPLE_IMAGES_DIR as SAMPLES_DIR


def _load_model(bundle: str | None, device: str, providers: str | None, threads: int | None, verify: bool = False):
    from anytime.runtime.model import load

    return load(bundle, providers=providers, device=device, threads=threads, verify=verify)


def _policy_option(value: str) -> tuple[str, str | None]:
    """--policy is a method name or a policy JSON file written by `anytime calibrate -o`."""
    if value in ("best", "geometric", "search"):
        return value, None
    if Path(value).is_file():
        return "best", value
    raise click.BadParameter(f"{value!r} is neither best, geometric, search nor an existing policy file", param_hint="--policy")


def _device_options(f):
    f = click.option("--threads", type=click.IntRange(min=0), default=None, help="onnxruntime intra-op threads (default: its own choice).")(f)
    f = click.option("--providers", default=None, help="Explicit onnxruntime providers, comma-separated (overrides --device).")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.")(f)
    return f


@click.command("serve")
@click.argument("args", nargs=-1, metavar="[BUNDLE] [INPUTS...]")
@click.option("--budget", "-b", default=None, help="Average cost per image: 120M, 1.5G, 3e8, or 40% of the full network.")
@click.option("--exit", "exit_", type=int, default=None, help="Answer every input at this exit (1-based) instead of a budget.")
@click.option("--strict", is_flag=True, help="Hard cap: no batch's total cost exceeds images × budget.")
@click.option("--policy", "policy_opt", default="best", show_default=True,
              help="Exit policy: best (higher validation accuracy), geometric (MSDNet), search, or a policy JSON file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write one row per input: .jsonl or .csv.")
@_device_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no per-image lines; only the summary.")
@click.pass_context
def serve(ctx: click.Context, args: tuple[str, ...], budget: str | None, exit_: int | None, strict: bool, policy_opt: str,
          batch_size: int, output: str | None, device: str, providers: str | None, threads: int | None, quiet: bool) -> None:
    """Budgeted batch prediction with real early exit.

    BUNDLE is optional: the first argument is a bundle when it is a directory with a manifest.json,
    otherwise the embedded default model answers. INPUTS are image files, directories (recursive),
    globs, or `-` for a list of paths on standard input. Without inputs (and without a bundle) the
    embedded sample images are used. Inputs in class-named folders also get an accuracy.

    Exit status: 0 all inputs answered, 1 some input failed (it has an error row), 2 usage error.
    """
    from tqdm import tqdm

    from anytime.runtime.bundle import is_bundle_dir
    from anytime.runtime.inputs import expand_paths
    from anytime.runtime.results import RowWriter, RunningTotals, output_format

    method, policy_file = _policy_option(policy_opt)
    bundle: str | None = None
    inputs = list(args)
    if inputs and is_bundle_dir(inputs[0]):
        bundle, inputs = inputs[0], inputs[1:]
    if not inputs:
        if bundle is not None:
            raise click.UsageError("give the images to classify after the bundle (files, directories, globs or - for stdin)")
        if not SAMPLES_DIR.is_dir():
            raise ConfigError(f"no inputs given and the embedded sample images are not installed ({SAMPLES_DIR}); pass images to classify")
        inputs = [str(SAMPLES_DIR)]
    if budget is None and exit_ is None and policy_file is None:
        raise click.UsageError("give a compute budget (--budget 50%, --budget 120M) or a fixed exit (--exit 3)")
    if budget is not None and exit_ is not None:
        raise click.UsageError("give either --budget or --exit, not both")
    fmt = output_format(output) if output else None

    model = _load_model(bundle, device, providers, threads)
    policy = model.resolve_policy(budget=budget, policy=policy_file, exit=exit_, method=method)
    if strict and policy.budget is None:
        raise click.UsageError("--strict caps a budget; it has no meaning with --exit")
    if not quiet:
        click.echo(f"{model.bundle.arch} on {', '.join(model.providers)}; {policy.describe()}", err=True)

    totals = RunningTotals(model.num_exits, model.cost_convention, policy.budget)
    out_fh = open(output, "w", encoding="utf-8", newline="") if output else None
    writer = RowWriter(out_fh, fmt) if out_fh else None
    stream = model.predict_batches(expand_paths(inputs, stdin=sys.stdin), policy=policy, batch_size=batch_size,
                                   strict=strict, on_error="record")
    bar = tqdm(unit="img", file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for part in stream:
            totals.add(part)
            bar.update(len(part))
            if writer is not None:
                writer.write(part.to_rows())
            elif not quiet:
                for p in part:
                    if p.error is not None:
                        bar.write(f"{p.path}\tERROR\t{p.error}", file=sys.stdout)
                    else:
                        bar.write(f"{p.path}\t{p.class_name}\t{p.confidence:.4f}\texit {p.exit}", file=sys.stdout)
    finally:
        bar.close()
        if out_fh is not None:
            out_fh.close()
    totals.seconds = time.perf_counter() - t0
    if totals.images + totals.failed == 0:
        raise ConfigError(f"no image files found in {' '.join(inputs)}")
    click.echo(totals.summary())
    if output:
        click.echo(f"rows written to {output}")
    if totals.failed:
        click.echo(f"{totals.failed} input(s) failed; see the error rows" + (f" in {output}" if output else " above"), err=True)
        ctx.exit(1)
