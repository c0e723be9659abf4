"""DR-MGF: gated reparameterisation, folding, per-exit passes from θ0, fusion, resume, `anytime routes`."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from anytime.cli.routes import routes as routes_command
from anytime.errors import ConfigError, TrainingError
from anytime.models import create
from anytime.training.base import compute_routes
from anytime.training.folding import fold_model, folded_state_dict
from anytime.training.methods.drmgf import DRMGF, DRAvgF, DRMGFOptions, MetaGF
from anytime.training.methods.drmgf.gates import RouteGates, lateral_normalise
from anytime.training.precision import Precision

IMAGE = 12


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return create("test-convnet", num_classes=4, in_channels=3, image_size=IMAGE)


class FakeContext:
    """A minimal TrainingContext: tiny synthetic data, deterministic per (epoch, phase), hooks per pass."""

    def __init__(self, model, epochs: int = 2, images: int = 24, batch: int = 8, lr: float = 0.05) -> None:
        self.model = model
        self.device = torch.device("cpu")
        self.num_exits = model.num_exits
        self.epochs = epochs
        self.rank, self.world_size = 0, 1
        self.precision = Precision()  # full precision (no --amp)
        self.base_lr = lr
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(images, 3, IMAGE, IMAGE, generator=g)
        self.y = torch.randint(0, 4, (images,), generator=g)
        self.batch = batch
        self.steps_per_epoch = -(-images // batch)
        self.routes = compute_routes(model, self.x[:4])
        self.phases: list[tuple[int, str]] = []
        self.on_start: Callable[[int, str], None] | None = None
        self.on_end: Callable[[int, str], None] | None = None
        self.steps = 0
        self.seen: list[torch.Tensor] = []

    def train_batches(self, epoch: int, phase: str, part=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: this body runs when the method starts iterating, i.e. at the start of its pass.
        if part is not None:
            phase = f"{phase} {part[0] + 1}/{part[1]}"
        self.phases.append((epoch, phase))
        if self.on_start:
            self.on_start(epoch, phase)
        g = torch.Generator().manual_seed(zlib.crc32(f"{epoch}/{phase.split(' ')[0]}".encode()))
        order = torch.randperm(len(self.y), generator=g)
        starts = list(range(0, len(order), self.batch))
        if part is not None:
            k, n = part
            starts = starts[len(starts) * k // n : len(starts) * (k + 1) // n]
        for i in starts:
            idx = order[i : i + self.batch]
            self.seen.append(idx.clone())
            yield self.x[idx], self.y[idx]
        if self.on_end:  # runs after the last step of the pass
            self.on_end(epoch, phase)

    def exit_losses(self, outputs, targets, epoch):
        return [F.cross_entropy(o, targets) for o in outputs]

    def lr(self, epoch: int) -> float:
        return self.base_lr

    def compiled(self, fn):
        return fn

    def sync_gradients(self, params: Iterable[torch.Tensor]) -> None:
        list(params)

    def sync_buffers(self, module) -> None:
        pass

    def check_finite(self, loss, epoch, step, exit_index) -> None:
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss at epoch {epoch} step {step} exit {exit_index}")

    def log_step(self, loss: float, batch_size: int) -> None:
        self.steps += 1


def setup_method(cls=DRMGF, epochs: int = 2, seed: int = 0, **options: Any):
    model = make_model(seed)
    ctx = FakeContext(model, epochs=epochs)
    method = cls(cls.Options(**options))
    method.setup(ctx)
    return model, ctx, method


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb_importance(gates: RouteGates, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in gates.parameters():
            m.mul_(torch.rand(m.shape, generator=g) * 1.5 + 0.25)


# ----------------------------------------------------------------- reparameterisation
def test_gated_forward_at_init_equals_plain_forward_for_every_exit():
    model = make_model().eval()
    ctx = FakeContext(model)
    gates = RouteGates.from_model(model, ctx.routes, kappa=10)
    # test-convnet: the convs of stages 0 and 1 are shared (3x3), stage 2's conv belongs to the last exit.
    assert [(layer.name, layer.exits) for layer in gates.layers] == [
        ("stages.0.block.0.weight", (0, 1, 2)),
        ("stages.1.block.0.weight", (1, 2)),
    ]
    x = torch.randn(5, 3, IMAGE, IMAGE)
    with torch.no_grad():
        plain = model(x)
        for t in range(model.num_exits):
            for a, b in zip(gates.forward(model, x, t), plain):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gate_formula_matches_direct_computation():
    model = make_model()
    ctx = FakeContext(model)
    kappa = 10.0
    gates = RouteGates.from_model(model, ctx.routes, kappa=kappa)
    perturb_importance(gates)
    layer = gates.layers[0]
    v = dict(model.named_parameters())[layer.name].detach()
    ms = [m.detach() for m in gates.importance[layer.name]]
    out_ch, in_ch = layer.shape
    r = len(layer.exits)
    for position, t in enumerate(layer.exits):
        gate = gates.gates(t)[layer.name]
        weight = gates.effective_weights(dict(model.named_parameters()), t)[layer.name]
        for o in range(out_ch):
            for i in range(in_ch):
                n = []
                for m in ms:
                    row = sum(abs(float(m[o, k])) for k in range(in_ch))
                    n.append(abs(float(m[o, i])) / (1 + 1e-4 * row) ** 0.75)
                expected = (kappa * n[position] + sum(n) - n[position]) / (kappa + r - 1)
                assert abs(float(gate[o, i].detach()) - expected) < 1e-6
                direction = v[o, i] / v[o, i].norm()
                torch.testing.assert_close(weight[o, i], expected * direction, rtol=1e-5, atol=1e-7)


def test_only_own_importance_gets_gradient_in_its_pass():
    model = make_model()
    ctx = FakeContext(model)
    gates = RouteGates.from_model(model, ctx.routes, kappa=10)
    outputs = gates.forward(model, ctx.x[:4], 1)
    sum(o.sum() for o in outputs).backward()
    for layer in gates.layers:
        for t, m in zip(layer.exits, gates.importance[layer.name]):
            assert (m.grad is not None) == (t == 1), (layer.name, t)


# ----------------------------------------------------------------------------- folding
def test_folded_weights_load_into_fresh_network_and_match_gated_outputs():
    model, ctx, method = setup_method()
    gates = method.gates
    t = 1
    opt = torch.optim.SGD(list(model.parameters()) + gates.parameters(t), lr=0.1, momentum=0.9)
    model.train()
    for x, y in ctx.train_batches(0, "steps"):
        loss = sum(ctx.exit_losses(gates.forward(model, x, t), y, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    start = RouteGates.from_model(make_model(), ctx.routes, kappa=10)
    assert not torch.allclose(
        gates.importance_of(t)["stages.0.block.0.weight"], start.importance_of(t)["stages.0.block.0.weight"]
    )

    x = torch.randn(6, 3, IMAGE, IMAGE)
    for exit_index in range(model.num_exits):
        fresh = make_model(seed=99)
        fresh.load_state_dict(folded_state_dict(model, gates, exit_index), strict=True)
        fresh.eval()
        with torch.no_grad():
            expected = gates.forward(model, x, exit_index)
            for a, b in zip(fresh(x), expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # fold_model gives the same plain network and leaves the trained model as it was
        with torch.no_grad():
            for a, b in zip(fold_model(model, gates, exit_index).eval()(x), expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the folded weights differ from the stored V, so the check above was not trivially true
    assert not torch.allclose(
        folded_state_dict(model, gates, t)["stages.0.block.0.weight"], model.stages[0].block[0].weight
    )


def test_model_after_an_epoch_is_plain_and_reloads_strictly():
    model, ctx, method = setup_method()
    method.train_epoch(ctx, 0)
    plain = method.plain_model(model).eval()
    fresh = make_model(seed=5)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        for a, b in zip(fresh(x), plain(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------- epoch structure
def _momentum(ctx) -> dict[int, torch.Tensor]:
    return {id(p): s["momentum_buffer"].clone() for p, s in ctx.optimizer.state.items() if "momentum_buffer" in s}


def _warm_momentum(model, ctx) -> None:
    """Give the optimiser a non-trivial momentum state at the start of epoch 1."""
    for x, y in ctx.train_batches(1, "warm"):
        ctx.optimizer.zero_grad()
        sum(ctx.exit_losses(model(x), y, 1)).backward()
        ctx.optimizer.step()


@pytest.mark.parametrize("rule", ["carry", "fused", "reset"])
def test_every_exit_pass_starts_from_identical_theta0_and_the_momentum_rule_holds(rule):
    model, ctx, method = setup_method(momentum=rule)
    method.train_epoch(ctx, 0)  # moves BN buffers and leaves momentum buffers in the optimiser
    _warm_momentum(model, ctx)
    theta0 = state_of(model)
    momentum0 = _momentum(ctx)
    assert momentum0
    seen: dict[str, tuple[dict, dict]] = {}
    ended: dict[str, dict] = {}
    ctx.on_start = lambda epoch, phase: seen.update({phase: (state_of(model), _momentum(ctx))})
    ctx.on_end = lambda epoch, phase: ended.update({phase: _momentum(ctx)})
    method.train_epoch(ctx, 1)
    passes = ["exit 3", "exit 2", "exit 1"]
    assert [p for e, p in ctx.phases if e == 1 and p != "warm"] == passes + ["fusion"]
    for phase in passes:
        state, _ = seen[phase]
        for key, value in theta0.items():
            assert torch.equal(state[key], value), (phase, key)
    for previous, phase in zip([None] + passes, passes):
        momentum = seen[phase][1]
        # carry: each pass continues from the momentum the previous one ended with (the original code);
        # fused and reset: every pass starts from the epoch start's momentum
        expected = ended[previous] if rule == "carry" and previous else momentum0
        assert momentum.keys() == expected.keys()
        assert all(torch.equal(momentum[k], v) for k, v in expected.items()), phase
    after = _momentum(ctx)
    if rule == "carry":
        assert all(torch.equal(after[k], v) for k, v in ended["exit 1"].items())
    elif rule == "reset":
        assert all(torch.equal(after[k], v) for k, v in momentum0.items())
    else:  # fused like the parameters: the owner's buffer, or the mean over the owners
        named = dict(model.named_parameters())
        for name in ctx.routes.names:
            owners = ctx.routes.owners(name)
            expected_buf = sum(ended[f"exit {t + 1}"][id(named[name])] for t in owners) / len(owners)
            torch.testing.assert_close(after[id(named[name])], expected_buf, rtol=1e-6, atol=1e-7)
    # the epoch did change the model
    assert not torch.equal(state_of(model)["stages.0.block.0.weight"], theta0["stages.0.block.0.weight"])


def test_momentum_is_not_empty_for_the_whole_run_by_default():
    model, ctx, method = setup_method()
    assert method.options.momentum == "carry"
    method.train_epoch(ctx, 0)
    started: dict[str, dict] = {}
    ctx.on_start = lambda epoch, phase: started.update({phase: _momentum(ctx)})
    method.train_epoch(ctx, 1)
    assert all(started[f"exit {t}"] for t in (1, 2, 3))  # every pass of epoch 2 starts with momentum


def test_other_exits_importance_never_moves_during_an_exit_pass():
    """Regression: a stale .grad of another exit's M (left by its own pass) was stepped with momentum."""
    model, ctx, method = setup_method(epochs=4)
    opt = method.importance_optimizer

    def importance_state() -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        out = {}
        for m in method.gates.parameters():
            buf = opt.state.get(m, {}).get("momentum_buffer")
            out[id(m)] = (m.detach().clone(), None if buf is None else buf.clone())
        return out

    starts: dict[tuple[int, str], dict] = {}
    checked = []

    def on_start(epoch, phase):
        starts[(epoch, phase)] = importance_state()

    def on_end(epoch, phase):
        if not phase.startswith("exit "):
            return
        t = int(phase.split()[1]) - 1
        own = {id(m) for m in method.gates.parameters(t)}
        before, now = starts[(epoch, phase)], importance_state()
        for key, (value, buf) in before.items():
            if key in own:
                continue
            assert torch.equal(now[key][0], value), (epoch, phase)
            assert (buf is None and now[key][1] is None) or torch.equal(now[key][1], buf), (epoch, phase)
        assert any(not torch.equal(now[k][0], before[k][0]) for k in own), (epoch, phase)  # M_t did move
        checked.append((epoch, phase))

    ctx.on_start, ctx.on_end = on_start, on_end
    method.train_epoch(ctx, 0)
    method.train_epoch(ctx, 1)  # the second epoch is where stale gradients of epoch 1 would act
    assert len(checked) == 6


