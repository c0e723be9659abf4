"""Properties every registered training method has (TorchJD-style shared asserts), and per-method checks."""

from __future__ import annotations

import dataclasses
import io
import sys

import pytest
import torch
import torch.nn.functional as F

from anytime.errors import ConfigError, MissingDependencyError
from anytime.models import create
from anytime.training.base import TrainingMethod, compute_routes
from anytime.training.methods import create_method, get_method_class, list_methods
from anytime.training.precision import Precision


class ToyContext:
    """A minimal TrainingContext: test-convnet on 1×8×8 inputs, 3 batches of 8 per pass."""

    def __init__(self, seed: int = 0, epochs: int = 2) -> None:
        torch.manual_seed(seed)
        self.model = create("test-convnet", num_classes=4, in_channels=1, image_size=8, widths=(4, 6, 6))
        self.device = torch.device("cpu")
        self.num_exits = self.model.num_exits
        self.epochs = epochs
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(1234)
        self.data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
        self.routes = compute_routes(self.model, self.data[0][0])
        self.rank, self.world_size = 0, 1
        self.steps_per_epoch = len(self.data)
        self.precision = Precision()  # full precision (no --amp)
        self.phases: list[str] = []
        self.steps = 0

    def train_batches(self, epoch, phase, part=None):
        self.phases.append(phase)
        # Order depends only on (epoch, phase), as the trainer guarantees.
        order = torch.randperm(
            len(self.data), generator=torch.Generator().manual_seed(epoch * 97 + len(phase))
        ).tolist()
        if part is not None:
            k, n = part
            order = order[len(order) * k // n : len(order) * (k + 1) // n]
        for i in order:
            yield self.data[i]

    def exit_losses(self, outputs, targets, epoch):
        return [F.cross_entropy(o, targets) for o in outputs]

    def lr(self, epoch):
        return 0.05

    def compiled(self, fn):
        return fn

    def sync_gradients(self, params):
        list(params)

    def sync_buffers(self, module):
        pass

    def check_finite(self, loss, epoch, step, exit_index):
        assert torch.isfinite(loss).all(), (epoch, step, exit_index)

    def log_step(self, loss, batch_size):
        assert loss == loss
        self.steps += 1


def _available(name: str) -> bool:
    try:
        create_method(name)
    except MissingDependencyError:
        return False
    return True


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(name: str, seed: int = 0, epochs: int = 1) -> tuple[ToyContext, TrainingMethod]:
    ctx = ToyContext(seed)
    method = create_method(name)
    method.setup(ctx)
    for epoch in range(epochs):
        method.train_epoch(ctx, epoch)
    return ctx, method


ALL = list_methods()


def test_registry_lists_the_baselines_and_drmgf():
    assert {"joint", "ge", "pcgrad", "cagrad", "upgrad", "mgda", "nashmtl", "drmgf"} <= set(ALL)
    for name in ALL:
        cls = get_method_class(name)
        assert cls.name == name and issubclass(cls, TrainingMethod)
        assert dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen


@pytest.mark.parametrize("name", ALL)
def test_a_method_either_trains_or_names_its_missing_dependency(name):
    """Missing solver -> MissingDependencyError naming the `mtl` extra; otherwise a real epoch."""
    if not _available(name):
        with pytest.raises(MissingDependencyError, match=r"anytime\[mtl\]"):
            create_method(name)
        return
    ctx = ToyContext()
    before = _params(ctx.model)
    method = create_method(name)
    method.setup(ctx)
    metrics = method.train_epoch(ctx, 0)
    after = ctx.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    params = {n for n, _ in ctx.model.named_parameters()}
    assert params <= set(changed), f"{name} left {sorted(params - set(changed))} unchanged"
    assert ctx.steps > 0 and torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.parametrize("name", [n for n in ALL if _available(n)])
def test_same_seed_same_result(name):
    a, _ = _run(name, seed=3)
    b, _ = _run(name, seed=3)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


@pytest.mark.parametrize("name", [n for n in ALL if _available(n)])
def test_state_round_trip_continues_identically(name):
    """Epoch 0, save everything (weights_only loadable), restore into fresh objects: epoch 1 matches."""
    ctx, method = _run(name, seed=5)
    buffer = io.BytesIO()
    torch.save(
        {"model": ctx.model.state_dict(), "opt": ctx.optimizer.state_dict(), "method": method.state_dict(),
         "rng": torch.get_rng_state()},
        buffer,
    )  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    method.train_epoch(ctx, 1)

    fresh = ToyContext(seed=99)  # other initial weights: everything must come from the state
    restored = create_method(name)
    restored.setup(fresh)
    fresh.model.load_state_dict(saved["model"])
    fresh.optimizer.load_state_dict(saved["opt"])
    restored.load_state_dict(saved["method"])
    torch.set_rng_state(saved["rng"])
    restored.train_epoch(fresh, 1)
    for k, v in ctx.model.state_dict().items():
        assert torch.equal(v, fresh.model.state_dict()[k]), k


def test_unknown_method_and_options_are_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown training method 'pcgard'.*pcgrad"):
        create_method("pcgard")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['cc'\] for method 'cagrad'|cvxpy"):
        create_method("cagrad", {"cc": "1"})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['schedule'\]"):
        create_method("joint", {"schedule": "sdn"})  # the ramp is the trainer's --exit-weights now
    with pytest.raises(ConfigError, match="must be float"):
        create_method("joint", {"weights": "1,x,1"})


def test_missing_solver_fails_loudly_instead_of_averaging(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # import cvxpy now raises ImportError
    for name in ("cagrad", "nashmtl"):
        with pytest.raises(MissingDependencyError, match=r"cvxpy.*pip install 'anytime\[mtl\]'"):
            create_method(name)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(MissingDependencyError, match="torchjd"):
        create_method("pcgrad")


def _per_exit_grads(ctx: ToyContext) -> list[dict[str, torch.Tensor]]:
    x, y = ctx.data[0]
    named = dict(ctx.model.named_parameters())
    grads = []
    for t in range(ctx.num_exits):
        outputs = ctx.model(x)
        loss = F.cross_entropy(outputs[t], y)
        g = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        grads.append({n: (gi if gi is not None else torch.zeros_like(p)) for (n, p), gi in zip(named.items(), g)})
    return grads


def _grads_of(method_name: str, ctx: ToyContext, **options) -> dict[str, torch.Tensor]:
    method = create_method(method_name, options)
    method.setup(ctx)
    x, y = ctx.data[0]
    ctx.model.zero_grad(set_to_none=True)
    method.backward(ctx, ctx.exit_losses(ctx.model(x), y, 0), 0)
    return {n: p.grad.clone() for n, p in ctx.model.named_parameters()}


def test_gradient_equilibrium_averages_the_exits_reaching_each_parameter():
    ctx = ToyContext()
    per_exit = _per_exit_grads(ctx)
    got = _grads_of("ge", ctx)
    for name in ctx.routes.names:
        owners = ctx.routes.owners(name)
        expected = sum(per_exit[t][name] for t in owners) / len(owners)
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7)
    # the first block is shared by all 3 exits, the heads by one
    assert len(ctx.routes.owners("stages.0.block.0.weight")) == 3
    assert ctx.routes.owners("stages.1.head.2.weight") == [1]


def test_joint_weights_and_sdn_ramp():
    from anytime.training.losses import exit_weights

    ctx = ToyContext(epochs=10)
    per_exit = _per_exit_grads(ctx)
    got = _grads_of("joint", ctx, weights="0.5,1,2")
    name = "stages.0.block.0.weight"
    torch.testing.assert_close(got[name], 0.5 * per_exit[0][name] + per_exit[1][name] + 2 * per_exit[2][name])
    # C = (0.15, 0.90) for the 2 internal exits; w = min(C, 0.01 + e * C / E), e = 1..E; final exit 1.
    assert exit_weights("sdn", 3, 0, 10) == pytest.approx([0.025, 0.1, 1.0])
    assert exit_weights("sdn", 3, 4, 10) == pytest.approx([0.085, 0.46, 1.0])
    assert exit_weights("sdn", 3, 9, 10) == pytest.approx([0.15, 0.9, 1.0])
    assert exit_weights("constant", 3, 0, 10) == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="3 exits"):
        create_method("joint", {"weights": "1,1"}).setup(ctx)


