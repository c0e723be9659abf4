"""`export_bundle`: a run directory -> a validated ONNX bundle, written atomically.

Everything is written into a temporary directory next to the output, validated there (onnx checker,
names, shapes at two batch sizes, values against PyTorch, the manifest's own integrity check) and only
then renamed into place, so a failed or interrupted export never leaves a partial bundle behind.
"""

from __future__ import annotations

from anytime.errors import require_torch

require_torch(
    "Exporting (anytime export, anytime.export)"
)  # before any torch import: one clear line instead of a traceback

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import anytime
from anytime.errors import BundleError, ConfigError, DatasetError
from anytime.export.errors import OutputExistsError, WeightSizeError
from anytime.export.onnx_stages import (
    DEFAULT_OPSET,
    EXPORTERS,
    export_full_exit,
    export_stage,
    initializer_bytes,
    max_opset,
    plan_stages,
)
from anytime.export.source import ExportSource, load_source
from anytime.export.validate import (
    DEFAULT_ATOL,
    Check,
    Report,
    validate_full_exits,
    validate_stages,
)
from anytime.fileio import atomic_write_bytes, atomic_write_json, current_umask
from anytime.formats import bundle as mf
from anytime.formats.preprocessing import PreprocessingSpec, Preprocessor
from anytime.formats.rundir import MODEL_WEIGHTS
from anytime.models.costs import exit_costs, exit_params
from anytime.runtime.engine import StageExecutor

log = logging.getLogger(__name__)

# Stage graphs may hold a little more than params x 4 bytes (folded BatchNorm adds a conv bias; BatchNorm
# that cannot be folded keeps its running statistics), never a second copy of anything.
MAX_WEIGHT_RATIO = 1.10
MIN_OPSET = 13  # dynamic-axis Slice/Squeeze semantics the stages rely on


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict[str, Any]
    checks: list[Check]
    seconds: float
    size_bytes: int  # all files of the bundle
    stage_bytes: int  # stage graphs only
    weight_bytes: int  # weights stored in the stage graphs
    param_count: int
    files: list[str] = field(default_factory=list)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    @property
    def weight_ratio(self) -> float:
        """Stage weight bytes / (parameters x 4): about 1 when no weight is stored twice."""
        return self.weight_bytes / max(1, 4 * self.param_count)


