"""Exit-policy fitting on crafted validation logits (pure numpy: no bundle, no onnxruntime)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from anytime.runtime.calibration import (
    ExitPolicy,
    ValidationData,
    first_exit,
    fit_geometric,
    fit_search,
    fixed_exit_policy,
    geometric_thresholds,
    search_frontier,
    softmax_confidence,
)

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch

# A 7-exit MSDNet-like cost profile (cumulative MFLOPs of the CIFAR-100 configuration).
COSTS = np.array([56.43, 101.00, 155.31, 198.10, 249.53, 298.05, 340.64]) * 1e6


def crafted_logits(
    n: int = 5000, k: int = 7, c: int = 10, seed: int = 0, qualities: list[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Logits where deeper exits are better (or as `qualities` says: exit e resolves samples easier than its
    quality) and confidence tracks correctness (easy samples stay easy)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    difficulty = rng.uniform(0, 1, n)
    logits = np.empty((k, n, c), dtype=np.float32)
    for e in range(k):
        quality = qualities[e] if qualities is not None else 0.35 + 0.55 * e / (k - 1)
        margin = 4.0 * (quality - difficulty) + rng.normal(0, 0.6, n)
        z = rng.normal(0, 1.0, (n, c))
        z[np.arange(n), labels] += margin
        logits[e] = z
    return logits, labels


@pytest.fixture(scope="module")
def data() -> ValidationData:
    logits, labels = crafted_logits()
    return ValidationData(logits, labels, COSTS)


def reference_msdnet_thresholds(probs_max: np.ndarray, p: np.ndarray) -> np.ndarray:
    """A literal port of MSDNet's dynamic_eval_find_threshold (adaptive_inference.py), loops and all."""
    n_stage, n_sample = probs_max.shape
    sorted_idx = np.argsort(-probs_max, axis=1, kind="stable")
    filtered = np.zeros(n_sample)
    t = np.full(n_stage, 1e8)
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor(n_sample * p[k])
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    t[k] = probs_max[k][ori_idx]
                    break
        filtered += probs_max[k] >= t[k]
    t[n_stage - 1] = -1e8
    return t


def test_softmax_confidence_matches_definition():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    conf, pred = softmax_confidence(logits)
    expected = np.exp(3.0) / np.exp([1.0, 2.0, 3.0]).sum()
    assert conf[0] == pytest.approx(expected, rel=1e-6)
    assert conf[1] == pytest.approx(1.0)  # stable at extreme logits
    assert pred.tolist() == [2, 0]


@pytest.mark.parametrize("r", [0.25, 0.8, 1.0, 1.45, 1.9])
def test_geometric_thresholds_match_msdnet_reference(data, r):
    ks = np.arange(1, data.num_exits + 1)
    p = r**ks / (r**ks).sum()
    expected = reference_msdnet_thresholds(data.confidence, p)
    ours = geometric_thresholds(data, r)
    ref = np.where(expected >= 1e8, np.inf, expected)
    np.testing.assert_array_equal(ours[:-1], ref[:-1].astype(np.float64))
    assert ours[-1] == -np.inf


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.7, 0.9])
def test_geometric_policy_solves_for_budget(data, fraction):
    budget = fraction * COSTS[-1]
    policy = fit_geometric(data, budget, "macs")
    cost, acc, _ = data.evaluate(policy.threshold_array())
    assert cost <= budget  # never over the budget on validation
    assert cost >= budget - 0.02 * COSTS[-1]  # and close to it: solved, not swept on a coarse grid
    assert policy.expected_cost == pytest.approx(cost)
    assert policy.expected_accuracy == pytest.approx(acc)
    assert policy.method == "geometric" and policy.info["r"] > 0


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.5, 0.7, 0.9])
def test_search_policy_within_budget_and_not_worse(data, fraction):
    budget = fraction * COSTS[-1]
    geo = fit_geometric(data, budget, "macs")
    search = fit_search(data, budget, "macs", start=geo)
    cost, acc, _ = data.evaluate(search.threshold_array())
    assert cost <= budget
    assert acc >= geo.expected_accuracy
    assert search.expected_accuracy == pytest.approx(acc)


def test_search_improves_somewhere(data):
    gains = []
    for fraction in (0.3, 0.5, 0.7):
        budget = fraction * COSTS[-1]
        geo = fit_geometric(data, budget, "macs")
        gains.append(fit_search(data, budget, "macs", start=geo).expected_accuracy - geo.expected_accuracy)
    assert max(gains) > 0.002  # the search finds a better policy than the geometric family


def test_accuracy_grows_with_budget(data):
    accs = [fit_search(data, f * COSTS[-1], "macs").expected_accuracy for f in (0.2, 0.5, 0.9)]
    assert accs[0] < accs[1] < accs[2]


