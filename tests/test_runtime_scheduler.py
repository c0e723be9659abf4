"""The refilling stage scheduler and IO binding: same answers as the per-batch executor, bounded queues."""

from __future__ import annotations

import json

import numpy as np
import pytest

import anytime
from anytime.errors import ConfigError
from anytime.runtime.inputs import InputItem, MissingInput
from anytime.runtime.iobinding import DeviceRows, concat_graph, gather_graph, resolve_io_binding
from anytime.runtime.model import _choose_scheduler
from anytime.runtime.scheduler import RefillingScheduler, StageCalls

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch


@pytest.fixture(scope="module")
def model(pattern_bundle):
    return anytime.load(pattern_bundle, device="cpu", threads=1)


@pytest.fixture(scope="module")
def bound_model(pattern_bundle):
    """The same bundle with IO binding forced on the CPU provider (state tensors as OrtValues)."""
    return anytime.load(pattern_bundle, device="cpu", threads=1, io_binding=True)


def named_inputs(x: np.ndarray, broken: dict[int, object]) -> list[InputItem]:
    """Inputs named img_<i>, with the positions in `broken` replaced by something that cannot be decoded."""
    return [InputItem(broken.get(i, img), f"img_{i:03d}") for i, img in enumerate(x)]


BROKEN = {
    3: MissingInput("gone.png", "gone.png: file not found"),
    40: np.zeros((16, 16, 1), np.float32),  # not uint8
    41: MissingInput("gone2.png", "gone2.png: file not found"),
    130: np.zeros((2, 2, 2, 2, 2), np.uint8),  # no image shape
}


def by_name(preds) -> dict[str, dict]:
    return {row["path"]: row for row in preds.to_rows()}


