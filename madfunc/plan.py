"""Strategies (how one segment is differentiated) and plans (which segment gets which strategy)."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterator, Mapping, Sequence

# (importing them registers their kinds)
from madfunc.strategies import Activity, Checkpointed, Exact, Guessed, Random
from madfunc.strategies.base import KINDS, Reverse, Strategy

__all__ = [
    "Strategy", "Reverse", "Checkpointed", "Exact", "Random", "Activity", "Guessed", "Plan", "PlanLike", "as_plan",
    "as_strategy", "parse_strategy",
]

PLAN_EXAMPLE = "features=random:16:rademacher,head=rev"


def strategy_syntax() -> str:
    """The string forms of every registered strategy class (built-in or the user's), e.g. ``"rev | reverse |
    exact[:CHUNK] | ..."``: what errors and the CLI help list."""
    return " | ".join(dict.fromkeys(cls.syntax() for cls in KINDS.values() if cls.syntax()))


def parse_strategy(text: str, where: str = "parse_strategy") -> Strategy:
    """Read a strategy from its string form, the inverse of ``str(strategy)``.

    The forms are those of the registered strategy classes (``kind=`` and ``fields=`` of a
    :class:`Strategy` subclass, the user's own included): ``rev`` or ``reverse``; ``exact`` or
    ``exact:CHUNK``; ``random``, ``random:K``, ``random:K:DISTRIBUTION`` (gaussian, rademacher,
    orthogonal) or ``random:K:DISTRIBUTION:SEEDING`` (auto, lazy, eager, kept); ``activity`` with the same
    fields and an optional ``:BATCH_DIM``. Case and surrounding spaces are ignored; omitted fields take
    the class's defaults. (:class:`Guessed` holds a callable and has no string form.)

    Args:
        text: the strategy, e.g. ``"random:16:rademacher"``.
        where: what the error messages name first (e.g. ``"segment 'head'"``). Default: ``"parse_strategy"``.

    Returns:
        The strategy.

    Raises:
        ValueError: naming the bad field and listing the valid choices.

    Examples:
        >>> parse_strategy("random:16:rademacher")
        Random(k=16, distribution='rademacher')
        >>> parse_strategy("activity:4")
        Activity(k=4, distribution='gaussian')
        >>> parse_strategy("backprop")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: parse_strategy: unknown strategy 'backprop'; valid strategies: rev | reverse | exact...
    """
    if not isinstance(text, str):
        raise TypeError(f"{where}: expected a str, got {type(text).__name__} {text!r}.")
    text = text.strip()
    kind, *fields = (field.strip() for field in text.split(":"))
    cls = KINDS.get(kind.lower())
    if cls is None or len(fields) > len(cls._FIELDS):
        problem = f"unknown strategy {text!r}" if cls is None else f"too many ':' fields in {text!r}"
        raise ValueError(f"{where}: {problem}; valid strategies: {strategy_syntax()}.")
    return cls._from_fields(fields, where)


StrategyLike = Strategy | str


def as_strategy(value: StrategyLike, where: str) -> Strategy:
    """Turn a strategy, or its string form (``"rev"``, ``"exact:8"``, ``"random:16:rademacher"``: see
    :func:`parse_strategy`), into a Strategy."""
    if isinstance(value, Strategy):
        if type(value) is Strategy:
            raise TypeError(f"{where}: Strategy is abstract; use one of its subclasses, e.g. {_known()}.")
        return value
    if isinstance(value, str):
        return parse_strategy(value, where)
    raise TypeError(
        f"{where}: expected a strategy ({_known()}) or its string form, got {type(value).__name__} {value!r}."
    )


def _known() -> str:
    """The registered strategy classes, as an error lists them: ``madfunc.Reverse(), madfunc.Exact(), ...``."""
    names = dict.fromkeys(f"{'madfunc.' if cls.__module__.startswith('madfunc.') else ''}{cls.__name__}()"
                          for cls in KINDS.values())
    return ", ".join(names)


class Plan(Mapping):
    """An immutable, validated mapping from segment names or fnmatch patterns to strategies.

    A segment takes the strategy of the key equal to its name; failing that, of the pattern
    (``"block*"``, ``"layer[0-3]"``) that matches it. Two patterns that match one segment with different
    strategies are an error, and so is a key that matches no segment that ran in a call. A segment the
    plan does not name keeps its annotation's default (``fwd``: its ``strategy`` or ``Exact()``; ``rev``:
    ``Reverse()``).

    Args:
        entries: a mapping (or Plan) from names/patterns to strategies or their string forms
            (``"rev"``, ``"exact"``, ``"random:16:rademacher"``: see :func:`parse_strategy`). Default: empty.

    Examples:
        >>> import madfunc as mf
        >>> plan = mf.Plan({"stem": "exact", "block*": mf.Random(k=4)})
        >>> plan
        Plan({'stem': Exact(chunk_size=None), 'block*': Random(k=4, distribution='gaussian')})
        >>> plan.lookup("block2")
        Random(k=4, distribution='gaussian')
        >>> plan.lookup("head") is None
        True
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, StrategyLike] | None = None) -> None:
        if entries is None:
            entries = {}
        if not isinstance(entries, Mapping):
            raise TypeError(
                "Plan(...): expected a mapping from segment names (or fnmatch patterns) to strategies, "
                f"got {type(entries).__name__}."
            )
        checked: dict[str, Strategy] = {}
        for key, value in entries.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"Plan(...): keys must be non-empty segment names or patterns, got {key!r}.")
            if "," in key or "=" in key or key != key.strip():
                raise ValueError(
                    f"Plan(...): key {key!r} cannot be written in a plan string (str(plan)); segment names and "
                    "patterns in a plan must not contain ',' or '=' or start or end with a space."
                )
            checked[key] = as_strategy(value, f"Plan entry {key!r}")
        object.__setattr__(self, "_entries", checked)

    @classmethod
    def from_string(cls, text: str) -> Plan:
        """Read a plan from its string form ``"SEGMENT=STRATEGY,..."``, the inverse of ``str(plan)``.

        ``SEGMENT`` is a segment name or fnmatch pattern; ``STRATEGY`` is read by :func:`parse_strategy`:
        ``rev`` | ``reverse`` | ``exact[:CHUNK]`` | ``random[:K[:DISTRIBUTION[:SEEDING]]]``. Spaces
        around entries, names and strategies are ignored; the empty string is the empty plan.

        Args:
            text: the plan, e.g. ``"features=random:16:rademacher,head=rev"``.

        Returns:
            The :class:`Plan`; ``Plan.from_string(str(plan)) == plan`` for every plan.

        Raises:
            ValueError: naming the bad entry (or its segment) and the valid syntax.

        Examples:
            >>> import madfunc as mf
            >>> plan = mf.Plan.from_string("features=random:16:rademacher, head=rev, block*=exact:8")
            >>> plan["block*"]
            Exact(chunk_size=8)
            >>> str(plan)
            'features=random:16:rademacher,head=rev,block*=exact:8'
            >>> mf.Plan.from_string("features=random:0")
            Traceback (most recent call last):
            ...
            ValueError: segment 'features': random:K: K must be an integer >= 1, got '0'.
        """
        if not isinstance(text, str):
            raise TypeError(f"Plan.from_string: expected a str, got {type(text).__name__} {text!r}.")
        if not text.strip():
            return cls()
        entries: dict[str, Strategy] = {}
        for entry in text.split(","):
            name, sep, strategy = entry.partition("=")
            name, entry = name.strip(), entry.strip()
            if not sep:
                raise ValueError(
                    f"plan entry {entry!r}: expected SEGMENT=STRATEGY, e.g. {PLAN_EXAMPLE!r}, with STRATEGY one "
                    f"of {strategy_syntax()}."
                )
            if not name:
                raise ValueError(f"plan entry {entry!r}: missing the segment name before '='.")
            if name in entries:
                raise ValueError(f"plan entry {entry!r}: segment {name!r} is given twice.")
            entries[name] = parse_strategy(strategy, f"segment {name!r}")
        return cls(entries)

    def to_string(self) -> str:
        """The plan in the form :meth:`from_string` reads, e.g. ``"features=random:16:rademacher,head=rev"``."""
        return ",".join(f"{key}={strategy.to_string()}" for key, strategy in self._entries.items())

    def __str__(self) -> str:
        return self.to_string()

    def __reduce__(self) -> tuple[type[Plan], tuple[dict[str, Strategy]]]:
        # The default reduction restores __slots__ through __setattr__, which Plan forbids.
        return (type(self), (dict(self._entries),))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Plan is immutable; build a new one.")

    def __getitem__(self, key: str) -> Strategy:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Plan):
            return self._entries == other._entries
        return NotImplemented

    def __repr__(self) -> str:
        return f"Plan({self._entries!r})"

    def matching_keys(self, name: str) -> list[str]:
        """The keys that apply to segment ``name``: its exact key alone if present, else every matching pattern."""
        return matching_keys(self._entries, name)

    def lookup(self, name: str) -> Strategy | None:
        """The strategy the plan gives segment ``name``, or ``None`` if no key applies."""
        keys = self.matching_keys(name)
        if not keys:
            return None
        strategies = {self._entries[key] for key in keys}
        if len(strategies) > 1:
            raise conflict_error(name, [(key, self._entries[key]) for key in keys])
        return self._entries[keys[0]]


PlanLike = Plan | Mapping[str, StrategyLike] | None


def matching_keys(keys: Collection[str], name: str) -> list[str]:
    """Of plan ``keys``, those that apply to segment ``name``: its exact key alone, else every matching pattern."""
    if name in keys:
        return [name]
    return [key for key in keys if fnmatch.fnmatchcase(name, key)]


def conflict_error(name: str, matches: Sequence[tuple[str, Strategy]]) -> ValueError:
    """Several plan patterns match segment ``name`` with different strategies (both engines raise this)."""
    listed = ", ".join(f"{key!r} -> {strategy!r}" for key, strategy in matches)
    return ValueError(
        f"plan: segment {name!r} is matched by several patterns with different strategies ({listed}); add an "
        f"exact entry for {name!r} or make the patterns disjoint."
    )


def as_plan(plan: PlanLike) -> Plan:
    """Validate ``plan`` (None, a dict or a Plan) into a Plan."""
    if isinstance(plan, Plan):
        return plan
    if plan is None:
        return Plan()
    if isinstance(plan, Mapping):
        return Plan(plan)
    raise TypeError(
        "plan: expected None, a dict or a madfunc.Plan mapping segment names to strategies, got "
        f"{type(plan).__name__} {plan!r}."
    )
