"""Exit policies: per-exit confidence thresholds fitted on validation logits for a compute budget.

Exit rule (MSDNet, Sec. 5): a sample leaves at the first exit whose maximum softmax probability reaches
that exit's threshold; the last exit always answers. Two fitting procedures:

- "geometric": the MSDNet procedure. Exit shares P_k ∝ r^k; walking exits in order, exit k's threshold is
  the confidence of the ⌊N·P_k⌋-th most confident validation sample not yet exited. The published code
  sweeps r; here r is solved for the budget by bisection on log r.
- "search": coordinate ascent on the thresholds, started from the geometric policy and (given a
  `search_frontier`) from the frontier's best policy that fits. For one exit at a time every split of the
  samples reaching it is scored exactly (sorted prefix sums), keeping the best validation accuracy whose
  average cost stays within the budget. Deterministic, never worse than its starting points on
  validation, and so never below the frontier at a smaller budget.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from anytime.errors import ConfigError
from anytime.fileio import atomic_write_json

POLICY_METHODS = ("geometric", "search", "exit")


def softmax_confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max softmax probability, argmax) along the last axis; numerically stable, float32."""
    logits = np.asarray(logits, dtype=np.float32)
    top = logits.max(axis=-1, keepdims=True)
    denom = np.exp(logits - top).sum(axis=-1)
    return (1.0 / denom).astype(np.float32), logits.argmax(axis=-1)


