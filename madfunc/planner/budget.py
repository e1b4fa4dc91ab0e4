"""Memory budgets: bytes as an int, or a string with a unit (``"2GiB"``, ``"50MiB"``, ``"1.5GB"``)."""

from __future__ import annotations

import math
import re

__all__ = ["parse_budget"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_FORM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(budget: int | float | str, where: str = "auto_plan") -> int:
    """A memory budget in bytes: an int (or integral float) >= 0, or a number with a unit (case ignored).

    Units: ``B``; decimal ``KB``, ``MB``, ``GB``, ``TB`` (powers of 1000, also ``K``, ``M``, ``G``, ``T``);
    binary ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024). A fractional byte count rounds down.

    Examples:
        >>> parse_budget("50MiB"), parse_budget("1.5GB"), parse_budget(4096)
        (52428800, 1500000000, 4096)
    """
    if isinstance(budget, bool):
        raise TypeError(f"{where}(budget={budget!r}): expected bytes (an int) or a string such as '2GiB'.")
    if isinstance(budget, int | float):
        value, unit = float(budget), ""
    elif isinstance(budget, str):
        match = _FORM.match(budget)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{where}(budget={budget!r}): expected a number of bytes with an optional unit, e.g. '50MiB', "
                f"'2GiB', '1.5GB' or 4096; units: B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (of 1024)."
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TypeError(
            f"{where}(budget=...): expected bytes (an int) or a string such as '2GiB', got {type(budget).__name__}."
        )
    nbytes = value * _UNITS[unit]
    if not math.isfinite(nbytes) or nbytes < 0:
        raise ValueError(f"{where}(budget={budget!r}): a budget must be a finite number of bytes >= 0.")
    return int(nbytes)
