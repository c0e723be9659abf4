"""`anytime calibrate`: fit exit thresholds for a budget on a bundle's validation data (torch-free)."""

from __future__ import annotations

import time

import click

from anytime.cli.serve import _device_options, _load_model


@click.command("calibrate")
@click.argument("bundle", required=False, type=click.Path(file_okay=False))
@click.option("--budget", "-b", required=True, help="Average cost per image: 120M, 1.5G, 3e8, or 40% of the full network.")
@click.option("--policy", "method", type=click.Choice(["best", "geometric", "search"]), default="best", show_default=True,
              help="Which policy -o writes.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the chosen policy as JSON (for serve --policy).")
@click.option("--verify", is_flag=True, help="Check every bundle file's sha256 against the manifest first.")
@_device_options
def calibrate(bundle: str | None, budget: str, method: str, output: str | None, verify: bool, device: str,
              providers: str | None, threads: int | None) -> None:
    """Fit exit thresholds for a budget on the bundle's validation data; print both policies.

    BUNDLE defaults to the embedded model.
    """
    from anytime.runtime.budget import format_cost

    model = _load_model(bundle, "cpu" if providers is None and device == "auto" else device, providers, threads, verify=verify)
    t0 = time.perf_counter()
    policies = model.calibrate_all(budget)
    seconds = time.perf_counter() - t0
    conv = model.cost_convention
    click.echo(f"{model.bundle.arch}: {model.num_exits} exits, full network {format_cost(model.full_cost, conv)} per image; "
               f"budget {budget} = {format_cost(model.budget_cost(budget), conv)} per image")
    data = model.validation_data()
    click.echo(f"validation data: {data.count} samples (the bundle's calibration split); fitted in {seconds:.2f} s")
    best = policies["best"]
    for name in ("geometric", "search"):
        p = policies[name]
        mark = "  <- default (best on validation)" if p is best else ""
        click.echo(p.describe() + mark)
    chosen = policies[method]
    click.echo(f"expected accuracy {100 * chosen.expected_accuracy:.2f}% at {format_cost(chosen.expected_cost, conv)} per image "
               f"({chosen.method}; {100 * chosen.expected_cost / model.full_cost:.1f}% of the full network)")
    if output:
        chosen.save(output)
        click.echo(f"policy written to {output}; use it with: anytime serve {model.bundle.path} IMAGES --policy {output}")