def test_pcgrad_projects_shared_gradients_and_keeps_head_gradients():
    from torchjd.aggregation import PCGrad

    ctx = ToyContext()
    per_exit = _per_exit_grads(ctx)
    torch.manual_seed(0)
    got = _grads_of("pcgrad", ctx)
    shared = ctx.routes.shared
    matrix = torch.stack([torch.cat([per_exit[t][n].flatten() for n in shared]) for t in range(ctx.num_exits)])
    torch.manual_seed(0)
    expected = PCGrad()(matrix)
    torch.testing.assert_close(torch.cat([got[n].flatten() for n in shared]), expected, rtol=1e-4, atol=1e-6)
    for name in ctx.routes.names:
        if not ctx.routes.is_shared(name):
            (owner,) = ctx.routes.owners(name)
            torch.testing.assert_close(got[name], per_exit[owner][name], rtol=1e-5, atol=1e-7)


def test_distillation_loss_follows_phuong_lampert():
    from anytime.training.losses import ExitLoss

    torch.manual_seed(0)
    outputs = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 4, (5,))
    plain = ExitLoss()(outputs, y)
    assert all(torch.equal(a, F.cross_entropy(o, y)) for a, o in zip(plain, outputs))
    w, tau = 0.3, 2.0
    kd = ExitLoss(kd_weight=w, kd_temperature=tau)(outputs, y)
    teacher = F.softmax(outputs[2].detach() / tau, 1)
    manual = (1 - w) * F.cross_entropy(outputs[0], y) + w * tau**2 * (
        teacher * (teacher.log() - F.log_softmax(outputs[0] / tau, 1))
    ).sum(1).mean()
    torch.testing.assert_close(kd[0], manual)
    assert torch.equal(kd[2], F.cross_entropy(outputs[2], y))
    # the teacher is detached: early exits' distillation terms send no gradient to the last exit
    grad = torch.autograd.grad(kd[0], outputs[2], allow_unused=True)[0]
    assert grad is None
