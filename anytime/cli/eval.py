"""`anytime eval`: the anytime table and budget curves of bundles (or run directories) on a labelled split.

The runtime evaluates bundles only; a run directory is exported here, explicitly, into a temporary
bundle, because exporting needs torch and the runtime must not.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from anytime.cli._options import (
    EVALUATE,
    SAVE_REPORT,
    api_option,
    given,
    output_option,
    profile_options,
    runtime_device_options,
)


def _export_run(run_dir: Path, bundle_dir: Path, quiet: bool) -> Path:
    from anytime.export import export_bundle

    if not quiet:
        click.echo(
            f"exporting run {run_dir} to a temporary bundle (keep one with: anytime export {run_dir} -o BUNDLE_DIR)",
            err=True,
        )
    export_bundle(run_dir, bundle_dir, progress=False if quiet else None)
    return bundle_dir


@click.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Labelled dataset as KIND:PATH, e.g. npz:fashion-mnist.npz.")
@api_option(
    "--split",
    type=click.Choice(["test", "val", "train"]),
    api=EVALUATE,
    help="Which split of --data to measure on (thresholds always come from the bundle's validation data).",
)
@output_option("Report directory for CSV, JSON and PNG plots.", type=click.Path(file_okay=False), metavar="DIR")
@api_option("--points", type=int, api=EVALUATE, help="Budgets in the sweep, first exit to full network.")
@runtime_device_options
@profile_options(per_model=True)
@api_option("--plots/--no-plots", api=SAVE_REPORT, help="PNG plots in the report directory (needs matplotlib).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(
    models: tuple[str, ...],
    data: str,
    split: str | None,
    output: str | None,
    points: int | None,
    device: str | None,
    providers: str | None,
    threads: int | None,
    thread_pool: str,
    profile: tuple[str, ...],
    cost_mode: str | None,
    plots: bool | None,
    quiet: bool,
) -> None:
    """Anytime table and budget curves of bundles (or run directories) on a labelled split.

    A run directory of `anytime train` is exported to a temporary bundle first (needs torch).

    \b
    Several MODELS are overlaid in one plot, e.g. DR-MGF against joint training:
      anytime eval runs/drmgf runs/joint --data npz:fashion-mnist.npz -o reports/compare
    """
    from anytime.fileio import check_writable
    from anytime.formats.bundle import is_bundle_dir
    from anytime.formats.rundir import is_model_dir
    from anytime.runtime.evaluation import check_bundle_dir, evaluate
    from anytime.runtime.reports import save_report, summary_lines

    runs = [m for m in models if not is_bundle_dir(Path(m).expanduser()) and is_model_dir(Path(m).expanduser())]
    if profile and runs:
        # Every export is another bundle (its manifest is dated), so no profile fits the temporary one.
        raise click.UsageError(
            f"--profile is measured for one bundle, and {runs[0]} is a run directory, exported anew here; export it "
            f"(anytime export {runs[0]} -o BUNDLE_DIR), profile that (anytime profile BUNDLE_DIR -o PROFILE) "
            "and evaluate BUNDLE_DIR with --profile PROFILE"
        )
    if output:
        check_writable(Path(output) / "report.json")  # before the evaluation, not after it
    with tempfile.TemporaryDirectory(prefix="anytime-eval-") as tmp:
        bundles: list[Path] = []
        names: list[str | None] = []
        for i, model in enumerate(models):
            path = Path(model).expanduser()
            if not is_bundle_dir(path) and is_model_dir(path):
                bundles.append(_export_run(path, Path(tmp) / f"bundle_{i}", quiet))
                names.append(path.resolve().name)  # not the temporary directory's name
            else:
                bundles.append(check_bundle_dir(path))
                names.append(None)
        report = evaluate(
            bundles,
            data,
            names=names,
            progress=not quiet and sys.stderr.isatty(),
            **given(
                split=split,
                points=points,
                device=device,
                providers=providers,
                threads=threads,
                thread_pool=thread_pool,
                profile=list(profile) if len(profile) > 1 else (profile[0] if profile else None),
                cost_mode=cost_mode,
            ),
        )
    for m, model, name in zip(report.models, models, names):
        if name is not None:
            m.bundle = model  # the temporary bundle is gone; record where the model came from
    for line in summary_lines(report):
        click.echo(line)
    if output:
        files = save_report(report, output, **given(plots=plots))
        click.echo(f"wrote {', '.join(f.name for f in files)} to {output}")
        if plots is not False and not any(f.suffix == ".png" for f in files):
            click.echo("no plots: install the plot extra with pip install 'anytime[plot]'")
