"""The `anytime` command line: one verb per step of a model's life, one module per verb.

Verb modules are imported lazily, and import the library inside their command function, so that
`anytime --help` and `anytime serve` start without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

import click

from anytime import __version__
from anytime.errors import AnytimeError, AnytimeWarning

# verb -> (module, attribute, one-line help shown in `anytime --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("anytime.cli.info", "info", "Per-exit cost and parameter table of a model preset."),
    "train": ("anytime.cli.train", "train", "Train a multi-exit network (DR-MGF or a baseline)."),
    "routes": ("anytime.cli.routes", "routes", "Per-exit route similarity of a DR-MGF run."),
    "export": ("anytime.cli.export", "export", "Write (or --check) an ONNX bundle, one graph per exit stage."),
    "profile": ("anytime.cli.profile", "profile", "Measure each stage's time per image: budgets in time."),
    "calibrate": ("anytime.cli.calibrate", "calibrate", "Fit exit thresholds for a compute budget."),
    "serve": ("anytime.cli.serve", "serve", "Budgeted batch prediction with real early exit."),
    "eval": ("anytime.cli.eval", "eval_command", "Anytime table and budget curves on a dataset."),
}

EPILOG = """\b
The whole journey:
  anytime info msdnet-tiny
  anytime train --arch msdnet-tiny --data npz:fashion-mnist.npz --method drmgf --epochs 8 -o runs/fm
  anytime export runs/fm -o bundles/fm
  anytime calibrate bundles/fm --budget 50%
  anytime profile bundles/fm --threads 1 -o fm-profile.json
  anytime serve bundles/fm images/ --profile fm-profile.json --threads 1 --budget 0.3ms
  anytime serve bundles/fm images/ --budget 50% -o preds.jsonl
  anytime eval bundles/fm --data npz:fashion-mnist.npz -o reports/fm
  anytime serve --budget 50%        # the embedded default model on its sample images
"""


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from the table, so `anytime --help` imports no subcommand (and no torch).
        with formatter.section("Commands"):
            formatter.write_dl([(name, h) for name, (_, _, h) in COMMANDS.items()])


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anytime")
def cli() -> None:
    """Anytime and budgeted inference with multi-exit image classifiers."""


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Our own warnings as one `Warning: ...` line on stderr, like errors; others as Python shows them."""
    if issubclass(category, AnytimeWarning):
        click.secho(f"Warning: {message}", fg="yellow", err=True)
    else:
        _python_show_warning(message, category, *args, **kwargs)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    with warnings.catch_warnings():  # restores the caller's warning settings afterwards
        # Our warnings are for the person at the terminal: always shown, as one line each.
        warnings.simplefilter("always", AnytimeWarning)
        warnings.showwarning = _show_warning
        _main(argv)


def _main(argv: list[str] | None) -> None:
    try:
        # standalone_mode=False returns ctx.exit()'s code instead of exiting; keep it.
        rv = cli.main(args=argv, prog_name="anytime", standalone_mode=False)
        if isinstance(rv, int) and rv != 0:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AnytimeError as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
