"""`--compile`: a compiled run trains the same network as an eager one (to float rounding), really runs
compiled graphs (DR-MGF's gated forward included), keeps plain parameter names in what it saves, may be
switched on or off on resume, and a machine that cannot compile is told so in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_precision import write_npz
from torch._dynamo.utils import counters

from anytime.cli.train import train as train_command
from anytime.errors import ConfigError
from anytime.training.compilation import COMPILE_MODES, check_compile
from anytime.training.config import TrainConfig
from anytime.training.preflight import resume_config
from anytime.training.trainer import Trainer


def config(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(arch="test-convnet", data=f"npz:{data}", epochs=1, out=str(out), batch_size=16, val_size=16,
                  train_limit=32, lr=0.05, device="cpu", method="drmgf", seed=2)  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def test_compiled_drmgf_trains_the_eager_network_with_compiled_graphs(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    eager = Trainer(config(data, tmp_path / "eager"))
    eager_result = eager.run()
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = Trainer(config(data, tmp_path / "compiled", compile="default"))
    compiled_result = compiled.run()
    # 3 exits: a gated graph per exit pass, plus the plain network's (fusion, evaluation)
    assert counters["stats"]["unique_graphs"] - graphs_before >= compiled.num_exits + 1
    assert compiled.method._gated_forward is not compiled.method.gates.forward

    a = load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert set(a) == set(b)  # plain names: no "_orig_mod." from a compile wrapper
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    eager_row, compiled_row = eager_result.history[0], compiled_result.history[0]
    for name in ("loss", "pass_loss_exit_0", "pass_loss_exit_2"):
        assert compiled_row[name] == pytest.approx(eager_row[name], rel=1e-4), name


def test_compile_refuses_methods_that_differentiate_one_forward_twice(tmp_path, monkeypatch):
    import torch._functorch.config
    import torch.nn.functional as F

    from anytime.models import create

    # the reason: a compiled graph's second backward (one per exit, retain_graph) is wrong
    torch.manual_seed(0)
    model = create("test-convnet", num_classes=3, in_channels=1, image_size=(12, 12))
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 3, (16,))
    params = list(model.parameters())

    def grads_of_exit_0_after_exit_2(m):
        losses = [F.cross_entropy(o, y) for o in m(x)]
        torch.autograd.grad(losses[2], params, retain_graph=True, allow_unused=True)
        return torch.autograd.grad(losses[0], params, allow_unused=True)

    eager = grads_of_exit_0_after_exit_2(model)
    # by default a second backward is refused outright; allowed, it is wrong
    monkeypatch.setattr(torch._functorch.config, "donated_buffer", False)
    model.compile()
    compiled = grads_of_exit_0_after_exit_2(model)
    gaps = [float((a - b).norm() / a.norm()) for a, b in zip(eager, compiled) if a is not None]
    assert max(gaps) > 0.1  # eager and compiled agree to 1e-6 on a first backward; if torch fixes the
    # second, the TorchJD methods can be allowed to compile

    data = write_npz(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match=r"--compile default cannot train method 'pcgrad': .* drop --compile"):
        Trainer(config(data, tmp_path / "run", method="pcgrad", compile="default"))


def test_compile_may_change_on_resume_and_bad_modes_are_one_line(tmp_path):
    data = write_npz(tmp_path / "d.npz")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config(data, run).to_dict()))
    assert resume_config(run, {"compile": "default"}).compile == "default"
    with pytest.raises(ConfigError) as info:
        config(data, tmp_path / "x", compile="fast")
    assert str(info.value) == "invalid compile='fast': choose one of off, default, reduce-overhead, max-autotune"
    result = CliRunner().invoke(train_command, ["--arch", "test-convnet", "--data", f"npz:{data}", "--epochs", "1",
                                                "-o", str(tmp_path / "cli"), "--compile", "fast"])  # fmt: skip
    assert result.exit_code == 2 and "'fast' is not one of 'off', 'default', 'reduce-overhead'" in result.output
    option = next(p for p in train_command.params if p.name == "compile")
    assert tuple(option.type.choices) == COMPILE_MODES  # the CLI (which does not import torch) lists them again


def test_compile_without_a_cpp_compiler_names_the_fix(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    check_compile("off", torch.device("cpu"))  # nothing to compile, nothing needed
    with pytest.raises(
        ConfigError, match=r"needs a C\+\+ compiler .* install one \(e\.g\. apt install g\+\+\) or drop --compile"
    ):
        check_compile("default", torch.device("cpu"))
