"""Validate exported graphs against the PyTorch model, optimum style, failing by default.

Per graph: onnx's checker, then input/output names, then output shapes at batch 1 and 3 (a batch size
baked into a graph shows up there), then the logits of every exit from the chained stages against
PyTorch in eval mode (max absolute difference within `atol`; with `rtol` > 0, within
`atol + rtol * the image's largest |logit|`) and argmax agreement. Each check is one
`Check` (a ✓/✗ line with the max difference); the first failing kind raises its typed ExportError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anytime.errors import ExportError
from anytime.export.errors import (
    ArgmaxError,
    AtolError,
    OnnxCheckError,
    OutputNamesError,
    ShapeError,
)
from anytime.export.onnx_stages import StageIO
from anytime.formats.bundle import IMAGE_INPUT, logits_name
from anytime.models.base import MultiExitNetwork, State
from anytime.runtime.engine import CPU, StageExecutor, create_session

log = logging.getLogger(__name__)


def make_session(path: Path):
    return create_session(path, [CPU])


DEFAULT_ATOL = 1e-4
SHAPE_BATCHES = (1, 3)


@dataclass
class Check:
    subject: str  # "stage_1.onnx", "exit 2"
    what: str  # "onnx checker", "names", "shapes", "values", "argmax"
    ok: bool
    detail: str = ""
    max_diff: float | None = None
    error: type[ExportError] | None = None

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        return f"{mark} {self.subject}: {self.what}" + (f" ({self.detail})" if self.detail else "")


Report = Callable[[Check], None]


class Validator:
    def __init__(self, report: Report | None = None) -> None:
        self.checks: list[Check] = []
        self._report = report

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        (log.info if check.ok else log.error)(check.line())
        if self._report is not None:
            self._report(check)
        return check

    def raise_failures(self) -> None:
        """Raise the typed error of the first failing check, naming every failure."""
        failed = [c for c in self.checks if not c.ok]
        if failed:
            error = failed[0].error or ExportError
            raise error("export validation failed, nothing was written: " + "; ".join(c.line()[2:] for c in failed))


def _torch_chain(model: MultiExitNetwork, images: np.ndarray) -> list[tuple[State, State, torch.Tensor]]:
    """(input state, output state, logits) of every stage in PyTorch eval mode."""
    out = []
    state: State = (torch.from_numpy(images),)
    with torch.no_grad():
        for stage in model.stages:
            next_state, logits = stage(state)
            out.append((state, next_state, logits))
            state = next_state
    return out


def _batch_of(images: np.ndarray, n: int) -> np.ndarray:
    # Real images when there are enough; repeated ones otherwise (shapes are all this is used for).
    return np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])), dtype=np.float32)


def _check_graph(v: Validator, path: Path, subject: str) -> bool:
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except Exception as exc:
        v.add(Check(subject, "onnx checker", False, f"{type(exc).__name__}: {exc}", error=OnnxCheckError))
        return False
    v.add(Check(subject, "onnx checker", True))
    return True


def _check_names(v: Validator, session, subject: str, inputs: list[str], outputs: list[str]) -> bool:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    ok = got_in == inputs and got_out == outputs
    detail = f"{got_in} -> {got_out}" if ok else f"expected {inputs} -> {outputs}, got {got_in} -> {got_out}"
    v.add(Check(subject, "names", ok, detail, error=None if ok else OutputNamesError))
    return ok


def _check_shapes(
    v: Validator,
    session,
    subject: str,
    feeds_by_batch: dict[int, dict[str, np.ndarray]],
    expected_by_batch: dict[int, list[tuple[int, ...]]],
) -> bool:
    mismatches = []
    for b, feeds in feeds_by_batch.items():
        try:
            got = [tuple(o.shape) for o in session.run(None, feeds)]
        except Exception as exc:  # a baked-in batch size usually fails inside ORT's shape checks
            mismatches.append(f"batch {b}: ONNX Runtime failed: {exc}".splitlines()[0])
            continue
        if got != expected_by_batch[b]:
            mismatches.append(f"batch {b}: got {got}, PyTorch {expected_by_batch[b]}")
    ok = not mismatches
    detail = "batch " + ", ".join(str(b) for b in feeds_by_batch) + " match PyTorch" if ok else "; ".join(mismatches)
    v.add(Check(subject, "shapes", ok, detail, error=None if ok else ShapeError))
    return ok


def _check_values(v: Validator, subject: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    err = np.abs(got - ref)
    diff = float(err.max()) if got.size else 0.0
    finite = bool(np.isfinite(got).all())
    # rtol scales with each image's largest |logit|: rounding in the last layer grows with the size of the
    # features it sums, not with the (possibly small) logit it produces.
    row_scale = np.abs(ref).max(axis=1, keepdims=True) if ref.size else np.zeros((len(ref), 1))
    ok = finite and bool(np.all(err <= atol + rtol * row_scale))
    bound = f"atol {atol:.0e}" + (f" + rtol {rtol:.0e} x max |logit|" if rtol else "")
    detail = f"max |diff| {diff:.2e} {'<=' if ok else '>'} {bound}" + ("" if finite else ", non-finite values")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if not ok and finite and scale > 0 and diff / scale < 1e-5:
        # Large logits (untrained or uncalibrated deep nets) carry float32 rounding of ~1e-7 x their size.
        detail += (
            f"; logits reach {scale:.3g}, so this is a relative difference of {diff / scale:.1e} (float32 "
            "rounding): pass --rtol 1e-5 (rtol=1e-5) to allow it"
        )
    v.add(Check(subject, "values", ok, detail, max_diff=diff, error=None if ok else AtolError))
    # Argmax: a disagreement only counts where PyTorch's top two logits are further apart than 2 tolerances;
    # closer than that, the prediction is a tie that a tolerance-level difference may flip either way.
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref, ref - np.inf], axis=1)
    decided = (top2[:, 1] - top2[:, 0]) > 2 * (atol + rtol * row_scale[:, 0])
    disagree = got.argmax(axis=1) != ref.argmax(axis=1)
    real = int((disagree & decided).sum())
    n = len(ref)
    detail = f"agrees on {n - int(disagree.sum())}/{n} images" + (f", {real} not ties" if real else "")
    v.add(Check(subject, "argmax", real == 0, detail, error=None if real == 0 else ArgmaxError))


def validate_stages(
    model: MultiExitNetwork,
    paths: Sequence[Path],
    io: Sequence[StageIO],
    images: np.ndarray,
    atol: float = DEFAULT_ATOL,
    rtol: float = 0.0,
    report: Report | None = None,
) -> list[Check]:
    """Check the stage graphs against `model` on `images` (float32 NCHW, real validation images)."""
    v = Validator(report)
    model.eval()
    for path in paths:
        _check_graph(v, path, path.name)
    v.raise_failures()
    sessions = [make_session(p) for p in paths]
    for session, path, stage_io in zip(sessions, paths, io):
        _check_names(v, session, path.name, stage_io.inputs, stage_io.outputs)
    v.raise_failures()
    refs = {b: _torch_chain(model, _batch_of(images, b)) for b in SHAPE_BATCHES}
    for k, (session, path, stage_io) in enumerate(zip(sessions, paths, io)):
        feeds = {b: {n: t.numpy() for n, t in zip(stage_io.inputs, refs[b][k][0])} for b in SHAPE_BATCHES}
        expected = {b: [tuple(t.shape) for t in (*refs[b][k][1], refs[b][k][2])] for b in SHAPE_BATCHES}
        _check_shapes(v, session, path.name, feeds, expected)
    v.raise_failures()
    chain = StageExecutor.for_graphs(paths, [stage_io.as_tuple() for stage_io in io], IMAGE_INPUT)
    got = list(chain.run_all(images))
    ref = [logits.numpy() for _, _, logits in _torch_chain(model, images)]
    for k in range(len(io)):
        _check_values(v, f"exit {k + 1}", got[k], ref[k], atol, rtol)
    v.raise_failures()
    return v.checks


def validate_full_exits(
    model: MultiExitNetwork,
    paths: dict[int, Path],
    images: np.ndarray,
    atol: float = DEFAULT_ATOL,
    rtol: float = 0.0,
    report: Report | None = None,
) -> list[Check]:
    """Check the image -> logits graphs of single exits against `model`."""

    v = Validator(report)
    for path in paths.values():
        _check_graph(v, path, path.name)
    v.raise_failures()
    ref = [logits.numpy() for _, _, logits in _torch_chain(model, images)]
    shape_refs = {b: _torch_chain(model, _batch_of(images, b)) for b in SHAPE_BATCHES}
    for k, path in paths.items():
        session = make_session(path)
        if not _check_names(v, session, path.name, [IMAGE_INPUT], [logits_name(k)]):
            continue
        feeds = {b: {IMAGE_INPUT: _batch_of(images, b)} for b in SHAPE_BATCHES}
        expected = {b: [tuple(shape_refs[b][k][2].shape)] for b in SHAPE_BATCHES}
        if _check_shapes(v, session, path.name, feeds, expected):
            _check_values(v, path.name, session.run(None, {IMAGE_INPUT: images})[0], ref[k], atol, rtol)
    v.raise_failures()
    return v.checks
