"""The bundle `anytime export` writes and the runtime reads: constants, names, the manifest schema, typed
reading (`read_bundle` -> `Bundle`) and integrity checks (`check_bundle`, `anytime export --check`).

Torch-free (json, hashlib, numpy; onnx or onnxruntime only if installed). The format is documented in
docs/architecture.md; this module is its one definition.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from anytime.errors import BundleError
from anytime.formats.preprocessing import PreprocessingSpec

FORMAT = "anytime-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration.npz"
IMAGE_INPUT = "image"
BATCH_AXIS = "batch"
COST_CONVENTIONS = ("macs", "msdnet")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The embedded default bundle ships as package data (anytime/assets/default/).
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parents[1] / "assets" / "default"
# About a hundred Fashion-MNIST test images in class-named folders, shipped with the embedded model.
SAMPLE_IMAGES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"


def stage_file(k: int) -> str:
    return f"stage_{k}.onnx"


def exit_file(exit_number: int) -> str:
    """File of the full graph image -> logits of exit `exit_number` (1-based, as users count exits)."""
    return f"exit_{exit_number}.onnx"


def state_name(stage: int, i: int) -> str:
    return f"s{stage}_{i}"


def logits_name(stage: int) -> str:
    return f"logits_{stage}"


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- schema


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> TypeGuard[list[str]]:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _plain_file_name(v: Any) -> bool:
    # Bundle files live next to the manifest; a name with a separator or '..' could point anywhere.
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v


def format_problems(manifest: Any) -> list[str]:
    """Problems with `format` / `format_version` alone (checked first: other keys may mean other things)."""
    if not isinstance(manifest, dict):
        return [f"manifest is a JSON {type(manifest).__name__}, expected an object"]
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format is {manifest.get('format')!r}, expected {FORMAT!r}: this is not an anytime bundle")
    version = manifest.get("format_version")
    if not _is_int(version):
        problems.append(f"format_version is {version!r}, expected an integer")
    elif version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
        hint = "upgrade anytime to read it" if version > max(SUPPORTED_FORMAT_VERSIONS) else "re-export the bundle"
        problems.append(f"unknown format_version {version} (this anytime reads version {supported}); {hint}")
    return problems


def _input_problems(block: Any) -> list[str]:
    if not isinstance(block, dict):
        return ["input: missing or not an object"]
    problems = []
    for key in ("channels", "height", "width"):
        size = block.get(key)
        if not _is_int(size) or size <= 0:
            problems.append(f"input.{key} is {size!r}, expected a positive integer")
    channels = block.get("channels")
    for key in ("mean", "std"):
        v = block.get(key)
        if not (isinstance(v, list) and all(_is_number(x) for x in v)):
            problems.append(f"input.{key} is {v!r}, expected a list of numbers")
        elif _is_int(channels) and len(v) != channels:
            problems.append(f"input.{key} has {len(v)} values for {channels} channels")
    std = block.get("std")
    if isinstance(std, list) and any(_is_number(s) and s <= 0 for s in std):
        problems.append(f"input.std {std} has a value <= 0")
    if not isinstance(block.get("name"), str):
        problems.append("input.name is missing")
    resize = block.get("resize")
    if resize is not None and (not _is_int(resize) or resize <= 0):
        problems.append(f"input.resize is {resize!r}, expected null or a positive integer")
    if block.get("crop") not in ("center",):
        problems.append(f"input.crop is {block.get('crop')!r}, expected 'center'")
    if block.get("layout") != "NCHW":
        problems.append(f"input.layout is {block.get('layout')!r}, expected 'NCHW'")
    if block.get("dtype") != "float32":
        problems.append(f"input.dtype is {block.get('dtype')!r}, expected 'float32'")
    if block.get("color") not in ("L", "RGB"):
        problems.append(f"input.color is {block.get('color')!r}, expected 'L' or 'RGB'")
    return problems


def _stage_problems(stages: Any, manifest: dict[str, Any]) -> list[str]:
    if not isinstance(stages, list) or not stages:
        return ["stages: missing or empty list"]
    problems: list[str] = []
    block = manifest.get("input")
    input_name = block.get("name", IMAGE_INPUT) if isinstance(block, dict) else IMAGE_INPUT
    convention = manifest.get("cost_convention")
    expected_inputs: list[str] = [input_name]
    previous_cost: float | None = None
    for k, st in enumerate(stages):
        where = f"stages[{k}]"
        if not isinstance(st, dict):
            problems.append(f"{where} is not an object")
            continue
        if st.get("index") != k:
            problems.append(f"{where}.index is {st.get('index')!r}, expected {k}")
        if not _plain_file_name(st.get("file")):
            problems.append(f"{where}.file is {st.get('file')!r}, expected a file name inside the bundle")
        if not isinstance(st.get("sha256"), str) or not _SHA256.match(st["sha256"]):
            problems.append(f"{where}.sha256 is {st.get('sha256')!r}, expected 64 lowercase hex digits")
        inputs, outputs, logits = st.get("inputs"), st.get("outputs"), st.get("logits")
        if not _is_str_list(inputs) or not _is_str_list(outputs):
            problems.append(f"{where}: inputs/outputs must be lists of names")
            expected_inputs = []
            continue
        if inputs != expected_inputs:
            problems.append(
                f"{where}.inputs {inputs} differ from the state the previous stage outputs {expected_inputs}"
            )
        if logits not in outputs:
            problems.append(f"{where}.logits {logits!r} is not one of its outputs {outputs}")
        expected_inputs = [o for o in outputs if o != logits]
        params, accuracy = st.get("params"), st.get("val_accuracy")
        if params is not None and not (_is_int(params) and params >= 0):
            problems.append(f"{where}.params is {params!r}, expected null or a parameter count")
        if accuracy is not None and not (_is_number(accuracy) and 0 <= accuracy <= 1):
            problems.append(f"{where}.val_accuracy is {accuracy!r}, expected null or a fraction in [0, 1]")
        cost = st.get("cost")
        if not isinstance(cost, dict) or not all(_is_number(v) for v in cost.values()):
            problems.append(f"{where}.cost is {cost!r}, expected an object of numbers per convention")
        elif convention not in cost:
            problems.append(f"{where}.cost has no value for the cost_convention {convention!r}")
        else:
            if previous_cost is not None and cost[convention] < previous_cost:
                problems.append(f"{where}.cost.{convention} {cost[convention]} is lower than the previous exit's")
            previous_cost = cost[convention]
    if expected_inputs and isinstance(stages[-1], dict):
        problems.append(f"the last stage hands over state {expected_inputs} that no stage consumes")
    return problems


def schema_problems(manifest: Any) -> list[str]:
    """Everything wrong with a manifest's structure (no file access); empty when it is valid."""
    problems = format_problems(manifest)
    if problems:
        return problems
    if not isinstance(manifest.get("arch"), str):
        problems.append("arch is missing")
    n = manifest.get("num_classes")
    if not _is_int(n) or n <= 0:
        problems.append(f"num_classes is {n!r}, expected a positive integer")
    classes = manifest.get("classes")
    if not _is_str_list(classes):
        problems.append("classes must be a list of names")
    elif _is_int(n) and len(classes) != n:
        problems.append(f"classes has {len(classes)} names for num_classes={n}")
    problems += _input_problems(manifest.get("input"))
    if manifest.get("cost_convention") not in COST_CONVENTIONS:
        problems.append(
            f"cost_convention is {manifest.get('cost_convention')!r}, expected one of {list(COST_CONVENTIONS)}"
        )
    problems += _stage_problems(manifest.get("stages"), manifest)
    full = manifest.get("full_exits", [])
    if not isinstance(full, list):
        problems.append("full_exits must be a list")
    else:
        n_stages = len(manifest["stages"]) if isinstance(manifest.get("stages"), list) else 0
        for i, entry in enumerate(full):
            ok = (
                isinstance(entry, dict)
                and _is_int(entry.get("exit"))
                and 1 <= entry["exit"] <= n_stages
                and _plain_file_name(entry.get("file"))
                and isinstance(entry.get("sha256"), str)
                and _SHA256.match(entry["sha256"]) is not None
            )
            if not ok:
                problems.append(
                    f"full_exits[{i}] is {entry!r}, expected {{exit (1-based, <= {n_stages}), file, sha256}}"
                )
            elif "logits" in entry and isinstance(manifest["stages"][entry["exit"] - 1], dict):
                expected = manifest["stages"][entry["exit"] - 1].get("logits")
                if entry["logits"] != expected:
                    problems.append(
                        f"full_exits[{i}].logits is {entry['logits']!r} but exit {entry['exit']}'s logits are {expected!r}"
                    )
    cal = manifest.get("calibration")
    if not isinstance(cal, dict) or not _plain_file_name(cal.get("file")):
        problems.append("calibration is missing or has no file name")
    else:
        if not isinstance(cal.get("sha256"), str) or not _SHA256.match(cal["sha256"]):
            problems.append(f"calibration.sha256 is {cal.get('sha256')!r}, expected 64 lowercase hex digits")
        if not _is_int(cal.get("count")) or cal["count"] <= 0:
            problems.append(f"calibration.count is {cal.get('count')!r}, expected a positive integer")
    if not isinstance(manifest.get("provenance"), dict):
        problems.append("provenance is missing")
    return problems