def _input_spec(src: ExportSource) -> PreprocessingSpec:
    spec = src.model.spec
    pre = src.meta.get("preprocessing") or {}
    try:
        return PreprocessingSpec.for_model(
            spec.in_channels, spec.image_size, pre["mean"], pre["std"], pre.get("resize"),
            pre.get("interpolation", "bilinear"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"model.json preprocessing {pre} does not fit the {spec.in_channels}-channel model ({exc}); "
            "fix model.json (mean and std, one value per channel)"
        ) from exc


def _images(split: Any, indices: Any, preprocessor: Preprocessor) -> np.ndarray:
    """Validation images preprocessed one by one, then stacked: image folders hold images of any size."""
    arrays = []
    for i in indices:
        image, _ = split[int(i)]
        arrays.append(preprocessor.to_array(image, f"validation image {int(i)}"))
    return preprocessor.normalise(np.stack(arrays))


def _prepare_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory; choose another path")
    is_bundle = (out / mf.MANIFEST_FILE).is_file()
    if not force:
        what = "a bundle" if is_bundle else "a directory"
        raise OutputExistsError(
            f"--out {out} already exists ({what}); pass --force (force=True) to replace it, or choose another path"
        )
    if not is_bundle and any(out.iterdir()):
        # --force must never wipe an unrelated directory (think `--out .`).
        raise OutputExistsError(
            f"--out {out} is a non-empty directory without {mf.MANIFEST_FILE}; --force only replaces bundles, "
            "so remove it yourself or choose another path"
        )


def _publishable_modes(tmp: Path) -> None:
    """Give the bundle the permissions of a normally created directory (mkdtemp/mkstemp make them private)."""
    umask = current_umask()
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _calibration(
    chain: StageExecutor, src: ExportSource, preprocessor: Preprocessor, batch_size: int, progress: bool | None
) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    n, k = len(src.val_split), chain.num_exits
    logits = np.empty((k, n, src.model.spec.num_classes), dtype=np.float32)
    with tqdm(
        total=n, desc="calibration logits", unit="img", disable=None if progress is None else not progress, leave=False
    ) as bar:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            logits[:, start:stop] = chain.run_all(_images(src.val_split, range(start, stop), preprocessor))
            bar.update(stop - start)
    return logits, np.asarray(src.val_split.labels, dtype=np.int64)


def _provenance(src: ExportSource) -> dict[str, Any]:
    cfg = src.config
    return {
        "run_dir": str(src.run_dir.resolve()),
        "method": cfg.get("method"),
        "epochs": cfg.get("epochs"),
        "anytime_version": anytime.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": src.data_spec,
        "weights_sha256": mf.sha256_file(src.run_dir / MODEL_WEIGHTS),
    }


def export_bundle(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    opset: int | None = None,
    full_exits: bool = False,
    data: str | None = None,
    split: str | os.PathLike | None = None,
    force: bool = False,
    atol: float = DEFAULT_ATOL,
    rtol: float = 0.0,
    exporter: str = "torchscript",
    cost_convention: str = "macs",
    validation_images: int = 32,
    batch_size: int = 256,
    report: Report | None = None,
    progress: bool | None = None,
) -> ExportResult:
    """Export the model of `run_dir` as a bundle at `out` (see docs/architecture.md for the format).

    Raises an `ExportError` subclass (nothing written) when a graph fails validation against PyTorch,
    `DatasetError` when the run's validation images cannot be found (pass `data=` to relocate them).
    `report` receives each validation check as it completes (the CLI prints them).
    """
    started = time.perf_counter()
    if validation_images < 1 or batch_size < 1:
        raise ConfigError(
            f"validation_images and batch_size must be at least 1, got {validation_images} and {batch_size}"
        )
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    if not MIN_OPSET <= opset <= max_opset(exporter):
        raise ConfigError(
            f"opset {opset} is not supported for the stage graphs with the {exporter} exporter; use "
            f"{MIN_OPSET}..{max_opset(exporter)} (default {DEFAULT_OPSET})"
        )
    if cost_convention not in mf.COST_CONVENTIONS:
        raise ConfigError(f"unknown cost convention {cost_convention!r}; expected one of {mf.COST_CONVENTIONS}")
    if not atol > 0 or not rtol >= 0:
        raise ConfigError(f"atol must be positive and rtol >= 0, got atol={atol}, rtol={rtol}")
    out = Path(out)
    _prepare_out(out, force)  # fail before the slow work
    src = load_source(run_dir, data=data, split=split)
    model = src.model.eval()
    num_classes = model.spec.num_classes
    labels = np.asarray(src.val_split.labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"the validation labels of {src.data_spec} reach {int(labels.max())} but the model has {num_classes} "
            "classes; export with the dataset the model was trained on (--data KIND:PATH)"
        )
    input_spec = _input_spec(src)
    preprocessor = Preprocessor(input_spec)
    val_images = _images(src.val_split, range(min(validation_images, len(src.val_split))), preprocessor)

    # The temporary bundle is made next to the output and renamed into place: that needs the output's
    # real name and parent, which `-o .` (or `bundles/fm/..`) does not spell out.
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # Batch 2 as the tracing example: a batch of 1 invites exporters to specialise the batch axis.
        plans = plan_stages(model, torch.from_numpy(val_images[np.arange(2) % len(val_images)]))
        stage_paths, weight_bytes, stage_bytes = [], 0, 0
        for k, (stage, plan) in enumerate(zip(model.stages, plans)):
            graph = export_stage(stage, plan, opset=opset, exporter=exporter)
            weight_bytes += initializer_bytes(graph)
            stage_bytes += len(graph)
            path = tmp / mf.stage_file(k)
            atomic_write_bytes(path, graph)
            stage_paths.append(path)
            log.info("exported %s (%d bytes)", path.name, len(graph))
        param_count = sum(p.numel() for p in model.parameters())
        float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        allowed = MAX_WEIGHT_RATIO * 4 * (param_count + float_buffers)
        ratio = weight_bytes / max(1, 4 * param_count)
        weights_ok = weight_bytes <= allowed
        weight_check = Check(
            "stage graphs",
            "weights stored once",
            weights_ok,
            f"{weight_bytes / 1e6:.3f} MB of weights = {ratio:.3f} x params x 4 bytes",
            error=None if weights_ok else WeightSizeError,
        )
        if report:
            report(weight_check)
        if not weights_ok:
            raise WeightSizeError(
                f"the stage graphs hold {weight_bytes} bytes of weights, {ratio:.2f}x the {param_count} parameters "
                "x 4 bytes: weights are duplicated across stages or constant folding inflated them; nothing was written"
            )
        ios = [p.io for p in plans]
        checks = [weight_check] + validate_stages(
            model, stage_paths, ios, val_images, atol=atol, rtol=rtol, report=report
        )
        full_entries = []
        if full_exits:
            example = torch.from_numpy(val_images[np.arange(2) % len(val_images)])
            exit_paths = {}
            for k in range(model.num_exits):
                path = tmp / mf.exit_file(k + 1)
                atomic_write_bytes(path, export_full_exit(model, k, example, opset=opset, exporter=exporter))
                exit_paths[k] = path
            checks += validate_full_exits(model, exit_paths, val_images, atol=atol, rtol=rtol, report=report)
            # "exit" counts from 1 as users do (serve's exit=3, result rows): exit_{k+1}.onnx answers
            # what stage_k's logits_k answer.
            full_entries = [
                {
                    "exit": k + 1,
                    "file": p.name,
                    "inputs": [mf.IMAGE_INPUT],
                    "logits": mf.logits_name(k),
                    "sha256": mf.sha256_file(p),
                }
                for k, p in exit_paths.items()
            ]

        chain = StageExecutor.for_graphs(stage_paths, [io.as_tuple() for io in ios], mf.IMAGE_INPUT)
        logits, cal_labels = _calibration(chain, src, preprocessor, batch_size, progress)
        cal_path = tmp / mf.CALIBRATION_FILE
        with open(cal_path, "wb") as fh:
            np.savez(fh, logits=logits, labels=cal_labels, indices=src.val_indices)
        accuracy = [float((logits[e].argmax(axis=1) == cal_labels).mean()) for e in range(len(ios))]

        costs = {conv: exit_costs(model, conv) for conv in mf.COST_CONVENTIONS}
        params = exit_params(model)
        max_diff = [c.max_diff for c in checks if c.what == "values" and c.subject.startswith("exit ")]
        stages = []
        for k, (path, io) in enumerate(zip(stage_paths, ios)):
            stages.append(
                {
                    "index": k,
                    "file": path.name,
                    "inputs": io.inputs,
                    "outputs": io.outputs,
                    "logits": io.logits,
                    "cost": {conv: int(costs[conv][k]) for conv in mf.COST_CONVENTIONS},
                    "params": int(params[k]),
                    "val_accuracy": round(accuracy[k], 6),
                    "sha256": mf.sha256_file(path),
                    "bytes": path.stat().st_size,
                }
            )
        classes = [str(c) for c in src.meta.get("classes") or range(num_classes)]
        manifest = {
            "format": mf.FORMAT,
            "format_version": mf.FORMAT_VERSION,
            "arch": model.spec.arch,
            "num_classes": num_classes,
            "classes": classes,
            "input": input_spec.to_manifest(),
            "cost_convention": cost_convention,
            "cost_note": "cost is cumulative per image: all stages and heads up to and including this exit",
            "stages": stages,
            "full_exits": full_entries,
            "calibration": {
                "file": cal_path.name,
                "sha256": mf.sha256_file(cal_path),
                "split": "validation",
                "source": src.split_source,
                "count": int(len(cal_labels)),
                "arrays": {
                    "logits": "float32 (exits, count, classes)",
                    "labels": "int64 (count,)",
                    "indices": "int64 (count,): positions in the dataset split the images come from",
                },
            },
            "provenance": _provenance(src),
            "export": {
                "exporter": exporter,
                "opset": opset,
                "atol": atol,
                "rtol": rtol,
                "max_abs_diff": max_diff,
                "validation_images": int(len(val_images)),
                "param_count": int(param_count),
                "weight_bytes": int(weight_bytes),
                "torch": torch.__version__,
            },
        }
        atomic_write_json(tmp / mf.MANIFEST_FILE, manifest)
        problems = mf.check_bundle(tmp)
        if problems:  # a bug in this module, not in the user's model; still, never publish it
            raise BundleError("the exported bundle fails its own check: " + "; ".join(problems))
        files = sorted(p.name for p in tmp.iterdir())
        size = sum(p.stat().st_size for p in tmp.iterdir())
        _prepare_out(out, force)  # the output may have appeared meanwhile
        _publishable_modes(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    log.info("bundle written to %s in %.1f s (%d bytes)", out, seconds, size)
    return ExportResult(out, manifest, checks, seconds, size, stage_bytes, weight_bytes, param_count, files)
