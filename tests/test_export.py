"""`anytime export`: bundle contents, agreement with PyTorch, atomicity, and `--check` on damaged bundles.

Run directories are built by hand (model + save_model + config.json + split.json over a tiny random npz),
independent of the trainer. Two exports are shared per module: test-convnet (with --full-exits, via the CLI)
and msdnet-tiny (multi-scale state).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from anytime.cli import main as cli_main
from anytime.cli.export import export as export_command
from anytime.data import open_dataset, restore_split, split_train_val
from anytime.errors import BundleError, DatasetError
from anytime.export import AtolError, OutputExistsError, ShapeError, check_bundle, export_bundle, read_manifest
from anytime.formats.bundle import schema_problems
from anytime.formats.preprocessing import PreprocessingSpec
from anytime.models import create, load_model, save_model

NUM_CLASSES = 10


def make_run(
    root: Path,
    arch: str,
    size: int,
    channels: int,
    n_train: int,
    val_size: int,
    seed: int = 0,
    with_val_split: bool = False,
) -> Path:
    """A run directory as `anytime train` writes it (the parts export reads) over a random npz dataset."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size, channels), dtype=np.uint8),
        "y_train": rng.integers(0, NUM_CLASSES, n_train),
        "x_test": rng.integers(0, 256, (8, size, size, channels), dtype=np.uint8),
        "y_test": rng.integers(0, NUM_CLASSES, 8),
    }
    if with_val_split:
        arrays["x_val"] = rng.integers(0, 256, (val_size, size, size, channels), dtype=np.uint8)
        arrays["y_val"] = rng.integers(0, NUM_CLASSES, val_size)
    npz = root / "data.npz"
    np.savez(npz, **arrays)
    dataset = open_dataset(f"npz:{npz}")
    _, _, record = split_train_val(dataset, val_size=val_size, seed=seed)
    torch.manual_seed(seed)
    model = create(arch, num_classes=NUM_CLASSES, in_channels=channels, image_size=size)
    # Non-trivial BatchNorm statistics, so folding them into the graphs is really exercised.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    run = root / "run"
    classes = [f"class {i}" for i in range(NUM_CLASSES)]
    save_model(
        model,
        run,
        PreprocessingSpec.for_model(model.spec.in_channels, model.spec.image_size, dataset.info.mean, dataset.info.std),
        classes,
    )
    (run / "config.json").write_text(json.dumps({"arch": arch, "data": dataset.spec, "method": "joint", "epochs": 3}))
    (run / "split.json").write_text(json.dumps(record))
    return run