def read_manifest(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and schema-check `manifest.json`; raise BundleError naming every problem (files are not read)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(
            f"bundle directory {bundle_dir} does not exist; export one with `anytime export RUN_DIR --out {bundle_dir}`"
        )
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not an anytime bundle (or its export was interrupted)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    problems = format_problems(manifest)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    problems = schema_problems(manifest)
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems) + "; re-export the bundle")
    return manifest


# ----------------------------------------------------------------------------------------- file checks


def _graph_problems(path: Path, inputs: list[str], outputs: list[str]) -> list[str]:
    """Can the graph be parsed, does it pass onnx's checker, and are its names the manifest's?"""
    name = path.name
    try:
        import onnx

        have_onnx = True
    except ImportError:
        have_onnx = False
    if have_onnx:
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model)
        except Exception as exc:  # DecodeError, ValidationError, ...: any is a damaged graph
            return [f"{name}: not a valid ONNX graph (truncated or corrupt?): {type(exc).__name__}: {exc}".strip()]
        graph_inputs = [i.name for i in model.graph.input]
        graph_outputs = [o.name for o in model.graph.output]
        batch_dims = [
            v.type.tensor_type.shape.dim[0]
            for v in list(model.graph.input) + list(model.graph.output)
            if v.type.tensor_type.shape.dim
        ]
        fixed = [d.dim_value for d in batch_dims if d.HasField("dim_value")]
        problems = []
        if fixed:
            problems.append(f"{name}: batch axis is fixed to {fixed[0]} instead of dynamic '{BATCH_AXIS}'")
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            return []  # neither onnx nor onnxruntime: the hash check is all we can do
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            return [f"{name}: ONNX Runtime cannot load it (truncated or corrupt?): {exc}"]
        graph_inputs = [i.name for i in session.get_inputs()]
        graph_outputs = [o.name for o in session.get_outputs()]
        problems = []
    if graph_inputs != inputs:
        problems.append(f"{name}: graph inputs {graph_inputs} differ from the manifest's {inputs}")
    if graph_outputs != outputs:
        problems.append(f"{name}: graph outputs {graph_outputs} differ from the manifest's {outputs}")
    return problems


