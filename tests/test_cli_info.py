"""`anytime info`: per-exit table, JSON, preset listing, overrides and errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from anytime.cli import cli, main
from anytime.errors import ConfigError
from anytime.models import create, list_models
from anytime.models.costs import exit_costs, exit_params


def _run(*args: str):
    return CliRunner().invoke(cli, ["info", *args])


def test_json_has_raw_per_exit_counts() -> None:
    result = _run("msdnet-cifar100", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["name"] == "msdnet-cifar100"
    exits = data["exits"]
    assert [e["exit"] for e in exits] == list(range(1, 8))
    assert all(isinstance(e["cost"]["macs"], int) and isinstance(e["cost"]["msdnet"], int) for e in exits)
    assert exits[0]["cost"]["msdnet"] / 1e6 == pytest.approx(56.43, rel=0.005)
    assert exits[-1]["cost"]["msdnet"] / 1e6 == pytest.approx(340.64, rel=0.005)
    assert exits[-1]["params"] / 1e6 == pytest.approx(7.36, rel=0.005)
    assert exits[-1]["fraction"] == 1.0


def test_table_lists_every_exit_in_both_conventions() -> None:
    result = _run("msdnet-tiny")
    assert result.exit_code == 0, result.output
    model = create("msdnet-tiny")
    macs, ops, params = exit_costs(model, "macs"), exit_costs(model, "msdnet"), exit_params(model)
    lines = result.output.splitlines()
    assert "4 exits" in lines[0] and "1x28x28" in lines[0]
    assert "MACs" in result.output and "msdnet" in result.output
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    for r, m, o, p in zip(rows, macs, ops, params):
        assert float(r[1]) == pytest.approx(m / 1e6, abs=0.006)
        assert float(r[2]) == pytest.approx(o / 1e6, abs=0.006)
        assert float(r[3]) == pytest.approx(p / 1e6, abs=0.006)
    assert rows[-1][4] == "100.0%"


def test_overrides_reach_the_model() -> None:
    default = json.loads(_run("msdnet-tiny", "--json").output)
    result = _run("msdnet-tiny", "--json", "--num-classes", "7", "--in-channels", "3", "--image-size", "32")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["num_classes"], data["in_channels"], data["image_size"]) == (7, 3, [32, 32])
    expected = exit_costs(create("msdnet-tiny", num_classes=7, in_channels=3, image_size=32), "macs")
    assert [e["cost"]["macs"] for e in data["exits"]] == expected
    assert expected[0] > default["exits"][0]["cost"]["macs"]  # 32x32 costs more than 28x28
    rect = json.loads(_run("msdnet-tiny", "--json", "--image-size", "28x32").output)
    assert rect["image_size"] == [28, 32]


@pytest.mark.parametrize("args", [["--list"], [], ["--list", "--json"]])
def test_list_presets(args: list[str]) -> None:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    if "--json" in args:
        assert json.loads(result.output)["models"] == list_models()
    else:
        for name in list_models():
            assert name in result.output


def test_wildcard_lists_matching_presets() -> None:
    result = _run("sdn-*")
    assert result.exit_code == 0
    assert "sdn-resnet56" in result.output and "msdnet-tiny" not in result.output


def test_unknown_name_suggests_close_matches() -> None:
    result = _run("msdnet-cifar")
    assert isinstance(result.exception, ConfigError)
    assert "msdnet-cifar10" in str(result.exception) and "anytime info --list" in str(result.exception)


@pytest.mark.parametrize(
    "args, message",
    [
        (["msdnet-tiyn"], "Did you mean: msdnet-tiny"),
        (["msdnet-tiny", "--image-size", "big"], "--image-size"),
        (["msdnet-tiny", "--num-classes", "0"], "num_classes"),
        (["nothing-*"], "no model preset matches"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["info", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
