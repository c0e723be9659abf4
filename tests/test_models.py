"""The model contract, checked on every registered preset, and architecture specifics."""

from __future__ import annotations

import pytest
import torch

from anytime.errors import ConfigError
from anytime.models import MultiExitNetwork, create, list_models
from anytime.models.costs import exit_costs, exit_params
from anytime.models.msdnet import MSDNet, block_steps, scales_of_layer
from anytime.models.sdn import InternalClassifier, MixedPool

# ImageNet presets run at batch 1 and skip the backward check (seconds on 2 CPU cores); the MSDNet code
# they share with the CIFAR presets gets its backward pass there.
IMAGENET = {"msdnet-imagenet-step4", "msdnet-imagenet-step7"}


_COSTS: dict[str, tuple[list[int], list[int], list[int]]] = {}


def _costs(name: str, model: MultiExitNetwork | None = None) -> tuple[list[int], list[int], list[int]]:
    """(MACs, msdnet ops, params) per exit, counted once per preset."""
    if name not in _COSTS:
        model = model if model is not None else create(name)
        _COSTS[name] = (exit_costs(model, "macs"), exit_costs(model, "msdnet"), exit_params(model))
    return _COSTS[name]


def _input(model: MultiExitNetwork, batch: int) -> torch.Tensor:
    return torch.randn(batch, model.spec.in_channels, *model.spec.image_size)


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create(name)
    assert isinstance(model, MultiExitNetwork)
    assert model.spec.arch == name
    assert model.num_exits >= 2
    batch = 1 if name in IMAGENET else 2
    x = _input(model, batch)

    if name not in IMAGENET:
        model.train()
        outs = model(x)
        loss = sum(torch.nn.functional.cross_entropy(o, torch.zeros(batch, dtype=torch.long)) for o in outs)
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{name}: parameter {pname} receives no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"

    model.eval()
    with torch.no_grad():
        outs = model(x)
        assert len(outs) == model.num_exits
        for o in outs:
            assert o.shape == (batch, model.spec.num_classes)
            assert torch.isfinite(o).all()
        # Chaining the stages by hand is exactly the forward pass, and only the last stage hands over ().
        state = (x,)
        for k, stage in enumerate(model.stages):
            state, logits = stage(state)
            assert torch.equal(logits, outs[k]), f"{name}: stage {k} differs from forward()"
            assert isinstance(state, tuple)
            assert (len(state) == 0) == (k == model.num_exits - 1)
            assert all(isinstance(t, torch.Tensor) and t.shape[0] == batch for t in state)
        partial = model.forward_until(x, 1)
        assert len(partial) == 2 and torch.equal(partial[1], outs[1])

    macs, ops, params = _costs(name, model)
    assert len(macs) == len(ops) == len(params) == model.num_exits
    assert all(a < b for a, b in zip(macs, macs[1:])), macs
    assert all(a < b for a, b in zip(ops, ops[1:])), ops
    assert all(a <= b for a, b in zip(params, params[1:])), params
    assert params[-1] == sum(p.numel() for p in model.parameters())
    # The published convention only adds activation/pooling/bias work to the MACs, a few percent at most.
    assert all(m < o <= 1.1 * m for m, o in zip(macs, ops)), (macs, ops)

    s = model.spec
    with torch.device("meta"):
        rebuilt = create(
            s.arch, num_classes=s.num_classes, in_channels=s.in_channels, image_size=s.image_size, **s.overrides
        )
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)


def test_overrides_change_the_spec_and_are_recorded() -> None:
    model = create("msdnet-tiny", num_classes=5, in_channels=3, image_size=32, growth_rate=6)
    assert (model.spec.num_classes, model.spec.in_channels, model.spec.image_size) == (5, 3, (32, 32))
    assert model.spec.overrides == {"growth_rate": 6}
    assert model(torch.randn(2, 3, 32, 32))[-1].shape == (2, 5)
    # None means "keep the preset's value", so CLI defaults never clobber a preset.
    assert create("msdnet-cifar100", num_classes=None).spec.num_classes == 100