def _file_problems(bundle_dir: Path, file: str, sha256: str, what: str) -> tuple[list[str], bool]:
    """(problems, hash_ok) for one file named by the manifest."""
    path = bundle_dir / file
    if not path.is_file():
        return [f"{file}: missing ({what} listed in the manifest)"], False
    actual = sha256_file(path)
    if actual != sha256:
        return [
            f"{file}: sha256 mismatch (manifest {sha256[:12]}..., file {actual[:12]}..., "
            f"{path.stat().st_size} bytes): the file was modified or damaged; re-export the bundle"
        ], False
    return [], True


def _calibration_problems(path: Path, manifest: dict[str, Any]) -> list[str]:
    import numpy as np

    name = path.name
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("logits", "labels", "indices") if k in data.files}
    except Exception as exc:
        return [f"{name}: cannot be read as an npz archive: {exc}"]
    missing = [k for k in ("logits", "labels", "indices") if k not in arrays]
    if missing:
        return [f"{name}: arrays {missing} are missing"]
    logits, labels, indices = arrays["logits"], arrays["labels"], arrays["indices"]
    k, c, count = len(manifest["stages"]), manifest["num_classes"], manifest["calibration"]["count"]
    problems = []
    if logits.shape != (k, count, c):
        problems.append(f"{name}: logits have shape {logits.shape}, expected (exits, count, classes) = {(k, count, c)}")
    if labels.shape != (count,) or indices.shape != (count,):
        problems.append(f"{name}: labels {labels.shape} / indices {indices.shape}, expected ({count},) each")
    elif labels.size and (labels.min() < 0 or labels.max() >= c):
        problems.append(f"{name}: labels outside [0, {c})")
    return problems


