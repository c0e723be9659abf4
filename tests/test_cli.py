"""The CLI layer as a whole: one module per verb, option names and defaults tied to the Python API."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from anytime.cli import COMMANDS, cli
from anytime.cli._options import MISSING, ApiOption, api_default

REPO = Path(__file__).resolve().parents[1]
WRITERS = ["train", "export", "calibrate", "serve", "eval"]


def _command(verb: str) -> click.Command:
    module, attr, _ = COMMANDS[verb]
    return getattr(importlib.import_module(module), attr)


def _option(verb: str, name: str) -> click.Option:
    return next(p for p in _command(verb).params if isinstance(p, click.Option) and name in p.opts + p.secondary_opts)


@pytest.mark.parametrize("verb", list(COMMANDS))
def test_api_options_default_to_none_and_name_a_real_api_parameter(verb):
    for param in _command(verb).params:
        if not isinstance(param, ApiOption):
            continue
        assert param.default is None, f"{verb} {param.opts}: the default belongs in the API, not in click"
        api_default(param.api, param.api_name)  # raises LookupError for a parameter the API does not have


@pytest.mark.parametrize(
    "verb, option, expected",
    [
        ("train", "--batch-size", "[default: 64]"),
        ("train", "--milestones", "[default: 0.5,0.75]"),
        ("train", "--augment", "[default: augment]"),
        ("train", "--method", "[default: joint]"),
        ("export", "--opset", "[default: 17]"),
        ("export", "--atol", "[default: 0.0001]"),
        ("serve", "--batch-size", "[default: 64]"),
        ("serve", "--policy", "[default: best]"),
        ("calibrate", "--policy", "[default: best]"),
        ("eval", "--points", "[default: 15]"),
        ("eval", "--device", "[default: auto]"),
    ],
)
def test_help_shows_the_api_default(verb, option, expected):
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert expected in flat
    command = _command(verb)
    _, text = _option(verb, option).get_help_record(click.Context(command))
    assert text.endswith(expected), text


def test_help_defaults_follow_the_api():
    from anytime.export.onnx_stages import DEFAULT_OPSET
    from anytime.runtime.model import AnytimeModel
    from anytime.training.config import TrainConfig

    assert api_default("anytime.training.config:TrainConfig", "lr") == TrainConfig.__dataclass_fields__["lr"].default
    assert _option("export", "--opset").api_default() == DEFAULT_OPSET
    import inspect

    assert (
        _option("serve", "--batch-size").api_default()
        == inspect.signature(AnytimeModel.predict_batches).parameters["batch_size"].default
    )
    assert _option("train", "--val-size").api_default() is None  # no default shown: the data set decides
    assert ApiOption(["--x"]).api_default() is MISSING


@pytest.mark.parametrize("verb", WRITERS)
def test_every_writing_verb_takes_dash_o_output(verb):
    option = _option(verb, "--output")
    assert "-o" in option.opts and option.name == "output"


@pytest.mark.parametrize("verb", ["train", "export"])
def test_old_out_is_a_hidden_alias(verb):
    option = _option(verb, "--out")
    assert option.hidden
    res = CliRunner().invoke(cli, [verb, "--help"])
    assert not re.search(r"--out\b", res.output)


def test_old_out_still_exports(tmp_path):
    from test_export import make_run  # the export tests' tiny trained run

    run = make_run(tmp_path, "test-convnet", size=16, channels=3, n_train=48, val_size=12)
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "b"), "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "manifest.json").is_file()
    assert "--out is deprecated; use -o/--output" in res.output
    both = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "c"), "-o", str(tmp_path / "d")])
    assert both.exit_code == 2 and "give -o/--output once" in both.output


def test_old_out_reaches_train_output_too(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert res.exit_code == 2 and "give -o/--output once" in res.output


def test_output_is_required_with_a_one_line_fix(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--arch", "test-convnet", "--data", "npz:x.npz", "--epochs", "1"])
    assert res.exit_code == 2 and "missing -o/--output" in res.output


def test_verb_modules_import_no_torch():
    modules = sorted({m for m, _, _ in COMMANDS.values()})
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from anytime.cli import cli\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('anytime'))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_group_help_imports_no_torch():
    code = (
        "import sys\nfrom anytime.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\nprint('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_python_dash_m_anytime_runs_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "anytime", "info", "--list"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "msdnet-tiny" in done.stdout, done.stdout + done.stderr


def test_old_command_modules_are_gone():
    for old in (
        "anytime.models.commands",
        "anytime.training.commands",
        "anytime.training.routes_command",
        "anytime.export.commands",
        "anytime.runtime.commands",
    ):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def test_eval_exports_a_run_directory_explicitly_to_a_temporary_bundle(tmp_path):
    import json

    from test_export import make_run

    from anytime.errors import ConfigError
    from anytime.runtime.evaluation import evaluate

    run = make_run(tmp_path, "test-convnet", size=16, channels=3, n_train=48, val_size=12)
    data = f"npz:{tmp_path / 'data.npz'}"
    # The runtime evaluates bundles only; it names the fix for a run directory.
    with pytest.raises(ConfigError, match="training run directory.*anytime export"):
        evaluate(run, data)
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, ["eval", str(run), "--data", data, "--points", "3", "--no-plots", "-o", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "exporting run" in res.output and "temporary bundle" in res.output
    assert not (run / "bundle").exists()  # nothing hidden is written into the run directory any more
    model = json.loads((out / "report.json").read_text())["models"][0]
    assert model["bundle"] == str(run) and model["name"].startswith("run")
    assert not list(out.glob("*.png"))


def test_eval_of_a_run_directory_with_a_latency_profile_names_the_fix_before_exporting(tmp_path, monkeypatch):
    """A profile is measured for one bundle, and every export of a run is another bundle (its manifest is dated): the
    temporary bundle could never match, and the error named that temporary directory, gone by then."""
    from test_export import make_run

    import anytime.cli.eval as eval_cli

    run = make_run(tmp_path, "test-convnet", size=16, channels=3, n_train=48, val_size=12)
    (tmp_path / "profile.json").write_text("{}")

    def no_export(*args, **kwargs):
        raise AssertionError("exported although the profile cannot fit the temporary bundle")

    monkeypatch.setattr(eval_cli, "_export_run", no_export)
    res = CliRunner().invoke(
        cli, ["eval", str(run), "--data", f"npz:{tmp_path / 'data.npz'}", "--profile", str(tmp_path / "profile.json")]
    )
    assert res.exit_code == 2, res.output + repr(res.exception)
    assert f"anytime export {run} -o BUNDLE_DIR" in res.output and "anytime profile BUNDLE_DIR" in res.output