@pytest.mark.parametrize("image_size", [28, 32, (28, 32)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_msdnet_tiny_any_input(image_size, in_channels: int) -> None:
    model = create("msdnet-tiny", in_channels=in_channels, image_size=image_size).eval()
    assert model.num_exits >= 4
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    outs = model(torch.randn(3, in_channels, h, w))
    assert [tuple(o.shape) for o in outs] == [(3, 10)] * model.num_exits


def test_msdnet_tiny_defaults_are_fashion_mnist_sized() -> None:
    s = create("msdnet-tiny").spec
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (28, 28))


def test_msdnet_state_is_the_multiscale_features_with_pruned_scales() -> None:
    model = create("msdnet-cifar10").eval()
    state = (torch.randn(1, 3, 32, 32),)
    n_scales, sizes = [], []
    with torch.no_grad():
        for stage in model.stages:
            state, _ = stage(state)
            n_scales.append(len(state))
            sizes.append([t.shape[-1] for t in state])
    # 16 layers over 3 scales with prune=max: the finest scale goes after layer 6, the next after layer 12.
    assert n_scales == [3, 3, 2, 2, 2, 1, 0]
    assert sizes[0] == [32, 16, 8] and sizes[2] == [16, 8] and sizes[5] == [8]


def test_msdnet_schedule_matches_reference() -> None:
    assert block_steps(7, 4, 2, "even") == [4, 2, 2, 2, 2, 2, 2]
    assert block_steps(5, 1, 1, "lin_grow") == [1, 2, 3, 4, 5]
    # prune=max over 16 layers and 3 scales: interval 6.
    assert [scales_of_layer("max", k, 16, 3) for k in (1, 6, 7, 8, 13, 16)] == [
        (3, 3),
        (3, 3),
        (3, 2),
        (2, 2),
        (2, 1),
        (1, 1),
    ]
    model = create("msdnet-cifar100")
    transitions = [type(m).__name__ for m in model.modules()].count("Transition")
    assert transitions == 2


def test_msdnet_final_layer_computes_only_what_the_last_head_reads() -> None:
    # msdnet-tiny's 4 layers over 3 scales leave 2 scales at the last layer; its finer output would feed
    # nothing, so it is not built (the contract test checks every parameter gets a gradient).
    model = create("msdnet-tiny")
    assert scales_of_layer("max", 4, 4, 3) == (2, 2)
    final_layer = model.stages[-1].layers[-1]
    assert len(final_layer.units) == 1 and final_layer.sources == [(1, 0)]


def test_msdnet_lin_grow_and_prune_min_build_and_run() -> None:
    for overrides in ({"step_mode": "lin_grow", "step": 1, "base": 1}, {"prune": "min"}):
        model = create("msdnet-tiny", **overrides).eval()
        assert isinstance(model, MSDNet)
        assert len(model(torch.randn(1, 1, 28, 28))) == 4


def test_sdn_internal_classifier_pooling() -> None:
    ic = InternalClassifier(8, (32, 32), 10)
    assert isinstance(ic.pool, MixedPool) and ic.linear.in_features == 8 * 4 * 4
    assert InternalClassifier(8, (8, 8), 10).linear.in_features == 8 * 4 * 4
    small = InternalClassifier(8, (4, 4), 10)
    assert small.pool is None and small.linear.in_features == 8 * 16
    pool = MixedPool((2, 2))
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        pool.alpha.fill_(1.0)
        assert torch.allclose(pool(x), torch.nn.functional.max_pool2d(x, 2))
        pool.alpha.fill_(0.0)
        assert torch.allclose(pool(x), torch.nn.functional.avg_pool2d(x, 2))


@pytest.mark.parametrize(
    "name, exits, fractions",
    [
        ("sdn-vgg16", 7, None),
        ("sdn-resnet56", 7, (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)),
        ("sdn-wrn32-4", 7, (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)),
        ("sdn-mobilenet", 6, None),
        ("sdn-tiny", 4, (0.19, 0.50, 0.82)),
    ],
)
def test_sdn_ics_sit_at_increasing_shares_of_the_cost(name: str, exits: int, fractions) -> None:
    macs = _costs(name)[0]
    assert len(macs) == exits
    share = [m / macs[-1] for m in macs[:-1]]
    assert share == sorted(share)
    if name != "sdn-tiny":
        assert 0.1 < share[0] < 0.25 and 0.85 < share[-1] < 0.95
    if fractions is not None:
        assert all(abs(s - f) < 0.04 for s, f in zip(share, fractions)), share


def test_sdn_resnet_ic_reads_the_residual_sum_before_relu() -> None:
    model = create("sdn-resnet56").eval()
    with torch.no_grad():
        (state,), _ = model.stages[0]((torch.randn(2, 3, 32, 32),))
    assert (state < 0).any(), "the state after block 4 should be the pre-activation residual sum"


def test_unknown_model_and_bad_options_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="msdnet-cifar100"):
        create("msdnet-cifar1000")
    with pytest.raises(ConfigError, match="invalid option"):
        create("msdnet-tiny", no_such_option=3)
    with pytest.raises(ConfigError, match="step_mode"):
        create("msdnet-tiny", step_mode="odd")
    with pytest.raises(ConfigError, match="num_classes"):
        create("sdn-resnet56", num_classes=0)
    with pytest.raises(ConfigError, match="too small"):
        create("sdn-vgg16", image_size=16)


