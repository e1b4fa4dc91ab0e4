"""The one owner of madfunc's process-wide state: caches, warn-once sets and learned op routing.

Every module that keeps state beyond one call registers its container here under a dotted name, with a line
saying what it holds. ``REGISTRY.summary()`` shows what is held (entries per container), and
``REGISTRY.reset()`` empties it all, e.g. between experiments or tests that must not see each other's
recordings. Nothing is lost by a reset but time: each cache refills on use, each warning may be given again,
and learned op routing is learned again. The user's rules (``register_forward_rule``) and the strategy
classes' registration are not state of this kind: they are configuration, and are kept.

Examples:
    >>> from madfunc.core.registry import REGISTRY
    >>> "replay.recordings" in REGISTRY.summary()
    True
    >>> REGISTRY.reset()
    >>> REGISTRY.summary()["replay.recordings"]
    0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["REGISTRY", "Registry"]


class _Clearable(Protocol):
    def clear(self) -> None: ...
    def __len__(self) -> int: ...


C = TypeVar("C", bound=_Clearable)


@dataclasses.dataclass
class _Entry:
    container: Any
    doc: str


class Registry:
    """Named process-wide containers (dicts, sets, ordered dicts), each registered once by the module that uses it."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, factory: Callable[[], C], doc: str) -> C:
        """A new empty container ``factory()`` kept under ``name`` (dotted: ``"<module>.<what>"``), returned for the
        module to use as its own (a module reloaded gets a fresh one)."""
        container = factory()
        self._entries[name] = _Entry(container, doc)
        return container

    def summary(self) -> dict[str, int]:
        """Entries held per container, by name."""
        return {name: len(entry.container) for name, entry in self._entries.items()}

    def describe(self) -> dict[str, str]:
        """What each container holds, by name."""
        return {name: entry.doc for name, entry in self._entries.items()}

    def reset(self) -> None:
        """Empty every container (caches refill, warnings may be given again, op routing is learned again)."""
        for entry in self._entries.values():
            entry.container.clear()


REGISTRY = Registry()
