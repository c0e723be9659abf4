"""The runtime on a real exported bundle: loading, early exit, strict caps, inputs, results."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

import anytime
from anytime.errors import BudgetError, BundleError, ConfigError, InputImageError, MissingDependencyError
from anytime.runtime.calibration import first_exit, search_frontier, softmax_confidence
from anytime.runtime.results import ROW_KEYS

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch


@pytest.fixture(scope="module")
def model(pattern_bundle):
    return anytime.load(pattern_bundle, device="cpu", threads=1)


class CountingSession:
    """Wraps an onnxruntime session and records the batch size of every run."""

    def __init__(self, session, log):
        self.session, self.log = session, log

    def run(self, names, feeds):
        self.log.append(next(iter(feeds.values())).shape[0])
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_describes_itself(model):
    text = repr(model)
    assert "test-convnet" in text and "CPUExecutionProvider" in text
    assert "horizontal, vertical, checker/board, disc" in text
    rows = [line for line in text.splitlines() if line.split()[0].isdigit() and "classes" not in line]
    assert len(rows) == model.num_exits == 4
    for stage, row in zip(model.bundle.stages, rows):
        assert f"{100 * stage.val_accuracy:.2f}%" in row  # validation accuracy of each exit
    assert model.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("budget", ["30%", "50%", "75%"])
@pytest.mark.parametrize("policy", ["geometric", "search"])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_early_exit_equals_run_all_then_threshold(model, pattern_test_images, budget, policy, batch_size):
    x, _ = pattern_test_images
    x = x[:100] if batch_size == 1 else x
    preds = model.predict(x, budget=budget, policy=policy, batch_size=batch_size)
    conf, labels = softmax_confidence(model.run_all_exits(x, batch_size=64))
    exits = first_exit(conf, preds.policy.threshold_array())
    np.testing.assert_array_equal(preds.exits, exits + 1)
    np.testing.assert_array_equal(preds.labels, labels[exits, np.arange(len(x))])
    np.testing.assert_allclose(preds.confidences, conf[exits, np.arange(len(x))], rtol=1e-5)
    np.testing.assert_array_equal(preds.costs, model.exit_costs[exits])


def test_no_sample_runs_a_stage_it_does_not_need(model, pattern_test_images, monkeypatch):
    x, _ = pattern_test_images
    logs = [[] for _ in range(model.num_exits)]
    wrapped = [CountingSession(s, log) for s, log in zip(model.executor.sessions, logs)]
    monkeypatch.setattr(model.executor, "sessions", wrapped)
    preds = model.predict(x, budget="50%", batch_size=64)
    exits = preds.exits
    assert len(set(exits.tolist())) >= 3  # the budget really spreads samples over exits
    for k in range(model.num_exits):
        ran = sum(logs[k])
        needed = int((exits >= k + 1).sum())
        assert ran == needed, f"stage {k}: {ran} rows run, {needed} needed"
        assert preds.rows_per_stage[k] == needed
    assert sum(len(log) for log in logs) <= math.ceil(len(x) / 64) * model.num_exits


def test_fixed_exit_runs_only_needed_stages(model, pattern_test_images, monkeypatch):
    x, _ = pattern_test_images
    logs = [[] for _ in range(model.num_exits)]
    monkeypatch.setattr(
        model.executor, "sessions", [CountingSession(s, log) for s, log in zip(model.executor.sessions, logs)]
    )
    preds = model.predict(x[:50], exit=2)
    assert set(preds.exits.tolist()) == {2}
    assert [sum(log) for log in logs] == [50, 50, 0, 0]
    assert preds.average_cost == pytest.approx(model.exit_costs[1])


def test_calibrated_cost_within_budget_on_validation_and_reported_on_test(model, pattern_test_images):
    x, y = pattern_test_images
    data = model.validation_data()
    for budget in ("25%", "50%", "75%"):
        cost = model.budget_cost(budget)
        policies = model.calibrate_all(budget)
        for name in ("geometric", "search"):
            val_cost, val_acc, _ = data.evaluate(policies[name].threshold_array())
            assert val_cost <= cost
            assert policies[name].expected_cost == pytest.approx(val_cost)
        assert policies["search"].expected_accuracy >= policies["geometric"].expected_accuracy
        best = model.calibrate(budget)
        assert best.expected_accuracy == max(
            policies["geometric"].expected_accuracy, policies["search"].expected_accuracy
        )
        preds = model.predict(x, budget=budget)
        # Test data is not validation data: the realised cost is reported next to the budget, near it.
        assert preds.budget == pytest.approx(cost)
        assert abs(preds.average_cost - cost) < 0.25 * cost
        assert "against a budget of" in preds.summary()


def test_strict_cap_holds_on_every_batch(model, pattern_test_images):
    x, _ = pattern_test_images
    budget = model.budget_cost("40%")
    loose = list(model.predict_batches(x, budget="40%", batch_size=16))
    over = [p for p in loose if np.nansum(p.cost_array) > len(p) * budget]
    assert over, "test needs batches that the thresholds alone send over the budget"
    strict = list(model.predict_batches(x, budget="40%", batch_size=16, strict=True))
    for p in strict:
        assert np.nansum(p.cost_array) <= len(p) * budget
    # Where the cap bites, the least confident samples are the ones that went on.
    changed = sum(int((a.exit_array != b.exit_array).sum()) for a, b in zip(loose, strict))
    assert changed > 0


def test_strict_without_a_budget_is_refused_as_the_cli_refuses_it(model, pattern_test_images):
    x, _ = pattern_test_images
    for asked in ({"exit": 2}, {"budget": None, "policy": None}):
        with pytest.raises(ConfigError, match="strict=True caps a budget"):
            model.predict(x[:4], strict=True, **asked)


def test_strict_keeps_least_confident_going(model):
    # Unit check of the cap rule on one stage: 4 samples want to go on, the budget pays for 2.
    leave = np.array([True, False, False, False, False])
    conf = np.array([0.9, 0.5, 0.2, 0.4, 0.3], dtype=np.float32)
    out = model.executor._apply_cap(leave, conf, remaining=2.5, step_cost=1.0)
    assert out.tolist() == [True, True, False, True, False]  # 0.2 and 0.3 continue


def test_strict_cap_that_pays_for_every_stage_stops_nobody_early(model, pattern_test_images, monkeypatch):
    # With costs that are not whole numbers (seconds from a latency profile), a cap of the full network's cost
    # per image pays for every image to run every stage; rounding in the running total must not stop one early.
    images, _ = pattern_test_images
    x = model.preprocessor.normalise(np.stack([model.preprocessor.to_array(im, "image") for im in images[:64]]))
    rng = np.random.default_rng(0)
    wants_all = np.array([np.inf] * (model.num_exits - 1) + [-np.inf])
    for _ in range(40):
        costs = np.cumsum(rng.uniform(1e-5, 5e-5, model.num_exits))
        monkeypatch.setattr(model.executor, "costs", costs)
        for n in (5, 17, 64):
            _, _, exits, trace = model.executor.run_early_exit(x[:n], wants_all, cap_per_image=float(costs[-1]))
            assert (exits == model.num_exits - 1).all(), (costs.tolist(), n, np.bincount(exits).tolist())
            assert trace.total_cost <= n * costs[-1] * (1 + 1e-12)
        # All want the second exit; a cap that pays for exactly 3 of 10 images to go on there lets 3 go on.
        cap = costs[0] + 3 * (costs[1] - costs[0]) / 10
        to_second = np.array([np.inf] + [-np.inf] * (model.num_exits - 1))
        _, _, exits, trace = model.executor.run_early_exit(x[:10], to_second, cap_per_image=float(cap))
        assert np.bincount(exits, minlength=model.num_exits).tolist() == [7, 3] + [0] * (model.num_exits - 2)
        assert trace.total_cost <= 10 * cap * (1 + 1e-12)


def test_input_kinds_agree(model, pattern_test_images, tmp_path):
    x, _ = pattern_test_images
    x = x[:6]
    reference = model.predict(x, exit=4)
    paths = []
    for i, img in enumerate(x):
        p = tmp_path / f"{i}.png"
        Image.fromarray(img[:, :, 0]).save(p)
        paths.append(p)
    pil_l = [Image.fromarray(img[:, :, 0]) for img in x]
    pil_rgb = [Image.fromarray(np.repeat(img, 3, axis=2)) for img in x]  # converted to L for this model
    variants = {
        "paths": [str(p) for p in paths],
        "pathlib": paths,
        "pil_l": pil_l,
        "pil_rgb": pil_rgb,
        "hw": [img[:, :, 0] for img in x],
        "hwc_list": list(x),
        "nhwc": x,
        "generator": (img for img in x),
    }
    for name, inputs in variants.items():
        preds = model.predict(inputs, exit=4)
        np.testing.assert_array_equal(preds.labels, reference.labels, err_msg=name)
        np.testing.assert_allclose(preds.confidences, reference.confidences, rtol=1e-5, err_msg=name)
    single = model.predict(x[0], exit=4)
    assert len(single) == 1 and single[0].label == reference[0].label
    one_path = model.predict(str(paths[0]), exit=4)
    assert one_path[0].path == str(paths[0]) and one_path[0].class_name == model.classes[reference[0].label]


def test_bad_inputs_raise_or_record(model, pattern_bundle_exact, pattern_test_images):
    x, _ = pattern_test_images
    wrong_size = np.zeros((20, 20), dtype=np.uint8)
    exact = anytime.load(pattern_bundle_exact, device="cpu")  # input.resize null: no resizing allowed
    with pytest.raises(InputImageError, match=r"expected 16×16 .*got 20×20"):
        exact.predict([x[0], wrong_size], exit=1)
    with pytest.raises(InputImageError, match="uint8"):
        model.predict(x[0].astype(np.float32), exit=1)
    with pytest.raises(InputImageError, match="file not found"):
        model.predict("/nonexistent/image.png", exit=1)
    preds = exact.predict([x[0], wrong_size, x[1]], exit=1, on_error="record")
    assert [p.error is None for p in preds] == [True, False, True]
    assert preds.images == 2 and preds.failed == 1
    row = preds.to_rows()[1]
    assert row["label"] is None and row["exit"] is None and "expected 16×16" in row["error"]


def test_resize_and_crop_follow_the_training_recipe(model):
    """With input.resize set (export always writes it), other sizes are resized and centre-cropped exactly as
    anytime.formats.preprocessing.eval_preprocess does for training evaluation and the calibration logits."""
    from anytime.formats.preprocessing import eval_preprocess

    assert model.bundle.input.resize == 16
    rng = np.random.default_rng(5)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(20, 20, 1), (40, 30, 1), (13, 29, 3), (16, 16, 1)]
    ]
    for img in images:
        ours = model.preprocessor.to_array(img)
        theirs = eval_preprocess(img, 1, (16, 16), 16)
        np.testing.assert_array_equal(ours, theirs)
    preds = model.predict(images, exit=2)
    assert preds.images == 4


@pytest.mark.parametrize("scheduler", ["batch", "refill"])
def test_inputs_are_consumed_lazily_in_batches(model, pattern_test_images, scheduler):
    x, _ = pattern_test_images
    pulled = []

    def source():
        for i in range(len(x)):
            pulled.append(i)
            yield x[i]

    stream = model.predict_batches(source(), budget="50%", batch_size=10, scheduler=scheduler, max_wait_rows=40)
    first = next(stream)
    assert len(first) == 10 and first.paths == [None] * 10
    if scheduler == "batch":
        # One batch being answered and at most one prefetched: never the whole input.
        assert len(pulled) <= 20
    else:
        # The first batch is out once no input of it is more than max_wait_rows behind, plus one prefetched.
        assert len(pulled) <= 40 + 2 * 10
    rest = sum(len(p) for p in stream)
    assert rest == len(x) - 10 and len(pulled) == len(x)


def test_results_object_rows_and_save(model, pattern_test_images, tmp_path):
    x, _ = pattern_test_images
    preds = model.predict(x[:40], budget="60%", batch_size=16)
    rows = preds.to_rows()
    assert len(rows) == 40 and tuple(rows[0]) == ROW_KEYS
    assert sum(preds.exit_histogram) == 40 and len(preds.exit_histogram) == model.num_exits
    assert preds.images_per_second > 0 and set(preds.speed) == {"preprocess", "inference", "total"}
    assert preds.average_cost == pytest.approx(np.mean([r["cost"] for r in rows]))
    preds.save(tmp_path / "p.jsonl")
    back = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert back == json.loads(json.dumps(rows))
    preds.save(tmp_path / "p.csv")
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == ",".join(ROW_KEYS) and len(lines) == 41
    with pytest.raises(ConfigError, match=r"\.jsonl, \.csv or \.parquet"):
        preds.save(tmp_path / "p.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.jsonl"]  # no temporary file left
    if importlib.util.find_spec("pyarrow") is not None:  # the [parquet] extra; without it, a one-line error
        import pyarrow.parquet as pq

        preds.save(tmp_path / "p.parquet")
        assert pq.read_table(tmp_path / "p.parquet").to_pylist() == back
    else:
        with pytest.raises(MissingDependencyError, match=r"anytime\[parquet\]"):
            preds.save(tmp_path / "p.parquet")


def test_policy_names_a_method_or_a_ready_policy_and_method_keyword_still_works(model, pattern_test_images, tmp_path):
    x, _ = pattern_test_images
    geo = model.calibrate("50%", policy="geometric")
    assert geo is model.calibrate_all("50%")["geometric"]
    preds = model.predict(x[:20], budget="50%", policy="geometric")
    assert preds.policy is geo
    geo.save(tmp_path / "geo.json")
    from_file = model.predict(x[:20], policy=str(tmp_path / "geo.json"))
    np.testing.assert_array_equal(from_file.exits, preds.exits)
    # `method=` was the API's old name for `policy=`
    with pytest.warns(DeprecationWarning, match="policy='geometric'"):
        assert model.calibrate("50%", method="geometric") is geo
    with pytest.warns(DeprecationWarning, match="use policy="):
        old = model.predict(x[:20], budget="50%", method="geometric")
    np.testing.assert_array_equal(old.exits, preds.exits)
    with pytest.raises(ConfigError, match="neither best, geometric, search nor an existing policy file"):
        model.predict(x[:2], policy="nonexistent.json")
    with pytest.raises(ConfigError, match="give it without budget"):
        model.predict(x[:2], budget="50%", policy=geo)


def test_budget_errors_from_model(model):
    with pytest.raises(BudgetError, match="feasible budgets are"):
        model.calibrate("1%")
    with pytest.raises(BudgetError, match="exits 1..4"):
        model.predict(np.zeros((16, 16), np.uint8), exit=9)
    with pytest.raises(ConfigError, match="only one of"):
        model.predict(np.zeros((16, 16), np.uint8), budget="50%", exit=2)


def test_a_larger_budget_never_scores_below_a_cheaper_frontier_policy_on_the_embedded_model():
    # On the shipped model, coordinate ascent from the geometric policy alone fell up to 0.6 points below
    # what a smaller budget reached; calibration now also ascends from the search frontier.
    model = anytime.load(device="cpu", threads=1)
    frontier = search_frontier(model.validation_data(), model.cost_convention)
    costs = model.exit_costs
    starts = set()
    for budget in np.linspace(costs[0], costs[-1], 41)[1:]:
        search = model.calibrate_all(float(budget))["search"]
        fitting = max((p.expected_accuracy for p in frontier if p.expected_cost <= budget), default=0.0)
        assert search.expected_cost <= budget * (1 + 1e-9)
        assert search.expected_accuracy >= fitting
        starts.add(search.info["start"])
    assert starts == {"geometric", "frontier"}


def test_bundle_validation(pattern_bundle, tmp_path):
    import shutil

    with pytest.raises(BundleError, match="no manifest.json"):
        anytime.load(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        anytime.load(tmp_path / "nope")
    broken = tmp_path / "b"
    shutil.copytree(pattern_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["format_version"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99"):
        anytime.load(broken)
    manifest["format_version"] = 1
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "stage_2.onnx").unlink()
    with pytest.raises(BundleError, match="stage_2.onnx"):
        anytime.load(broken)
    shutil.copy(pattern_bundle / "stage_2.onnx", broken / "stage_2.onnx")
    anytime.load(broken, verify=True, device="cpu")
    with open(broken / "stage_1.onnx", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="stage_1.onnx is damaged"):
        anytime.load(broken, verify=True)


def test_providers(pattern_bundle):
    with pytest.raises(ConfigError, match="not available"):
        anytime.load(pattern_bundle, providers=["NoSuchExecutionProvider"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MissingDependencyError, match=r"anytime\[gpu\]"):
            anytime.load(pattern_bundle, device="cuda")
    m = anytime.load(pattern_bundle, providers="CPUExecutionProvider", threads=2)
    assert m.providers == ["CPUExecutionProvider"]


def test_cuda_sessions_preload_cuda_libraries_once_and_keep_stdout_clean(pattern_bundle, monkeypatch, capsys, caplog):
    from anytime.runtime import engine

    calls = []

    class FakeOrt:
        @staticmethod
        def preload_dlls():
            calls.append("preload")
            print("WARNING: cuDNN not found")  # onnxruntime prints its complaints

    monkeypatch.setitem(engine._cuda_libraries, "tried", False)
    with caplog.at_level(logging.INFO, logger="anytime.runtime.engine"):
        engine.preload_cuda_libraries(FakeOrt)
        engine.preload_cuda_libraries(FakeOrt)
    assert calls == ["preload"] and capsys.readouterr().out == ""
    assert "preload_dlls: WARNING: cuDNN not found" in caplog.text

    class BrokenOrt:
        @staticmethod
        def preload_dlls():
            raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setitem(engine._cuda_libraries, "tried", False)
    engine.preload_cuda_libraries(BrokenOrt)  # the provider check reports the outcome, not this

    # a session asked for CUDA preloads first; a CPU session does not
    seen = []
    monkeypatch.setattr(engine, "preload_cuda_libraries", lambda ort: seen.append(ort))
    engine.create_session(pattern_bundle / "stage_1.onnx", ["CPUExecutionProvider"])
    assert seen == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU-only onnxruntime warns that CUDA is not available and runs on CPU
        session = engine.create_session(
            pattern_bundle / "stage_1.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    assert len(seen) == 1 and "CPUExecutionProvider" in session.get_providers()


def test_default_bundle_missing_is_clear(monkeypatch, tmp_path):
    import anytime.formats.bundle as bundle_mod

    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE_DIR", tmp_path / "default")
    with pytest.raises(BundleError, match="embedded default model is not installed"):
        anytime.load()


def test_runtime_never_imports_torch(pattern_bundle, tmp_path):
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "a.png")
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import anytime, anytime.runtime
        from anytime.cli import main
        model = anytime.load({str(pattern_bundle)!r})
        print(model)
        model.calibrate("50%")
        preds = model.predict([np.zeros((16, 16), np.uint8), {str(tmp_path / "a.png")!r}], budget="50%")
        preds.save({str(tmp_path / "p.csv")!r})
        try:
            main(["serve", {str(pattern_bundle)!r}, {str(tmp_path)!r}, "--budget", "50%", "-q"])
        except SystemExit as exc:
            assert exc.code in (None, 0), exc.code
        assert "torch" not in sys.modules, "the runtime imported torch"
        print("TORCH-FREE")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH-FREE" in out.stdout


def test_manifest_schema_problems_are_named(pattern_bundle, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(pattern_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["input"]["std"] = [0.0]
    manifest["num_classes"] = 7
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as info:
        anytime.load(broken)
    assert "std" in str(info.value) and "num_classes=7" in str(info.value)


@pytest.mark.parametrize("key, value", [("val_accuracy", "0.9"), ("val_accuracy", 87.5), ("params", "many")])
def test_stage_params_and_accuracy_are_checked_with_the_manifest(pattern_bundle, tmp_path, key, value):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(pattern_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["stages"][1][key] = value
    (broken / "manifest.json").write_text(json.dumps(manifest))
    # A string here was a bare ValueError from float()/int() in read_bundle; 87.5 printed as 8750%.
    with pytest.raises(BundleError, match=rf"stages\[1\]\.{key} is {value!r}.*re-export the bundle"):
        anytime.load(broken)


def test_predict_on_a_folder_takes_its_images_recursively_with_folder_labels(
    pattern_bundle, pattern_test_images, tmp_path
):
    from conftest import PATTERN_CLASSES
    from PIL import Image

    import anytime

    x, y = pattern_test_images
    for i in range(6):
        folder = tmp_path / "imgs" / PATTERN_CLASSES[y[i]].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(folder / f"{i}.png")
    model = anytime.load(pattern_bundle)
    preds = model.predict(tmp_path / "imgs", exit=model.num_exits)
    assert preds.images == 6 and preds.labelled == 6
    direct = model.predict(x[:6], exit=model.num_exits)
    assert sorted(preds.labels.tolist()) == sorted(direct.labels.tolist())


def test_encoded_bytes_are_one_input_alone_as_in_a_list(model, pattern_test_images, tmp_path):
    x, _ = pattern_test_images
    path = tmp_path / "one.png"
    Image.fromarray(x[0, :, :, 0]).save(path)
    data = path.read_bytes()
    reference = model.predict(str(path), exit=4)
    for inputs in (data, bytearray(data), [data]):
        preds = model.predict(inputs, exit=4, on_error="record")
        # bytes alone were iterated as ints: one error row per byte of the file
        assert len(preds) == 1 and preds.failed == 0, type(inputs)
        assert preds[0].label == reference[0].label


@pytest.mark.parametrize("inputs", [None, 5, 2.5, object()])
def test_inputs_that_are_not_images_nor_collections_of_them_are_a_config_error(model, inputs):
    # None and numbers were a bare TypeError from deep inside ("'NoneType' object is not iterable")
    with pytest.raises(ConfigError, match=f"cannot classify an input of type {type(inputs).__name__}; give a path"):
        model.predict(inputs, exit=1, on_error="record")


def test_predictions_slice_to_predictions_of_those_rows(model, pattern_test_images):
    # a slice went to the error-row branch and failed with numpy's "truth value of an array is ambiguous"
    x, _ = pattern_test_images
    preds = model.predict([x[0], np.zeros((3, 3, 2), np.uint8), x[1], x[2]], budget="60%", on_error="record")
    part = preds[1:3]
    assert type(part) is type(preds) and len(part) == 2
    assert part.to_rows() == preds.to_rows()[1:3]
    assert part.failed == 1 and part.images == 1 and part.budget == preds.budget
    assert preds[::-1].to_rows() == preds.to_rows()[::-1]
    assert preds[:].to_rows() == preds.to_rows() and preds[:].summary() == preds.summary()
    assert preds[np.int64(2)] == preds[2] and preds[-1] == preds[3]
    assert len(preds[10:]) == 0 and preds[10:].to_rows() == []


def test_file_objects_and_memoryviews_are_one_input_each(model, pattern_test_images, tmp_path):
    # an open file was iterated as lines and a memoryview as ints: one image became many error rows
    import io

    x, _ = pattern_test_images
    path = tmp_path / "one.png"
    Image.fromarray(x[0, :, :, 0]).save(path)
    data = path.read_bytes()
    reference = model.predict(str(path), exit=4)[0]
    with open(path, "rb") as fh:
        preds = model.predict(fh, exit=4, on_error="record")
    assert len(preds) == 1 and preds.failed == 0
    assert preds[0].label == reference.label and preds[0].path == str(path)
    for inputs in (memoryview(data), io.BytesIO(data), [io.BytesIO(data), memoryview(data)]):
        preds = model.predict(inputs, exit=4, on_error="record")
        assert preds.failed == 0 and {p.label for p in preds} == {reference.label}, type(inputs)
        assert len(preds) == (2 if isinstance(inputs, list) else 1)
    with open(path, encoding="latin-1") as text:
        with pytest.raises(InputImageError, match=r"text-mode file object; open the image in binary mode"):
            model.predict(text, exit=4)
    closed = io.BytesIO(data)
    closed.close()
    preds = model.predict([closed, data], exit=4, on_error="record")
    assert len(preds) == 2 and "cannot read the file object" in preds[0].error and preds[1].ok


def test_paths_are_taken_as_serve_takes_its_inputs_also_in_lists(model, pattern_test_images, tmp_path, monkeypatch):
    # a folder in a list was one error row ("not a regular file"), a glob "file not found", and a path
    # list was read as an image, while `anytime serve` takes all three (and predict(folder) took a folder)
    from anytime.runtime.model import _at_most_one_batch

    x, _ = pattern_test_images
    for i in range(4):
        (tmp_path / "imgs" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(tmp_path / "imgs" / f"d{i % 2}" / f"{i}.png")
    files = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.png"))
    reference = model.predict(files, exit=4)
    listing = tmp_path / "paths.jsonl"
    listing.write_text("".join(json.dumps({"path": f}) + "\n" for f in files))
    variants = {
        "folders in a list": [tmp_path / "imgs" / "d0", str(tmp_path / "imgs" / "d1")],
        "glob": str(tmp_path / "imgs" / "*" / "*.png"),
        "globs in a list": [str(tmp_path / "imgs" / "d0" / "*.png"), str(tmp_path / "imgs" / "d1" / "*.png")],
        "path list": listing,
    }
    for name, inputs in variants.items():
        preds = model.predict(inputs, exit=4, batch_size=3)
        assert sorted(preds.paths) == files and preds.failed == 0, name
        assert sorted(zip(preds.paths, preds.labels.tolist())) == list(zip(files, reference.labels.tolist())), name
        assert not _at_most_one_batch(inputs, 64), name  # a GPU's auto scheduler sees a stream
    preds = model.predict([str(tmp_path / "none" / "*.png"), files[0]], exit=4, on_error="record")
    assert preds[0].error.endswith("no file matches this pattern") and preds[1].ok
    with pytest.raises(InputImageError, match="file not found"):
        model.predict(str(tmp_path / "missing.png"), exit=4)
    monkeypatch.chdir(tmp_path)
    assert model.predict(["./imgs//d0/0.png"], exit=4)[0].path == "./imgs//d0/0.png"  # kept as written
    assert _at_most_one_batch(files[0], 64) and _at_most_one_batch(files, 64)


@pytest.mark.parametrize("max_pixels", [0, -1, None, math.inf])
def test_a_max_pixels_that_refuses_every_image_is_refused_at_load(pattern_bundle, max_pixels):
    # 0 loaded, then every input failed with "28×28 = 0 MP, more than the 0 MP accepted"; None a bare TypeError
    with pytest.raises(ConfigError, match=rf"max_pixels={max_pixels!r}: give the most pixels an input image may have"):
        anytime.load(pattern_bundle, max_pixels=max_pixels)


def test_a_small_max_pixels_names_the_pixels(model, pattern_bundle, pattern_test_images):
    x, _ = pattern_test_images
    small = anytime.load(pattern_bundle, max_pixels=np.int64(100))
    with pytest.raises(InputImageError, match=r"= 1,024 pixels, more than the 100 pixels accepted"):
        small.predict(Image.fromarray(np.zeros((32, 32), np.uint8)), exit=1)
    assert small.predict(x[:1], exit=1).failed == 0  # arrays of the model's size are not images to decode


def test_predict_batches_checks_its_arguments_when_called_not_at_the_first_part(model, pattern_test_images):
    x, _ = pattern_test_images
    bad_calls = [
        {"budget": "50%", "on_error": "ignore"},
        {"budget": "50%", "scheduler": "fastest"},
        {"budget": "3kb"},
        {"exit": 2, "strict": True},
        {"budget": "50%", "batch_size": 0},
    ]
    for bad in bad_calls:
        with pytest.raises((ConfigError, BudgetError)):
            model.predict_batches(x, **bad)  # never iterated
    parts = model.predict_batches(iter(x), budget="50%", batch_size=8)
    assert sum(len(p) for p in parts) == len(x)


def test_load_refuses_thread_counts_and_provider_lists_it_would_bend(pattern_bundle, tmp_path):
    for threads in (1.5, "2", -1, True):
        with pytest.raises(ConfigError, match="must be a whole number >= 0"):
            anytime.load(pattern_bundle, threads=threads)
    for providers in ([], ""):
        with pytest.raises(ConfigError, match="providers is empty; name at least one execution provider"):
            anytime.load(pattern_bundle, providers=providers)
    model = anytime.load(pattern_bundle, threads=np.int64(1))
    policy = model.calibrate("50%")
    assert policy.save(tmp_path / "p.json") == tmp_path / "p.json"  # as Predictions.save and LatencyProfile.save
