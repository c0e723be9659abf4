"""`anytime info`: the per-exit cost and parameter table of a model preset."""

from __future__ import annotations

import json

import click

from anytime.errors import ConfigError


def _parse_image_size(value: str | None) -> int | tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ConfigError(f"--image-size must be a positive size like 32 or 28x28 (height x width), got {value!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _preset_lines(pattern: str) -> list[str]:
    from anytime.models.registry import list_models, model_description

    lines = []
    names = list_models(pattern)
    if not names:
        raise ConfigError(f"no model preset matches {pattern!r}; run `anytime info --list` for all of them")
    width = max(len(n) for n in names)
    for name in names:
        lines.append(f"  {name:<{width}}  {model_description(name)}")
    return lines


@click.command("info")
@click.argument("name", required=False)
@click.option("--list", "list_presets", is_flag=True, help="List the registered model presets.")
@click.option("--num-classes", type=int, default=None, help="Override the preset's number of classes.")
@click.option("--in-channels", type=int, default=None, help="Override the preset's input channels (1 = grey).")
@click.option("--image-size", default=None, metavar="N|HxW", help="Override the preset's input size, e.g. 32 or 28x28.")
@click.option("--json", "as_json", is_flag=True, help="Print raw per-exit counts as JSON.")
def info(
    name: str | None,
    list_presets: bool,
    num_classes: int | None,
    in_channels: int | None,
    image_size: str | None,
    as_json: bool,
) -> None:
    """Per-exit cumulative cost and parameters of model preset NAME.

    The cost of exit k counts everything run to answer there (stages and heads 1..k), per image, in two
    conventions: `macs` (conv + linear multiply-accumulates, PyTorch's FlopCounterMode) and `msdnet`
    (the published MSDNet convention: MACs + 1 op per ReLU output and per pooling-window element).

    \b
    Examples:
      anytime info --list
      anytime info 'sdn-*'
      anytime info msdnet-cifar100
      anytime info msdnet-tiny --image-size 32 --in-channels 3 --json
    """
    from anytime.models.costs import cost_table
    from anytime.models.registry import create, list_models

    if list_presets or name is None or any(c in name for c in "*?["):
        pattern = name if name is not None else "*"
        if as_json:
            click.echo(json.dumps({"models": list_models(pattern)}))
        else:
            lines = _preset_lines(pattern)
            click.echo("Model presets (anytime info NAME for the per-exit table):")
            click.echo("\n".join(lines))
        return

    model = create(name, num_classes=num_classes, in_channels=in_channels, image_size=_parse_image_size(image_size))
    rows = cost_table(model)
    spec = model.spec
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": name,
                    "num_classes": spec.num_classes,
                    "in_channels": spec.in_channels,
                    "image_size": list(spec.image_size),
                    "cost_unit": "operations per image, cumulative",
                    "exits": [
                        {"exit": r["exit"], "cost": r["cost"], "params": r["params"], "fraction": r["fraction"]}
                        for r in rows
                    ],
                },
                indent=2,
            )
        )
        return

    h, w = spec.image_size
    click.echo(f"{name}: {model.num_exits} exits, {spec.num_classes} classes, input {spec.in_channels}x{h}x{w}")
    click.echo("cumulative per image: stages and heads 1..k")
    header = f"{'exit':>4}  {'MACs (M)':>10}  {'msdnet ops (M)':>14}  {'params (M)':>10}  {'of full (MACs)':>14}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(
            f"{r['exit']:>4}  {r['cost']['macs'] / 1e6:>10.2f}  {r['cost']['msdnet'] / 1e6:>14.2f}  "
            f"{r['params'] / 1e6:>10.2f}  {100 * r['fraction']:>13.1f}%"
        )
