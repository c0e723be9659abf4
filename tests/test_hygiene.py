"""The code's own hygiene, part of the test command so CI and developers run the same checks:
ruff (lint and format), mypy, and the import contracts of pyproject.toml (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[cpu,train,test]'")
    return path


def test_ruff_lint_is_clean():
    result = _run([_tool("ruff"), "check", "anytime", "tests", "benchmarks", "scripts"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = _run([_tool("ruff"), "format", "--check", "anytime", "tests", "benchmarks", "scripts"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = _run([sys.executable, "-m", "mypy"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold():
    """Serving, formats and readers never import torch; the runtime imports nothing from export, training
    or the models (pyproject.toml [tool.importlinter])."""
    result = _run([_tool("lint-imports")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 4, result.stdout


def test_import_contracts_catch_a_violation(tmp_path):
    """The contracts are not vacuous: a runtime module importing torch breaks them."""
    probe = REPO / "anytime" / "runtime" / "_contract_probe.py"
    probe.write_text("import torch  # deliberately forbidden\n")
    try:
        result = _run([_tool("lint-imports"), "--no-cache"])
    finally:
        probe.unlink()
    assert result.returncode != 0 and "anytime.runtime._contract_probe -> torch" in result.stdout, result.stdout
