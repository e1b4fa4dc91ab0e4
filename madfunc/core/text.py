"""Plain-text tables for the printable reports (``inspect``/``compare``'s and ``auto_plan``'s)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right-aligned.

    Examples:
        >>> print(text_table(("name", "bytes"), [("a", "1"), ("bb", "22")], left=1))
        name  bytes
        ----  -----
        a         1
        bb       22
    """
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])
