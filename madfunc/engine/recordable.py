"""What a recorded tangent pass may contain: the checks that refuse a recording (engine/replay.py) that would
not replay what the eager pass computes, each with the reason ``replay.REFUSED`` reports."""

from __future__ import annotations

import torch

__all__ = ["Refused", "check_recordable"]


class Refused(Exception):  # noqa: N818 - a reason, not an error
    pass


_LAYOUT_READERS = frozenset(
    getattr(torch.ops.aten, name).default for name in ("as_strided", "as_strided_", "as_strided_scatter", "set_")
    if hasattr(getattr(torch.ops.aten, name, None), "default")
)


def _mutated_inputs(gm: torch.fx.GraphModule) -> str:
    """The first in-place op that writes to an input (or a view of one), or ''. In-place ops on the pass's
    own intermediates (forward-mode rules use them: layer_norm's ``div_``) replay as recorded."""
    of_inputs: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            of_inputs.add(node)
            continue
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        args = dict(zip((a.name for a in schema.arguments), node.args, strict=False)) | dict(node.kwargs)
        if any(args.get(name) in of_inputs for name in written):
            return str(node.target)
        # a view of an input (its result aliases an argument) is an input too
        aliases = schema.returns and schema.returns[0].alias_info is not None
        if aliases and any(a in of_inputs for a in node.args if isinstance(a, torch.fx.Node)):
            of_inputs.add(node)
    return ""


def check_recordable(gm: torch.fx.GraphModule) -> None:
    """Refuse (``Refused``, with the reason) a recording that would not replay what the eager pass computes."""
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            raise Refused("it reads tensors that are not its inputs (they would be frozen into the recording)")
        if node.op != "call_function":
            continue
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags and not _draws_nothing(node):
            raise Refused(f"it draws random numbers ({node.target})")
        if node.target in _LAYOUT_READERS:
            raise Refused(f"it reads the memory layout of its tensors ({node.target})")
        if torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags:
            raise Refused(f"its shapes or Python values depend on tensor values ({node.target})")
    mutated = _mutated_inputs(gm)
    if mutated:
        raise Refused(f"it mutates an input in place ({mutated})")


def _draws_nothing(node: torch.fx.Node) -> bool:
    """An op tagged as drawing random numbers that draws none here: an attention kernel with ``dropout_p`` 0
    (under autocast a segment's attention takes its value from the plain call's kernel: ``_autocast``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    names = [a.name for a in schema.arguments]
    if "dropout_p" not in names:
        return False
    i = names.index("dropout_p")
    p = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", schema.arguments[i].default_value)
    return isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0
