"""Budget parsing and the feasible-range check (no bundle needed)."""

from __future__ import annotations

import numpy as np
import pytest

from anytime.errors import AnytimeError, BudgetError
from anytime.runtime.budget import Budget, check_exit, format_cost, parse_budget, resolve_budget_cost

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch

COSTS = [20e6, 60e6, 100e6, 200e6]


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("120M", "cost", 120e6),
        ("120m", "cost", 120e6),
        ("1.5G", "cost", 1.5e9),
        ("250K", "cost", 250e3),
        ("3e8", "cost", 3e8),
        ("  75000000 ", "cost", 75e6),
        ("40%", "fraction", 0.40),
        ("12.5 %", "fraction", 0.125),
        ("exit=3", "exit", 3),
        ("EXIT = 2", "exit", 2),
        (150e6, "cost", 150e6),
        (7, "cost", 7.0),
    ],
)
def test_parse_budget_forms(text, kind, value):
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize(
    "bad", ["", "fast", "12X", "-5M", "0", "0%", "1e400", "exit=", "M120", float("nan"), -3, True, None, [1]]
)
def test_parse_budget_rejects_malformed(bad):
    with pytest.raises(BudgetError) as info:
        parse_budget(bad)
    assert isinstance(info.value, AnytimeError)


def test_resolve_budget_cost_in_range_and_fraction():
    assert resolve_budget_cost(parse_budget("120M"), COSTS, "macs") == pytest.approx(120e6)
    assert resolve_budget_cost(parse_budget("50%"), COSTS, "macs") == pytest.approx(100e6)
    assert resolve_budget_cost(parse_budget("100%"), COSTS, "macs") == pytest.approx(200e6)
    assert resolve_budget_cost(parse_budget("exit=2"), COSTS, "macs") == pytest.approx(60e6)
    assert resolve_budget_cost(parse_budget(20e6), COSTS, "macs") == pytest.approx(20e6)


@pytest.mark.parametrize("budget, side", [("10M", "below"), ("5%", "below"), ("250M", "above"), ("150%", "above")])
def test_infeasible_budget_states_range(budget, side):
    with pytest.raises(BudgetError) as info:
        resolve_budget_cost(parse_budget(budget), COSTS, "macs")
    msg = str(info.value)
    assert side in msg
    assert "20M macs to 200M macs" in msg  # the feasible range, in the bundle's convention
    assert "10.0% to 100%" in msg
    assert "exit=1..4" in msg


@pytest.mark.parametrize("exit_number", [0, 5, 2.5])
def test_exit_out_of_range(exit_number):
    with pytest.raises(BudgetError, match=r"exits 1\.\.4"):
        resolve_budget_cost(Budget("exit", exit_number, f"exit={exit_number}"), COSTS, "macs")


def test_format_cost():
    assert format_cost(123.4e6) == "123.4M"
    assert format_cost(340.64e6) == "340.6M"
    assert format_cost(1.5e9, "msdnet") == "1.5G msdnet"
    assert format_cost(980) == "980"


def test_exit_given_as_text_names_the_type():
    with pytest.raises(BudgetError, match=r"exit='2' is a str; give the exit as a whole number 1\.\.4"):
        check_exit("2", 4)
    assert check_exit(np.int64(2), 4) == 2 and check_exit(3.0, 4) == 3


@pytest.mark.parametrize("budget", [0.5, "0.5"])
def test_a_bare_number_below_one_suggests_the_fraction_meant(budget):
    with pytest.raises(
        BudgetError, match=r"is below the cost of the first exit \(for a fraction of the full network write 50%\)"
    ):
        resolve_budget_cost(parse_budget(budget), COSTS, "macs")
    with pytest.raises(BudgetError) as info:
        resolve_budget_cost(parse_budget("10M"), COSTS, "macs")
    assert "fraction" not in str(info.value)


@pytest.mark.parametrize("number", [np.float32(120e6), np.int64(120_000_000), np.float64(120e6)])
def test_numpy_numbers_are_budgets_like_python_numbers(number):
    # A budget computed with numpy (a cost from exit_costs, a sum over a batch) is a number, as check_exit takes it.
    b = parse_budget(number)
    assert b.kind == "cost" and b.value == pytest.approx(120e6)
    assert resolve_budget_cost(b, COSTS, "macs") == pytest.approx(120e6)
    with pytest.raises(BudgetError, match="positive finite"):
        parse_budget(np.float32("nan"))
