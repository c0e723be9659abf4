"""`anytime serve` and `anytime calibrate` end to end on folders of real and broken image files."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import broken_image_files
from PIL import Image

from anytime.cli import main

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch

FOLDERS = ["horizontal", "vertical", "checker_board", "disc"]  # "checker/board" cannot be a folder name


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def image_tree(tmp_path, pattern_test_images) -> tuple[Path, dict[str, int], dict[str, str]]:
    """Class-named folders with 24 good images (one RGB) and one broken file of each kind."""
    x, y = pattern_test_images
    root = tmp_path / "images"
    truth = {}
    for i in range(24):
        folder = root / FOLDERS[y[i]]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:02d}.png"
        img = Image.fromarray(x[i, :, :, 0])
        (img.convert("RGB") if i == 0 else img).save(path)
        truth[str(path)] = int(y[i])
    broken_dir = root / "disc"
    broken_dir.mkdir(exist_ok=True)
    broken = broken_image_files(x[30, :, :, 0])
    for name, data in broken.items():
        (broken_dir / name).write_bytes(data)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(broken_dir / "wrong_size.png")
    Image.fromarray(np.zeros((16, 16), np.float32)).save(broken_dir / "float.tiff")  # mode F: what is white?
    (root / "README.txt").write_text("not an image suffix: skipped when walking a directory")
    reasons = {
        "truncated.png": "damaged",
        "empty.png": "empty file",
        "notes.png": "not an image",
        "bomb.png": "decompression bomb",
        "wrong_size.png": "expected 16×16",
        "float.tiff": "mode 'F' is not supported",
    }
    return root, truth, {str(broken_dir / k): v for k, v in reasons.items()}


def test_serve_folder_with_broken_files(pattern_bundle_exact, image_tree, tmp_path, capsys):
    # The bundle without resizing, so that an image of another size is an error row too.
    root, truth, broken = image_tree
    out_path = tmp_path / "preds.jsonl"
    code, out, err = run_cli(
        ["serve", str(pattern_bundle_exact), str(root), "--budget", "50%", "-o", str(out_path), "--batch-size", "8"],
        capsys,
    )
    assert code == 1, (out, err)  # some inputs failed
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == len(truth) + len(broken)
    assert all(list(r) == ["path", "label", "class", "confidence", "exit", "cost", "error"] for r in rows)
    by_path = {r["path"]: r for r in rows}
    for path, reason in broken.items():
        row = by_path[path]
        assert row["error"] is not None and reason in row["error"], (path, row["error"])
        assert row["label"] is None and row["exit"] is None
    correct = 0
    for path, label in truth.items():
        row = by_path[path]
        assert row["error"] is None, row
        assert 1 <= row["exit"] <= 4 and 0 < row["confidence"] <= 1 and row["cost"] > 0
        correct += row["label"] == label
    assert f"{len(truth)} image(s) predicted, {len(broken)} failed" in out
    assert f"accuracy {100 * correct / len(truth):.2f}% on {len(truth)} image(s) in class-named folders" in out
    assert "images/s" in out and "against a budget of" in out and "exits: 1:" in out
    assert "failed" in err


def test_serve_resizes_when_the_bundle_says_so(pattern_bundle, image_tree, tmp_path, capsys):
    root, truth, broken = image_tree
    out_path = tmp_path / "preds.jsonl"
    code, _, _ = run_cli(
        ["serve", str(pattern_bundle), str(root / "disc"), "--budget", "50%", "-o", str(out_path), "-q"], capsys
    )
    assert code == 1
    rows = {Path(r["path"]).name: r for r in map(json.loads, out_path.read_text().splitlines())}
    assert rows["wrong_size.png"]["error"] is None and rows["wrong_size.png"]["exit"] >= 1  # 20×20 resized to 16×16
    assert all(rows[Path(p).name]["error"] for p in broken if not p.endswith("wrong_size.png"))


def test_serve_csv_stdin_and_exit_code_zero(pattern_bundle, image_tree, tmp_path, capsys, monkeypatch):
    root, truth, _ = image_tree
    paths = sorted(truth)[:10]
    out_path = tmp_path / "preds.csv"
    code, out, err = run_cli(
        ["serve", str(pattern_bundle), "-", "--budget", "60%", "-o", str(out_path), "-q"],
        capsys,
        stdin="\n".join(paths) + "\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0, (out, err)
    with open(out_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == paths  # input order is kept
    assert all(r["error"] == "" and r["class"] for r in rows)
    assert "10 image(s) predicted" in out


def test_serve_glob_exit_and_strict(pattern_bundle, image_tree, capsys):
    root, truth, _ = image_tree
    code, out, _ = run_cli(["serve", str(pattern_bundle), str(root / "h*" / "*.png"), "--exit", "1", "-q"], capsys)
    assert code == 0
    n = sum(1 for p in truth if "/horizontal/" in p)
    assert f"{n} image(s) predicted" in out and f"1: {n} (100.0%)" in out
    code, out, _ = run_cli(
        ["serve", str(pattern_bundle), str(root / "vertical"), "--budget", "30%", "--strict", "--policy", "geometric"],
        capsys,
    )
    assert code == 0
    assert "\texit " in out  # per-image lines without -o


def test_serve_rows_on_stdout_are_one_line_per_input(pattern_bundle, image_tree, capsys):
    # Piped into other tools (cut, sort, wc -l), stdout carries the rows alone; the summary goes to stderr.
    root, truth, broken = image_tree
    code, out, err = run_cli(["serve", str(pattern_bundle), str(root), "--budget", "50%"], capsys)
    assert code == 1  # the broken files
    lines = out.splitlines()
    assert len(lines) == len(truth) + len(broken), out
    assert all(line.split("\t")[0] in truth or line.split("\t")[0] in broken for line in lines), out
    failed = sum("\tERROR\t" in line for line in lines)
    assert failed > 0 and f"{len(lines) - failed} image(s) predicted, {failed} failed" in err
    assert "against a budget of" in err and "against a budget of" not in out


def test_serve_missing_input_is_an_error_row(pattern_bundle, image_tree, capsys):
    root, truth, _ = image_tree
    code, out, _ = run_cli(
        ["serve", str(pattern_bundle), str(root / "vertical"), str(root / "nope.png"), "--budget", "50%", "-q"], capsys
    )
    assert code == 1
    assert "1 failed" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "1%"], "feasible budgets are"),
        (["--budget", "fast"], "cannot read budget"),
        ([], "give a compute budget"),
        (["--budget", "50%", "--exit", "2"], "either --budget or --exit"),
        (["--budget", "50%", "-o", "preds.txt"], ".jsonl, .csv or .parquet"),
        (["--budget", "50%", "--workers", "2"], "give it with --ray"),
        (["--budget", "50%", "--ray", "fast"], "not a Ray address"),
        (["--budget", "50%", "--ray", "auto", "--profile", "p.json"], "Ray workers run on others"),
        (["--budget", "50%", "--ray", "auto", "--scheduler", "refill"], "drop --scheduler refill"),
        # serve prices a budget as its executor runs; a --cost-mode it would ignore is refused, not dropped silently
        (["--budget", "50%", "--cost-mode", "full-batches"], "choose the executor with --scheduler"),
        (["--budget", "50%", "--cost-mode", "per-batch"], "choose the executor with --scheduler"),
    ],
)
def test_serve_usage_errors_exit_2(pattern_bundle, image_tree, capsys, argv, message):
    root, _, _ = image_tree
    code, out, err = run_cli(["serve", str(pattern_bundle), str(root / "disc"), *argv], capsys)
    assert code == 2
    assert message in out + err
    assert "Traceback" not in out + err


def test_calibrate_command(pattern_bundle, tmp_path, capsys, image_tree):
    policy_path = tmp_path / "policy.json"
    code, out, _ = run_cli(["calibrate", str(pattern_bundle), "--budget", "45%", "-o", str(policy_path)], capsys)
    assert code == 0
    assert "geometric policy for budget 45%" in out and "search policy for budget 45%" in out
    assert "<- default (best on validation)" in out
    assert "expected accuracy" in out
    saved = json.loads(policy_path.read_text())
    assert saved["method"] in ("geometric", "search") and len(saved["thresholds"]) == 4
    root, _, _ = image_tree
    code, out, _ = run_cli(
        ["serve", str(pattern_bundle), str(root / "vertical"), "--policy", str(policy_path), "-q"], capsys
    )
    assert code == 0 and "against a budget of" in out


@pytest.mark.parametrize(
    "module, argv, extra",
    [
        ("ray", ["--ray"], "anytime[ray]"),
        ("ray", ["--ray", "ray://head:10001", "--workers", "2"], "anytime[ray]"),
        ("pyarrow", ["-o", "preds.parquet"], "anytime[parquet]"),
    ],
)
def test_missing_extra_is_one_line_naming_it(
    pattern_bundle, image_tree, tmp_path, capsys, monkeypatch, module, argv, extra
):
    # A None entry in sys.modules makes `import module` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, module, None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root, _, _ = image_tree
    code, out, err = run_cli(["serve", str(pattern_bundle), str(root / "disc"), "--budget", "50%", *argv], capsys)
    assert code == 2, (out, err)
    assert f"pip install '{extra}'" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err
    assert not list(work.iterdir()), "nothing may be written"


def test_a_failed_run_leaves_no_output_file(pattern_bundle, image_tree, tmp_path, capsys, monkeypatch):
    from anytime.runtime.engine import StageExecutor

    root, _, _ = image_tree
    out_path = tmp_path / "out" / "preds.jsonl"
    out_path.parent.mkdir()
    out_path.write_text("an earlier run's rows\n")
    real = StageExecutor.run_stage
    calls = []

    def fail_on_third_stage_call(self, *args, **kwargs):  # under either scheduler
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the job
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StageExecutor, "run_stage", fail_on_third_stage_call)
    argv = ["serve", str(pattern_bundle), str(root), "--budget", "50%", "--batch-size", "4", "-o", str(out_path), "-q"]
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and len(calls) == 3
    # The earlier file is untouched and no temporary file is left behind.
    assert out_path.read_text() == "an earlier run's rows\n"
    assert [p.name for p in out_path.parent.iterdir()] == ["preds.jsonl"]
    monkeypatch.setattr(StageExecutor, "run_stage", real)
    code, _, _ = run_cli(argv, capsys)
    assert code == 1  # the broken files of the tree
    assert len(out_path.read_text().splitlines()) == 24 + 6
    assert [p.name for p in out_path.parent.iterdir()] == ["preds.jsonl"]


def test_serve_a_jsonl_path_list(pattern_bundle, image_tree, tmp_path, capsys):
    root, truth, broken = image_tree
    listed = sorted(truth)[:10] + sorted(broken)[:2]
    list_path = tmp_path / "inputs.jsonl"
    # Objects with a path key, and bare strings: both name one file per line.
    list_path.write_text(
        "\n".join(json.dumps({"path": p, "id": i} if i % 2 else p) for i, p in enumerate(listed)) + "\n"
    )
    out_path = tmp_path / "preds.csv"
    code, out, _ = run_cli(
        ["serve", str(pattern_bundle), str(list_path), "--budget", "50%", "-o", str(out_path), "-q"], capsys
    )
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(out_path.read_text())))
    assert [r["path"] for r in rows] == listed
    assert sum(r["error"] != "" for r in rows) == 2
    assert "10 image(s) predicted, 2 failed" in out and "on 10 image(s) in class-named folders" in out


@pytest.mark.parametrize("verb", ["serve", "calibrate", "profile"])
def test_an_output_that_cannot_be_created_is_one_line_naming_it(
    pattern_bundle, image_tree, tmp_path, capsys, monkeypatch, verb
):
    from anytime.runtime.model import AnytimeModel

    def never(*args, **kwargs):
        raise AssertionError("profile measured before finding that its output cannot be written")

    monkeypatch.setattr(AnytimeModel, "profile", never)
    root, _, _ = image_tree
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output's directory should be")
    out_path = blocker / {"serve": "preds.jsonl", "calibrate": "policy.json", "profile": "profile.json"}[verb]
    inputs = {
        "serve": [str(root / "vertical"), "-q", "--budget", "50%"],
        "calibrate": ["--budget", "50%"],
        "profile": [],
    }[verb]
    code, out, err = run_cli([verb, str(pattern_bundle), *inputs, "-o", str(out_path)], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    assert f"cannot write '{out_path}'" in err and "is a file, not a directory" in err
    assert blocker.read_text().startswith("a file")


def test_atomic_output_errors_are_output_errors_and_still_os_errors(tmp_path):
    from anytime.errors import OutputError
    from anytime.fileio import atomic_write_text

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory") as info:
        atomic_write_text(tmp_path / "f" / "out.json", "{}")
    assert isinstance(info.value, OSError)  # callers that caught OSError before still do
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="it is a directory"):
        atomic_write_text(tmp_path / "d", "{}")
    assert [p.name for p in (tmp_path / "d").iterdir()] == []  # no temporary file left behind


def test_check_writable_leaves_no_trace_and_keeps_an_existing_file(tmp_path):
    from anytime.errors import OutputError
    from anytime.fileio import check_writable

    check_writable(tmp_path / "new" / "out.json")
    assert [p.name for p in (tmp_path / "new").iterdir()] == []  # no file made, not even a temporary one
    (tmp_path / "old.json").write_text("kept")
    check_writable(tmp_path / "old.json")
    assert (tmp_path / "old.json").read_text() == "kept"
    with pytest.raises(OutputError, match="it is a directory"):
        check_writable(tmp_path / "new")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_calibration_file_is_a_bundle_error(pattern_bundle, image_tree, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(pattern_bundle, broken)
    data = (broken / "calibration.npz").read_bytes()
    (broken / "calibration.npz").write_bytes(data[: len(data) // 3] if damage == "truncated" else b"")
    root, _, _ = image_tree
    code, out, err = run_cli(["serve", str(broken), str(root / "vertical"), "--budget", "50%", "-q"], capsys)
    # An empty file made numpy raise EOFError, which click turned into "Aborted." (exit 130).
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and "Aborted" not in err
    assert "calibration file" in err and "re-export the bundle" in err
    # A fixed exit needs no calibration data: it still answers.
    code, out, err = run_cli(["serve", str(broken), str(root / "vertical"), "--exit", "2", "-q"], capsys)
    assert code == 0, (out, err)


def test_a_path_list_or_policy_file_that_is_not_utf8_is_one_line(pattern_bundle, image_tree, tmp_path, capsys):
    root, _, _ = image_tree
    listing = tmp_path / "paths.jsonl"
    listing.write_bytes(b'{"path": "' + str(root / "vertical").encode() + b'"}\n\xff\xfe{"path": "x.png"}\n')
    code, out, err = run_cli(["serve", str(pattern_bundle), str(listing), "--budget", "50%", "-q"], capsys)
    assert code == 2 and "Traceback" not in out + err, (out, err)
    assert "paths.jsonl: not UTF-8 text" in err
    policy = tmp_path / "policy.json"
    policy.write_bytes(b"\xff\xfe{}")
    code, out, err = run_cli(["serve", str(pattern_bundle), str(root / "vertical"), "--policy", str(policy)], capsys)
    assert code == 2 and "Traceback" not in out + err, (out, err)
    assert "cannot read exit policy" in err


def test_a_bundle_without_its_manifest_is_not_taken_for_a_folder_of_images(
    pattern_bundle, image_tree, tmp_path, capsys
):
    import shutil

    partial = tmp_path / "bundle"
    shutil.copytree(pattern_bundle, partial)
    (partial / "manifest.json").unlink()
    root, _, _ = image_tree
    # It was read as a folder with no images, and the embedded default model answered the other inputs.
    code, out, err = run_cli(["serve", str(partial), str(root / "vertical"), "--budget", "50%", "-q"], capsys)
    assert code == 2, (out, err)
    assert "looks like a bundle but has no manifest.json" in err and "image(s) predicted" not in out
