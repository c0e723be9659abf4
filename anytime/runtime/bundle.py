"""Reading and validating an exported bundle (manifest.json + one ONNX graph per exit stage).

Torch-free: only json, hashlib and numpy. The format is fixed in docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anytime.errors import BundleError

BUNDLE_FORMAT = "anytime-bundle"
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
COST_CONVENTIONS = ("macs", "msdnet")

# The embedded default bundle ships as package data (anytime/assets/default/).
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"
# About a hundred Fashion-MNIST test images in class-named folders, shipped with the embedded model.
SAMPLE_IMAGES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"


@dataclass(frozen=True)
class InputSpec:
    """How raw pixels become the network input (the manifest's `input` block)."""

    name: str
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None
    crop: str
    interpolation: str
    color: str  # "L" or "RGB"

    @classmethod
    def from_manifest(cls, d: dict[str, Any], where: str) -> "InputSpec":
        try:
            channels = int(d["channels"])
            color = str(d.get("color") or ("L" if channels == 1 else "RGB"))
            spec = cls(
                name=str(d.get("name", "image")),
                channels=channels,
                height=int(d["height"]),
                width=int(d["width"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                resize=None if d.get("resize") is None else int(d["resize"]),
                crop=str(d.get("crop", "center")),
                interpolation=str(d.get("interpolation", "bilinear")),
                color=color,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: the 'input' block is incomplete or malformed ({exc!r}); re-export the bundle") from exc
        if spec.color not in ("L", "RGB") or spec.channels != (1 if spec.color == "L" else 3):
            raise BundleError(
                f"{where}: input color {spec.color!r} with {spec.channels} channel(s) is not supported; "
                "expected 'L' with 1 channel or 'RGB' with 3"
            )
        if len(spec.mean) != spec.channels or len(spec.std) != spec.channels or min(spec.std) <= 0:
            raise BundleError(f"{where}: input mean/std must have {spec.channels} value(s) and std > 0, got {spec.mean}/{spec.std}")
        if spec.crop != "center":
            raise BundleError(f"{where}: input crop {spec.crop!r} is not supported (only 'center')")
        return spec


@dataclass(frozen=True)
class StageSpec:
    index: int
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    logits: str
    cost: float  # cumulative, in the bundle's cost convention
    params: int | None
    val_accuracy: float | None
    sha256: str | None

    @property
    def state_outputs(self) -> tuple[str, ...]:
        """Outputs handed to the next stage (all but the logits)."""
        return tuple(o for o in self.outputs if o != self.logits)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk: where it is and what its manifest says."""

    path: Path
    manifest: dict[str, Any]
    input: InputSpec
    stages: tuple[StageSpec, ...]
    classes: tuple[str, ...]
    cost_convention: str

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @property
    def exit_costs(self) -> np.ndarray:
        """Cumulative cost per image of exits 1..K (float64, the bundle's cost convention)."""
        return np.array([s.cost for s in self.stages], dtype=np.float64)

    @property
    def arch(self) -> str:
        return str(self.manifest.get("arch", "?"))

    def file(self, name: str) -> Path:
        return self.path / name

    def load_calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Validation logits (K, N, C) float32 and labels (N,) int64 recorded at export."""
        cal = self.manifest.get("calibration")
        if not cal or not cal.get("file"):
            raise BundleError(
                f"bundle {self.path} carries no calibration data; re-export it with `anytime export` "
                "(calibration needs the run's validation logits), or pass exit=K"
            )
        path = self.file(cal["file"])
        try:
            with np.load(path, allow_pickle=False) as data:
                logits = np.asarray(data["logits"], dtype=np.float32)
                labels = np.asarray(data["labels"], dtype=np.int64)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"calibration file {path} cannot be read ({exc}); re-export the bundle") from exc
        k, n = self.num_exits, labels.shape[0]
        if logits.ndim != 3 or logits.shape[0] != k or logits.shape[1] != n or logits.shape[2] != len(self.classes):
            raise BundleError(
                f"calibration file {path}: logits have shape {logits.shape}, expected ({k}, {n}, {len(self.classes)}); "
                "re-export the bundle"
            )
        if n == 0:
            raise BundleError(f"calibration file {path} holds no validation samples; re-export with a validation split")
        return logits, labels

    def verify_checksums(self) -> list[str]:
        """Recompute sha256 of every file the manifest lists; return the files checked. Raise on mismatch."""
        checked = []
        entries = [(s.file, s.sha256) for s in self.stages]
        cal = self.manifest.get("calibration") or {}
        if cal.get("file"):
            entries.append((cal["file"], cal.get("sha256")))
        entries += [(e.get("file"), e.get("sha256")) for e in self.manifest.get("full_exits") or []]
        for name, expected in entries:
            if not name or not expected:
                continue
            actual = sha256_file(self.file(name))
            if actual != expected:
                raise BundleError(
                    f"bundle {self.path}: {name} is damaged (sha256 {actual[:12]}..., manifest says {expected[:12]}...); "
                    "re-export or re-copy the bundle"
                )
            checked.append(name)
        return checked


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_bundle_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def resolve_bundle_path(bundle: str | os.PathLike | None) -> Path:
    if bundle is None:
        if not (DEFAULT_BUNDLE_DIR / MANIFEST).is_file():
            raise BundleError(
                f"the embedded default model is not installed (no {DEFAULT_BUNDLE_DIR / MANIFEST}); "
                "pass a bundle directory written by `anytime export`"
            )
        return DEFAULT_BUNDLE_DIR
    path = Path(bundle)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"bundle directory '{bundle}' does not exist; pass a directory written by `anytime export`")
    if not (path / MANIFEST).is_file():
        raise BundleError(f"'{bundle}' is not a bundle: it has no {MANIFEST}; pass a directory written by `anytime export`")
    return path


def read_bundle(bundle: str | os.PathLike | None = None, verify: bool = False) -> Bundle:
    """Read and validate a bundle's manifest; with `verify`, also check every file's sha256."""
    path = resolve_bundle_path(bundle)
    where = str(path / MANIFEST)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where} cannot be read as JSON ({exc}); re-export the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where} is not an anytime bundle manifest (format={got!r}, expected {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{where}: bundle format_version {version!r} is not supported by this anytime "
            f"(supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade anytime or re-export the bundle"
        )
    # The exporter's schema check (torch-free) is the contract; the parsing below only builds typed views.
    from anytime.export.manifest import schema_problems

    problems = schema_problems(manifest)
    if problems:
        raise BundleError(f"{where}: " + "; ".join(problems) + "; re-export the bundle")
    convention = manifest.get("cost_convention")
    if convention not in COST_CONVENTIONS:
        raise BundleError(f"{where}: unknown cost_convention {convention!r}; expected one of {COST_CONVENTIONS}")
    input_spec = InputSpec.from_manifest(manifest.get("input") or {}, where)

    raw_stages = manifest.get("stages") or []
    if not raw_stages:
        raise BundleError(f"{where} lists no stages; re-export the bundle")
    stages = []
    for i, s in enumerate(raw_stages):
        try:
            cost_table = s["cost"]
            cost = float(cost_table[convention] if isinstance(cost_table, dict) else cost_table)
            stage = StageSpec(
                index=int(s.get("index", i)),
                file=str(s["file"]),
                inputs=tuple(str(v) for v in s["inputs"]),
                outputs=tuple(str(v) for v in s["outputs"]),
                logits=str(s["logits"]),
                cost=cost,
                params=None if s.get("params") is None else int(s["params"]),
                val_accuracy=None if s.get("val_accuracy") is None else float(s["val_accuracy"]),
                sha256=s.get("sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: stage {i} entry is incomplete ({exc!r}); re-export the bundle") from exc
        if stage.index != i:
            raise BundleError(f"{where}: stage entries out of order (entry {i} has index {stage.index})")
        if stage.logits not in stage.outputs:
            raise BundleError(f"{where}: stage {i} logits {stage.logits!r} is not among its outputs {stage.outputs}")
        if not (path / stage.file).is_file():
            raise BundleError(f"bundle {path} is incomplete: {stage.file} (stage {i}) is missing; re-export or re-copy it")
        stages.append(stage)
    # The state chain: stage k's inputs are exactly stage k-1's non-logit outputs.
    if stages[0].inputs != (input_spec.name,):
        raise BundleError(f"{where}: stage 0 inputs {stages[0].inputs} should be ({input_spec.name!r},)")
    for prev, cur in zip(stages, stages[1:]):
        if set(cur.inputs) != set(prev.state_outputs):
            raise BundleError(
                f"{where}: stage {cur.index} inputs {cur.inputs} do not match stage {prev.index}'s state outputs {prev.state_outputs}"
            )
    costs = [s.cost for s in stages]
    if any(c <= 0 for c in costs) or any(b < a for a, b in zip(costs, costs[1:])):
        raise BundleError(f"{where}: exit costs must be positive and cumulative (non-decreasing), got {costs}")

    num_classes = int(manifest.get("num_classes", 0))
    classes = tuple(str(c) for c in (manifest.get("classes") or [str(i) for i in range(num_classes)]))
    if num_classes and len(classes) != num_classes:
        raise BundleError(f"{where}: {len(classes)} class names for num_classes={num_classes}")
    cal = manifest.get("calibration")
    if cal and cal.get("file") and not (path / cal["file"]).is_file():
        raise BundleError(f"bundle {path} is incomplete: calibration file {cal['file']} is missing; re-export or re-copy it")

    bundle_obj = Bundle(path, manifest, input_spec, tuple(stages), classes, str(convention))
    if verify:
        bundle_obj.verify_checksums()
    return bundle_obj
