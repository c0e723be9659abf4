"""`anytime eval`: anytime table, budget curves fitted on validation and measured on a split, reports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PATTERN_CLASSES, make_pattern_images

from anytime.cli import cli
from anytime.errors import DatasetError
from anytime.runtime.evaluation import budget_grid, evaluate

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch


@pytest.fixture(scope="module")
def pattern_npz(tmp_path_factory, pattern_test_images) -> str:
    x_test, y_test = pattern_test_images
    x_train, y_train = make_pattern_images(64, seed=7)
    path = tmp_path_factory.mktemp("data") / "patterns.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(PATTERN_CLASSES))
    return f"npz:{path}"


def test_anytime_table_matches_every_exit_run_directly(pattern_bundle, pattern_npz, pattern_test_images):
    import anytime

    report = evaluate(pattern_bundle, pattern_npz, split="test", points=6)
    m = report.models[0]
    x, y = pattern_test_images
    logits = anytime.load(pattern_bundle).run_all_exits(x)
    expected = (logits.argmax(axis=2) == y[None]).mean(axis=1)
    assert [e.exit for e in m.exits] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.top1 for e in m.exits], expected, atol=1e-12)
    assert all(e.top5 is None for e in m.exits)  # 4 classes: no top-5
    costs = [e.cost for e in m.exits]
    assert costs == sorted(costs) and m.exits[-1].fraction == pytest.approx(1.0)
    assert m.count == len(y)


def test_budget_curve_spans_first_exit_to_full_and_tracks_the_budget(pattern_bundle, pattern_npz):
    m = evaluate(pattern_bundle, pattern_npz, points=8).models[0]
    for policy in ("geometric", "search"):
        pts = m.points(policy)
        budgets = [p.budget for p in pts]
        assert budgets[0] == pytest.approx(m.exits[0].cost) and budgets[-1] == pytest.approx(m.exits[-1].cost)
        for p in pts:
            # fitted on validation: the expected cost respects the budget there
            assert p.val_cost <= p.budget * (1 + 1e-9)
            assert sum(p.exit_fractions) == pytest.approx(1.0)
            # measured on test: realised cost is the exit mix priced by the exit costs
            assert p.cost == pytest.approx(sum(f * e.cost for f, e in zip(p.exit_fractions, m.exits)))
        assert pts[-1].accuracy >= pts[0].accuracy
    assert {round(p.budget_fraction, 6) for p in m.points("search")} >= {0.5, 0.75}


def test_budget_grid_includes_summary_fractions():
    grid = budget_grid(np.array([10.0, 40.0, 100.0]), 3)
    assert grid[0] == 10 and grid[-1] == 100 and 25.0 in grid and 50.0 in grid and 75.0 in grid


def test_cli_writes_tables_curves_and_plots_and_overlays_models(pattern_bundle, pattern_npz, tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(
        cli,
        [
            "eval",
            str(pattern_bundle),
            str(pattern_bundle),
            "--data",
            pattern_npz,
            "--points",
            "5",
            "-o",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "budgeted" in res.output and "top-1" in res.output
    report = json.loads((out / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert len(names) == 2 and len(set(names)) == 2  # same bundle twice still gets two labelled curves
    rows = list(csv.DictReader((out / "budget_curve.csv").read_text().splitlines()))
    assert {r["policy"] for r in rows} == {"geometric", "search"}
    assert len(list(csv.DictReader((out / "anytime.csv").read_text().splitlines()))) == 8
    for png in ("accuracy_vs_cost.png", "exit_histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_count_mismatch_is_a_clear_error(pattern_bundle, tmp_path):
    path = tmp_path / "ten.npz"
    x = np.zeros((20, 16, 16, 1), np.uint8)
    y = np.arange(20) % 10
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DatasetError, match="10 classes"):
        evaluate(pattern_bundle, f"npz:{path}")


def test_a_class_count_mismatch_of_a_later_model_is_found_before_any_is_evaluated(
    pattern_bundle, pattern_npz, monkeypatch
):
    import anytime.runtime.evaluation as evaluation
    from anytime.formats.bundle import resolve_bundle_path

    default = resolve_bundle_path(None)  # 10 classes; the pattern data has fewer
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate_model", lambda *a, **k: evaluated.append(a))
    with pytest.raises(DatasetError, match=f"classes but the model {default} has 10"):
        evaluate([pattern_bundle, default], pattern_npz)
    assert evaluated == []


def test_not_a_model_directory_is_a_clear_error(tmp_path, pattern_npz):
    res = CliRunner().invoke(cli, ["eval", str(tmp_path), "--data", pattern_npz])
    assert res.exit_code != 0
    assert "neither a bundle" in (res.output + str(res.exception))


def test_dataset_classes_in_another_order_are_matched_by_name(
    pattern_bundle, pattern_npz, pattern_test_images, tmp_path
):
    """An image folder lists its classes sorted by name, which need not be the model's order: labels are the
    model's indices of the same class names (as serve's class-named folders are), not the dataset's."""
    x, y = pattern_test_images
    order = [2, 3, 0, 1]  # the dataset's class i is the model's class order[i]
    names = [PATTERN_CLASSES[k].replace("/", "_") for k in order]  # "checker_board": folder-style, matched loosely
    relabel = np.argsort(order)[y]  # the same images, labelled in the dataset's own order
    path = tmp_path / "shuffled.npz"
    np.savez(path, x_train=x, y_train=relabel, x_test=x, y_test=relabel, classes=np.array(names))
    expected = evaluate(pattern_bundle, pattern_npz, points=4).models[0]
    got = evaluate(pattern_bundle, f"npz:{path}", points=4).models[0]
    assert [e.top1 for e in got.exits] == [e.top1 for e in expected.exits]
    assert [p.accuracy for p in got.curve] == [p.accuracy for p in expected.curve]


