"""`anytime train`: the CLI face of `anytime.training.train` (options map one-to-one onto TrainConfig)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import click

from anytime.errors import ConfigError
from anytime.training.methods import list_methods

EXAMPLES = """\b
Examples:
  anytime train --arch msdnet-tiny --data npz:fashion-mnist.npz --method drmgf --epochs 8 --out runs/fm
  anytime train --arch msdnet-tiny --data npz:fashion-mnist.npz --method joint --exit-weights sdn --epochs 8 --out runs/sdn
  anytime train --arch test-convnet --data npz:fashion-mnist.npz --method pcgrad --epochs 1 --train-limit 2000 --out runs/try
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


def _milestones(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--milestones {text!r}: give comma-separated fractions of the epochs, e.g. 0.5,0.75") from None


def _val_size(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--val-size {text!r}: give a number of images, e.g. 5000") from None


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--arch", help="Model preset (see `anytime info --list`).")
@click.option("--data", help="Dataset as KIND:PATH, e.g. npz:fashion-mnist.npz or cifar100:~/data.")
@click.option("--method", default="joint", show_default=True, help=f"Training method: {', '.join(list_methods())}.")
@click.option("--method-option", "-m", "method_option", multiple=True, metavar="KEY=VALUE", help="Method hyper-parameter (repeatable), e.g. -m c=0.4 or -m aux_weight=0.4.")
@click.option("--epochs", type=int, help="Number of epochs.")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory from its last checkpoint.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Global mini-batch size (split over torchrun processes).")
@click.option("--eval-batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True, help="Initial learning rate.")
@click.option("--schedule", type=click.Choice(["multistep", "cosine", "constant"]), default="multistep", show_default=True)
@click.option("--milestones", default="0.5,0.75", show_default=True, help="Multistep: fractions of the epochs where lr is multiplied by --lr-gamma.")
@click.option("--lr-gamma", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--nesterov/--no-nesterov", default=False, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option("--val-size", default=None, help="Validation images held out of the training split [default: the data set's default].")
@click.option("--train-limit", type=int, default=None, help="Train on only the first N training images (quick trials).")
@click.option("--workers", type=int, default=None, help="Loader worker processes for image folders [default: 0].")
@click.option("--augment/--no-augment", default=True, show_default=True, help="Random crop and flip of training images.")
@click.option("--kd-weight", type=float, default=0.0, show_default=True, help="Distillation from the last exit (Phuong & Lampert 2019); 0 disables.")
@click.option("--kd-temperature", type=float, default=4.0, show_default=True)
@click.option("--exit-weights", type=click.Choice(["auto", "constant", "sdn"]), default="auto", show_default=True, help="Per-exit loss weights for every method: all 1, or the SDN ramp of the internal exits; auto: sdn for SDN presets, constant otherwise.")
@click.option("--num-classes", type=int, default=None, help="Expected number of classes; an error if the data set has another.")
@click.option("--model-option", "model_option", multiple=True, metavar="KEY=VALUE", help="Architecture override passed to anytime.models.create (repeatable).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off", show_default=True, help="Mixed precision of the training steps: bfloat16, or float16 with loss scaling.")
@click.option("--deterministic/--no-deterministic", default=False, show_default=True, help="torch.use_deterministic_algorithms (bit-exact resume, slower).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no per-epoch lines.")
def train(**kw: Any) -> None:
    """Train a multi-exit network (DR-MGF or a baseline) into a run directory."""
    from anytime.training.config import TrainConfig, parse_key_values
    from anytime.training.trainer import resume, train as run_training

    quiet = kw.pop("quiet")
    logging.getLogger("anytime.training").setLevel(logging.WARNING if quiet else logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    progress = not quiet
    resume_dir = kw.pop("resume_dir")
    try:
        if resume_dir is not None:
            result = resume(resume_dir, progress=progress, device=kw["device"], workers=kw["workers"])
        else:
            missing = [f"--{n}" for n in ("arch", "data", "epochs", "out") if kw[n] is None]
            if missing:
                raise click.UsageError(f"missing {', '.join(missing)} (or give --resume RUN_DIR)")
            config = TrainConfig(
                arch=kw["arch"], data=kw["data"], method=kw["method"], epochs=kw["epochs"], out=kw["out"],
                method_options=parse_key_values(kw["method_option"]),
                model_options=_parse_model_options(kw["model_option"]),
                num_classes=kw["num_classes"], batch_size=kw["batch_size"], eval_batch_size=kw["eval_batch_size"],
                lr=kw["lr"], momentum=kw["momentum"], nesterov=kw["nesterov"], weight_decay=kw["weight_decay"],
                schedule=kw["schedule"], milestones=_milestones(kw["milestones"]), lr_gamma=kw["lr_gamma"],
                seed=kw["seed"], device=kw["device"] or "auto", val_size=_val_size(kw["val_size"]),
                train_limit=kw["train_limit"], workers=kw["workers"] or 0, augment=kw["augment"],
                kd_weight=kw["kd_weight"], kd_temperature=kw["kd_temperature"], deterministic=kw["deterministic"],
                exit_weights=kw["exit_weights"], amp=kw["amp"],
            )  # fmt: skip
            result = run_training(config, progress=progress)
    except KeyboardInterrupt:
        run_dir = resume_dir or kw.get("out")
        click.echo(f"\nInterrupted. The last completed epoch is checkpointed; continue with: anytime train --resume {run_dir}", err=True)
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
    if result.history:
        click.echo(f"{len(result.history)} epochs run here, {result.epoch_time_s:.1f} s per epoch (training)")
    click.echo(f"Run directory: {result.run_dir}  (model.safetensors, model.json, results.csv, summary.json)")
    click.echo(f"Export:  anytime export {result.run_dir} --out bundles/{result.run_dir.name}")


def __getattr__(name: str) -> Any:
    # `anytime routes` lives in anytime.training.routes_command (DR-MGF analysis); import it on demand.
    if name == "routes":
        from anytime.training.routes_command import routes

        return routes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