def ort_chain_from_manifest(bundle: Path, x: np.ndarray) -> list[np.ndarray]:
    """Run a bundle the way a third party would: the manifest and onnxruntime, nothing of anytime."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    values = {manifest["input"]["name"]: x}
    logits = []
    for st in manifest["stages"]:
        session = ort.InferenceSession(str(bundle / st["file"]), providers=["CPUExecutionProvider"])
        outs = dict(zip(st["outputs"], session.run(st["outputs"], {n: values[n] for n in st["inputs"]})))
        logits.append(outs[st["logits"]])
        values = {n: v for n, v in outs.items() if n != st["logits"]}
    return logits


def normalise_from_manifest(images: np.ndarray, manifest: dict) -> np.ndarray:
    """uint8 N×H×W×C images already of the model's size -> the network input, from the manifest alone."""
    block = manifest["input"]
    mean = np.asarray(block["mean"], np.float32)
    std = np.asarray(block["std"], np.float32)
    return np.ascontiguousarray(((images.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2))


def torch_logits(run: Path, x: np.ndarray) -> list[np.ndarray]:
    model, _ = load_model(run)
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    """test-convnet exported with --full-exits through the CLI; (run, bundle, CLI output)."""
    root = tmp_path_factory.mktemp("convnet")
    run = make_run(root, "test-convnet", size=16, channels=3, n_train=48, val_size=12)
    bundle = root / "bundle"
    result = CliRunner().invoke(export_command, [str(run), "-o", str(bundle), "--full-exits"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run, bundle, result.output


@pytest.fixture(scope="module")
def msdnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("msdnet")
    run = make_run(root, "msdnet-tiny", size=28, channels=1, n_train=40, val_size=10, seed=1)
    result = export_bundle(run, root / "bundle")
    return run, root / "bundle", result


def test_cli_export_writes_every_file_and_prints_checks_and_next_steps(convnet):
    run, bundle, output = convnet
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["manifest.json", "calibration.npz"]
        + [f"stage_{k}.onnx" for k in range(3)]
        + [f"exit_{k}.onnx" for k in range(1, 4)]
    )
    for needle in (
        "✓ stage_0.onnx: onnx checker",
        "✓ stage_2.onnx: shapes",
        "✓ exit 1: values",
        "✓ exit 2: argmax",
        "✓ exit_1.onnx: values",
        "✓ exit 3: values",
        "Export complete",
        f"anytime calibrate {bundle} --budget 50%",
        f"anytime serve {bundle}",
    ):
        assert needle in output
    assert "✗" not in output
    # No temporary directory is left next to the bundle.
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle")]


def test_manifest_follows_the_contract(convnet):
    run, bundle, _ = convnet
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert schema_problems(manifest) == []
    assert check_bundle(bundle) == []
    assert manifest["format"] == "anytime-bundle" and manifest["format_version"] == 1
    assert manifest["arch"] == "test-convnet" and manifest["num_classes"] == NUM_CLASSES
    assert manifest["classes"] == [f"class {i}" for i in range(NUM_CLASSES)]
    block = manifest["input"]
    assert (block["channels"], block["height"], block["width"]) == (3, 16, 16)
    assert block["color"] == "RGB" and block["layout"] == "NCHW" and block["crop"] == "center"
    meta = json.loads((run / "model.json").read_text())
    assert block["mean"] == pytest.approx(meta["preprocessing"]["mean"])
    assert block["std"] == pytest.approx(meta["preprocessing"]["std"])
    stages = manifest["stages"]
    assert [s["inputs"] for s in stages] == [["image"], ["s0_0"], ["s1_0"]]
    assert [s["outputs"] for s in stages] == [["s0_0", "logits_0"], ["s1_0", "logits_1"], ["logits_2"]]
    model, _ = load_model(run)
    from anytime.models.costs import exit_costs, exit_params

    assert [s["cost"]["macs"] for s in stages] == exit_costs(model, "macs")
    assert [s["cost"]["msdnet"] for s in stages] == exit_costs(model, "msdnet")
    assert [s["params"] for s in stages] == exit_params(model)
    assert manifest["cost_convention"] == "macs"
    assert [(e["exit"], e["file"], e["logits"]) for e in manifest["full_exits"]] == [
        (k + 1, f"exit_{k + 1}.onnx", f"logits_{k}") for k in range(3)
    ]
    prov = manifest["provenance"]
    assert prov["run_dir"] == str(run.resolve()) and prov["method"] == "joint" and prov["epochs"] == 3
    assert prov["date"].endswith("Z") and prov["anytime_version"]
    # Graph names and the dynamic batch axis as declared.
    graph = onnx.load(str(bundle / "stage_1.onnx")).graph
    assert [i.name for i in graph.input] == ["s0_0"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("which", ["convnet", "msdnet"])
@pytest.mark.parametrize("batch", [1, 5])
def test_chained_stages_in_onnxruntime_equal_pytorch_per_exit(which, batch, request):
    run, bundle, *_ = request.getfixturevalue(which)
    manifest = json.loads((bundle / "manifest.json").read_text())
    dataset = open_dataset(json.loads((run / "config.json").read_text())["data"])
    images = dataset.test.get_batch(np.arange(batch))[0]
    x = normalise_from_manifest(images, manifest)
    got, ref = ort_chain_from_manifest(bundle, x), torch_logits(run, x)
    assert len(got) == len(ref) == len(manifest["stages"])
    for k, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == (batch, NUM_CLASSES)
        assert np.max(np.abs(g - r)) <= 1e-4, f"exit {k}"


def test_msdnet_hands_multi_scale_state_between_stages(msdnet):
    run, bundle, result = msdnet
    stages = result.manifest["stages"]
    assert len(stages) == 4
    assert len(stages[0]["outputs"]) - 1 >= 2  # several scales of features, not one tensor
    for prev, st in zip(stages, stages[1:]):
        assert st["inputs"] == [o for o in prev["outputs"] if o != prev["logits"]]
    assert stages[-1]["outputs"] == ["logits_3"]


@pytest.mark.parametrize("which", ["convnet", "msdnet"])
def test_each_weight_is_stored_once(which, request):
    run, bundle, *_ = request.getfixturevalue(which)
    model, _ = load_model(run)
    param_bytes = 4 * sum(p.numel() for p in model.parameters())
    stage_files = sorted(bundle.glob("stage_*.onnx"))
    weights = sum(numpy_helper.to_array(t).nbytes for f in stage_files for t in onnx.load(str(f)).graph.initializer)
    # Folding BatchNorm into convolutions drops its scale but adds a bias: within a few percent of params x 4.
    assert 0.9 * param_bytes <= weights <= 1.1 * param_bytes
    total = sum(f.stat().st_size for f in stage_files)
    assert total <= 1.1 * param_bytes + 4096 * len(stage_files)  # plus a little graph structure per file


def test_full_exit_graphs_equal_the_chained_stages(convnet):
    run, bundle, _ = convnet
    manifest = json.loads((bundle / "manifest.json").read_text())
    x = np.random.default_rng(3).normal(size=(4, 3, 16, 16)).astype(np.float32)
    chained = ort_chain_from_manifest(bundle, x)
    for entry in manifest["full_exits"]:
        session = ort.InferenceSession(str(bundle / entry["file"]), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"image": x})
        assert np.max(np.abs(logits - chained[entry["exit"] - 1])) <= 1e-5


@pytest.mark.parametrize("which", ["convnet", "msdnet"])
def test_calibration_holds_exactly_the_validation_split(which, request):
    run, bundle, *_ = request.getfixturevalue(which)
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = json.loads((run / "split.json").read_text())
    dataset = open_dataset(record["dataset"])
    with np.load(bundle / "calibration.npz") as cal:
        logits, labels, indices = cal["logits"], cal["labels"], cal["indices"]
    train_indices, val_indices = restore_split(dataset, record)
    assert indices.tolist() == val_indices.tolist()
    assert not set(indices.tolist()) & set(train_indices.tolist())
    assert labels.dtype == np.int64 and labels.tolist() == dataset.train.labels[indices].tolist()
    assert logits.dtype == np.float32 and logits.shape == (len(manifest["stages"]), len(indices), NUM_CLASSES)
    assert manifest["calibration"]["count"] == len(indices)
    x = normalise_from_manifest(dataset.train.get_batch(indices)[0], manifest)
    for k, ref in enumerate(torch_logits(run, x)):
        assert np.max(np.abs(logits[k] - ref)) <= 1e-4
        accuracy = float((logits[k].argmax(1) == labels).mean())
        assert manifest["stages"][k]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_values_beyond_tolerance_fail_naming_the_exit_and_write_nothing(tmp_path, monkeypatch):
    import anytime.export.bundle as bundle_module

    run = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=24, val_size=6)
    original = bundle_module.export_stage

    def export_perturbed(stage, plan, **kwargs):
        if plan.io.logits == "logits_1":  # a graph whose head differs from the PyTorch model's
            stage = __import__("copy").deepcopy(stage)
            with torch.no_grad():
                stage.head[-1].bias.add_(0.01)
        return original(stage, plan, **kwargs)

    monkeypatch.setattr(bundle_module, "export_stage", export_perturbed)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(AtolError, match=r"exit 2: values \(max \|diff\| 1\.00e-02 > atol"):
        export_bundle(run, out)
    assert not out.exists() and _leftovers(out.parent) == []


def test_an_interrupted_export_leaves_no_half_bundle(tmp_path, monkeypatch):
    import anytime.export.bundle as bundle_module

    run = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=24, val_size=6)

    def interrupted(*args, **kwargs):  # Ctrl-C after the graphs are written and validated
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "_calibration", interrupted)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(run, out)
    assert not out.exists() and _leftovers(out.parent) == []