def first_exit(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0-based exit of each sample: the first k with confidence[k] >= thresholds[k]; the last always answers."""
    k = confidence.shape[0]
    passes = confidence >= np.asarray(thresholds, dtype=np.float32)[:, None]
    passes[k - 1] = True
    return passes.argmax(axis=0)


@dataclass
class ExitPolicy:
    """Per-exit thresholds with what they are expected to cost and score (on the validation data)."""

    thresholds: list[float]  # per exit; +inf: never leaves there, -inf: always leaves (the last exit)
    method: str
    budget: float | None  # average cost per image the policy was fitted for (None for a fixed exit)
    expected_cost: float
    expected_accuracy: float
    exit_fractions: list[float] = field(default_factory=list)
    cost_convention: str = "macs"
    budget_text: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_exits(self) -> int:
        return len(self.thresholds)

    def threshold_array(self) -> np.ndarray:
        return np.asarray(self.thresholds, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinities: +inf ("never exits here") is written as null, the last exit as -1.
        def enc(t: float) -> float | None:
            return None if t == math.inf else (-1.0 if t == -math.inf else float(t))

        return {
            "method": self.method,
            "budget": self.budget,
            "budget_text": self.budget_text,
            "cost_convention": self.cost_convention,
            "thresholds": [enc(t) for t in self.thresholds],
            "expected_cost": self.expected_cost,
            "expected_accuracy": self.expected_accuracy,
            "exit_fractions": list(self.exit_fractions),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExitPolicy":
        try:
            thresholds = [math.inf if t is None else float(t) for t in d["thresholds"]]
            thresholds[-1] = -math.inf
            return cls(
                thresholds=thresholds,
                method=str(d["method"]),
                budget=None if d.get("budget") is None else float(d["budget"]),
                expected_cost=float(d["expected_cost"]),
                expected_accuracy=float(d["expected_accuracy"]),
                exit_fractions=[float(v) for v in d.get("exit_fractions", [])],
                cost_convention=str(d.get("cost_convention", "macs")),
                budget_text=str(d.get("budget_text", "")),
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(
                f"not an exit policy: {exc!r}; write one with `anytime calibrate BUNDLE --budget B -o policy.json`"
            ) from exc

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy as JSON, atomically; returns the path (as `Predictions.save` does)."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExitPolicy":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read exit policy '{path}': {exc}") from exc

    def describe(self) -> str:
        from anytime.runtime.budget import format_cost

        ths = ", ".join(
            "never" if t == math.inf else ("all" if t == -math.inf else f"{t:.4f}") for t in self.thresholds
        )
        fr = " ".join(f"{100 * f:.1f}%" for f in self.exit_fractions)
        budget = f" for budget {self.budget_text or format_cost(self.budget or 0)}" if self.budget is not None else ""
        return (
            f"{self.method} policy{budget}: expected cost {format_cost(self.expected_cost, self.cost_convention)} "
            f"per image, expected accuracy {100 * self.expected_accuracy:.2f}% (validation)\n"
            f"  thresholds: [{ths}]\n  exit shares: {fr}"
        )


class CostModel(Protocol):
    """How a policy's cost per image follows from how many images run each stage (`costmodel.TimeCost`)."""

    @property
    def linear(self) -> bool: ...

    @property
    def exit_costs(self) -> np.ndarray: ...

    def reach_cost(self, reach: np.ndarray, count: int) -> np.ndarray: ...


class ValidationData:
    """Per-exit confidence, correctness and cost of the calibration split, precomputed once.

    Without a `cost_model` (or with a linear one) a policy's cost is the mean of its exits' cumulative
    `exit_costs`; a non-linear model (time with per-batch compaction) prices the number of images that run
    each stage instead.
    """

    def __init__(
        self, logits: np.ndarray, labels: np.ndarray, exit_costs: np.ndarray, cost_model: CostModel | None = None
    ) -> None:
        self.confidence, predictions = softmax_confidence(logits)  # (K, N)
        self.correct = predictions == np.asarray(labels)[None, :]
        self.num_exits, self.count = self.confidence.shape
        self._set_costs(exit_costs, cost_model)

    def _set_costs(self, exit_costs: np.ndarray, cost_model: CostModel | None) -> None:
        self.costs = np.asarray(exit_costs if cost_model is None else cost_model.exit_costs, dtype=np.float64)
        self.cost_model = cost_model
        self.linear = cost_model is None or cost_model.linear

    def with_cost_model(self, cost_model: CostModel | None, exit_costs: np.ndarray | None = None) -> "ValidationData":
        """The same validation data priced by another cost model (the softmax is not recomputed)."""
        other = copy.copy(self)
        other._set_costs(self.costs if exit_costs is None else exit_costs, cost_model)
        return other

    def reach_counts(self, exits: np.ndarray) -> np.ndarray:
        """How many samples run each stage, (K,), given their 0-based exits."""
        taken = np.bincount(exits, minlength=self.num_exits)
        return taken[::-1].cumsum()[::-1]

    def evaluate(self, thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
        """(average cost, accuracy, exit fractions) of a threshold vector on the validation data."""
        exits = first_exit(self.confidence, thresholds)
        if self.linear:
            cost = float(self.costs[exits].mean())
        else:
            assert self.cost_model is not None  # not linear means a model was given
            cost = float(self.cost_model.reach_cost(self.reach_counts(exits), self.count))
        acc = float(self.correct[exits, np.arange(self.count)].mean())
        fractions = np.bincount(exits, minlength=self.num_exits) / self.count
        return cost, acc, fractions

    def policy(
        self,
        thresholds: np.ndarray,
        method: str,
        budget: float | None,
        convention: str,
        budget_text: str = "",
        **info: Any,
    ) -> ExitPolicy:
        thresholds = np.asarray(thresholds, dtype=np.float64).copy()
        thresholds[-1] = -math.inf
        cost, acc, fractions = self.evaluate(thresholds)
        return ExitPolicy(
            thresholds=[float(t) for t in thresholds],
            method=method,
            budget=budget,
            expected_cost=cost,
            expected_accuracy=acc,
            exit_fractions=[float(f) for f in fractions],
            cost_convention=convention,
            budget_text=budget_text,
            info=info,
        )


def geometric_thresholds(data: ValidationData, r: float) -> np.ndarray:
    """MSDNet thresholds for exit shares P_k ∝ r^k (k = 1..K)."""
    k_exits, n = data.num_exits, data.count
    logp = np.arange(1, k_exits + 1) * math.log(r)
    p = np.exp(logp - logp.max())
    p /= p.sum()
    counts = np.floor(n * p).astype(np.int64)
    thresholds = np.full(k_exits, math.inf)
    remaining = np.ones(n, dtype=bool)
    for k in range(k_exits - 1):
        conf = data.confidence[k]
        pool = np.sort(conf[remaining])[::-1]
        # As in the reference code: when fewer samples remain than the share asks for (ties at an
        # earlier threshold let more leave), nobody leaves here.
        if 0 < counts[k] <= pool.size:
            thresholds[k] = float(pool[counts[k] - 1])
            remaining &= conf < np.float32(thresholds[k])
    thresholds[-1] = -math.inf
    return thresholds


def fit_geometric(
    data: ValidationData, budget: float, convention: str, budget_text: str = "", iterations: int = 60
) -> ExitPolicy:
    """Solve the geometric ratio r for the budget: the largest r (bisection on log r) whose cost fits."""
    lo, hi = math.log(1e-4), math.log(1e4)
    lo_th = geometric_thresholds(data, math.exp(lo))
    if data.evaluate(lo_th)[0] > budget:
        # Even all-but-nothing at exit 1 does not fit (ties at the first exit's threshold); everyone at exit 1 does.
        th = np.full(data.num_exits, math.inf)
        th[0] = -math.inf
        return data.policy(th, "geometric", budget, convention, budget_text, r=0.0)
    hi_th = geometric_thresholds(data, math.exp(hi))
    if data.evaluate(hi_th)[0] <= budget:
        return data.policy(hi_th, "geometric", budget, convention, budget_text, r=math.exp(hi))
    best_th, best_r = lo_th, math.exp(lo)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        th = geometric_thresholds(data, math.exp(mid))
        if data.evaluate(th)[0] <= budget:
            lo, best_th, best_r = mid, th, math.exp(mid)
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return data.policy(best_th, "geometric", budget, convention, budget_text, r=best_r)


def _best_split_for_exit(
    data: ValidationData, thresholds: np.ndarray, k: int, budget: float
) -> tuple[float, float, float]:
    """Best threshold for exit k with the others fixed: (threshold, accuracy, cost) within the budget."""
    n = data.count
    exits = first_exit(data.confidence, thresholds)
    passes = data.confidence >= thresholds.astype(np.float32)[:, None]
    passes[-1] = True
    # Where each sample would answer if it did not leave at exit k: the first passing exit after k.
    after = passes.copy()
    after[: k + 1] = False
    fallback = after.argmax(axis=0)
    reach = exits >= k  # samples not gone before exit k
    idx = np.arange(n)
    base_cost = data.costs[exits[~reach]].sum()
    base_correct = data.correct[exits[~reach], idx[~reach]].sum()

    r_idx = idx[reach]
    conf = data.confidence[k, r_idx]
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    leave_correct = data.correct[k, r_idx][order].astype(np.float64)
    leave_cost = np.full(order.size, data.costs[k])
    stay_correct = data.correct[fallback[r_idx], r_idx][order].astype(np.float64)
    stay_cost = data.costs[fallback[r_idx]][order]
    # j = number of the most confident reaching samples that leave at exit k (0..m).
    zero = np.zeros(1)
    cum_lc = np.concatenate([zero, np.cumsum(leave_correct)])
    cum_sc = np.concatenate([zero, np.cumsum(stay_correct)])
    correct = base_correct + cum_lc + (cum_sc[-1] - cum_sc)
    if data.linear:
        cum_lcost = np.concatenate([zero, np.cumsum(leave_cost)])
        cum_scost = np.concatenate([zero, np.cumsum(stay_cost)])
        cost = base_cost + cum_lcost + (cum_scost[-1] - cum_scost)
    else:
        cost = _split_costs(data, exits, fallback[r_idx][order], k) * n
    m = order.size
    # A threshold can only separate j samples when the j-th and (j+1)-th confidences differ.
    valid = np.ones(m + 1, dtype=bool)
    if m > 1:
        valid[1:m] = conf_sorted[:-1] > conf_sorted[1:]
    valid &= cost <= budget * n + 1e-9 * budget * n
    if not valid.any():
        return float(thresholds[k]), -1.0, math.inf
    score = np.where(valid, correct, -1.0)
    # Best accuracy; among ties the cheapest (then the fewest leaving, which argmax's first hit gives).
    best = np.flatnonzero(score == score.max())
    j = int(best[np.argmin(cost[best])])
    th = math.inf if j == 0 else float(conf_sorted[j - 1])
    return th, float(correct[j]) / n, float(cost[j]) / n


def _split_costs(data: ValidationData, exits: np.ndarray, stay_fallback: np.ndarray, k: int) -> np.ndarray:
    """Cost per image for j = 0..m of the m samples reaching exit k leaving there (most confident first),
    under a non-linear cost model: price the number of samples that run each stage for every j."""
    assert data.cost_model is not None
    m = stay_fallback.size
    reach = np.empty((data.num_exits, m + 1))
    # Stages up to k are run by the same samples whatever exit k does.
    reach[: k + 1] = data.reach_counts(exits)[: k + 1, None]
    for stage in range(k + 1, data.num_exits):
        # Stage `stage` runs for the samples that stay at exit k (order[j:]) and would answer at or after it.
        goes_on = np.concatenate([[0.0], np.cumsum(stay_fallback >= stage)])
        reach[stage] = goes_on[-1] - goes_on
    return np.asarray(data.cost_model.reach_cost(reach, data.count), dtype=np.float64)


def fit_search(
    data: ValidationData,
    budget: float,
    convention: str,
    start: ExitPolicy | None = None,
    budget_text: str = "",
    max_rounds: int = 20,
    frontier: Sequence[ExitPolicy] = (),
) -> ExitPolicy:
    """Coordinate ascent on thresholds maximising validation accuracy with average cost <= budget.

    Coordinate ascent stops at a local optimum, and the one reached from the budget's geometric policy
    can be worse than a policy that fits a smaller budget. With a `frontier` (`search_frontier`) it also
    starts from the frontier's most accurate policy that fits and returns the better of the two, so a
    larger budget never scores lower on validation than the frontier at a smaller one."""
    if start is None:
        start = fit_geometric(data, budget, convention, budget_text)
    best = _ascend(data, budget, convention, start, budget_text, max_rounds)
    fitting = [p for p in frontier if p.expected_cost <= budget * (1 + 1e-9)]
    if fitting:
        seed = max(fitting, key=lambda p: (p.expected_accuracy, -p.expected_cost))
        other = _ascend(data, budget, convention, seed, budget_text, max_rounds, start_name="frontier")
        if _better(other, best):
            best = other
    return best


def _better(a: ExitPolicy, b: ExitPolicy) -> bool:
    return _improves(a.expected_accuracy, a.expected_cost, b.expected_accuracy, b.expected_cost)


def _improves(acc: float, cost: float, than_acc: float, than_cost: float) -> bool:
    """Higher validation accuracy, or the same for less cost."""
    return acc > than_acc + 1e-12 or (abs(acc - than_acc) <= 1e-12 and cost < than_cost - 1e-9 * max(than_cost, 1.0))


def _ascend(
    data: ValidationData,
    budget: float,
    convention: str,
    start: ExitPolicy,
    budget_text: str,
    max_rounds: int,
    start_name: str | None = None,
) -> ExitPolicy:
    thresholds = np.asarray(start.thresholds, dtype=np.float64).copy()
    cost, acc, _ = data.evaluate(thresholds)
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (read after the loop: how many rounds ran)
        improved = False
        for k in range(data.num_exits - 1):
            th, new_acc, new_cost = _best_split_for_exit(data, thresholds, k, budget)
            if _improves(new_acc, new_cost, acc, cost):
                thresholds[k] = th
                acc, cost = new_acc, new_cost
                improved = True
        if not improved:
            break
    return data.policy(
        thresholds, "search", budget, convention, budget_text, rounds=rounds, start=start_name or start.method
    )


FRONTIER_POINTS = 32


def search_frontier(data: ValidationData, convention: str, points: int = FRONTIER_POINTS) -> tuple[ExitPolicy, ...]:
    """Searched policies at `points` budgets evenly spaced from the cheapest policy's cost (everyone at
    exit 1) to the full network's, each ascended from the one before it (the first from its geometric
    policy): a continuation whose best accuracy never falls as the budget grows, for `fit_search` to start
    from. Costs about `points` warm-started searches (0.1-0.2 s for 6,000 samples and 4 exits)."""
    k = data.num_exits
    cheapest = data.evaluate(np.full(k, -math.inf))[0]
    full_th = np.full(k, math.inf)
    full_th[-1] = -math.inf
    full = data.evaluate(full_th)[0]
    policies: list[ExitPolicy] = []
    previous: ExitPolicy | None = None
    for budget in np.linspace(cheapest, full, points + 1)[1:]:
        start = previous if previous is not None else fit_geometric(data, float(budget), convention)
        policy = _ascend(data, float(budget), convention, start, "", 20)
        if policy.expected_cost > budget * (1 + 1e-9):
            continue  # a start that does not fit (ties at exit 1's threshold); the next budget tries again
        policies.append(policy)
        previous = policy
    return tuple(policies)


def fixed_exit_policy(
    data: ValidationData | None, exit_number: int, exit_costs: np.ndarray, convention: str
) -> ExitPolicy:
    """Every sample answers at one exit (1-based); stages after it never run."""
    k = len(exit_costs)
    thresholds = np.full(k, math.inf)
    thresholds[exit_number - 1 :] = -math.inf
    if data is not None:
        cost, acc, fractions = data.evaluate(thresholds)
    else:
        cost, acc, fractions = float(exit_costs[exit_number - 1]), math.nan, np.eye(k)[exit_number - 1]
    return ExitPolicy(
        thresholds=[float(t) for t in thresholds],
        method="exit",
        budget=None,
        expected_cost=cost,
        expected_accuracy=acc,
        exit_fractions=[float(f) for f in fractions],
        cost_convention=convention,
        budget_text=f"exit={exit_number}",
    )
