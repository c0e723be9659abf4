"""Serving from several threads, and long or broken streams: shared state must not leak between calls."""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

import anytime
from anytime.errors import InputImageError
from anytime.formats import preprocessing
from anytime.runtime.inputs import InputItem, MissingInput

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_decoding_in_threads_neither_changes_the_warning_filters_nor_lets_a_bomb_through(monkeypatch):
    """Decode threads (the decode pool, or several `predict` calls) once each turned PIL's
    DecompressionBombWarning into an error with `warnings.catch_warnings`, which saves and restores the
    process-wide filter list: interleaved, one thread's exit removed the filter under another thread still
    decoding (a bomb then passed as a warning) and the last exit put it back for good."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # PIL warns above 200 pixels, fails above 400
    bomb, small = png(15), png(8)  # 225 pixels: a bomb by PIL's warning, within anytime's max_pixels
    open_image = Image.open
    b_opening, a_done = threading.Event(), threading.Event()
    first_open: set[str] = set()

    def interleaved_open(*args, **kwargs):
        # The first open of each thread: A waits until B is decoding too, B waits until A has finished.
        me = threading.current_thread().name
        if me not in first_open:
            first_open.add(me)
            if me == "A":
                assert b_opening.wait(10)
            elif me == "B":
                b_opening.set()
                assert a_done.wait(10)
        return open_image(*args, **kwargs)

    monkeypatch.setattr(Image, "open", interleaved_open)
    # As a process that does not make warnings errors (this suite does; pytest restores its filters after).
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    before = list(warnings.filters)
    outcome: dict[str, object] = {}

    def decode(data: bytes) -> None:
        me = threading.current_thread().name
        try:
            outcome[me] = preprocessing.decode_bytes(data, me).size
        except InputImageError as exc:
            outcome[me] = exc
        finally:
            if me == "A":
                a_done.set()

    threads = [threading.Thread(target=decode, args=(d,), name=n) for n, d in (("A", small), ("B", bomb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert list(warnings.filters) == before
    assert outcome["A"] == (8, 8)
    assert isinstance(outcome["B"], InputImageError) and "decompression bomb" in str(outcome["B"])


@pytest.fixture(scope="module")
def model(pattern_bundle):
    return anytime.load(pattern_bundle, device="cpu", threads=1)


class SourceBroke(Exception):
    pass


def rows(preds) -> list[tuple]:
    return [(r["path"], r["label"], r["exit"], r["confidence"], r["error"]) for r in preds.to_rows()]


@pytest.mark.parametrize("scheduler", ["batch", "refill"])
@pytest.mark.parametrize("on_error", ["raise", "record"])
def test_a_source_that_raises_midway_gets_every_input_before_it_answered_once_then_its_error(
    model, pattern_test_images, scheduler, on_error
):
    """The stream pulled the next batch before yielding the one decoded, so an error of the source lost
    that batch and the items it gave towards the next (per batch: 86 of 150 inputs; refilling: all 150,
    still in the queues)."""
    x, _ = pattern_test_images
    items = [InputItem(x[i], f"img_{i:03d}") for i in range(150)]

    def source():
        yield from items
        raise SourceBroke("the source broke after 150 inputs")

    expected = rows(model.predict(items, budget="50%", batch_size=64, scheduler=scheduler))
    got: list[tuple] = []
    with pytest.raises(SourceBroke, match="after 150 inputs"):
        for part in model.predict_batches(
            source(), budget="50%", batch_size=64, scheduler=scheduler, on_error=on_error, max_wait_rows=128
        ):
            got += rows(part)
    assert got == expected


def test_an_unreadable_input_under_on_error_raise_answers_the_batches_before_it_with_either_scheduler(
    model, pattern_test_images
):
    """Per batch, the batches before the one holding the unreadable input are yielded before the error; the
    refilling scheduler lost them in its queues."""
    x, _ = pattern_test_images
    items = [InputItem(x[i], f"img_{i:03d}") for i in range(200)]
    items[140] = InputItem(MissingInput("gone.png", "gone.png: file not found"), "gone.png")
    expected = rows(model.predict(items[:128], budget="50%", batch_size=64, scheduler="batch"))
    for scheduler in ("batch", "refill"):
        got: list[tuple] = []
        with pytest.raises(InputImageError, match="gone.png"):
            for part in model.predict_batches(
                items, budget="50%", batch_size=64, scheduler=scheduler, on_error="raise"
            ):
                got += rows(part)
        assert got == expected, scheduler


def test_threads_predicting_at_once_on_one_model_answer_as_each_would_alone(
    pattern_bundle, pattern_test_images, tmp_path
):
    """Eight threads on one model (and two on a second model with IO binding) start together, with other
    batch sizes, budgets, schedulers, strict, ordering and inputs (arrays, PNG files), and repeat: every call's
    rows equal those of the same call run alone."""
    x, _ = pattern_test_images
    x = x[:120]
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"img_{i:03d}.png"))
        Image.fromarray(x[i, :, :, 0]).save(paths[-1])
    model = anytime.load(pattern_bundle, device="cpu", threads=1, workers=2)
    bound = anytime.load(pattern_bundle, device="cpu", threads=1, io_binding=True)
    calls = [
        (model, x, dict(budget="50%", batch_size=64, scheduler="batch")),
        (model, x, dict(budget="30%", batch_size=17, scheduler="refill", max_wait_rows=34)),
        (model, x, dict(budget="70%", batch_size=50, strict=True)),
        (model, paths, dict(budget="40%", batch_size=7, scheduler="refill", ordered=False)),
        (model, paths, dict(budget="60%", batch_size=16, scheduler="batch")),
        (model, x[:5], dict(exit=2)),
        (model, x, dict(budget="25%", batch_size=33, scheduler="refill", policy="geometric")),
        (model, paths, dict(budget="45%", batch_size=100, strict=True)),
        (bound, x, dict(budget="50%", batch_size=32, scheduler="refill")),
        (bound, x, dict(budget="50%", batch_size=20, scheduler="batch")),
    ]

    def run(m, inputs, options) -> list[tuple]:
        return sorted(rows(m.predict(inputs, **options)), key=lambda r: str(r[0]))  # unordered: by path

    alone = [run(*c) for c in calls]
    start = threading.Barrier(len(calls))
    got: dict[int, list[list[tuple]]] = {i: [] for i in range(len(calls))}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait(30)
            for _ in range(3):
                got[i].append(run(*calls[i]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    for i, expected in enumerate(alone):
        assert got[i] == [expected] * 3, calls[i][2]


@pytest.mark.parametrize("scheduler", ["batch", "refill"])
def test_a_stream_left_early_leaves_no_threads_once_closed(model, pattern_test_images, tmp_path, scheduler):
    x, _ = pattern_test_images
    paths = []
    for i in range(60):
        paths.append(str(tmp_path / f"img_{i:03d}.png"))
        Image.fromarray(x[i, :, :, 0]).save(paths[-1])
    before = set(threading.enumerate())
    stream = model.predict_batches(paths, budget="50%", batch_size=8, scheduler=scheduler, max_wait_rows=16)
    first = next(stream)
    assert len(first) == 8
    stream.close()
    assert set(threading.enumerate()) == before
    for _part in model.predict_batches(x, budget="50%", batch_size=8, scheduler=scheduler, max_wait_rows=16):
        break  # the loop held the only reference: the generator is dropped here
    assert set(threading.enumerate()) == before
