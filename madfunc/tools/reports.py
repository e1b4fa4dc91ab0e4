"""The report objects of the diagnostics: frozen, printable as tables, convertible to plain dicts."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

from madfunc.core.text import text_table

__all__ = ["CompareReport", "GradientFigures", "InspectReport", "SegmentRow"]


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples to lists, mappings and dataclasses to dicts, NaN to None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    exponent = min(int(math.log(count, 1024)), 3)
    return f"{count / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


@dataclasses.dataclass(frozen=True)
class GradientFigures:
    """Quality of gradient estimates against the exact gradient ``g`` (see :func:`compare`).

    Attributes: ``cosine``, ``relative_error``, ``variance`` (measured ``E||g^-g||^2/||g||^2``),
    ``bias`` with ``bias_ci`` (95% CI), ``bias_norm``, ``draws``, ``numel`` (scalars measured),
    ``variance_theory`` (None unless a formula applies), ``leaves`` (gradient leaves measured), and
    for a segment: ``strategy``, ``differentiated`` (its ``n``) and ``calls``.
    """

    cosine: float
    relative_error: float
    variance: float
    bias: float
    bias_ci: tuple[float, float]
    bias_norm: float
    draws: int
    numel: int
    variance_theory: float | None = None
    leaves: tuple[str, ...] = ()
    strategy: str | None = None
    differentiated: int | None = None
    calls: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (JSON-serialisable; NaN becomes None)."""
        return _plain(self)

    def _cells(self, name: str) -> list[str]:
        low, high = self.bias_ci
        ci = "" if math.isnan(low) else f" [{low:+.2g}, {high:+.2g}]"
        return [
            name,
            self.strategy or "(whole plan)",
            str(self.numel),
            *map(_num, (self.cosine, self.relative_error, self.variance, self.variance_theory)),
            f"{self.bias:+.2g}{ci}",
        ]


@dataclasses.dataclass(frozen=True)
class CompareReport:
    """What :func:`compare` measured: ``overall`` figures (also as ``report.cosine`` etc.),
    ``per_segment`` figures, and median seconds per gradient call (``time_plan``, ``time_reference``)."""

    overall: GradientFigures
    per_segment: Mapping[str, GradientFigures]
    time_plan: float
    time_reference: float
    plan: str
    reference: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_segment", types.MappingProxyType(dict(self.per_segment)))

    cosine = property(lambda self: self.overall.cosine, doc="Mean cosine similarity to the exact gradient.")
    relative_error = property(lambda self: self.overall.relative_error, doc="Mean ||g^ - g|| / ||g||.")
    variance = property(lambda self: self.overall.variance, doc="Measured E||g^ - g||^2 / ||g||^2.")
    variance_theory = property(lambda self: self.overall.variance_theory, doc="Theoretical variance or None.")
    bias = property(lambda self: self.overall.bias, doc="Mean <g^ - g, g> / ||g||^2.")
    bias_ci = property(lambda self: self.overall.bias_ci, doc="95% confidence interval of ``bias``.")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (JSON-serialisable; NaN becomes None)."""
        return _plain(self)

    def __str__(self) -> str:
        headers = ("segment", "strategy", "scalars", "cosine", "rel.error", "variance", "theory", "bias [95% CI]")
        rows = [self.overall._cells("(all)"), *(f._cells(name) for name, f in self.per_segment.items())]
        ratio = self.time_plan / self.time_reference if self.time_reference > 0 else math.nan
        return (
            f"compare: {self.overall.draws} draws of {self.plan} against {self.reference}\n"
            f"{text_table(headers, rows)}\ntime per gradient (median): plan {self.time_plan * 1e3:.3g} ms, "
            f"reference {self.time_reference * 1e3:.3g} ms ({ratio:.2f}x)"
        )


@dataclasses.dataclass(frozen=True)
class SegmentRow:
    """One segment call as :func:`inspect` saw it run. Sizes count scalars; bytes are kept for backward
    (``reverse_saved_bytes``: what backprop would keep there instead, for forward segments)."""

    name: str
    strategy: str
    nested_in: str | None
    differentiated: Mapping[str, int]
    differentiated_numel: int | None
    tangents: int | None
    output_numel: int | None
    saved_bytes: int | None
    reverse_saved_bytes: int | None
    flags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types."""
        return _plain(self)


@dataclasses.dataclass(frozen=True)
class InspectReport:
    """What :func:`inspect` saw: ``rows`` (one per segment call) and ``flags`` (costly choices)."""

    rows: tuple[SegmentRow, ...]
    plan: str

    @property
    def flags(self) -> tuple[str, ...]:
        """Every flagged costly choice, prefixed with its segment's name."""
        return tuple(f"{row.name}: {flag}" for row in self.rows for flag in row.flags)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types (JSON-serialisable)."""
        return {"plan": self.plan, "rows": [row.to_dict() for row in self.rows], "flags": list(self.flags)}

    def __str__(self) -> str:
        headers = (
            "segment",
            "strategy",
            "differentiated",
            "tangents",
            "outputs",
            "kept for backward",
            "backprop would keep",
        )
        rows = [
            [f"  {r.name}", f"(inside {r.nested_in})", "", "", "", "", ""]
            if r.nested_in
            else [
                r.name + (" (!)" if r.flags else ""),
                r.strategy,
                " + ".join(f"{k}:{v}" for k, v in r.differentiated.items()) or "-",
                _num(r.tangents),
                _num(r.output_numel),
                _bytes(r.saved_bytes),
                _bytes(r.reverse_saved_bytes),
            ]
            for r in self.rows
        ]
        return f"inspect: {self.plan}\n{text_table(headers, rows)}" + "".join(f"\n(!) {f}" for f in self.flags)