@pytest.mark.parametrize("budget", ["30%", "50%", "75%"])
@pytest.mark.parametrize("batch_size", [5, 16, 64])
def test_refill_answers_equal_per_batch_in_input_order(model, pattern_test_images, budget, batch_size):
    x, _ = pattern_test_images
    items = named_inputs(x, BROKEN)  # 300 inputs: no batch size here divides it
    reference = model.predict(items, budget=budget, batch_size=batch_size, scheduler="batch", on_error="record")
    calls = StageCalls(model.num_exits)
    refilled = model.predict(
        items,
        budget=budget,
        batch_size=batch_size,
        scheduler="refill",
        on_error="record",
        stage_calls=calls,
        max_wait_rows=len(items),  # no forced partial runs here (test_queues_and_waits_... forces them)
    )
    assert refilled.paths == reference.paths == [it.name for it in items]  # input order, error rows in place
    assert refilled.to_rows() == reference.to_rows()
    np.testing.assert_array_equal(refilled.confidence_array, reference.confidence_array)
    assert refilled.failed == len(BROKEN) and [refilled[i].error is not None for i in BROKEN] == [True] * 4
    assert refilled.rows_per_stage == reference.rows_per_stage == calls.rows_per_stage
    assert len(set(refilled.exits.tolist())) >= 3  # the budget spreads inputs over the exits
    # Every stage runs on full batches, except one last call per stage when the stream ends.
    for k, rows in enumerate(calls.rows):
        assert all(r == batch_size for r in rows[:-1]), (k, rows)
        assert len(rows) == -(-calls.rows_per_stage[k] // batch_size)


@pytest.mark.parametrize("batch_size", [7, 32])
def test_unordered_gives_the_same_answers_in_another_order(model, pattern_test_images, batch_size):
    x, _ = pattern_test_images
    items = named_inputs(x, BROKEN)
    reference = by_name(model.predict(items, budget="50%", batch_size=batch_size, scheduler="batch", on_error="record"))
    parts = list(model.predict_batches(items, budget="50%", batch_size=batch_size, scheduler="refill", ordered=False))
    rows = [row for p in parts for row in p.to_rows()]
    assert len(rows) == len(items) and {r["path"] for r in rows} == set(reference)  # each input exactly once
    assert {r["path"]: r for r in rows} == reference
    assert [r["path"] for r in rows] != [it.name for it in items]  # answers do come out as they are ready
    # Error rows are released at once: they come in the first part that holds their batch's rows.
    assert rows.index(by_name_row(rows, "img_003")) < rows.index(by_name_row(rows, "img_004"))


def by_name_row(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["path"] == name)


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize(("batch_size", "max_wait_rows"), [(8, 8), (8, 20), (16, 64)])
def test_queues_and_waits_stay_within_their_bounds(model, pattern_test_images, ordered, batch_size, max_wait_rows):
    x, _ = pattern_test_images
    items = named_inputs(x, BROKEN)
    reference = model.predict(items, budget="50%", batch_size=batch_size, scheduler="batch", on_error="record")
    calls = StageCalls(model.num_exits)
    seen_queues: list[list[int]] = []
    released_at: list[tuple[int, int]] = []  # (inputs admitted so far, first input id still waiting)

    scheduler = RefillingScheduler(
        model.executor, reference.policy.threshold_array(), batch_size, ordered, max_wait_rows, calls
    )
    original_run = scheduler._run

    def watched_run(k):
        seen_queues.append(scheduler.queued_rows)
        original_run(k)

    scheduler._run = watched_run
    answered = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loaded = model._load_batch(chunk, None, "record")  # inputs are arrays: no decoding pool needed
        answered += scheduler.add(loaded["x"], loaded["ok"], len(chunk), start)
        waiting = [q for q in scheduler.queued_rows if q]
        heads = [q.head for q in scheduler._queues if q.rows]
        released_at.append((start + len(chunk), min(heads) if heads else start + len(chunk)))
        assert not waiting or max(waiting) <= batch_size
    answered += scheduler.finish()
    assert all(max(q) <= batch_size for q in seen_queues)
    assert max(calls.max_queued_rows) <= batch_size and max(max(r) for r in calls.rows) <= batch_size
    assert all(admitted - oldest <= max_wait_rows for admitted, oldest in released_at)
    if ordered:
        assert calls.max_held_rows <= max_wait_rows + batch_size
        assert [a.payload for a in answered] == list(range(0, len(items), batch_size))
    else:
        assert calls.max_held_rows <= model.num_exits * batch_size
    # Whatever the bounds forced, the answers are the per-batch executor's.
    exits = np.zeros(len(items), dtype=np.int64)
    labels = np.zeros(len(items), dtype=np.int64)
    for a in answered:
        exits[a.payload + a.rows] = a.exits + 1
        labels[a.payload + a.rows] = np.where(a.exits >= 0, a.labels, -1)
    np.testing.assert_array_equal(exits, reference.exit_array)
    np.testing.assert_array_equal(labels, reference.label_array)


def test_a_batch_of_only_errors_keeps_its_place(model, pattern_test_images):
    x, _ = pattern_test_images
    broken = {i: MissingInput(f"m{i}", f"m{i}: file not found") for i in range(8, 16)}
    items = named_inputs(x[:40], broken)
    parts = list(model.predict_batches(items, budget="50%", batch_size=8, scheduler="refill"))
    assert [p.paths for p in parts] == [[it.name for it in items[i : i + 8]] for i in range(0, 40, 8)]
    assert parts[1].failed == 8 and parts[1].images == 0 and parts[1].rows_per_stage == [0, 0, 0, 0]


def test_scheduler_choice_and_errors(model, pattern_test_images):
    x, _ = pattern_test_images
    assert _choose_scheduler("auto", False, (img for img in x), 64, on_gpu=True) == "refill"
    assert _choose_scheduler("auto", False, list(x), 64, on_gpu=True) == "refill"
    assert _choose_scheduler("auto", False, (img for img in x), 64) == "batch"  # CPU: refilling did not pay
    assert _choose_scheduler("auto", False, list(x[:64]), 64, on_gpu=True) == "batch"  # one batch: nothing to refill
    assert _choose_scheduler("auto", False, x[:10], 64, on_gpu=True) == "batch"
    assert _choose_scheduler("auto", False, x[0], 64, on_gpu=True) == "batch"
    assert _choose_scheduler("auto", True, (img for img in x), 64, on_gpu=True) == "batch"  # strict: per batch
    assert _choose_scheduler("batch", False, (img for img in x), 64) == "batch"
    with pytest.raises(ConfigError, match="strict=True caps each batch's cost.*scheduler='batch'"):
        model.predict(x, budget="50%", strict=True, scheduler="refill")
    with pytest.raises(ConfigError, match="scheduler='fast' is unknown; use one of auto, refill, batch"):
        model.predict(x, budget="50%", scheduler="fast")
    with pytest.raises(ConfigError, match="max_wait_rows=10 must be at least batch_size \\(16\\)"):
        model.predict(list(x), budget="50%", batch_size=16, max_wait_rows=10, scheduler="refill")
    # strict with auto still caps every batch (per-batch executor).
    budget = model.budget_cost("40%")
    for part in model.predict_batches(list(x), budget="40%", batch_size=16, strict=True):
        assert np.nansum(part.cost_array) <= len(part) * budget


def test_stage_calls_are_recorded_by_both_schedulers(model, pattern_test_images):
    x, _ = pattern_test_images
    per_batch, refilled = StageCalls(model.num_exits), StageCalls(model.num_exits)
    model.predict(list(x), budget="50%", batch_size=64, scheduler="batch", stage_calls=per_batch)
    model.predict(list(x), budget="50%", batch_size=64, scheduler="refill", stage_calls=refilled)
    assert per_batch.rows_per_stage == refilled.rows_per_stage
    assert per_batch.calls[0] == refilled.calls[0] == 5  # 300 rows: 4 full batches and 44
    assert refilled.calls[-1] < per_batch.calls[-1]  # the last stage waits for rows instead of running on few
    assert all(f <= 1.0 for f in refilled.fill(64)) and refilled.fill(64)[-1] > per_batch.fill(64)[-1]
    assert all(s >= 0 for s in refilled.seconds_per_row())


def _preprocessed(model, images: np.ndarray) -> np.ndarray:
    pre = model.preprocessor
    return pre.normalise(np.stack([pre.to_array(img) for img in images]))


def _answers(scheduler: RefillingScheduler, x: np.ndarray, batch_size: int, interleave=None) -> np.ndarray:
    """Exits of `x` streamed through `scheduler` in batches (0-based; -1 where unanswered)."""
    exits = np.full(len(x), -1)
    answered = []
    for i in range(0, len(x), batch_size):
        part = x[i : i + batch_size]
        answered += scheduler.add(part, np.arange(len(part)), len(part), payload=i)
        if interleave is not None:
            interleave()
    answered += scheduler.finish()
    for a in answered:
        exits[a.payload + a.rows] = a.exits
    return exits


def test_queue_buffers_are_reused_by_the_next_scheduler_and_can_be_freed(pattern_bundle, pattern_test_images):
    x, _ = pattern_test_images
    own = anytime.load(pattern_bundle, device="cpu", threads=1)  # a pool of its own
    thresholds = own.calibrate("50%").threshold_array()
    images, x = x, _preprocessed(own, x)
    pool = own.executor.queue_buffers
    assert pool.held_bytes == 0
    expected = own.predict(list(images), budget="50%", batch_size=16, scheduler="batch").exit_array - 1
    first = _answers(RefillingScheduler(own.executor, thresholds, 16), x, 16)
    held = pool.held_bytes
    assert held > 0  # the stages after the first queued rows in buffers, now kept
    kept = {stage: dict(buffers) for stage, buffers in pool._free.items()}
    second = RefillingScheduler(own.executor, thresholds, 16)
    again = _answers(second, x, 16)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)
    # The second scheduler filled the very arrays the first left, and gave them back.
    assert {s: {n: id(b) for n, b in bufs.items()} for s, bufs in pool._free.items()} == {
        s: {n: id(b) for n, b in bufs.items()} for s, bufs in kept.items()
    }
    # A smaller batch size fits in the kept buffers; a larger one needs new ones, which the pool then keeps.
    np.testing.assert_array_equal(_answers(RefillingScheduler(own.executor, thresholds, 8), x, 8), expected)
    assert pool.held_bytes == held
    np.testing.assert_array_equal(_answers(RefillingScheduler(own.executor, thresholds, 32), x, 32), expected)
    assert pool.held_bytes == 2 * held
    own.executor.free_buffers()
    assert pool.held_bytes == 0