def test_importance_lr_scales_the_importance_steps_and_zero_freezes_them():
    """-m importance_lr=R: M's lr is R times the network's at every epoch; 0 keeps the routes fixed while
    the weights still train through the gated forward."""
    _, ctx, method = setup_method(epochs=4, importance_lr=0.25)
    for epoch in (0, 1):
        method.train_epoch(ctx, epoch)
        assert method.importance_optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * ctx.lr(epoch))
    model, ctx, method = setup_method(epochs=4, importance_lr=0.0)
    before, weights = method.gates.state_dict(), state_of(model)
    method.train_epoch(ctx, 0)
    after = method.gates.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(weights[k], v) for k, v in state_of(model).items())


@pytest.mark.parametrize("start", ["carry", "fused"])
def test_importance_start_decides_whether_gated_passes_start_from_the_fused_network(start):
    """-m importance_start=fused: at each dynamic epoch's first pass every exit's gated network equals the
    fused one; with the paper's carry it is exit t's own magnitudes on the fused directions."""
    model, ctx, method = setup_method(epochs=4, importance_start=start)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    gaps: dict[int, float] = {}

    def on_start(epoch, phase):
        if not phase.startswith("exit ") or epoch in gaps:
            return
        model.eval()
        with torch.no_grad():
            plain = model(x)
            gaps[epoch] = max(
                float((gated - ref).abs().max())
                for t in range(method.num_exits)
                for gated, ref in zip(method.gates.forward(model, x, t), plain)
            )
        model.train()

    ctx.on_start = on_start
    method.train_epoch(ctx, 0)
    method.train_epoch(ctx, 1)
    assert gaps[0] < 1e-6  # identity at init either way
    if start == "fused":
        assert gaps[1] < 1e-6
    else:
        assert gaps[1] > 1e-4


