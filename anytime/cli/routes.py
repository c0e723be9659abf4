"""`anytime routes RUN_DIR`: how similar the exits' learned routes are (DR-MGF importance variables)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("routes")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def routes(run_dir: Path, as_json: bool) -> None:
    """Per-exit route similarity of a DR-MGF run (cosine of the importance variables).

    \b
    Example:
      anytime routes runs/fm
      anytime routes runs/fm --json > routes.json
    """
    from anytime.training.routes import format_report, load_routes

    report = load_routes(run_dir)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
