"""`anytime serve`: budgeted batch prediction with real early exit (torch-free: only the runtime)."""

from __future__ import annotations

import sys
import time

import click

from anytime.cli._options import (
    LOAD,
    PREDICT,
    api_default,
    api_option,
    given,
    load_bundle,
    output_option,
    profile_options,
    runtime_device_options,
)
from anytime.errors import ConfigError
from anytime.formats.bundle import SAMPLE_IMAGES_DIR as SAMPLES_DIR


@click.command("serve")
@click.argument("args", nargs=-1, metavar="[BUNDLE] [INPUTS...]")
@click.option(
    "--budget",
    "-b",
    default=None,
    help="Average cost per image: 120M, 1.5G, 3e8, a time with --profile (0.3ms, 300us), or 40% of the full network.",
)
@click.option(
    "--exit", "exit_", type=int, default=None, help="Answer every input at this exit (1-based) instead of a budget."
)
@api_option("--strict", is_flag=True, api=PREDICT, help="Hard cap: no batch's total cost exceeds images × budget.")
@api_option(
    "--policy",
    api=PREDICT,
    metavar="NAME|FILE",
    help="Exit policy: best (higher validation accuracy), geometric (MSDNet), search, or a policy JSON file "
    "written by `anytime calibrate -o` (then no --budget).",
)
@api_option(
    "--batch-size",
    type=click.IntRange(min=1),
    api=PREDICT,
    help="Images per batch (--strict caps each batch; a latency profile prices this batch size).",
)
@api_option(
    "--scheduler",
    type=click.Choice(["auto", "refill", "batch"]),
    api=PREDICT,
    help="refill: a queue per stage, so every stage runs on full batches; batch: each batch on its own, "
    "compacted after each exit; auto: refill on a GPU unless --strict (its cap is per batch), else batch. "
    "Same answers.",
)
@api_option(
    "--ordered/--unordered",
    api=PREDICT,
    help="Rows in input order, or as they are answered (refill: early answers leave without waiting).",
)
@api_option(
    "--max-wait-rows",
    type=click.IntRange(min=1),
    api=PREDICT,
    help="Refill: no input waits while more later inputs than this are read (default: 16 batches).",
)
@output_option(
    "Write one row per input: .jsonl, .csv or .parquet (it appears complete, or not at all).",
    type=click.Path(dir_okay=False),
)
@runtime_device_options
@profile_options
@api_option(
    "--io-binding",
    type=click.Choice(["auto", "on", "off"]),
    api=LOAD,
    help="Keep stage state tensors on the device between stages (auto: with CUDA).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[auto|ADDRESS]",
    help="Run on a Ray cluster (needs anytime[ray]): auto joins the one RAY_ADDRESS or `ray start` names, "
    "else starts one on this machine; or a cluster address (ray://host:10001, host:6379).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="With --ray: Ray actors (one CPU each) that run the bundle [default: the cluster's CPUs].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no per-image lines; only the summary.")
@click.pass_context
def serve(
    ctx: click.Context,
    args: tuple[str, ...],
    budget: str | None,
    exit_: int | None,
    strict: bool | None,
    policy: str | None,
    batch_size: int | None,
    scheduler: str | None,
    ordered: bool | None,
    max_wait_rows: int | None,
    output: str | None,
    device: str | None,
    providers: str | None,
    threads: int | None,
    thread_pool: str,
    profile: str | None,
    cost_mode: str | None,
    io_binding: str | None,
    ray_address: str | None,
    workers: int | None,
    quiet: bool,
) -> None:
    """Budgeted batch prediction with real early exit.

    BUNDLE is optional: the first argument is a bundle when it is a directory with a manifest.json,
    otherwise the embedded default model answers (a directory with a bundle's graphs but no manifest.json
    is an error). INPUTS are image files, directories (recursive),
    globs, or `-` for a list of paths on standard input. Without inputs (and without a bundle) the
    embedded sample images are used. Inputs in class-named folders also get an accuracy.

    A Parquet or JSONL file listing paths (column or key `path`) stands for the files it names.

    With --ray the same rows come from Ray actors: the policy is calibrated here, once, and every worker
    uses its thresholds; --strict then holds per batch of --batch-size rows of each worker.

    Without -o, stdout has one tab-separated line per input (path, class, confidence, exit; or path, ERROR,
    reason) and the summary goes to stderr.

    Exit status: 0 all inputs answered, 1 some input failed (it has an error row), 2 usage error.
    """
    import contextlib

    from tqdm import tqdm

    from anytime.errors import BundleError
    from anytime.formats.bundle import MANIFEST_FILE, is_bundle_dir, is_bundle_without_manifest
    from anytime.runtime.inputs import expand_paths
    from anytime.runtime.model import POLICY_CHOICES
    from anytime.runtime.results import RunningTotals, output_format, row_file

    if cost_mode not in (None, "auto"):
        # --cost-mode is how calibrate and eval count a policy's time; serve prices as its executor runs.
        raise click.UsageError(
            f"--cost-mode {cost_mode} does not apply to serve, which prices a budget as its executor runs (per "
            "batch on CPU and with --strict, full batches with --scheduler refill); choose the executor with "
            "--scheduler and drop --cost-mode"
        )
    if ray_address is not None:
        from anytime import ray as on_ray

        check_ray_address(ray_address)
        if profile is not None:
            raise click.UsageError(
                "--profile times the stages on this machine, and Ray workers run on others; "
                "give a compute budget (--budget 50%, 120M) with --ray"
            )
        if scheduler == "refill":
            raise click.UsageError(
                "with --ray each worker runs every block of --batch-size rows as one batch; drop --scheduler refill"
            )
        ignored = [
            flag
            for flag, given_here in (
                ("--unordered", ordered is False),
                ("--max-wait-rows", max_wait_rows is not None),
                ("--io-binding", io_binding is not None),
            )
            if given_here
        ]
        if ignored:
            raise click.UsageError(
                f"{', '.join(ignored)} do not apply with --ray: each Ray worker runs the per-batch executor on its "
                "CPU and the rows come in input order; drop them"
            )
        on_ray.require_ray("anytime serve --ray")
    elif workers is not None:
        raise click.UsageError("--workers sets the Ray actors; give it with --ray")

    ready_policy = policy is not None and policy not in POLICY_CHOICES  # a policy file: thresholds already fitted
    bundle: str | None = None
    inputs = list(args)
    if inputs and is_bundle_dir(inputs[0]):
        bundle, inputs = inputs[0], inputs[1:]
    elif inputs and is_bundle_without_manifest(inputs[0]):
        # Read as a folder of images it has none, and the embedded model would answer in its place.
        raise BundleError(
            f"'{inputs[0]}' looks like a bundle but has no {MANIFEST_FILE} (copied in part, or its export was "
            "interrupted); re-export or re-copy it"
        )
    if not inputs:
        if bundle is not None:
            raise click.UsageError(
                "give the images to classify after the bundle (files, directories, globs or - for stdin)"
            )
        if not SAMPLES_DIR.is_dir():
            raise ConfigError(
                f"no inputs given and the embedded sample images are not installed ({SAMPLES_DIR}); pass images to classify"
            )
        inputs = [str(SAMPLES_DIR)]
    if budget is None and exit_ is None and not ready_policy:
        raise click.UsageError(
            "give a compute budget (--budget 50%, --budget 120M), a fixed exit (--exit 3) "
            "or a calibrated policy file (--policy FILE)"
        )
    if budget is not None and exit_ is not None:
        raise click.UsageError("give either --budget or --exit, not both")
    if output:
        output_format(output)  # an unknown suffix, or Parquet without pyarrow: stop before any work

    binding = None if io_binding is None else {"auto": "auto", "on": True, "off": False}[io_binding]
    model = load_bundle(
        bundle,
        device=device,
        providers=providers,
        threads=threads,
        thread_pool=thread_pool,
        profile=profile,
        cost_mode=cost_mode,
        io_binding=binding,
    )
    # As predict does: a strict cap holds per batch and the per-batch executor compacts every batch stage by
    # stage, so their time is counted per batch; the refilling scheduler runs full batches.
    refill = scheduler == "refill" or (scheduler in (None, "auto") and model.executor.on_gpu)
    per_batch = strict or not refill or ray_address is not None
    chosen = model.resolve_policy(
        budget=budget,
        exit=exit_,
        # Per batch, time is priced at the batch the run compacts (predict's default when not given).
        batch_size=batch_size or api_default(PREDICT, "batch_size"),
        **given(policy=policy, cost_mode="per-batch" if per_batch else "full-batches"),
    )
    if strict and chosen.budget is None:
        raise click.UsageError("--strict caps a budget; it has no meaning with --exit")
    if not quiet:
        click.echo(f"{model.bundle.arch} on {', '.join(model.providers)}; {chosen.describe()}", err=True)

    totals = RunningTotals(model.num_exits, model.cost_convention, chosen.budget)
    rows_out = sys.stdout
    with contextlib.ExitStack() as stack:
        if ray_address is not None:
            # Ray's driver prints the cluster's error notices ("(raylet) A worker died ...") on sys.stdout
            # from a thread of its own, whenever they arrive: they go to stderr, so stdout holds only rows.
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            started, startup = on_ray.timed_connect(ray_address, quiet=True)
            if started:
                stack.callback(on_ray.shutdown)
            if not quiet:
                click.echo(f"Ray: {on_ray.describe_cluster()}, joined in {startup:.1f} s", err=True)
            stream = on_ray.stream_predictions(
                model,
                chosen,
                inputs,
                stdin=sys.stdin,
                workers=workers,
                **given(batch_size=batch_size, strict=strict, device=device, threads=threads),
            )
        else:
            stream = model.predict_batches(
                expand_paths(inputs, stdin=sys.stdin),
                policy=chosen,
                on_error="record",
                **given(
                    batch_size=batch_size,
                    strict=strict,
                    scheduler=scheduler,
                    ordered=ordered,
                    max_wait_rows=max_wait_rows,
                ),
            )
        # The rows go to a temporary file that becomes OUTPUT only when every input has its row.
        writer = stack.enter_context(row_file(output)) if output else None
        bar = stack.enter_context(
            tqdm(unit="img", file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True)
        )
        t0 = time.perf_counter()
        for part in stream:
            totals.add(part)
            bar.update(len(part))
            if writer is not None:
                writer.write(part.to_rows())
            elif not quiet:
                for p in part:
                    if p.error is not None:
                        bar.write(f"{p.path}\tERROR\t{p.error}", file=rows_out)
                    else:
                        bar.write(f"{p.path}\t{p.class_name}\t{p.confidence:.4f}\texit {p.exit}", file=rows_out)
        totals.seconds = time.perf_counter() - t0
        if totals.images + totals.failed == 0:
            raise ConfigError(f"no image files found in {' '.join(inputs)}")
    # Rows printed on stdout stay alone there (one line per input, for pipes); else the summary is the output.
    click.echo(totals.summary(), err=not output and not quiet)
    if output:
        click.echo(f"rows written to {output}")
    if totals.failed:
        click.echo(
            f"{totals.failed} input(s) failed; see the error rows" + (f" in {output}" if output else " above"), err=True
        )
        ctx.exit(1)


RAY_ADDRESS_WORDS = ("auto", "local")


def check_ray_address(address: str) -> None:
    """--ray takes an optional value, so `--ray BUNDLE` would read the bundle as the address: refuse
    what cannot be an address (a word other than auto/local, an existing path) with the fix."""
    from pathlib import Path

    looks_like_address = address in RAY_ADDRESS_WORDS or "://" in address or ":" in address
    if not looks_like_address or Path(address).exists():
        raise click.UsageError(
            f"--ray {address}: not a Ray address (auto, local, ray://host:10001 or host:6379); "
            "to join or start a cluster automatically, write --ray auto or put --ray after the inputs"
        )
