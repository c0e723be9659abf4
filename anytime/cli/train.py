"""`anytime train`: the CLI face of `anytime.training.train`; options map one-to-one onto TrainConfig
(`--batch-size` <-> `batch_size`; `-o/--output` <-> `out`, `-m/--method-option` <-> `method_options`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from anytime.cli._options import TRAIN_CONFIG, api_option, given, output_option
from anytime.errors import ConfigError

EXAMPLES = """\b
Examples:
  anytime train --arch msdnet-tiny --data npz:fashion-mnist.npz --method drmgf --epochs 8 -o runs/fm
  anytime train --arch msdnet-tiny --data npz:fashion-mnist.npz --method joint --exit-weights sdn --epochs 8 -o runs/sdn
  anytime train --arch test-convnet --data npz:fashion-mnist.npz --method pcgrad --epochs 1 --train-limit 2000 -o runs/try
  anytime train --resume runs/fm
  torchrun --standalone --nproc_per_node 2 -m anytime.cli train ...   (NCCL per GPU; gloo on CPU)
"""


def _parse_model_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from anytime.training.config import parse_key_values

    out: dict[str, Any] = {}
    for key, text in parse_key_values(pairs, "--model-option").items():
        try:
            out[key] = json.loads(text)  # numbers, lists (widths=[8,16,16]), true/false
        except json.JSONDecodeError:
            out[key] = text
    return out


def _milestones(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--milestones {text!r}: give comma-separated fractions of the epochs, e.g. 0.5,0.75"
        ) from None


def _val_size(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-size {text!r}: give a number of images (5000) or a fraction (0.1)")
    return fraction


def _check_resume_options(resume_dir: str, output: str | None, kw: dict[str, Any]) -> None:
    from anytime.training.preflight import RESUMABLE_CHANGES

    if output is not None:
        raise click.UsageError(
            f"give either --resume RUN_DIR (continue a run in place) or -o/--output (a new run), not both; "
            f"the resumed run writes to {resume_dir}"
        )
    changed = [name for name, value in given(**kw).items() if name not in RESUMABLE_CHANGES]
    if changed:
        opts = {p.name: "/".join(p.opts + p.secondary_opts) for p in click.get_current_context().command.params}
        flags = ", ".join(opts.get(name, name) for name in changed)
        allowed = ", ".join(f"--{name}" for name in sorted(RESUMABLE_CHANGES))
        raise ConfigError(
            f"--resume repeats the run's own configuration, so {flags} cannot be given with it (only {allowed} "
            f"may change); drop {flags}, or start a new run with -o/--output instead"
        )


def _method_names() -> str:
    from anytime.training.methods import list_methods

    return f"One of: {', '.join(list_methods())}."


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@api_option("--arch", api=TRAIN_CONFIG, help="Model preset (see `anytime info --list`).")
@api_option("--data", api=TRAIN_CONFIG, help="Dataset as KIND:PATH, e.g. npz:fashion-mnist.npz or cifar100:~/data.")
@api_option("--method", api=TRAIN_CONFIG, help="Training method.", help_suffix=_method_names)
@click.option(
    "--method-option",
    "-m",
    "method_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Method hyper-parameter (repeatable), e.g. -m c=0.4 or -m aux_weight=0.4.",
)
@api_option("--epochs", type=int, api=TRAIN_CONFIG, help="Number of epochs.")
@output_option("Run directory to create.", type=click.Path(file_okay=False), metavar="RUN_DIR", deprecated_out=True)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its last checkpoint.",
)
@api_option("--batch-size", type=int, api=TRAIN_CONFIG, help="Global mini-batch size (split over torchrun processes).")
@api_option("--eval-batch-size", type=int, api=TRAIN_CONFIG, help="Images per batch when validating and testing.")
@api_option("--lr", type=float, api=TRAIN_CONFIG, help="Initial learning rate.")
@api_option("--schedule", type=click.Choice(["multistep", "cosine", "constant"]), api=TRAIN_CONFIG)
@api_option(
    "--milestones", api=TRAIN_CONFIG, help="Multistep: fractions of the epochs where lr is multiplied by --lr-gamma."
)
@api_option("--lr-gamma", type=float, api=TRAIN_CONFIG)
@api_option("--momentum", type=float, api=TRAIN_CONFIG)
@api_option("--nesterov/--no-nesterov", api=TRAIN_CONFIG)
@api_option("--weight-decay", type=float, api=TRAIN_CONFIG)
@api_option("--seed", type=int, api=TRAIN_CONFIG)
@api_option("--device", api=TRAIN_CONFIG, help="auto, cpu, cuda or cuda:N.")
@api_option(
    "--val-size",
    api=TRAIN_CONFIG,
    help="Validation images held out of the training split, a count or a fraction (0.1) [default: the data set's default].",
)
@api_option(
    "--train-limit", type=int, api=TRAIN_CONFIG, help="Train on only the first N training images (quick trials)."
)
@api_option("--workers", type=int, api=TRAIN_CONFIG, help="Loader worker processes for image folders.")
@api_option("--augment/--no-augment", api=TRAIN_CONFIG, help="Random crop and flip of training images.")
@api_option(
    "--kd-weight",
    type=float,
    api=TRAIN_CONFIG,
    help="Distillation from the last exit (Phuong & Lampert 2019); 0 disables.",
)
@api_option("--kd-temperature", type=float, api=TRAIN_CONFIG)
@api_option(
    "--exit-weights",
    type=click.Choice(["auto", "constant", "sdn"]),
    api=TRAIN_CONFIG,
    help="Per-exit loss weights for every method: all 1, or the SDN ramp of the internal exits; auto: sdn for SDN presets, constant otherwise.",
)
@api_option(
    "--num-classes",
    type=int,
    api=TRAIN_CONFIG,
    help="Expected number of classes; an error if the data set has another.",
)
@click.option(
    "--model-option",
    "model_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Architecture override passed to anytime.models.create (repeatable).",
)
@api_option(
    "--amp",
    type=click.Choice(["off", "bf16", "fp16"]),
    api=TRAIN_CONFIG,
    help="Mixed precision of the training steps: bfloat16, or float16 with loss scaling.",
)
@api_option(
    "--channels-last/--no-channels-last",
    api=TRAIN_CONFIG,
    help="Model and batches in channels_last memory format (faster convolutions on recent GPUs).",
)
@api_option(
    "--compile",
    type=click.Choice(["off", "default", "reduce-overhead", "max-autotune"]),
    api=TRAIN_CONFIG,
    help="torch.compile the training steps (DR-MGF's gated forward included); reduce-overhead adds CUDA graphs "
    "on a GPU. Needs a C++ compiler on the CPU. May change on --resume.",
)
@api_option(
    "--deterministic/--no-deterministic",
    api=TRAIN_CONFIG,
    help="torch.use_deterministic_algorithms (bit-exact resume, slower).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
def train(**kw: Any) -> None:
    """Train a multi-exit network (DR-MGF or a baseline) into a run directory."""
    from anytime.training.config import TrainConfig, parse_key_values
    from anytime.training.trainer import resume
    from anytime.training.trainer import train as run_training

    quiet = kw.pop("quiet")
    logging.getLogger("anytime.training").setLevel(logging.WARNING if quiet else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    progress = not quiet
    resume_dir = kw.pop("resume_dir")
    output = kw.pop("output")
    try:
        if resume_dir is not None:
            # Only what was given overrides the run's saved configuration; a setting a resume cannot change
            # is refused rather than silently dropped.
            _check_resume_options(resume_dir, output, kw)
            result = resume(
                resume_dir, progress=progress, device=kw["device"], workers=kw["workers"], compile=kw["compile"]
            )
        else:
            missing = [
                name
                for name, v in (
                    ("--arch", kw["arch"]),
                    ("--data", kw["data"]),
                    ("--epochs", kw["epochs"]),
                    ("-o/--output", output),
                )
                if v is None
            ]
            if missing:
                raise click.UsageError(f"missing {', '.join(missing)} (or give --resume RUN_DIR)")
            kw["method_options"] = parse_key_values(kw.pop("method_option"))
            kw["model_options"] = _parse_model_options(kw.pop("model_option"))
            kw["milestones"] = _milestones(kw["milestones"])
            kw["val_size"] = _val_size(kw["val_size"])
            config = TrainConfig(out=output, **given(**kw))
            result = run_training(config, progress=progress)
    except KeyboardInterrupt:
        from anytime.formats.rundir import CHECKPOINT, CONFIG_FILE

        run_dir = Path(resume_dir or output)
        if (run_dir / CHECKPOINT).is_file():
            message = f"The last completed epoch is checkpointed; continue with: anytime train --resume {run_dir}"
        elif (run_dir / CONFIG_FILE).is_file():
            message = f"No epoch had completed; `anytime train --resume {run_dir}` starts it again from the beginning"
        else:
            message = "Nothing was written yet; run the command again to start"
        click.echo(f"\nInterrupted. {message}", err=True)
        raise SystemExit(130) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        _print_summary(result)


def _print_summary(result) -> None:
    test, val = result.test_accuracy, result.val_accuracy
    click.echo("")
    click.echo(f"{'exit':>4}  {'val acc':>8}  {'test acc':>8}")

    def pct(values, t):
        return f"{100 * values[t]:7.2f}%" if values else "       -"

    for t in range(len(val or test or [])):
        click.echo(f"{t + 1:>4}  {pct(val, t)}  {pct(test, t)}")
    val_mean = f"{100 * result.val_mean:7.2f}%" if val else "       -"
    test_mean = f"{100 * result.test_mean:7.2f}%" if test else "       -"
    click.echo(f"{'avg':>4}  {val_mean}  {test_mean}")
    ran = result.history[result.resumed_from_epoch :]  # a resumed run's history holds the earlier epochs too
    if ran:
        seconds = sum(row["train_time_s"] for row in ran) / len(ran)
        click.echo(f"{len(ran)} epochs run here, {seconds:.1f} s per epoch (training)")
    click.echo(f"Run directory: {result.run_dir}  (model.safetensors, model.json, results.csv, summary.json)")
    click.echo(f"Export:  anytime export {result.run_dir} -o bundles/{result.run_dir.name}")
