"""`anytime calibrate`: fit exit thresholds for a budget on a bundle's validation data (torch-free)."""

from __future__ import annotations

import time

import click

from anytime.cli._options import (
    CALIBRATE,
    LOAD,
    api_option,
    given,
    load_bundle,
    output_option,
    profile_options,
    runtime_device_options,
)


@click.command("calibrate")
@click.argument("bundle", required=False, type=click.Path(file_okay=False))
@click.option(
    "--budget",
    "-b",
    required=True,
    help="Average cost per image: 120M, 1.5G, 3e8, a time with --profile (0.3ms, 300us), or 40% of the full network.",
)
@api_option(
    "--policy", type=click.Choice(["best", "geometric", "search"]), api=CALIBRATE, help="Which policy -o writes."
)
@output_option("Write the chosen policy as JSON (for serve --policy).", type=click.Path(dir_okay=False))
@api_option("--verify", is_flag=True, api=LOAD, help="Check every bundle file's sha256 against the manifest first.")
@runtime_device_options
@profile_options
def calibrate(
    bundle: str | None,
    budget: str,
    policy: str | None,
    output: str | None,
    verify: bool | None,
    device: str | None,
    providers: str | None,
    threads: int | None,
    thread_pool: str,
    profile: str | None,
    cost_mode: str | None,
) -> None:
    """Fit exit thresholds for a budget on the bundle's validation data; print both policies.

    BUNDLE defaults to the embedded model. Calibration reads only the stored validation logits, so
    --device auto means the CPU here.
    """
    from anytime.runtime.budget import format_cost

    if providers is None and device in (None, "auto"):
        device = "cpu"  # no graph runs: starting CUDA would only cost time
    model = load_bundle(
        bundle,
        device=device,
        providers=providers,
        threads=threads,
        thread_pool=thread_pool,
        verify=verify,
        profile=profile,
        cost_mode=cost_mode,
    )
    t0 = time.perf_counter()
    policies = model.calibrate_all(budget)
    seconds = time.perf_counter() - t0
    conv = model.cost_convention
    click.echo(
        f"{model.bundle.arch}: {model.num_exits} exits, full network {format_cost(model.full_cost, conv)} per image; "
        f"budget {budget} = {format_cost(model.budget_cost(budget), conv)} per image"
    )
    data = model.validation_data()
    click.echo(f"validation data: {data.count} samples (the bundle's calibration split); fitted in {seconds:.2f} s")
    best = policies["best"]
    for name in ("geometric", "search"):
        p = policies[name]
        mark = "  <- default (best on validation)" if p is best else ""
        click.echo(p.describe() + mark)
    chosen = model.calibrate(budget, **given(policy=policy))  # fitted above: calibrate_all caches per budget
    click.echo(
        f"expected accuracy {100 * chosen.expected_accuracy:.2f}% at {format_cost(chosen.expected_cost, conv)} per image "
        f"({chosen.method}; {100 * chosen.expected_cost / model.full_cost:.1f}% of the full network)"
    )
    if output:
        chosen.save(output)
        click.echo(
            f"policy written to {output}; use it with: anytime serve {model.bundle.path} IMAGES --policy {output}"
        )
