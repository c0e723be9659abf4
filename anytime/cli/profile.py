"""`anytime profile`: measure each stage's time per call on this machine and provider (torch-free)."""

from __future__ import annotations

import click

from anytime.cli._options import PROFILE, api_option, given, load_bundle, output_option, runtime_device_options


@click.command("profile")
@click.argument("bundle", required=False, type=click.Path(file_okay=False))
@api_option("--batch-size", type=click.IntRange(min=1), api=PROFILE, help="Largest batch timed (serve's batch size).")
@api_option("--repeats", type=click.IntRange(min=1), api=PROFILE, help="Timed calls per stage and row count (median).")
@output_option("Write the profile as JSON (for --profile of serve, calibrate, eval).", type=click.Path(dir_okay=False))
@runtime_device_options
def profile(
    bundle: str | None,
    batch_size: int | None,
    repeats: int | None,
    output: str | None,
    device: str | None,
    providers: str | None,
    threads: int | None,
    thread_pool: str,
) -> None:
    """Measure each stage's time on this machine and provider, for budgets in time.

    Every stage is timed warm as the executor runs it (the stage graph plus the host work around it: the
    gather of the rows that go on, the exit test) at the row counts early exit produces (1, 2, 4, ... up to
    the batch size: later stages run on the rows still going), median of repeats, and the refilling scheduler's
    own work on a short stream. Profile with the --threads and
    --device you serve with: a profile is only valid for them. BUNDLE defaults to the embedded model.
    """
    from anytime.fileio import check_writable
    from anytime.runtime.budget import format_seconds

    if output:
        check_writable(output)  # before the measuring, not after it
    model = load_bundle(bundle, device=device, providers=providers, threads=threads, thread_pool=thread_pool)
    prof = model.profile(**given(batch_size=batch_size, repeats=repeats))
    threads_text = "onnxruntime's default" if prof.threads is None else str(prof.threads)
    click.echo(
        f"{model.bundle.arch} on {prof.provider}, threads {threads_text} ({prof.thread_pool} pool), "
        f"{prof.repeats} repeats; "
        f"CPU {prof.machine.get('cpu')}"
    )
    macs = model.bundle.exit_costs
    stage_macs = [float(macs[0])] + [float(b - a) for a, b in zip(macs, macs[1:])]
    click.echo(
        f"  {'stage':>5}  {'per row @' + str(prof.batch_size):>14}  {'@1 row':>10}  {'of time':>7}  {'of cost':>7}"
    )
    for k, per_row in enumerate(prof.seconds_per_row):
        click.echo(
            f"  {k + 1:>5}  {format_seconds(per_row):>14}  {format_seconds(prof.stage_call_seconds[k][0]):>10}  "
            f"{100 * per_row / prof.full_seconds:>6.1f}%  {100 * stage_macs[k] / float(macs[-1]):>6.1f}%"
        )
    if prof.first_stage_alone_seconds is not None:
        alone = prof.first_stage_alone_seconds[-1] / prof.batch_size
        click.echo(
            f"stage 1 back to back (every row leaving at exit 1): {format_seconds(alone)} per row "
            f"({alone / prof.seconds_per_row[0]:.2f} of its time in a full chain)"
        )
    if prof.refill_overhead_seconds is not None and prof.refill_overhead_seconds < 0:
        click.echo(
            f"refilling scheduler's own work measured {format_seconds(prof.refill_overhead_seconds)} per row and "
            "stage: below zero, timing noise (is the machine busy?); priced as none. Profile again on an idle "
            "machine for times you can budget by"
        )
    elif prof.refill_overhead_seconds is not None:
        click.echo(
            f"refilling scheduler's own work (queues, answers): {format_seconds(prof.refill_overhead_seconds)} per "
            "row and stage, priced with it (--scheduler refill, --cost-mode full-batches)"
        )
    click.echo(
        f"full network {format_seconds(prof.full_seconds)} per image at batch {prof.batch_size} "
        f"({1 / prof.full_seconds:,.0f} images/s on one stream)"
    )
    if output:
        prof.save(output)
        serve = f"anytime serve {model.bundle.path} IMAGES --profile {output}"
        serve += f" --threads {prof.threads}" if prof.threads is not None else ""
        serve += " --thread-pool session" if prof.thread_pool == "session" and prof.threads != 1 else ""
        click.echo(f"profile written to {output}; use it with: {serve} --budget 50%")
    else:
        click.echo("not saved: add -o FILE to write it")
