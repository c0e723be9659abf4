"""Exact per-exit cost accounting: published MSDNet numbers, hand counts, conventions."""

from __future__ import annotations

import pytest
import torch

from anytime.errors import ConfigError
from anytime.models import create
from anytime.models.costs import cost_table, exit_costs, exit_params, stage_costs

# Huang et al. (ICLR 2018), as reproduced by the reference op_counter.py: cumulative MFLOPs and M params.
PUBLISHED = {
    "msdnet-cifar100": (
        [56.43, 101.00, 155.31, 198.10, 249.53, 298.05, 340.64],
        [0.90, 1.84, 2.80, 3.76, 4.92, 6.10, 7.36],
    ),
    "msdnet-imagenet-step4": (
        [339.90, 685.46, 1008.16, 1254.47, 1360.53],
        [4.24, 8.77, 13.07, 16.75, 23.96],
    ),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_msdnet_costs_and_params(name: str) -> None:
    mflops, mparams = PUBLISHED[name]
    model = create(name)
    ops = exit_costs(model, "msdnet")
    params = exit_params(model)
    assert len(ops) == len(mflops)
    for k, (got, want) in enumerate(zip(ops, mflops)):
        assert got / 1e6 == pytest.approx(want, rel=0.005), f"exit {k + 1}: {got / 1e6:.2f} vs {want} MFLOPs"
    for k, (got, want) in enumerate(zip(params, mparams)):
        assert got / 1e6 == pytest.approx(want, rel=0.005), f"exit {k + 1}: {got / 1e6:.3f} vs {want} M params"


def test_exit_cost_includes_every_earlier_head() -> None:
    # CIFAR-10 and CIFAR-100 MSDNets differ only in their heads' linear layers (128 -> C, weight + bias),
    # so under real early exit the gap at exit k is k of those differences.
    cifar100, cifar10 = create("msdnet-cifar100"), create("msdnet-cifar10")
    c100, c10 = exit_costs(cifar100, "msdnet"), exit_costs(cifar10, "msdnet")
    per_head = (128 * 100 + 100) - (128 * 10 + 10)
    assert [a - b for a, b in zip(c100, c10)] == [per_head * k for k in range(1, 8)]
    m100, m10 = exit_costs(cifar100, "macs"), exit_costs(cifar10, "macs")
    assert [a - b for a, b in zip(m100, m10)] == [128 * 90 * k for k in range(1, 8)]


def test_hand_counted_test_convnet() -> None:
    # test-convnet, 3x32x32 input, widths 8/16/16: stage k = conv3x3(+BN+ReLU) -> global avg pool -> linear.
    model = create("test-convnet")
    conv = [3 * 8 * 9 * 32 * 32, 8 * 16 * 9 * 16 * 16, 16 * 16 * 9 * 8 * 8]
    linear_w = [8 * 10, 16 * 10, 16 * 10]
    relu = [8 * 32 * 32, 16 * 16 * 16, 16 * 8 * 8]  # = pooled elements, 1 op each
    stage_macs = [c + w for c, w in zip(conv, linear_w)]
    stage_ops = [c + 2 * r + w + 10 for c, r, w in zip(conv, relu, linear_w)]
    assert stage_costs(model, "macs") == stage_macs
    assert stage_costs(model, "msdnet") == stage_ops
    assert exit_costs(model, "macs") == [221264, 516336, 663952]
    assert exit_costs(model, "msdnet") == [237658, 540932, 690606]
    stage_params = [3 * 8 * 9 + 16 + 90, 8 * 16 * 9 + 32 + 170, 16 * 16 * 9 + 32 + 170]
    assert exit_params(model) == [322, 1676, 4182] == [sum(stage_params[: k + 1]) for k in range(3)]


def test_grouped_convolutions_are_counted_per_group() -> None:
    # sdn-mobilenet's depthwise convs: both conventions must divide by the group count, so they agree
    # on the conv work and differ only by ReLU/pooling/bias terms (about 1-3% here; without the division
    # the depthwise convs would count up to 512 times their work).
    model = create("sdn-mobilenet")
    macs, ops = exit_costs(model, "macs"), exit_costs(model, "msdnet")
    assert all(m < o < 1.04 * m for m, o in zip(macs, ops)), (macs, ops)
    assert 40e6 < macs[-1] < 50e6  # CIFAR MobileNet-v1 is about 47 M MACs


def test_image_size_override_scales_conv_work() -> None:
    model = create("test-convnet")
    small, large = stage_costs(model, "macs"), stage_costs(model, "macs", image_size=64)
    linear_w = [80, 160, 160]
    assert [big - w for big, w in zip(large, linear_w)] == [4 * (s - w) for s, w in zip(small, linear_w)]


def test_cost_table_rows() -> None:
    model = create("msdnet-tiny")
    rows = cost_table(model)
    assert [r["exit"] for r in rows] == [1, 2, 3, 4]
    assert [r["cost"]["macs"] for r in rows] == exit_costs(model, "macs")
    assert [r["cost"]["msdnet"] for r in rows] == exit_costs(model, "msdnet")
    assert [r["params"] for r in rows] == exit_params(model)
    assert rows[-1]["fraction"] == 1.0
    assert all(0 < a["fraction"] < b["fraction"] for a, b in zip(rows, rows[1:]))
    assert all(isinstance(r["cost"]["macs"], int) and isinstance(r["params"], int) for r in rows)


def test_counting_leaves_the_model_as_it_was() -> None:
    model = create("msdnet-tiny")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exit_costs(model, "macs")
    exit_costs(model, "msdnet")
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN statistics must not move"
    # No forward hooks left behind.
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_convention_and_bad_size() -> None:
    model = create("test-convnet")
    with pytest.raises(ConfigError, match="convention"):
        exit_costs(model, "flops")
    with pytest.raises(ConfigError, match="image size"):
        exit_costs(create("sdn-vgg16"), "macs", image_size=8)
