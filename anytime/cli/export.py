"""`anytime export`: write a validated bundle, or `--check` an existing one.

Options map one-for-one to `anytime.export.export_bundle` keyword arguments (`-o/--output` is its
`out`), and their defaults live there. torch is imported only when exporting, so `anytime export --check` runs on a machine with the runtime alone.
"""

from __future__ import annotations

from pathlib import Path

import click

from anytime.cli._options import EXPORT_BUNDLE, api_option, given, output_option
from anytime.errors import BundleError, ConfigError

EXPORTERS = ("torchscript", "dynamo")  # as anytime.export.onnx_stages.EXPORTERS, without importing torch

EPILOG = """\b
Examples:
  anytime export runs/fm -o bundles/fm
  anytime export runs/fm -o bundles/fm --full-exits --force
  anytime export runs/fm -o bundles/fm --data npz:/new/place/fashion-mnist.npz
  anytime export --check bundles/fm
"""


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _print_check(check) -> None:
    click.secho("  " + check.line(), fg=None if check.ok else "red")


def _run_check(bundle: Path) -> None:
    from anytime.formats.bundle import MANIFEST_FILE, check_bundle, read_manifest

    if bundle.is_file() and bundle.name == MANIFEST_FILE:
        bundle = bundle.parent  # the manifest names its bundle, as anytime.load takes it
    if not bundle.is_dir():
        what = "is a file, not a bundle directory" if bundle.exists() else "does not exist"
        raise BundleError(f"bundle directory {bundle} {what}; give the -o/--output directory of `anytime export`")
    problems = check_bundle(bundle)
    if problems:
        for p in problems:
            click.secho(f"  ✗ {p}", fg="red")
        raise BundleError(
            f"bundle {bundle} has {len(problems)} problem(s) (listed above); re-export it with "
            f"`anytime export RUN_DIR -o {bundle} --force`"
        )
    manifest = read_manifest(bundle)
    files = [s["file"] for s in manifest["stages"]] + [e["file"] for e in manifest.get("full_exits", [])]
    click.echo(
        f"  ✓ manifest: format {manifest['format']} v{manifest['format_version']}, {manifest['arch']}, "
        f"{len(manifest['stages'])} stages"
    )
    click.echo(f"  ✓ {len(files)} graph(s) match their sha256 and pass the checker")
    click.echo(f"  ✓ {manifest['calibration']['file']}: {manifest['calibration']['count']} validation images")
    click.echo(f"Bundle {bundle} is sound.")


@click.command("export", epilog=EPILOG)
@click.argument("run_dir", type=click.Path(path_type=Path), metavar="RUN_DIR")
@output_option(
    "Directory to write the bundle to (written atomically).",
    type=click.Path(path_type=Path),
    metavar="BUNDLE_DIR",
    deprecated_out=True,
)
@click.option(
    "--check",
    is_flag=True,
    help="Re-verify the bundle given in place of RUN_DIR (manifest schema, file hashes, graphs) instead of exporting.",
)
@api_option("--opset", type=int, api="anytime.export.onnx_stages:DEFAULT_OPSET", constant=True, help="ONNX opset.")
@api_option(
    "--full-exits", is_flag=True, api=EXPORT_BUNDLE, help="Also write exit_k.onnx: image -> logits of exit k, per exit."
)
@api_option(
    "--data",
    metavar="KIND:PATH",
    api=EXPORT_BUNDLE,
    help="Dataset to take the validation images from (default: the run's config.json).",
)
@api_option(
    "--split",
    type=click.Path(path_type=Path),
    api=EXPORT_BUNDLE,
    help="Validation split record (default: the run's split.json).",
)
@api_option("--force", is_flag=True, api=EXPORT_BUNDLE, help="Replace an existing bundle at -o/--output.")
@api_option(
    "--atol", type=float, api=EXPORT_BUNDLE, help="Largest allowed |ONNX Runtime - PyTorch| difference of any logit."
)
@api_option(
    "--rtol",
    type=float,
    api=EXPORT_BUNDLE,
    help="Also allow rtol x the largest |logit| of the image, for models with very large logits.",
)
@api_option("--exporter", type=click.Choice(EXPORTERS), api=EXPORT_BUNDLE, help="torch.onnx exporter.")
@api_option(
    "--cost-convention",
    type=click.Choice(["macs", "msdnet"]),
    api=EXPORT_BUNDLE,
    help="Convention the bundle's budgets are expressed in.",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
def export(run_dir: Path, output: Path | None, check: bool, quiet: bool, **options) -> None:
    """Export RUN_DIR as an ONNX bundle for `anytime serve` (or --check a bundle)."""
    if check:
        if output is not None:
            raise ConfigError(
                "--check verifies an existing bundle and takes no -o/--output; run `anytime export --check BUNDLE_DIR`"
            )
        _run_check(run_dir)
        return
    if output is None:
        raise ConfigError(
            f"missing -o/--output BUNDLE_DIR: where to write the bundle of {run_dir} (e.g. -o bundles/{run_dir.name})"
        )
    from anytime.export.bundle import export_bundle

    result = export_bundle(
        run_dir, output, report=None if quiet else _print_check, progress=False if quiet else None, **given(**options)
    )
    m = result.manifest
    conv = m["cost_convention"]
    click.echo(f"Export complete ({result.seconds:.1f} s)")
    click.echo(
        f"Bundle:  {result.bundle_dir} ({_size(result.size_bytes)}: {len(m['stages'])} stage graphs"
        + (f", {len(m['full_exits'])} full-exit graphs" if m["full_exits"] else "")
        + f", calibration on {m['calibration']['count']} validation images)"
    )
    click.echo(
        f"Weights: {_size(result.weight_bytes)} in the stage graphs = {result.weight_ratio:.2f} x "
        f"{result.param_count:,} parameters x 4 bytes"
    )
    if not quiet:
        click.echo(f"  exit  cost ({conv}, cumulative)  val acc")
        for st in m["stages"]:
            click.echo(f"  {st['index'] + 1:>4}  {st['cost'][conv]:>24,}  {st['val_accuracy']:7.2%}")
    click.echo("Next:")
    click.echo(f"  anytime calibrate {result.bundle_dir} --budget 50%")
    click.echo(f"  anytime serve {result.bundle_dir} IMAGES --budget 50% -o predictions.jsonl")