def check_bundle(bundle_dir: str | os.PathLike, raise_on_problem: bool = False) -> list[str]:
    """Re-verify a bundle: manifest schema, every file's presence and sha256, graphs, calibration data.

    Returns the list of problems (empty: the bundle is sound). With `raise_on_problem`, raises BundleError
    naming them all instead.
    """
    bundle_dir = Path(bundle_dir)
    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        if raise_on_problem:
            raise
        return [str(exc)]
    problems: list[str] = []
    for st in manifest["stages"]:
        file_problems, ok = _file_problems(bundle_dir, st["file"], st["sha256"], f"stage {st['index']}")
        problems += file_problems
        if bundle_dir.joinpath(st["file"]).is_file():
            # Even with a hash mismatch, say whether the graph itself is damaged (truncated, renamed outputs).
            problems += _graph_problems(bundle_dir / st["file"], st["inputs"], st["outputs"])
    for entry in manifest.get("full_exits", []):
        file_problems, ok = _file_problems(bundle_dir, entry["file"], entry["sha256"], f"full exit {entry['exit']}")
        problems += file_problems
        if bundle_dir.joinpath(entry["file"]).is_file():
            input_name = manifest["input"]["name"]
            logits = entry.get("logits", manifest["stages"][entry["exit"] - 1]["logits"])
            problems += _graph_problems(bundle_dir / entry["file"], [input_name], [logits])
    cal = manifest["calibration"]
    file_problems, ok = _file_problems(bundle_dir, cal["file"], cal["sha256"], "calibration data")
    problems += file_problems
    if bundle_dir.joinpath(cal["file"]).is_file():
        problems += _calibration_problems(bundle_dir / cal["file"], manifest)
    if problems and raise_on_problem:
        raise BundleError(f"bundle {bundle_dir} is damaged: " + "; ".join(problems))
    return problems