def test_a_batch_size_baked_into_a_graph_is_a_shape_error(tmp_path, monkeypatch):
    import io

    import anytime.export.bundle as bundle_module
    from anytime.export.onnx_stages import FlatStage

    run = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=24, val_size=6)

    def export_static(stage, plan, opset=17, exporter="torchscript"):
        buffer = io.BytesIO()  # no dynamic_axes: the example's batch of 2 is baked in
        torch.onnx.export(
            FlatStage(stage).eval(),
            plan.example,
            buffer,
            input_names=plan.io.inputs,
            output_names=plan.io.outputs,
            opset_version=opset,
            dynamo=False,
        )
        return buffer.getvalue()

    monkeypatch.setattr(bundle_module, "export_stage", export_static)
    out = tmp_path / "bundle"
    with pytest.raises(ShapeError, match="batch 1"):
        export_bundle(run, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_bare_model_dir_needs_data_and_existing_output_needs_force(tmp_path, convnet):
    run, bundle, _ = convnet
    # A model directory without config.json / split.json, over a dataset with its own validation split.
    src = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=16, val_size=5, with_val_split=True)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(src / name, model_dir / name)
    spec = json.loads((src / "config.json").read_text())["data"]
    out = tmp_path / "bundle"
    with pytest.raises(DatasetError, match="--data KIND:PATH"):
        export_bundle(model_dir, out)
    out.mkdir()
    (out / "notes.txt").write_text("not a bundle")
    with pytest.raises(OutputExistsError, match="--force"):
        export_bundle(model_dir, out, data=spec)
    with pytest.raises(OutputExistsError, match="only replaces bundles"):
        export_bundle(model_dir, out, data=spec, force=True)
    shutil.rmtree(out)
    shutil.copytree(bundle, out)  # an existing (other) bundle: replaced with --force
    result = export_bundle(model_dir, out, data=spec, force=True)
    assert result.manifest["calibration"]["source"] == "dataset-val" and result.manifest["calibration"]["count"] == 5
    assert not (out / "exit_0.onnx").exists()  # nothing of the old bundle survives
    assert check_bundle(out) == [] and _leftovers(tmp_path) == []


