"""Compute budgets: parsing (`120M`, `1.5G`, `3e8`, `0.3ms`, `300us`, `40%`, `exit=3`) and the feasible range check.

A budget is an average cost per image in the model's cost convention: the bundle's (MACs, say), or time
(`TIME_CONVENTION`, seconds per image) when a latency profile is in use. Time budgets carry a unit.
"""

from __future__ import annotations

import math
import numbers
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
# Time per image; µ is accepted as the micro sign (U+00B5) and as the Greek letter mu (U+03BC).
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ns": 1e-9}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(s|ms|us|\u00b5s|\u03bcs|ns)\s*$")
_WITH_UNIT = re.compile(r"^\s*[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\s*([^\s0-9.%][^\s]*)\s*$")
ACCEPTED_FORMS = (
    "an average cost per image in the bundle's convention (120M, 1.5G, 3e8; suffixes K, M, G, T), "
    "a time per image with a latency profile (0.3ms, 300us, 2e-4s; units s, ms, us or µs, ns), "
    "a fraction of the full network (40%), or a fixed exit (exit=3)"
)
TIME_CONVENTION = "seconds"
PROFILE_HINT = (
    "make a latency profile with `anytime profile BUNDLE -o profile.json` and pass --profile profile.json "
    "(Python: anytime.load(bundle, profile='profile.json'))"
)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: an average cost per image, a fraction of the full network, or a fixed exit."""

    kind: str  # "cost" | "time" | "fraction" | "exit"
    value: float  # cost per image / seconds per image / fraction in (0, 1] / 1-based exit
    text: str

    def __str__(self) -> str:
        return self.text


BudgetLike = str | float | int | Budget


def format_seconds(seconds: float) -> str:
    """Human-readable time: 312.4 µs, 1.25 ms, 2.1 s."""
    t = float(seconds)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(t) >= scale:
            return f"{t / scale:.4g} {unit}"
    return f"{t / 1e-9:.4g} ns"


def format_cost(cost: float, convention: str | None = None) -> str:
    """Human-readable cost: 123.4M, 1.50G, 980 (with the convention name when given); times (the
    `seconds` convention) as 312.4 µs."""
    if convention == TIME_CONVENTION:
        return format_seconds(cost)
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
    if isinstance(budget, numbers.Real):  # numpy's numbers too (a cost taken from exit_costs, say)
        if not math.isfinite(budget) or budget <= 0:
            raise BudgetError(f"budget {budget!r} must be a positive finite cost per image")
        return Budget("cost", float(budget), format_cost(float(budget)))
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
    if m := _TIME.match(budget):
        value = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        if value <= 0 or not math.isfinite(value):
            raise BudgetError(f"budget {budget!r} must be a positive finite time per image")
        return Budget("time", value, budget.strip())
    if m := _NUMBER.match(budget):
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
        if value <= 0 or not math.isfinite(value):
            raise BudgetError(f"budget {budget!r} must be a positive finite cost per image")
        return Budget("cost", value, budget.strip())
    if m := _WITH_UNIT.match(budget):
        raise BudgetError(f"budget {budget!r} has an unknown unit {m.group(1)!r}; give {ACCEPTED_FORMS}")
    raise BudgetError(f"cannot read budget {budget!r}: give {ACCEPTED_FORMS}")


def check_exit(exit_number: int | float, num_exits: int) -> int:
    """Validate a 1-based exit number."""
    if isinstance(exit_number, bool) or not isinstance(exit_number, numbers.Real):
        raise BudgetError(
            f"exit={exit_number!r} is a {type(exit_number).__name__}; give the exit as a whole number 1..{num_exits}"
        )
    if isinstance(exit_number, bool) or int(exit_number) != exit_number or not 1 <= exit_number <= num_exits:
        raise BudgetError(f"exit={exit_number!r} does not exist: this model has exits 1..{num_exits}")
    return int(exit_number)


def resolve_budget_cost(budget: Budget, exit_costs: Sequence[float] | np.ndarray, convention: str) -> float:
    """The budget as an average cost per image; raise with the feasible range when outside it.

    `convention` is `TIME_CONVENTION` when a latency profile is in use: then `exit_costs` are seconds per
    image, `40%` is 40% of the full network's measured time, and a time budget is what it says.
    """
    first, full = float(exit_costs[0]), float(exit_costs[-1])
    if budget.kind == "exit":
        return float(exit_costs[check_exit(budget.value, len(exit_costs)) - 1])
    timed = convention == TIME_CONVENTION
    if budget.kind == "time" and not timed:
        raise BudgetError(
            f"budget {budget.text} is a time per image, but this model's costs are in {convention} "
            f"(no latency profile in use); {PROFILE_HINT}"
        )
    suffixed = (m := _NUMBER.match(budget.text)) is not None and bool(m.group(2))
    if budget.kind == "cost" and timed and suffixed:
        raise BudgetError(
            f"budget {budget.text} is a cost count, but with a latency profile in use budgets are times per image "
            "(0.3ms, 300us, 2e-4s) or a fraction of the full network's measured time (40%)"
        )
    cost = budget.value * full if budget.kind == "fraction" else budget.value
    # A relative tolerance so that `100%` or a cost printed with rounding still counts as feasible.
    tol = 1e-9 * full
    if cost < first - tol or cost > full + tol:
        what = "time" if timed else "cost"
        side = f"below the {what} of the first exit" if cost < first else f"above the {what} of the last exit"
        # A bare number in (0, 1] is a cost of under one MAC (or second): a fraction was almost surely meant.
        meant = budget.kind == "cost" and 0 < budget.value <= 1 and not suffixed
        hint = f" (for a fraction of the full network write {100 * budget.value:g}%)" if meant else ""
        raise BudgetError(
            f"budget {budget.text} ({format_cost(cost, convention)} per image) is {side}{hint}; feasible budgets are "
            f"{format_cost(first, convention)} to {format_cost(full, convention)} per image "
            f"({100 * first / full:.1f}% to 100% of the full network), or a fixed exit=1..{len(exit_costs)}"
        )
    return min(max(cost, first), full)