# ------------------------------------------------------------------------------------------ typed views


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
    input: PreprocessingSpec
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

    def serving_files(self) -> list[str]:
        """The files that running the bundle needs (not the calibration data nor the full-exit graphs)."""
        return [MANIFEST_FILE] + [s.file for s in self.stages]

    def load_calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Validation logits (K, N, C) float32 and labels (N,) int64 recorded at export."""
        cal = self.manifest["calibration"]
        path = self.file(cal["file"])
        try:
            # The file is opened here so that it is closed even when numpy cannot parse it.
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as data:
                logits = np.asarray(data["logits"], dtype=np.float32)
                labels = np.asarray(data["labels"], dtype=np.int64)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            # EOFError: an empty file (which click would report as "Aborted."); BadZipFile: a truncated one.
            reason = str(exc) or type(exc).__name__
            raise BundleError(f"calibration file {path} cannot be read ({reason}); re-export the bundle") from exc
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
        entries.append((self.manifest["calibration"]["file"], self.manifest["calibration"]["sha256"]))
        entries += [(e["file"], e["sha256"]) for e in self.manifest.get("full_exits") or []]
        for name, expected in entries:
            actual = sha256_file(self.file(name))
            if actual != expected:
                raise BundleError(
                    f"bundle {self.path}: {name} is damaged (sha256 {actual[:12]}..., manifest says {str(expected)[:12]}...); "
                    "re-export or re-copy the bundle"
                )
            checked.append(name)
        return checked


def bundle_identity(bundle: Bundle) -> str:
    """A content hash that tells one bundle from another (a latency profile records it).

    The manifest carries no hash of itself, so this is sha256 over the manifest's bytes followed by every
    stage graph's bytes, in stage order: a copy of the bundle has the same identity, a re-export or an edited
    graph a different one.
    """
    digest = hashlib.sha256()
    digest.update((bundle.path / MANIFEST_FILE).read_bytes())
    for stage in bundle.stages:
        with open(bundle.file(stage.file), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def is_bundle_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file()


def is_bundle_without_manifest(path: str | os.PathLike) -> bool:
    """A directory with a bundle's first stage graph or calibration data but no manifest.json (a bundle
    copied in part, or an export that was interrupted): never a folder of images to classify."""
    p = Path(path)
    return (
        p.is_dir()
        and not (p / MANIFEST_FILE).exists()
        and ((p / stage_file(0)).is_file() or (p / CALIBRATION_FILE).is_file())
    )


def resolve_bundle_path(bundle: str | os.PathLike | None) -> Path:
    """The bundle directory: `bundle` (a directory or its manifest.json), or the embedded default for None."""
    if bundle is None:
        if not (DEFAULT_BUNDLE_DIR / MANIFEST_FILE).is_file():
            raise BundleError(
                f"the embedded default model is not installed (no {DEFAULT_BUNDLE_DIR / MANIFEST_FILE}); "
                "pass a bundle directory written by `anytime export`"
            )
        return DEFAULT_BUNDLE_DIR
    path = Path(bundle)
    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    if not path.is_dir():
        raise BundleError(f"bundle directory '{bundle}' does not exist; pass a directory written by `anytime export`")
    if not (path / MANIFEST_FILE).is_file():
        raise BundleError(
            f"'{bundle}' is not a bundle: it has no {MANIFEST_FILE}; pass a directory written by `anytime export`"
        )
    return path


def read_bundle(bundle: str | os.PathLike | None = None, verify: bool = False, calibration: bool = True) -> Bundle:
    """Read and schema-check a bundle's manifest into typed views; with `verify`, also check every sha256.

    `calibration=False`: the bundle is only run, never calibrated (a Ray worker that receives its thresholds
    from the driver), so it may lack the validation logits (`Bundle.serving_files`)."""
    path = resolve_bundle_path(bundle)
    manifest = read_manifest(path)
    where = str(path / MANIFEST_FILE)
    convention = str(manifest["cost_convention"])
    try:
        input_spec = PreprocessingSpec.from_manifest(manifest["input"])
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}; re-export the bundle") from exc
    stages = []
    for i, s in enumerate(manifest["stages"]):
        stage = StageSpec(
            index=i,
            file=str(s["file"]),
            inputs=tuple(s["inputs"]),
            outputs=tuple(s["outputs"]),
            logits=str(s["logits"]),
            cost=float(s["cost"][convention]),
            params=None if s.get("params") is None else int(s["params"]),
            val_accuracy=None if s.get("val_accuracy") is None else float(s["val_accuracy"]),
            sha256=s["sha256"],
        )
        if not (path / stage.file).is_file():
            raise BundleError(
                f"bundle {path} is incomplete: {stage.file} (stage {i}) is missing; re-export or re-copy it"
            )
        stages.append(stage)
    if any(st.cost <= 0 for st in stages):
        raise BundleError(
            f"{where}: exit costs must be positive, got {[st.cost for st in stages]}; re-export the bundle"
        )
    cal = manifest["calibration"]
    if calibration and not (path / cal["file"]).is_file():
        raise BundleError(
            f"bundle {path} is incomplete: calibration file {cal['file']} is missing; re-export or re-copy it"
        )
    bundle_obj = Bundle(path, manifest, input_spec, tuple(stages), tuple(manifest["classes"]), convention)
    if verify:
        bundle_obj.verify_checksums()
    return bundle_obj