def test_force_replaces_the_bundle_that_is_the_working_directory(tmp_path, convnet, monkeypatch):
    # `anytime export RUN -o . --force` inside a bundle: the old bundle was moved aside into a "..old-*"
    # directory made inside itself, then os.replace('.', ...) failed with an OSError traceback.
    run, bundle, _ = convnet
    out = tmp_path / "bundles" / "fm"
    shutil.copytree(bundle, out)
    (out / "exit_1.onnx").unlink()
    monkeypatch.chdir(out)
    result = export_bundle(run, ".", force=True)
    assert result.bundle_dir == Path(".")
    assert sorted(p.name for p in out.iterdir()) == ["calibration.npz", "manifest.json"] + [
        f"stage_{k}.onnx" for k in range(3)
    ]
    assert check_bundle(out) == [] and _leftovers(out.parent) == []


def test_a_run_trained_without_validation_images_names_the_fix(tmp_path):
    run = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=16, val_size=0)
    with pytest.raises(DatasetError, match=r"is empty .*train the run with --val-size above 0"):
        export_bundle(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_run_whose_dataset_moved_names_the_path_and_the_data_fix(tmp_path):
    run = make_run(tmp_path / "src", "test-convnet", size=16, channels=3, n_train=16, val_size=4)
    moved = tmp_path / "moved.npz"
    (tmp_path / "src" / "data.npz").rename(moved)
    with pytest.raises(DatasetError) as info:
        export_bundle(run, tmp_path / "bundle")
    message = str(info.value)
    assert str(tmp_path / "src" / "data.npz") in message and "--data KIND:PATH" in message
    assert not (tmp_path / "bundle").exists()
    # The fix the message names works: same split record, dataset at its new place.
    result = export_bundle(run, tmp_path / "bundle", data=f"npz:{moved}")
    assert result.manifest["provenance"]["data"] == f"npz:{moved}"
    with np.load(tmp_path / "bundle" / "calibration.npz") as cal:
        record = json.loads((run / "split.json").read_text())
        assert cal["indices"].tolist() == restore_split(open_dataset(f"npz:{moved}"), record)[1].tolist()


def test_large_logits_fail_atol_with_an_rtol_hint_and_pass_with_rtol():
    from anytime.export.validate import Validator, _check_values

    ref = np.random.default_rng(0).normal(scale=100.0, size=(4, 10)).astype(np.float32)
    got = ref + np.float32(1.5e-4)  # float32 rounding at |logit| ~ 200 is ~1e-5; 1.5e-4 is ~1e-6 relative
    strict = Validator()
    _check_values(strict, "exit 6", got, ref, atol=1e-4)
    values = strict.checks[0]
    assert not values.ok and values.error is AtolError and "--rtol 1e-5" in values.detail
    with pytest.raises(AtolError, match="exit 6: values"):
        strict.raise_failures()
    relaxed = Validator()
    _check_values(relaxed, "exit 6", got, ref, atol=1e-4, rtol=1e-5)
    assert all(c.ok for c in relaxed.checks)


def _damage_missing(bundle: Path) -> str:
    (bundle / "stage_1.onnx").unlink()
    return "stage_1.onnx: missing"


def _damage_hash(bundle: Path) -> str:
    path = bundle / "calibration.npz"
    with np.load(path) as cal:
        arrays = dict(cal)
    arrays["labels"] = (arrays["labels"] + 1) % NUM_CLASSES  # still a well-formed file, different content
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return "calibration.npz: sha256 mismatch"


def _damage_truncated(bundle: Path) -> str:
    path = bundle / "stage_2.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "stage_2.onnx: not a valid ONNX graph"


def _damage_version(bundle: Path) -> str:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 7
    path.write_text(json.dumps(manifest))
    return "unknown format_version 7"


@pytest.mark.parametrize("damage", [_damage_missing, _damage_hash, _damage_truncated, _damage_version])
def test_check_reports_what_is_wrong_with_a_damaged_bundle(damage, convnet, tmp_path, capsys):
    _, bundle, _ = convnet
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cli_main(["export", "--check", str(copy)])  # sound: exit status 0, no SystemExit
    assert "is sound" in capsys.readouterr().out
    expected = damage(copy)
    problems = check_bundle(copy)
    assert any(expected in p for p in problems), problems
    with pytest.raises(BundleError, match=expected):
        check_bundle(copy, raise_on_problem=True)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--check", str(copy)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert expected in captured.out + captured.err and "Traceback" not in captured.err


def test_check_takes_the_manifest_path_as_load_does(convnet, tmp_path, capsys):
    _, bundle, _ = convnet
    cli_main(["export", "--check", str(bundle / "manifest.json")])
    assert "is sound" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit):
        cli_main(["export", "--check", str(tmp_path / "notes.txt")])
    assert "is a file, not a bundle directory" in capsys.readouterr().err


