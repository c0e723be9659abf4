"""Row buffers kept between batches: lent to one caller at a time, reused, and answers unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import anytime
from anytime.runtime.buffers import BufferPool
from anytime.runtime.calibration import first_exit, softmax_confidence

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch


def state(rows: int, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"a": np.zeros((rows, 3, 4), dtype), "b": np.zeros((rows, 2), dtype)}


def test_pool_lends_keeps_the_largest_and_frees():
    pool = BufferPool()
    first = pool.take(1, 8, state(5))
    assert {n: b.shape for n, b in first.items()} == {"a": (8, 3, 4), "b": (8, 2)}
    assert pool.take(1, 8, state(5)) is not first  # lent out: a second caller gets its own
    pool.give_back(1, first)
    assert pool.held_bytes == sum(b.nbytes for b in first.values())
    again = pool.take(1, 4, state(4))
    assert again is first and pool.held_bytes == 0  # fits (8 >= 4 rows); taken out of the pool
    pool.give_back(1, again)
    assert pool.take(1, 16, state(16)) is not first  # too few rows: new ones
    assert pool.take(2, 4, state(4)) is not first  # another stage
    assert pool.take(1, 4, state(4, np.float16)) is not first  # another dtype
    pool.give_back(1, first)
    bigger = {n: np.empty((32, *b.shape[1:]), b.dtype) for n, b in first.items()}
    pool.give_back(1, bigger)
    pool.give_back(1, first)  # a smaller set does not push out the larger one
    assert pool.take(1, 8, state(8)) is bigger
    pool.give_back(1, bigger)
    pool.clear()
    assert pool.held_bytes == 0


@pytest.fixture(scope="module")
def setup(pattern_bundle, pattern_test_images):
    model = anytime.load(pattern_bundle, device="cpu", threads=1)
    images, _ = pattern_test_images
    pre = model.preprocessor
    x = pre.normalise(np.stack([pre.to_array(img) for img in images]))
    thresholds = model.calibrate("50%").threshold_array()
    return model, x, thresholds


def reference_exits(model, x, thresholds):
    """Exits from every exit's logits on the whole input (no compaction, no buffers)."""
    conf, _ = softmax_confidence(model.executor.run_all(x))
    return first_exit(conf, thresholds)


def test_batches_reuse_the_gather_buffers_and_answer_the_same(setup):
    model, x, thresholds = setup
    ex = model.executor
    ex.free_buffers()
    expected = reference_exits(model, x, thresholds)
    _, _, exits, _ = ex.run_early_exit(x[:64], thresholds)
    np.testing.assert_array_equal(exits, expected[:64])
    kept = {stage: {n: id(b) for n, b in bufs.items()} for stage, bufs in ex.gather_buffers._free.items()}
    assert kept and ex.gather_buffers.held_bytes > 0  # rows went on past the first stage, through buffers
    for start in range(64, len(x), 64):
        _, _, exits, _ = ex.run_early_exit(x[start : start + 64], thresholds)
        np.testing.assert_array_equal(exits, expected[start : start + 64])
    # The same arrays served every batch (the last, smaller one included).
    assert {s: {n: id(b) for n, b in bufs.items()} for s, bufs in ex.gather_buffers._free.items()} == kept
    ex.free_buffers()
    assert ex.gather_buffers.held_bytes == 0 and ex.queue_buffers.held_bytes == 0


def test_threads_on_one_executor_do_not_share_buffers(setup):
    model, x, thresholds = setup
    ex = model.executor
    expected = reference_exits(model, x, thresholds)
    got = np.full(len(x), -1)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for _ in range(5):
                for start in range(offset, len(x), 64 * 4):
                    _, _, exits, _ = ex.run_early_exit(x[start : start + 64], thresholds)
                    got[start : start + 64] = exits
                    np.testing.assert_array_equal(exits, expected[start : start + 64])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(64 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    np.testing.assert_array_equal(got, expected)
