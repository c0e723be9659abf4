"""`anytime eval`: the anytime table and budget curves of bundles on a labelled split."""

from __future__ import annotations

import click


@click.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Labelled dataset as KIND:PATH, e.g. npz:fashion-mnist.npz.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val", "train"]),
              help="Which split of --data to measure on (thresholds always come from the bundle's validation data).")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Report directory for CSV, JSON and PNG plots.")
@click.option("--points", default=15, show_default=True, help="Budgets in the sweep, first exit to full network.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots even when matplotlib is installed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(models: tuple[str, ...], data: str, split: str, output: str | None, points: int, device: str,
                 threads: int | None, no_plots: bool, quiet: bool) -> None:
    """Anytime table and budget curves of bundles (or run directories) on a labelled split.

    \b
    Several MODELS are overlaid in one plot, e.g. DR-MGF against joint training:
      anytime eval runs/drmgf runs/joint --data npz:fashion-mnist.npz -o reports/compare
    """
    import sys

    from anytime.runtime.evaluation import evaluate, summary_lines

    report = evaluate(list(models), data, split=split, points=points, device=device, threads=threads,
                      progress=not quiet and sys.stderr.isatty())
    for line in summary_lines(report):
        click.echo(line)
    if output:
        files = report.save(output, plots=not no_plots)
        click.echo(f"wrote {', '.join(f.name for f in files)} to {output}")
        if not no_plots and not any(f.suffix == ".png" for f in files):
            click.echo("no plots: install the plot extra with pip install 'anytime[plot]'")
