"""The README's promises: its two set-up commands, and its Python example, actually work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DEFAULT_BUNDLE = REPO / "anytime" / "assets" / "default" / "manifest.json"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _setup_commands() -> tuple[str, str]:
    one_liners = [b.strip() for b in _bash_blocks() if b.strip().startswith("python3 -m venv")]
    assert len(one_liners) == 2, "README must give exactly two set-up commands (main job, tests)"
    return one_liners[0], one_liners[1]


def test_ci_runs_exactly_the_readme_commands():
    main_job, tests = _setup_commands()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    # The test set-up word for word after its venv step, and the main job word for word.
    assert tests.split("&&", 2)[-1].strip() in ci, f"{tests!r} not in .ci/run"
    assert main_job.replace(".venv", ".ci-serve-venv") in ci, f"{main_job!r} not in .ci/run"
    # The test set-up installs the CPU torch first; the main job (serving) installs no torch at all.
    assert 'pip install torch==2.13.0 && pip install -e ".[cpu,train,test,ray]"' in tests
    assert "torch" not in main_job and 'pip install -e ".[cpu]"' in main_job


def _run_anytime(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "anytime.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_main_job_serves_the_sample_images_with_the_embedded_model(tmp_path):
    assert DEFAULT_BUNDLE.is_file(), "the embedded default bundle must ship in anytime/assets/default"
    main_job, _ = _setup_commands()
    command = main_job.split("&&")[-1].split()
    assert command[:2] == ["anytime", "serve"] and "--budget" in command
    proc = _run_anytime(command[1:], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert re.search(r"\b100 image\(s\) predicted", out), out
    assert "accuracy" in out and "budget" in out
    accuracy = float(re.search(r"accuracy[^0-9]*([0-9.]+)%", out).group(1))
    assert accuracy > 70.0, out  # the shipped model really classifies Fashion-MNIST


def test_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    preds = namespace["preds"]
    assert preds.images == 100 and preds.failed == 0
    assert preds.average_cost <= namespace["model"].full_cost
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 100


def test_serve_without_any_argument_uses_the_embedded_model_and_samples(tmp_path):
    proc = _run_anytime(["serve", "--budget", "70%", "-q", "-o", "p.csv"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = (tmp_path / "p.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[:3] == ["path", "label", "class"] and len(rows) == 101


@pytest.mark.parametrize("verb", ["info", "train", "routes", "export", "calibrate", "serve", "eval"])
def test_every_verb_has_help(verb):
    from click.testing import CliRunner

    from anytime.cli import cli

    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output