def test_two_schedulers_at_once_on_one_executor_do_not_share_buffers(pattern_bundle, pattern_test_images):
    x, _ = pattern_test_images
    own = anytime.load(pattern_bundle, device="cpu", threads=1)
    thresholds = own.calibrate("50%").threshold_array()
    images, x = x, _preprocessed(own, x)
    expected = own.predict(list(images), budget="50%", batch_size=16, scheduler="batch").exit_array - 1
    _answers(RefillingScheduler(own.executor, thresholds, 16), x, 16)  # leaves a set in the pool
    a, b = RefillingScheduler(own.executor, thresholds, 16), RefillingScheduler(own.executor, thresholds, 16)
    reversed_x = x[::-1].copy()
    b_exits = np.full(len(x), -1)
    b_answered = []
    positions = iter(range(0, len(x), 16))

    def feed_b() -> None:
        i = next(positions, None)
        if i is not None:
            part = reversed_x[i : i + 16]
            b_answered.extend(b.add(part, np.arange(len(part)), len(part), payload=i))

    a_exits = _answers(a, x, 16, interleave=feed_b)
    for i in positions:
        part = reversed_x[i : i + 16]
        b_answered.extend(b.add(part, np.arange(len(part)), len(part), payload=i))
    b_answered += b.finish()
    for ans in b_answered:
        b_exits[ans.payload + ans.rows] = ans.exits
    np.testing.assert_array_equal(a_exits, expected)
    np.testing.assert_array_equal(b_exits[::-1], expected)