@pytest.mark.parametrize(
    ("name", "options", "names"),
    [
        # `--model-option` values that are not JSON arrive as strings: none may build a model silently.
        ("msdnet-tiny", {"bottleneck": "False"}, "bottleneck"),
        ("msdnet-tiny", {"n_blocks": "three"}, "n_blocks"),
        ("msdnet-tiny", {"gr_factor": "1,2,4"}, "gr_factor"),
        ("msdnet-tiny", {"gr_factor": "124"}, "gr_factor"),
        ("msdnet-tiny", {"image_size": [28]}, "image_size"),
        ("msdnet-tiny", {"image_size": [28, 28, 1]}, "image_size"),
    ],
)
def test_bad_option_values_raise_config_errors_naming_the_option(name: str, options: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        create(name, **options)


def test_image_size_as_text_is_refused_not_split_into_characters() -> None:
    # as_hw("28") used to unpack the string into height "2" and width "8" and build a 2x8 model.
    with pytest.raises(ConfigError, match="image_size"):
        create("msdnet-tiny", image_size="28")


@pytest.mark.parametrize(
    ("name", "options"),
    [("sdn-vgg16", {"fc_widths": []}), ("sdn-vgg16", {"dropout": 2}), ("sdn-tiny", {"ic_after": [1, 2]})],
)
def test_option_values_a_builder_cannot_use_are_config_errors_naming_them(name: str, options: dict) -> None:
    # These failed inside torch or the builder (IndexError, ValueError): a traceback from `anytime train`.
    (key,) = options
    with pytest.raises(ConfigError, match=f"invalid option for model '{name}' \\({key}="):
        create(name, **options)


def test_msdnet_odd_growth_on_a_split_scale_is_refused_when_built() -> None:
    # A scale fed by a finer one gets half its new channels from each (growth // 2 twice): an odd
    # growth_rate * gr_factor there built a model whose first forward failed on a channel mismatch.
    with pytest.raises(ConfigError, match="growth_rate"):
        create("msdnet-tiny", gr_factor=[1, 1, 1], bn_factor=[1, 1, 1], growth_rate=3)
    create("msdnet-tiny", growth_rate=3)  # (1, 2, 4): every split scale gets an even growth