def test_search_is_deterministic_and_fast(data):
    budget = 0.45 * COSTS[-1]
    t0 = time.process_time()  # CPU time: robust to other processes sharing the machine
    a = fit_search(data, budget, "macs")
    cpu_seconds = time.process_time() - t0
    b = fit_search(data, budget, "macs")
    assert a.thresholds == b.thresholds
    assert cpu_seconds < 1.0, f"calibration of 5000 samples x 7 exits took {cpu_seconds:.2f} s of CPU"


def test_extreme_budgets(data):
    low = fit_geometric(data, COSTS[0], "macs")
    assert low.exit_fractions[0] == pytest.approx(1.0)
    high = fit_search(data, COSTS[-1], "macs")
    assert high.expected_cost <= COSTS[-1]
    assert high.expected_accuracy >= data.correct[-1].mean()


def test_first_exit_rule():
    conf = np.array([[0.9, 0.2, 0.5], [0.95, 0.7, 0.4], [0.3, 0.3, 0.3]], dtype=np.float32)
    exits = first_exit(conf, np.array([0.8, 0.6, -np.inf]))
    assert exits.tolist() == [0, 1, 2]  # the last exit always answers, whatever its confidence


def test_policy_round_trip(tmp_path, data):
    policy = fit_search(data, 0.5 * COSTS[-1], "macs", budget_text="50%")
    policy.thresholds[1] = math.inf  # "never leaves here" must survive JSON
    policy.save(tmp_path / "p.json")
    back = ExitPolicy.load(tmp_path / "p.json")
    assert back.thresholds == policy.thresholds
    assert back.method == "search" and back.budget == policy.budget and back.budget_text == "50%"


def test_fixed_exit_policy(data):
    p = fixed_exit_policy(data, 3, COSTS, "macs")
    assert p.expected_cost == pytest.approx(COSTS[2])
    assert p.exit_fractions[2] == pytest.approx(1.0)
    assert p.expected_accuracy == pytest.approx(data.correct[2].mean())


def spec_outcome(
    confidence: np.ndarray, correct: np.ndarray, costs: np.ndarray, thresholds
) -> tuple[float, float, list]:
    """From the exit rule alone, one sample at a time: leave at the first exit whose confidence reaches its
    threshold, the last always answers; (average cost, accuracy, share leaving at each exit)."""
    k_exits, n = confidence.shape
    total, right, taken = 0.0, 0, [0] * k_exits
    for i in range(n):
        for k in range(k_exits):
            if k == k_exits - 1 or confidence[k, i] >= np.float32(thresholds[k]):
                total += float(costs[k])
                right += int(correct[k, i])
                taken[k] += 1
                break
    return total / n, right / n, [t / n for t in taken]


@pytest.mark.parametrize("budget", [COSTS[0], (COSTS[0] + COSTS[1]) / 2, 0.4 * COSTS[-1], (COSTS[-2] + COSTS[-1]) / 2])
def test_fitted_policies_state_what_their_thresholds_do_on_validation(data, budget):
    # Independent of ValidationData.evaluate: the stated cost, accuracy and exit shares are the exit rule's.
    geo = fit_geometric(data, budget, "macs")
    for policy in (geo, fit_search(data, budget, "macs", start=geo)):
        cost, acc, shares = spec_outcome(data.confidence, data.correct, COSTS, policy.thresholds)
        assert policy.expected_cost == pytest.approx(cost, rel=1e-12)
        assert policy.expected_accuracy == acc
        assert policy.exit_fractions == pytest.approx(shares, abs=1e-15)
        assert cost <= budget * (1 + 1e-9)


def test_frontier_start_keeps_a_larger_budget_from_scoring_below_a_smaller_one():
    # Exit 2 is the best exit and deeper ones are worse (an undertrained network): coordinate ascent from
    # a large budget's geometric policy stops at "everyone at exit 1", below what a smaller budget gets.
    data = ValidationData(*crafted_logits(n=3000, qualities=[0.6, 0.7, 0.5, 0.55, 0.6, 0.62, 0.6]), COSTS)
    frontier = search_frontier(data, "macs")
    assert len(frontier) == 32
    assert all(p.expected_cost <= p.budget * (1 + 1e-9) for p in frontier)
    frontier_accuracy = [p.expected_accuracy for p in frontier]
    assert frontier_accuracy == sorted(frontier_accuracy)  # a continuation: each ascends from the one before
    shortfall = []
    for budget in np.linspace(COSTS[0], COSTS[-1], 61)[1:]:
        fitting = max((p.expected_accuracy for p in frontier if p.expected_cost <= budget), default=0.0)
        alone = fit_search(data, budget, "macs")
        with_frontier = fit_search(data, budget, "macs", frontier=frontier)
        assert with_frontier.expected_cost <= budget * (1 + 1e-9)
        assert with_frontier.expected_accuracy >= max(alone.expected_accuracy, fitting)
        cost, acc, _ = data.evaluate(with_frontier.threshold_array())
        assert (cost, acc) == pytest.approx((with_frontier.expected_cost, with_frontier.expected_accuracy))
        shortfall.append(fitting - alone.expected_accuracy)
    assert max(shortfall) > 0.005  # the trap is real: without the frontier a larger budget scored lower