def test_a_scheduler_that_fails_midway_leaves_the_pool_usable(pattern_bundle, pattern_test_images, monkeypatch):
    x, _ = pattern_test_images
    own = anytime.load(pattern_bundle, device="cpu", threads=1)
    thresholds = own.calibrate("50%").threshold_array()
    images, x = x, _preprocessed(own, x)
    expected = own.predict(list(images), budget="50%", batch_size=16, scheduler="batch").exit_array - 1
    broken = RefillingScheduler(own.executor, thresholds, 16)
    real_run_stage = own.executor.run_stage
    calls = {"n": 0}

    def failing(k, state):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("stage failed")
        return real_run_stage(k, state)

    monkeypatch.setattr(own.executor, "run_stage", failing)
    with pytest.raises(RuntimeError, match="stage failed"):
        _answers(broken, x, 16)
    monkeypatch.setattr(own.executor, "run_stage", real_run_stage)
    np.testing.assert_array_equal(_answers(RefillingScheduler(own.executor, thresholds, 16), x, 16), expected)


# --- IO binding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["batch", "refill"])
@pytest.mark.parametrize("budget", ["30%", "75%"])
def test_io_binding_answers_equal_the_plain_path(model, bound_model, pattern_test_images, scheduler, budget):
    x, _ = pattern_test_images
    items = named_inputs(x, BROKEN)
    plain = model.predict(items, budget=budget, batch_size=16, scheduler=scheduler, on_error="record")
    bound = bound_model.predict(items, budget=budget, batch_size=16, scheduler=scheduler, on_error="record")
    assert bound.to_rows() == plain.to_rows()
    np.testing.assert_array_equal(bound.confidence_array, plain.confidence_array)