def test_unknown_format_version_is_refused_by_read_manifest(convnet, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(convnet[1], copy)
    _damage_version(copy)
    with pytest.raises(BundleError, match="upgrade anytime"):
        read_manifest(copy)


def test_manifest_module_and_check_command_run_without_torch(convnet):
    code = (
        "import sys, anytime.export, anytime.formats.bundle; from anytime.cli import main; "
        f"main(['export', '--check', {str(convnet[1])!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("is sound.\nok"), done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["no weights", "truncated weights", "other model's spec", "no spec"])
def test_a_damaged_run_directory_is_one_clear_line(tmp_path, damage):
    # Each of these was a traceback from inside safetensors, torch or a KeyError.
    from anytime.errors import ConfigError

    run = make_run(tmp_path, "test-convnet", size=16, channels=3, n_train=48, val_size=12)
    weights, meta_path = run / "model.safetensors", run / "model.json"
    meta = json.loads(meta_path.read_text())
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "other model's spec":
        meta["spec"]["num_classes"] += 3
        meta_path.write_text(json.dumps(meta))
    else:
        del meta["spec"]
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="model.safetensors|model.json") as info:
        export_bundle(run, tmp_path / "bundle")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bundle").exists()
    result = CliRunner().invoke(export_command, [str(run), "-o", str(tmp_path / "bundle")])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
