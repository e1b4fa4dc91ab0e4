"""A griffe extension for the API reference: Sphinx roles in madfunc's docstrings become links.

madfunc's docstrings are Google style with reST roles (``:func:`fwd` ``, ``:class:`Plan` ``). Rendered as
Markdown, a role would show as ``:func:`` followed by code. This turns a role whose target is a public
name (one in ``madfunc.__all__``, or a public member of the class the docstring belongs to) into an
autorefs cross-reference, ``[`fwd`][madfunc.fwd]``, which the reference pages resolve; any other role
(a private helper) becomes plain code, so ``mkdocs build --strict`` never meets a dangling link.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`~?\.?([A-Za-z_][\w.]*)`")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "madfunc":
            return
        exports = {str(name) for name in (pkg.exports or ())}
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _ROLE.sub(lambda m, o=obj: _link(m.group(1), o, exports), obj.docstring.value)


def _walk(obj: Any, seen: set[int] | None = None):
    seen = set() if seen is None else seen
    if id(obj) in seen or obj.is_alias:
        return
    seen.add(id(obj))
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def _link(target: str, obj: Any, exports: set[str]) -> str:
    head, _, rest = target.partition(".")
    if head in exports and not any(part.startswith("_") for part in target.split(".")):
        return f"[`{target}`][madfunc.{target}]"
    owner = obj if obj.is_class else obj.parent
    if owner is not None and owner.is_class and owner.name in exports and "." not in target \
            and not target.startswith("_") and target in owner.members:
        return f"[`{target}`][madfunc.{owner.name}.{target}]"
    return f"`{target}`"
