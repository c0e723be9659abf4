"""Compute budgets: parsing (`120M`, `1.5G`, `3e8`, `40%`, `exit=3`) and the feasible range check."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anytime.errors import BudgetError

if TYPE_CHECKING:
    import numpy as np

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_EXIT = re.compile(r"^\s*exit\s*[=:]\s*([0-9]+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: an average cost per image, a fraction of the full network, or a fixed exit."""

    kind: str  # "cost" | "fraction" | "exit"
    value: float  # cost per image / fraction in (0, 1] / 1-based exit
    text: str

    def __str__(self) -> str:
        return self.text


BudgetLike = str | float | int | Budget


def format_cost(cost: float, convention: str | None = None) -> str:
    """Human-readable cost: 123.4M, 1.50G, 980 (with the convention name when given)."""
    c = float(cost)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(c) >= scale:
            s = f"{c / scale:.4g}{suffix}"
            break
    else:
        s = f"{c:.4g}"
    return f"{s} {convention}" if convention else s


def parse_budget(budget: BudgetLike) -> Budget:
    """Parse a budget given as a number, `120M`/`1.5G`, `40%` or `exit=3`."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, bool):
        raise BudgetError(f"budget {budget!r} is not a number; give e.g. 120M, 1.5G, 40% or exit=3")
    if isinstance(budget, (int, float)):
        if not math.isfinite(budget) or budget <= 0:
            raise BudgetError(f"budget {budget!r} must be a positive finite cost per image")
        return Budget("cost", float(budget), format_cost(budget))
    if not isinstance(budget, str):
        raise BudgetError(
            f"budget {budget!r} has type {type(budget).__name__}; give a string like 120M, 40% or exit=3, or a number"
        )
    if m := _PERCENT.match(budget):
        frac = float(m.group(1)) / 100.0
        if frac <= 0:
            raise BudgetError(f"budget {budget!r} must be a positive percentage of the full network, e.g. 40%")
        return Budget("fraction", frac, budget.strip())
    if m := _EXIT.match(budget):
        return Budget("exit", float(int(m.group(1))), f"exit={int(m.group(1))}")
    if m := _NUMBER.match(budget):
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
        if value <= 0 or not math.isfinite(value):
            raise BudgetError(f"budget {budget!r} must be a positive finite cost per image")
        return Budget("cost", value, budget.strip())
    raise BudgetError(
        f"cannot read budget {budget!r}: give an average cost per image (120M, 1.5G, 3e8), "
        "a fraction of the full network (40%), or a fixed exit (exit=3)"
    )


def check_exit(exit_number: int | float, num_exits: int) -> int:
    """Validate a 1-based exit number."""
    if isinstance(exit_number, bool) or int(exit_number) != exit_number or not 1 <= exit_number <= num_exits:
        raise BudgetError(f"exit={exit_number!r} does not exist: this model has exits 1..{num_exits}")
    return int(exit_number)


def resolve_budget_cost(budget: Budget, exit_costs: Sequence[float] | np.ndarray, convention: str) -> float:
    """The budget as an average cost per image; raise with the feasible range when outside it."""
    first, full = float(exit_costs[0]), float(exit_costs[-1])
    if budget.kind == "exit":
        return float(exit_costs[check_exit(budget.value, len(exit_costs)) - 1])
    cost = budget.value * full if budget.kind == "fraction" else budget.value
    # A relative tolerance so that `100%` or a cost printed with rounding still counts as feasible.
    tol = 1e-9 * full
    if cost < first - tol or cost > full + tol:
        side = "below the cost of the first exit" if cost < first else "above the cost of the last exit"
        raise BudgetError(
            f"budget {budget.text} ({format_cost(cost, convention)} per image) is {side}; feasible budgets are "
            f"{format_cost(first, convention)} to {format_cost(full, convention)} per image "
            f"({100 * first / full:.1f}% to 100% of the full network), or a fixed exit=1..{len(exit_costs)}"
        )
    return min(max(cost, first), full)
