"""`anytime serve --ray` and `anytime.ray.predict_dataset` on a local Ray cluster of 2 CPUs.

The cluster is started once for the module and stopped after it. What is checked: the rows equal the
single-process rows for the same inputs, budget and policy; unreadable files give error rows; a worker
killed in the middle of a job costs no row and duplicates none; a failed job leaves no output file.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import broken_image_files
from PIL import Image
from test_runtime_serve import run_cli  # the serve tests' CLI runner

# Not a runtime test: the serving environment of .ci/run has no ray; the test environment installs the
# [ray] extra (README test command), so this runs there.
ray = pytest.importorskip("ray", reason="needs the [ray] extra: pip install -e '.[ray]'")

import anytime.ray as on_ray  # noqa: E402
from anytime.errors import ConfigError  # noqa: E402
from anytime.runtime.model import load  # noqa: E402

pytestmark = [
    # Ray's own deprecation notes (its internals call APIs it is phasing out); nothing of ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

FOLDERS = ["horizontal", "vertical", "checker_board", "disc"]

# The worker classes below live in this module, which Ray's worker processes cannot import: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        logging_level="WARNING",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, pattern_test_images) -> tuple[Path, dict[str, int], list[str]]:
    """70 images in class-named folders and one broken file of each kind (so 2 batches of 64, 3 blocks)."""
    x, y = pattern_test_images
    root = tmp_path_factory.mktemp("ray-images")
    truth = {}
    for i in range(70):
        folder = root / FOLDERS[y[i]]
        folder.mkdir(exist_ok=True)
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(x[i, :, :, 0]).save(path)
        truth[str(path)] = int(y[i])
    broken = broken_image_files(x[99, :, :, 0])
    for name, data in broken.items():
        (root / "disc" / name).write_bytes(data)
    return root, truth, [str(root / "disc" / n) for n in broken]


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary_lines(out: str) -> list[str]:
    """The summary without its timing (images/s differ between runs), and without Ray's own notices: the
    raylet's "(raylet) A worker died ..." about a worker an earlier test killed reaches the driver's stdout
    whenever Ray delivers it, also during a later test (seen under load)."""
    lines = [line for line in out.splitlines() if not line.startswith("rows written") and "(raylet)" not in line]
    return [line.split(" in ")[0] if "predicted" in line else line for line in lines]


def test_serve_on_ray_gives_the_single_process_rows(cluster, pattern_bundle, image_tree, tmp_path, capsys):
    root, truth, broken = image_tree
    common = ["serve", str(pattern_bundle), str(root), "--budget", "45%", "-q"]
    code, single_out, _ = run_cli([*common, "-o", str(tmp_path / "single.jsonl")], capsys)
    assert code == 1  # the broken files
    code, ray_out, err = run_cli([*common, "-o", str(tmp_path / "ray.jsonl"), "--ray", "--workers", "2"], capsys)
    assert code == 1, err
    single, on_ray_rows = read_rows(tmp_path / "single.jsonl"), read_rows(tmp_path / "ray.jsonl")
    assert on_ray_rows == single  # same rows, same order, bit for bit
    assert len(single) == len(truth) + len(broken)
    errors = {r["path"]: r["error"] for r in on_ray_rows if r["error"] is not None}
    assert sorted(errors) == sorted(broken)
    for path, reason in zip(broken, ["damaged", "empty file", "not an image", "decompression bomb"]):
        assert reason in errors[path], errors[path]
    assert summary_lines(ray_out) == summary_lines(single_out)
    assert f"{len(truth)} image(s) predicted, {len(broken)} failed" in ray_out and "accuracy" in ray_out
    assert len({r["exit"] for r in single if r["error"] is None}) > 1  # the budget really sends some on


def test_ray_notices_during_a_stream_stay_off_the_rows_on_stdout(
    cluster, pattern_bundle, image_tree, capsys, monkeypatch
):
    # The driver prints the cluster's error notices with this very function, from its own thread, on
    # whatever sys.stdout is when they arrive; rows printed on stdout are a pipe's input.
    from ray._private.worker import print_to_stdstream

    root, truth, broken = image_tree
    stream_predictions = on_ray.stream_predictions

    def noisy_stream(*args, **kwargs):
        for part in stream_predictions(*args, **kwargs):
            print_to_stdstream(
                {"lines": ["A worker died or was killed while executing a task."], "pid": "raylet", "is_err": False},
                ignore_prefix=False,
            )
            yield part

    monkeypatch.setattr(on_ray, "stream_predictions", noisy_stream)
    code, out, err = run_cli(["serve", str(pattern_bundle), str(root), "--budget", "45%", "--ray"], capsys)
    assert code == 1, err  # the broken files
    lines = out.splitlines()
    assert len(lines) == len(truth) + len(broken)
    assert sorted(line.split("\t")[0] for line in lines) == sorted([*truth, *broken])
    assert all(len(line.split("\t")) in (3, 4) for line in lines), out
    assert "(raylet)" in err and "A worker died or was killed" in err


def test_parquet_path_list_in_parquet_rows_out(cluster, pattern_bundle, image_tree, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, truth, broken = image_tree
    listed = sorted(truth)[::3] + broken[:1] + [str(root / "missing.png")]
    pq.write_table(pa.table({"id": list(range(len(listed))), "path": listed}), tmp_path / "inputs.parquet")
    args = [str(pattern_bundle), str(tmp_path / "inputs.parquet"), "--budget", "60%", "-q"]
    code, single_out, _ = run_cli(["serve", *args, "-o", str(tmp_path / "single.csv")], capsys)
    assert code == 1
    code, ray_out, err = run_cli(["serve", *args, "-o", str(tmp_path / "ray.parquet"), "--ray", "auto"], capsys)
    assert code == 1, err
    rows = read_rows(tmp_path / "ray.parquet")
    assert [r["path"] for r in rows] == listed
    assert "file not found" in rows[-1]["error"] and rows[-1]["label"] is None
    assert summary_lines(ray_out) == summary_lines(single_out)
    assert rows == on_ray_rows_of(read_single_csv(tmp_path / "single.csv"))


def read_single_csv(path: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(io.StringIO(path.read_text())))


def on_ray_rows_of(csv_rows: list[dict]) -> list[dict]:
    """CSV rows typed as the Parquet rows are (empty cell: None)."""
    kinds = {"label": int, "exit": int, "confidence": float, "cost": float}
    return [{k: (None if v == "" else kinds.get(k, str)(v)) for k, v in r.items()} for r in csv_rows]


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_dataset_on_bytes_and_arrays(cluster, pattern_bundle, pattern_test_images):
    x, _ = pattern_test_images
    model = load(pattern_bundle, threads=1)
    expected = model.predict(list(x[:40]), budget="50%").to_rows()

    # Encoded bytes with names, and one row that is not an image.
    items = [{"image": png_bytes(x[i]), "path": f"item-{i}"} for i in range(40)]
    items.insert(7, {"image": b"GIF89a broken", "path": "bad"})
    ds = ray.data.from_items(items, override_num_blocks=3)
    rows = on_ray.predict_dataset(ds, pattern_bundle, budget="50%", batch_size=16, workers=2).take_all()
    assert len(rows) == 41
    by_path = {r["path"]: r for r in rows}
    assert "not an image" in by_path["bad"]["error"] and by_path["bad"]["label"] is None
    for i, want in enumerate(expected):
        got = by_path[f"item-{i}"]
        assert {k: got[k] for k in ("label", "class", "confidence", "exit", "cost", "error")} == {
            k: want[k] for k in ("label", "class", "confidence", "exit", "cost", "error")
        }

    # Arrays (a tensor column), strict: 4 blocks of 16 rows are 4 batches of 16, as in one process.
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    try:
        # Materialised first: a repartition running alongside 2 actors that hold both CPUs would wait forever.
        ds = ray.data.from_numpy(x[:64]).repartition(4).materialize()
        strict = on_ray.predict_dataset(
            ds, model, budget="30%", strict=True, image_column="data", path_column=None, batch_size=16, workers=2
        ).take_all()
    finally:
        ctx.execution_options.preserve_order = False
    single = model.predict(list(x[:64]), budget="30%", strict=True, batch_size=16).to_rows()
    assert strict == single
    budget = model.calibrate("30%").budget
    for start in range(0, 64, 16):
        assert sum(r["cost"] for r in strict[start : start + 16]) <= 16 * budget * (1 + 1e-9)


def test_predict_dataset_names_a_missing_image_column_before_any_task(cluster, pattern_bundle, pattern_test_images):
    x, _ = pattern_test_images
    ds = ray.data.from_items([{"pixels": png_bytes(x[0]), "name": "a"}])
    with pytest.raises(ConfigError, match=r"no column 'path' \(its columns: pixels, name\); name the column"):
        on_ray.predict_dataset(ds, pattern_bundle, budget="50%", workers=1)
    with pytest.raises(ConfigError, match=r"no column 'image'"):
        on_ray.predict_dataset(ds, pattern_bundle, budget="50%", image_column="image", workers=1)


class DiesOnce(on_ray.BundleWorker):
    """Kills its own process the first time it meets `die-here.png` (a file next to it records that)."""

    def __call__(self, batch):
        for path in batch["path"]:
            if Path(str(path)).name == "die-here.png":
                flag = Path(str(path)).with_suffix(".died")
                if not flag.exists():
                    flag.write_text(str(os.getpid()))
                    os._exit(1)
        return super().__call__(batch)


class FailsOnMarker(on_ray.BundleWorker):
    """Raises (a bug, not a lost worker: Ray does not retry it) when it meets `fail-here.png`."""

    def __call__(self, batch):
        if any(Path(str(p)).name == "fail-here.png" for p in batch["path"]):
            raise RuntimeError("injected failure")
        return super().__call__(batch)


def test_a_killed_worker_loses_and_duplicates_no_row(cluster, pattern_bundle, image_tree, tmp_path):
    import shutil

    root, truth, broken = image_tree
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    victim = sorted((tree / "vertical").glob("*.png"))[3]
    marker = victim.with_name("die-here.png")
    victim.rename(marker)
    model = load(pattern_bundle, threads=1)
    policy = model.calibrate("50%")
    parts = list(on_ray.stream_predictions(model, policy, [str(tree)], workers=2, worker_class=DiesOnce))
    assert marker.with_suffix(".died").exists(), "the worker was not killed; the test tests nothing"
    paths = [p for part in parts for p in part.paths]
    assert len(paths) == len(set(paths)) == len(truth) + len(broken)
    assert str(marker) in paths
    single = [p for part in model.predict_batches(str(tree), policy=policy, on_error="record") for p in part.to_rows()]
    assert [r for part in parts for r in part.to_rows()] == single


def test_a_failed_job_leaves_no_output_file(cluster, pattern_bundle, image_tree, tmp_path, capsys, monkeypatch):
    import shutil

    root, _, _ = image_tree
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    last = sorted((tree / "vertical").glob("*.png"))[-1]
    last.rename(last.with_name("fail-here.png"))
    out = tmp_path / "out" / "rows.jsonl"
    monkeypatch.setattr(on_ray, "BundleWorker", FailsOnMarker)
    code, _, err = run_cli(
        ["serve", str(pattern_bundle), str(tree), "--budget", "50%", "-q", "-o", str(out), "--ray"], capsys
    )
    assert code != 0 and "injected failure" in err
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_serve_ray_with_a_bundle_after_it_is_a_usage_error(pattern_bundle, image_tree, capsys):
    root, _, _ = image_tree
    code, out, err = run_cli(["serve", "--ray", str(pattern_bundle), str(root), "--budget", "50%"], capsys)
    assert code == 2 and "not a Ray address" in out + err


@pytest.mark.parametrize(
    "flags", [["--unordered"], ["--max-wait-rows", "8"], ["--io-binding", "off"], ["--unordered", "--io-binding", "on"]]
)
def test_serve_ray_refuses_the_options_its_workers_would_ignore(pattern_bundle, image_tree, capsys, flags):
    root, _, _ = image_tree
    args = ["serve", str(pattern_bundle), str(root), "--budget", "50%", "--ray", "auto", *flags]
    code, out, err = run_cli(args, capsys)
    named = [f for f in flags if f.startswith("--")]
    assert code == 2 and f"{', '.join(named)} do not apply with --ray" in out + err


def test_an_input_that_matches_nothing_keeps_its_place(cluster, pattern_bundle, image_tree, tmp_path, capsys):
    """Its error row comes where it was given, as in one process, not ahead of every other row."""
    root, _, _ = image_tree
    args = [str(root / "horizontal"), str(root / "missing.png"), str(root / "vertical"), str(root / "none-*.png")]
    common = ["serve", str(pattern_bundle), *args, "--budget", "50%", "-q"]
    code, single_out, _ = run_cli([*common, "-o", str(tmp_path / "single.jsonl")], capsys)
    assert code == 1
    code, ray_out, err = run_cli([*common, "-o", str(tmp_path / "ray.jsonl"), "--ray", "--workers", "1"], capsys)
    assert code == 1, err
    single, rows = read_rows(tmp_path / "single.jsonl"), read_rows(tmp_path / "ray.jsonl")
    assert rows == single
    errors = [i for i, r in enumerate(rows) if r["error"] is not None]
    assert errors == [len(list((root / "horizontal").glob("*.png"))), len(rows) - 1]
    assert summary_lines(ray_out) == summary_lines(single_out)


def test_a_damaged_parquet_path_list_is_a_clear_error(cluster, pattern_bundle, tmp_path, capsys):
    (tmp_path / "paths.parquet").write_text("not parquet\n")
    args = ["serve", str(pattern_bundle), str(tmp_path / "paths.parquet"), "--budget", "50%", "-q"]
    code, _, single_err = run_cli(args, capsys)
    assert code == 2 and "not a readable Parquet file" in single_err
    code, out, err = run_cli([*args, "--ray", "--workers", "1"], capsys)
    assert code == 2 and "not a readable Parquet file" in err and "Traceback" not in out + err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_no_cluster_answers_is_a_clear_error(pattern_bundle, image_tree, capsys, monkeypatch):
    """Ray itself retries such an address for minutes (seen: over 2 minutes of GCS warnings, then still waiting)."""
    from anytime.errors import ClusterError

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an address where nothing listens")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the module's cluster may be up
    monkeypatch.setattr(ray, "init", no_init)
    root, _, _ = image_tree
    for address in (f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}"):
        with pytest.raises(ClusterError, match="no Ray cluster answers at"):
            on_ray.connect(address)
        code, out, err = run_cli(
            ["serve", str(pattern_bundle), str(root), "--budget", "50%", "-q", "--ray", address], capsys
        )
        assert code == 2 and "no Ray cluster answers at" in err and "Traceback" not in out + err


def test_ray_init_failing_is_a_clear_error(monkeypatch):
    """E.g. a ray:// address without the ray[client] package: Ray raises a ValueError."""
    from anytime.errors import ClusterError

    def failing_init(*args, **kwargs):
        raise ValueError("Ray Client requires pip package `ray[client]`. If you installed the minimal Ray ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    with pytest.raises(ClusterError, match=r"cannot start or join Ray \(auto\): Ray Client requires .*ray\[client\]"):
        on_ray.connect("auto")


@pytest.mark.parametrize("as_list", [False, True])
def test_strict_caps_the_batches_of_one_process(cluster, pattern_bundle, image_tree, tmp_path, capsys, as_list):
    """--strict caps each batch of --batch-size rows: the blocks the inputs are cut into hold whole batches, so a
    worker's batches are those of one process and so are the rows (they were cut evenly: 74 rows into 37 + 37)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, truth, broken = image_tree
    inputs = [str(root)]
    if as_list:
        listed = [str(p) for p in sorted(root.rglob("*.png"))]
        pq.write_table(pa.table({"path": listed}), tmp_path / "inputs.parquet")
        inputs = [str(tmp_path / "inputs.parquet")]
    common = ["serve", str(pattern_bundle), *inputs, "--budget", "35%", "--strict", "--batch-size", "16", "-q"]
    code, single_out, _ = run_cli([*common, "-o", str(tmp_path / "single.jsonl")], capsys)
    assert code == 1
    code, ray_out, err = run_cli([*common, "-o", str(tmp_path / "ray.jsonl"), "--ray", "--workers", "1"], capsys)
    assert code == 1, err
    assert read_rows(tmp_path / "ray.jsonl") == read_rows(tmp_path / "single.jsonl")
    assert summary_lines(ray_out) == summary_lines(single_out)


def test_ray_address_in_the_environment_where_no_cluster_answers_is_a_clear_error(monkeypatch):
    from anytime.errors import ClusterError

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called for an address where nothing listens")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    with pytest.raises(ClusterError, match="no Ray cluster answers at RAY_ADDRESS=127.0.0.1:"):
        on_ray.connect("auto")