def test_split_passes_cover_the_epoch_once_between_them():
    model, ctx, method = setup_method(passes="split")
    method.train_epoch(ctx, 0)
    assert [p for _, p in ctx.phases] == ["exit passes 1/3", "exit passes 2/3", "exit passes 3/3", "fusion"]
    images = len(ctx.y)
    pass_indices = torch.cat(ctx.seen[: images // ctx.batch])  # the three parts, then the fusion pass
    assert sorted(pass_indices.tolist()) == list(range(images))
    assert all(torch.isfinite(v).all() for v in state_of(model).values())


def test_rounds_fuse_several_times_an_epoch_and_each_exit_still_sees_it_once():
    model, ctx, method = setup_method(DRAvgF, rounds=3)
    rounds_start: list[dict[str, torch.Tensor]] = []
    fused: list[dict[str, torch.Tensor]] = []

    def start(epoch, phase):
        if phase.startswith("exit 3 "):  # deepest first: the first pass of each round
            rounds_start.append(state_of(model))

    def end(epoch, phase):
        if phase.startswith("fusion"):
            fused.append(state_of(model))

    ctx.on_start, ctx.on_end = start, end
    method.train_epoch(ctx, 0)
    names = [p for _, p in ctx.phases]
    assert names == [f"{what} {r}/3" for r in (1, 2, 3) for what in ("exit 3", "exit 2", "exit 1", "fusion")]
    # Each exit's passes, and the fusion passes, cover the epoch's images exactly once between the rounds.
    per_pass = {}
    for (_, phase), idx in zip(ctx.phases, ctx.seen):  # one batch per part here: 3 batches, 3 rounds
        per_pass.setdefault(phase.rsplit(" ", 1)[0], []).append(idx)
    assert sorted(per_pass) == ["exit 1", "exit 2", "exit 3", "fusion"]
    for key, parts in per_pass.items():
        assert sorted(torch.cat(parts).tolist()) == list(range(len(ctx.y))), key
    # Round r starts from the network fused at the end of round r-1 (mean fusion refreshes BN statistics,
    # so compare the parameters), and the fused networks differ from round to round.
    params = [n for n, _ in model.named_parameters()]
    for r in (1, 2):
        for name in params:
            assert torch.equal(rounds_start[r][name], fused[r - 1][name]), (r, name)
    assert any(not torch.equal(fused[0][n], fused[1][n]) for n in params)


@pytest.mark.parametrize("method_cls", [DRMGF, DRAvgF])  # meta fusion, and mean fusion's BatchNorm refresh
def test_split_passes_in_rounds_share_out_each_rounds_part_and_fusion_share_cuts_the_fusion_pass(method_cls):
    model = make_model()
    ctx = FakeContext(model, images=96, batch=8)  # 12 batches
    method = method_cls(method_cls.Options(passes="split", rounds=2, fusion_share=0.5))
    method.setup(ctx)
    method.train_epoch(ctx, 0)
    names = [p for _, p in ctx.phases]
    assert names == [f"exit passes {i}/6" for i in (1, 2, 3)] + ["fusion 1/4"] + [
        f"exit passes {i}/6" for i in (4, 5, 6)
    ] + ["fusion 2/4"]
    per_phase: dict[str, list[torch.Tensor]] = {}
    for (_, phase), count in zip(ctx.phases, [2, 2, 2, 3, 2, 2, 2, 3]):
        per_phase.setdefault(phase.split()[0], []).extend(ctx.seen[:count])
        del ctx.seen[:count]
    assert not ctx.seen
    # The six exit passes see the epoch once between them; the two fusion passes its first half.
    assert sorted(torch.cat(per_phase["exit"]).tolist()) == list(range(96))
    fusion_seen = torch.cat(per_phase["fusion"])
    assert len(fusion_seen) == 48 and len(set(fusion_seen.tolist())) == 48
    assert all(torch.isfinite(v).all() for v in state_of(model).values())


@pytest.mark.parametrize(
    "images, options",
    [
        (40, {"rounds": 2}),  # 5 batches: rounds of 2 and 3 batches
        (56, {"rounds": 3}),  # 7 batches: rounds of 2, 2 and 3 batches
        (56, {"rounds": 2, "fusion_share": 0.5}),  # fusion parts of 1 and 2 of the 7 batches
        (80, {"passes": "split", "rounds": 3}),  # 10 batches in 9 split parts
    ],
)
def test_epoch_losses_are_means_over_the_images_whatever_the_rounds(images, options):
    # The epoch's loss and pass losses are the means over the images the passes saw, as joint's are; a
    # round whose part was short or empty must not pull them down (they were the plain mean over rounds,
    # an empty round counting as a loss of 0: rounds=6 over 3 batches reported half the loss).
    model = make_model()
    ctx = FakeContext(model, images=images, batch=8)
    method = DRMGF(DRMGFOptions(**options))
    method.setup(ctx)
    phase = [""]
    seen: dict[str, list[tuple[float, int]]] = {}

    def start(epoch, name):  # "exit 3 2/6" -> "exit 3", "fusion 1/4" -> "fusion", "exit passes 4/9" -> "exit passes"
        words = name.split(" ")
        phase[0] = "fusion" if words[0] == "fusion" else " ".join(words[:2])

    ctx.on_start = start
    ctx.log_step = lambda loss, n: seen.setdefault(phase[0], []).append((loss, n))  # type: ignore[method-assign]
    metrics = method.train_epoch(ctx, 0)

    def mean(steps):
        return sum(v * n for v, n in steps) / sum(n for _, n in steps)

    assert metrics["loss"] == pytest.approx(mean(seen["fusion"]))
    if options.get("passes") != "split":
        for t in range(ctx.num_exits):
            assert metrics[f"pass_loss_exit_{t}"] == pytest.approx(mean(seen[f"exit {t + 1}"])), t


def test_split_gain_scales_every_parameters_fused_step():
    # Mean fusion makes the fused step linear in the Δ_t: with gain 3 every parameter's step is 3 times the
    # plain average's (the default, gain 1), from the same start, data order and passes.
    steps = {}
    for gain in (3.0, 1.0):
        model, ctx, method = setup_method(DRAvgF, passes="split", split_gain=gain)
        theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        method.train_epoch(ctx, 0)
        steps[gain] = {k: v.detach() - theta0[k] for k, v in model.named_parameters()}
    assert method.delta_gain == 1.0
    moved = [k for k, v in steps[1.0].items() if v.abs().max() > 1e-6]
    assert moved
    for name in moved:
        torch.testing.assert_close(steps[3.0][name], 3 * steps[1.0][name], rtol=1e-4, atol=1e-6)


def capture_pass_ends(model, ctx, method) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """θ0 at the epoch start and each exit pass's folded parameters at its end."""
    theta0: dict[str, torch.Tensor] = {}
    ends: dict[int, dict[str, torch.Tensor]] = {}

    def start(epoch, phase):
        if phase == "exit 3":
            theta0.update(state_of(model))

    def end(epoch, phase):
        if phase.startswith("exit "):
            t = int(phase.split()[1]) - 1
            ends[t] = folded_state_dict(model, method.gates if method.dynamic(epoch) else None, t)

    ctx.on_start, ctx.on_end = start, end
    return theta0, ends


def test_mean_fusion_equals_mean_of_deltas_and_refreshes_batchnorm():
    model, ctx, method = setup_method(DRAvgF)
    assert method.gates is not None and not method.scales
    theta0, ends = capture_pass_ends(model, ctx, method)
    method.train_epoch(ctx, 0)
    after = state_of(model)
    for name in ctx.routes.names:
        owners = ctx.routes.owners(name)
        expected = theta0[name] + sum(ends[t][name] - theta0[name] for t in owners) / len(owners)
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    # BN statistics were re-estimated on the fused network (not left at θ0's)
    assert not torch.equal(after["stages.0.block.1.running_mean"], theta0["stages.0.block.1.running_mean"])


def test_meta_fusion_learns_scales_and_applies_the_weighted_formula():
    model, ctx, method = setup_method(DRMGF)
    theta0, ends = capture_pass_ends(model, ctx, method)
    metrics = method.train_epoch(ctx, 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert set(method.scales) == {
        "stages.0.block.0.weight",
        "stages.0.block.1.weight",
        "stages.0.block.1.bias",
        "stages.1.block.0.weight",
        "stages.1.block.1.weight",
        "stages.1.block.1.bias",
    }
    after = state_of(model)
    for name, s in method.scales.items():
        assert torch.isfinite(s).all()
        assert not torch.allclose(s, torch.full_like(s, 1e-3)), name
        owners = ctx.routes.owners(name)
        omega = s.detach().abs()
        if name in method.gates.importance:
            m = torch.stack([x.detach().abs() for x in method.gates.importance[name]])
            omega = omega * m / m.sum(dim=2, keepdim=True)
        expected = theta0[name].clone()
        num = sum(
            omega[r].reshape(omega[r].shape + (1,) * (after[name].dim() - omega.dim() + 1))
            * (ends[t][name] - theta0[name])
            for r, t in enumerate(owners)
        )
        den = omega.sum(0).reshape(omega.shape[1:] + (1,) * (after[name].dim() - omega.dim() + 1))
        torch.testing.assert_close(after[name], expected + num / den, rtol=1e-5, atol=1e-6)
    # task-specific parameters take their owner's update
    head = "stages.2.head.2.weight"
    torch.testing.assert_close(after[head], ends[2][head], rtol=0, atol=1e-7)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_importance_frozen_after_switch_epoch_and_scales_smoothed():
    model, ctx, method = setup_method(epochs=2)
    assert method.switch_epoch == 1
    before = method.gates.state_dict()
    assert method.train_epoch(ctx, 0)["dynamic_routes"] == 1.0
    mid = method.gates.state_dict()
    assert any(not torch.equal(before[k], mid[k]) for k in before)
    scales_mid = {k: v.detach().clone() for k, v in method.scales.items()}
    raw: dict[str, torch.Tensor] = {}
    ctx.on_end = lambda epoch, phase: (
        raw.update({k: v.detach().clone() for k, v in method.scales.items()}) if phase == "fusion" else None
    )
    assert method.train_epoch(ctx, 1)["dynamic_routes"] == 0.0
    after = method.gates.state_dict()
    assert all(torch.equal(mid[k], after[k]) for k in mid)
    for name, s in method.scales.items():  # EMA with β = 0.9 applied in place after the meta pass
        torch.testing.assert_close(s.detach(), 0.9 * scales_mid[name] + 0.1 * raw[name], rtol=1e-6, atol=1e-8)
    # the network was written with the scales the meta pass learned, before the EMA smoothed them
    smoothed = [g.scale.detach().clone() for g in method.fusion.groups]
    with torch.no_grad():
        for g in method.fusion.groups:
            for name in g.names:
                offset, count = g.slots[name]
                g.scale[:, offset : offset + count].copy_(raw[name].reshape(len(g.exits), count))
        fused_raw = method.fusion.fused()
        for g, value in zip(method.fusion.groups, smoothed):
            g.scale.copy_(value)
    params = dict(model.named_parameters())
    for name, value in fused_raw.items():
        torch.testing.assert_close(params[name].detach(), value.detach(), rtol=1e-6, atol=1e-7)
    assert method.fusion_optimizer.param_groups[0]["params"][0] is method.fusion.groups[0].scale


def test_meta_gf_variant_has_no_importance_and_fuses_with_scales_alone():
    model, ctx, method = setup_method(MetaGF)
    assert method.name == "meta-gf" and method.gates is None and method.scales
    method.train_epoch(ctx, 0)
    assert all(torch.isfinite(v).all() for v in state_of(model).values())
    assert method.analysis()["importance"] == {}


@pytest.mark.parametrize(
    "method, options",
    [
        ("meta-gf", {"gate": "true"}),
        ("meta-gf", {"fusion": "mean"}),
        ("dr-avgf", {"gate": "false"}),
        ("dr-avgf", {"fusion": "meta"}),
    ],
)
def test_an_ablation_refuses_the_options_that_would_make_it_another_method(method, options):
    # `--method meta-gf -m gate=true` trained full DR-MGF and recorded it as meta-gf.
    from anytime.training.methods import create_method

    with pytest.raises(ConfigError, match=f"invalid {method} options .* use --method drmgf"):
        create_method(method, options)
    assert create_method(method, {}).options.gate == (method == "dr-avgf")
    assert create_method("drmgf", {"gate": "false", "fusion": "mean"}).options.fusion == "mean"


def test_options_are_validated():
    with pytest.raises(ConfigError, match="fusion"):
        DRMGFOptions(fusion="median")
    with pytest.raises(ConfigError, match="kappa"):
        DRMGFOptions(kappa=0.5)
    with pytest.raises(ConfigError, match="momentum must be one of carry, fused, reset"):
        DRMGFOptions(momentum="keep")
    with pytest.raises(ConfigError, match="passes must be one of full, split"):
        DRMGFOptions(passes="half")
    with pytest.raises(ConfigError, match="split_gain applies to passes=split only"):
        DRMGFOptions(split_gain=2.0)
    with pytest.raises(ConfigError, match="split_gain must be > 0"):
        DRMGFOptions(passes="split", split_gain=0.0)
    with pytest.raises(ConfigError, match="importance_lr must be >= 0"):
        DRMGFOptions(importance_lr=-0.1)
    with pytest.raises(ConfigError, match="importance_start must be one of carry, fused"):
        DRMGFOptions(importance_start="init")
    with pytest.raises(ConfigError, match="rounds must be an integer >= 1, got 0"):
        DRMGFOptions(rounds=0)
    with pytest.raises(ConfigError, match="pass_steps must be an integer >= 1, got 0"):
        DRMGFOptions(pass_steps=0)
    for share in (0.0, 0.3, 1.5):
        with pytest.raises(ConfigError, match=r"fusion_share must be 1/F for a whole number F \(1, 0.5, 0.25"):
            DRMGFOptions(fusion_share=share)
    assert DRMGFOptions(rounds=2, passes="split", split_gain=3.0, fusion_share=0.25).rounds == 2
    assert DRAvgF.Options().fusion == "mean" and DRAvgF.Options().gate
    assert MetaGF.Options().fusion == "meta" and not MetaGF.Options().gate


# ------------------------------------------------------------------------------ resume
def test_state_dict_round_trip_continues_identically():
    model_a, ctx_a, method_a = setup_method(epochs=2)
    method_a.train_epoch(ctx_a, 0)
    buffer = io.BytesIO()
    torch.save(
        {"model": model_a.state_dict(), "optimizer": ctx_a.optimizer.state_dict(), "method": method_a.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model_b, ctx_b, method_b = setup_method(epochs=2, seed=7)  # different init: everything must come from the file
    model_b.load_state_dict(saved["model"])
    ctx_b.optimizer.load_state_dict(saved["optimizer"])
    method_b.load_state_dict(saved["method"])

    method_a.train_epoch(ctx_a, 1)
    method_b.train_epoch(ctx_b, 1)
    for key, value in state_of(model_a).items():
        assert torch.equal(value, state_of(model_b)[key]), key
    sa, sb = method_a.state_dict(), method_b.state_dict()
    assert sa["fusion"]["scales"].keys() == sb["fusion"]["scales"].keys()
    for name in sa["fusion"]["scales"]:
        assert torch.equal(sa["fusion"]["scales"][name], sb["fusion"]["scales"][name])
    for name in sa["importance"]:
        assert torch.equal(sa["importance"][name], sb["importance"][name])


def test_resume_with_other_architecture_is_refused():
    _, _, method = setup_method()
    state = method.state_dict()
    state["fusion"]["scales"].pop("stages.0.block.0.weight")
    with pytest.raises(TrainingError, match="cannot resume"):
        method.load_state_dict(state)


# ------------------------------------------------------------------------------ routes
def write_run(tmp_path, method, epoch: int = 1):
    from anytime.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method.name}))
    # the trainer's layout (anytime.training.trainer): checkpoint["method"] = {"name", "state", "analysis"}
    save_checkpoint(
        run / "checkpoints" / "last.pt",
        {"epoch": epoch, "method": {"name": method.name, "state": method.state_dict(), "analysis": method.analysis()}},
    )
    return run


def test_routes_command_reports_cosine_similarity_of_importance(tmp_path):
    _, ctx, method = setup_method()
    perturb_importance(method.gates, seed=3)
    run = write_run(tmp_path, method)
    result = CliRunner().invoke(routes_command, [str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["method"] == "drmgf" and report["exits"] == [1, 2, 3]
    m = method.gates.importance["stages.0.block.0.weight"]
    expected = F.cosine_similarity(m[0].abs().flatten(), m[2].abs().flatten(), dim=0).item()
    layer = next(entry for entry in report["layers"] if entry["name"] == "stages.0.block.0.weight")
    assert abs(layer["pairs"]["1-3"] - expected) < 1e-6
    assert expected < 0.999  # perturbed routes differ
    # exits 1 and 2 share only stage 0's conv; exits 2 and 3 share both gated convs
    assert abs(report["matrix"][0][1] - layer["pairs"]["1-2"]) < 1e-9
    second = next(entry for entry in report["layers"] if entry["name"] == "stages.1.block.0.weight")
    assert abs(report["matrix"][1][2] - (layer["pairs"]["2-3"] + second["pairs"]["2-3"]) / 2) < 1e-9

    table = CliRunner().invoke(routes_command, [str(run)])
    assert table.exit_code == 0, table.output
    assert "stages.1.block.0.weight" in table.output and f"{expected:.4f}" in table.output


def test_routes_command_errors_name_the_problem(tmp_path):
    result = CliRunner().invoke(routes_command, [str(tmp_path / "missing")])
    assert isinstance(result.exception, ConfigError) and "does not exist" in str(result.exception)
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(routes_command, [str(tmp_path / "a_file")])
    assert isinstance(result.exception, ConfigError) and "is a file, not a directory" in str(result.exception)
    _, _, meta = setup_method(MetaGF)
    run = write_run(tmp_path, meta)
    result = CliRunner().invoke(routes_command, [str(run)])
    assert isinstance(result.exception, ConfigError) and "meta-gf" in str(result.exception)


def test_lateral_normalisation_is_per_filter():
    m = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
    n = lateral_normalise(m)
    torch.testing.assert_close(n[0], torch.tensor([1.0, 3.0]) / (1 + 4e-4) ** 0.75)
    torch.testing.assert_close(n[1], torch.tensor([2.0, 0.0]) / (1 + 2e-4) ** 0.75)


# With rounds=2 the failure is in the second round, after one fusion moved the network.
@pytest.mark.parametrize("options, failing_phase", [({}, "exit 2"), ({"rounds": 2}, "exit 2 2/2")])
def test_failed_epoch_leaves_the_model_of_the_epoch_start(options, failing_phase):
    model, ctx, method = setup_method(**options)
    theta0 = state_of(model)
    clean = ctx.exit_losses

    def poisoned(outputs, targets, epoch):
        losses = clean(outputs, targets, epoch)
        if ctx.phases[-1][1] == failing_phase:
            losses[0] = losses[0] * float("nan")
        return losses

    ctx.exit_losses = poisoned
    with pytest.raises(TrainingError, match="exit 1"):
        method.train_epoch(ctx, 0)
    for key, value in state_of(model).items():
        assert torch.equal(value, theta0[key]), key


def test_rounds_follow_the_pass_length_unless_given():
    model, ctx, method = setup_method()  # test-convnet: 3 exits
    for steps, full, split in [(312, 39, 13), (62, 8, 3), (3, 1, 1), (24, 3, 1)]:
        assert method.rounds_for(steps) == full, steps
        split_method = DRMGF(DRMGFOptions(passes="split"))
        split_method.num_exits = 3
        assert split_method.rounds_for(steps) == split, steps
    short = DRMGF(DRMGFOptions(pass_steps=4))
    short.setup(FakeContext(make_model(), images=96, batch=8))  # 12 steps: 3 rounds of 4
    assert short.rounds == 3
    explicit = DRMGF(DRMGFOptions(rounds=1))
    explicit.setup(FakeContext(make_model(), images=96 * 20, batch=8))  # 240 steps; the paper's 1 fusion
    assert explicit.rounds == 1


def test_rounds_never_leave_a_pass_without_batches():
    # 3 batches: 6 rounds would leave three rounds' passes (and their fusion) empty, and split passes or a
    # fusion share multiply the parts; an empty fusion part learns no scales and re-estimates no statistics.
    for options, most in [
        ({"rounds": 6}, 3),
        ({"rounds": 2, "passes": "split"}, 1),
        ({"rounds": 2, "fusion_share": 0.5}, 1),
    ]:
        method = DRMGF(DRMGFOptions(**options))
        with pytest.raises(ConfigError, match=f"get no batch; give rounds <= {most}"):
            method.setup(FakeContext(make_model(), images=24, batch=8))
    derived = DRMGF(DRMGFOptions(pass_steps=1, fusion_share=0.25))
    derived.setup(FakeContext(make_model(), images=96, batch=8))  # 12 steps: 12 rounds by length, 3 by parts
    assert derived.rounds == 3


def test_a_run_resumes_with_the_fusions_per_epoch_it_started_with():
    # 64 steps an epoch: the default (8-step passes) would fuse 8 times. A checkpoint written before
    # pass_steps existed holds no rounds (its run fused once an epoch); one from a rounds=2 run holds 2.
    def resumed(state_changes):
        method = DRMGF(DRMGFOptions())
        method.setup(FakeContext(make_model(), images=512, batch=8))
        assert method.rounds == 8
        state = method.state_dict()
        state_changes(state)
        method.load_state_dict(state)
        return method.rounds

    def legacy(state):
        del state["rounds"]
        del state["options"]["rounds"], state["options"]["pass_steps"]

    def older_rounds_option(state):
        del state["rounds"]
        state["options"]["rounds"] = 2

    assert resumed(legacy) == 1
    assert resumed(older_rounds_option) == 2
    assert resumed(lambda state: state.update(rounds=3)) == 3
    assert resumed(lambda state: None) == 8


# ---------------------------------------------------------------- through the real trainer
def tiny_npz(tmp_path, train_images: int = 96):
    """Three separable classes of 12x12 images: `train_images` to train on, 24 to test."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    images = (rng.integers(0, 60, (120, 12, 12)) + labels[:, None, None] * 60).astype(np.uint8)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=images[:train_images], y_train=labels[:train_images], x_test=images[96:], y_test=labels[96:])
    return data


def test_drmgf_through_the_trainer_writes_a_plain_model_and_routes(tmp_path):
    import numpy as np

    from anytime.models import load_model
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import train

    data = tiny_npz(tmp_path)
    config = TrainConfig(
        arch="test-convnet", data=f"npz:{data}", epochs=2, out=str(tmp_path / "run"), method="drmgf",
        batch_size=16, val_size=32, device="cpu", lr=0.05,
    )  # fmt: skip
    result = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [row["dynamic_routes"] for row in rows] == [1.0, 0.0]  # switch at half of training
    assert all(np.isfinite(row["loss"]) for row in rows)
    model, _ = load_model(tmp_path / "run")
    assert not any("importance" in key for key in model.state_dict())
    assert len(result.val_accuracy) == 3

    report = CliRunner().invoke(routes_command, [str(tmp_path / "run"), "--json"])
    assert report.exit_code == 0, report.output
    parsed = json.loads(report.output)
    assert parsed["method"] == "drmgf" and parsed["epoch"] == 2
    assert [layer["name"] for layer in parsed["layers"]] == ["stages.0.block.0.weight", "stages.1.block.0.weight"]
    assert all(0.0 < layer["mean"] <= 1.0 + 1e-9 for layer in parsed["layers"])


def test_the_trainer_tells_drmgf_its_steps_per_epoch(tmp_path, monkeypatch):
    from anytime.training.checkpoint import load_checkpoint
    from anytime.training.config import TrainConfig
    from anytime.training.trainer import train

    data = tiny_npz(tmp_path, train_images=102)
    # 70 training images, batch 16, the last partial batch dropped: 4 steps, so 2-step passes make 2 rounds.
    config = TrainConfig(
        arch="test-convnet", data=f"npz:{data}", epochs=1, out=str(tmp_path / "run"), method="drmgf",
        batch_size=16, val_size=32, device="cpu", lr=0.05, method_options={"pass_steps": 2},
    )  # fmt: skip
    phases: list[str] = []
    from anytime.training import trainer as trainer_module

    real = trainer_module.Trainer.train_batches

    def recording(self, epoch, phase, part=None):
        phases.append(phase if part is None else f"{phase} {part[0] + 1}/{part[1]}")
        yield from real(self, epoch, phase, part)

    monkeypatch.setattr(trainer_module.Trainer, "train_batches", recording)
    train(config)
    assert phases == [f"{what} {r}/2" for r in (1, 2) for what in ("exit 3", "exit 2", "exit 1", "fusion")]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["method"]["state"]["rounds"] == 2


def test_grouped_and_depthwise_convs_get_one_importance_per_kernel_slice():
    from torch import nn

    from anytime.models.base import ModelSpec, MultiExitNetwork, Stage

    class GroupedStage(Stage):
        def __init__(self, last: bool) -> None:
            super().__init__()
            self.block = nn.Sequential(
                nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),  # grouped: weight [8, 2, 3, 3]
                nn.BatchNorm2d(8),
                nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise: weight [8, 1, 3, 3]
                nn.Conv2d(8, 4, 1),  # 1x1: shared but never gated
                nn.ReLU(),
            )
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
            self.last = last

        def forward(self, state):
            h = self.block(state[0])
            return (() if self.last else (h,)), self.head(h)

    class GroupedNet(MultiExitNetwork):
        def __init__(self) -> None:
            super().__init__(ModelSpec("grouped", 3, 4, (8, 8)))
            self.stages.extend([GroupedStage(False), GroupedStage(True)])

    torch.manual_seed(0)
    model = GroupedNet()
    routes = compute_routes(model, torch.randn(2, 4, 8, 8))
    gates = RouteGates.from_model(model, routes, kappa=10)
    assert [(layer.name, layer.shape) for layer in gates.layers] == [
        ("stages.0.block.0.weight", (8, 2)),
        ("stages.0.block.2.weight", (8, 1)),
    ]
    model.eval()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        for a, b in zip(gates.forward(model, x, 0), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    perturb_importance(gates)
    fresh = GroupedNet().eval()
    fresh.load_state_dict(folded_state_dict(model, gates, 0), strict=True)
    with torch.no_grad():
        for a, b in zip(fresh(x), gates.forward(model, x, 0)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_msdnet_tiny_gates_only_shared_kxk_convs_and_starts_as_identity():
    torch.manual_seed(0)
    model = create("msdnet-tiny", num_classes=4, in_channels=1, image_size=28).eval()
    routes = compute_routes(model, torch.randn(2, 1, 28, 28))
    gates = RouteGates.from_model(model, routes, kappa=10)
    params = dict(model.named_parameters())
    assert gates.layers and all(params[layer.name].shape[2:].numel() > 1 for layer in gates.layers)
    assert all(len(layer.exits) >= 2 for layer in gates.layers)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(x)
        for a, b in zip(gates.forward(model, x, 0), plain):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