def test_io_binding_keeps_state_off_the_host(model, bound_model, pattern_test_images):
    import onnxruntime as ort

    x, _ = pattern_test_images
    batch = model.preprocessor.normalise(np.stack([model.preprocessor.to_array(img) for img in x[:9]]))
    assert model.executor.io_binding is False and bound_model.executor.io_binding is True
    logits, state = bound_model.executor.run_stage(0, bound_model.executor.start(batch))
    plain_logits, plain_state = model.executor.run_stage(0, model.executor.start(batch))
    assert isinstance(logits, np.ndarray) and state and all(isinstance(v, ort.OrtValue) for v in state.values())
    np.testing.assert_array_equal(logits, plain_logits)
    rows = np.array([8, 0, 3])
    taken = bound_model.executor.take_rows(1, state, rows)
    joined = bound_model.executor.join_rows(1, [taken, bound_model.executor.take_rows(1, state, slice(4, 6))])
    for name, value in joined.items():
        np.testing.assert_array_equal(value.numpy(), plain_state[name][[8, 0, 3, 4, 5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int32, np.uint8, np.int8, np.bool_])
def test_gather_and_concat_graphs_match_numpy(dtype):
    import onnxruntime as ort

    type_name = {np.float32: "float", np.float64: "double", np.bool_: "bool"}.get(dtype, np.dtype(dtype).name)
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(6, 3, 2)) * 5).astype(dtype)
    b = (rng.normal(size=(6, 4)) * 5).astype(dtype)
    rows = DeviceRows(ort, ["a", "b"], [f"tensor({type_name})"] * 2, [3, 2], "cpu", 0, ["CPUExecutionProvider"])
    state = {"a": ort.OrtValue.ortvalue_from_numpy(a), "b": b}  # device values and host arrays both bind
    picked = rows.gather(state, np.array([5, 1, 1, 0]))
    np.testing.assert_array_equal(picked["a"].numpy(), a[[5, 1, 1, 0]])
    np.testing.assert_array_equal(picked["b"].numpy(), b[[5, 1, 1, 0]])
    parts = [rows.gather(state, np.array([i])) for i in range(6)] * 3  # 18 parts: a tree of 8-input concats
    joined = rows.concat(parts)
    np.testing.assert_array_equal(joined["a"].numpy(), np.concatenate([a] * 3))
    np.testing.assert_array_equal(joined["b"].numpy(), np.concatenate([b] * 3))


def test_helper_graphs_are_valid_onnx():
    onnx = pytest.importorskip("onnx")  # the serving install has no onnx; the graphs are written without it
    for graph in (gather_graph(["x", "y"], [1, 7], [4, 2]), concat_graph(["x"], [10], [3], 5)):
        onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)


def test_io_binding_choice_and_errors(pattern_bundle):
    assert resolve_io_binding("auto", ["CPUExecutionProvider"]) is None
    assert resolve_io_binding("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert resolve_io_binding(True, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert resolve_io_binding(True, ["CPUExecutionProvider"]) == "cpu"
    assert resolve_io_binding("off", ["CUDAExecutionProvider"]) is None
    assert resolve_io_binding(False, ["CUDAExecutionProvider"]) is None
    with pytest.raises(ConfigError, match="io_binding=True supports .* runs this bundle on DmlExecutionProvider"):
        resolve_io_binding(True, ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert resolve_io_binding("auto", ["DmlExecutionProvider"]) is None  # auto never fails
    with pytest.raises(ConfigError, match="io_binding='yes': use 'auto', True or False"):
        anytime.load(pattern_bundle, device="cpu", io_binding="yes")


def test_serve_scheduler_options_give_the_same_rows(pattern_bundle, pattern_test_images, tmp_path, capsys):
    from PIL import Image

    from anytime.cli import main

    x, _ = pattern_test_images
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(45):
        Image.fromarray(x[i, :, :, 0]).save(folder / f"{i:02d}.png")
    (folder / "20b.png").write_bytes(b"not an image")

    def serve(*extra):
        out = tmp_path / "rows.jsonl"
        out.unlink(missing_ok=True)
        argv = ["serve", str(pattern_bundle), str(folder), "-b", "50%", "--batch-size", "8", "-q", "-o", str(out)]
        try:
            main([*argv, *extra])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        return code, rows, capsys.readouterr().err

    code, batch_rows, _ = serve("--scheduler", "batch")
    assert code == 1 and len(batch_rows) == 46  # the broken file is an error row
    for extra in (["--scheduler", "refill"], [], ["--io-binding", "on"], ["--max-wait-rows", "8"]):
        assert serve(*extra)[:2] == (1, batch_rows), extra
    code, unordered, _ = serve("--unordered")
    assert code == 1 and sorted(unordered, key=lambda r: r["path"]) == sorted(batch_rows, key=lambda r: r["path"])
    code, _, err = serve("--strict", "--scheduler", "refill")
    assert code == 2 and "strict=True caps each batch's cost" in err
