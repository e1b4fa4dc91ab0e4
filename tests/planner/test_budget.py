"""Budgets: bytes, or a number with a decimal or binary unit."""

from __future__ import annotations

import pytest

from madfunc.planner.budget import parse_budget


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        (4096, 4096),
        (2.0**20, 2**20),
        ("4096", 4096),
        ("512B", 512),
        ("50MiB", 50 * 2**20),
        ("2GiB", 2 * 2**30),
        ("2 gib", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("1.5 KiB", 1536),
        ("3k", 3000),
        ("0.5M", 500_000),
        ("1e3", 1000),
        ("1TiB", 2**40),
    ],
)
def test_budget_forms(text: int | float | str, nbytes: int) -> None:
    assert parse_budget(text) == nbytes


@pytest.mark.parametrize("text", ["", "MiB", "50 parsecs", "-1MiB", "1..5GB", "GiB2"])
def test_bad_budget_strings_list_the_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"auto_plan\(budget=.*expected a number of bytes.*KiB, MiB, GiB, TiB"):
        parse_budget(text)


@pytest.mark.parametrize("value", [-1, float("inf"), float("nan")])
def test_negative_or_infinite_budget(value: float) -> None:
    with pytest.raises(ValueError, match=r"a budget must be a finite number of bytes >= 0"):
        parse_budget(value)


@pytest.mark.parametrize("value", [True, None, [1]])
def test_budget_of_the_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match=r"expected bytes \(an int\) or a string such as '2GiB'"):
        parse_budget(value)  # type: ignore[arg-type]