def test_an_empty_split_is_a_clear_error(pattern_bundle, tmp_path):
    x, y = make_pattern_images(20, seed=5)
    path = tmp_path / "empty-test.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0], classes=np.array(PATTERN_CLASSES))
    with pytest.raises(DatasetError, match="'test' split of .* has no images"):
        evaluate(pattern_bundle, f"npz:{path}")
    res = CliRunner().invoke(cli, ["eval", str(pattern_bundle), "--data", f"npz:{path}", "-q"])
    assert res.exit_code != 0 and isinstance(res.exception, DatasetError)


def test_an_output_directory_that_cannot_be_made_is_a_clear_error_before_the_work(
    pattern_bundle, pattern_npz, tmp_path, monkeypatch
):
    from anytime.errors import OutputError
    from anytime.runtime import evaluation

    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "report"
    report = evaluate(pattern_bundle, pattern_npz, points=3)
    with pytest.raises(OutputError, match="is a file, not a directory"):
        report.save(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated although the report could not be written")

    monkeypatch.setattr(evaluation, "evaluate", must_not_run)
    res = CliRunner().invoke(cli, ["eval", str(pattern_bundle), "--data", pattern_npz, "-o", str(out), "-q"])
    assert res.exit_code != 0 and isinstance(res.exception, OutputError), res.output
    assert "is a file, not a directory" in str(res.exception)


@pytest.mark.parametrize("how", ["--no-plots", "no matplotlib"])
def test_a_report_without_plots_leaves_no_plots_of_an_earlier_report(pattern_bundle, pattern_npz, tmp_path, how):
    """The directory is the report: the PNGs of an earlier report there would show other numbers than its CSVs."""
    import sys

    out = tmp_path / "report"
    evaluate(pattern_bundle, pattern_npz, points=3).save(out)
    assert (out / "accuracy_vs_cost.png").exists() and (out / "exit_histogram.png").exists()
    report = evaluate([pattern_bundle, pattern_bundle], pattern_npz, points=3)
    if how == "--no-plots":
        written = report.save(out, plots=False)
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
            written = report.save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert not any(p.suffix == ".png" for p in out.iterdir())


def test_models_counting_cost_differently_are_overlaid_as_fractions_of_their_full_networks(
    pattern_bundle, pattern_npz, tmp_path, monkeypatch
):
    """One axis in M macs for a model priced in MSDNet's convention (or in time) would misstate its cost."""
    pytest.importorskip("matplotlib")
    from anytime.runtime import reports

    report = evaluate([pattern_bundle, pattern_bundle], pattern_npz, points=3)
    report.models[1].cost_convention = "msdnet"  # as a bundle exported with --cost-convention msdnet
    for e in report.models[1].exits:
        e.cost *= 2.0
    for p in report.models[1].curve:
        p.cost *= 2.0
    drawn = {}

    def keep(fig, path):
        drawn[path.name] = fig.axes[0]
        return path

    monkeypatch.setattr(reports, "_save_figure", keep)
    reports.plot_report(report, tmp_path)
    ax = drawn["accuracy_vs_cost.png"]
    assert "% of each model's full network" in ax.get_xlabel() and "macs, msdnet" in ax.get_xlabel()
    exits = [line for line in ax.get_lines() if line.get_label().endswith("single exits")]
    for line, m in zip(exits, report.models):
        np.testing.assert_allclose(line.get_xdata(), [100 * e.fraction for e in m.exits])
