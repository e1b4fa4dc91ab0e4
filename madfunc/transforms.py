"""The public transforms: ``mixed_grad``, ``mixed_grad_and_value`` and the ``use_plan`` context."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from madfunc.engine import context as _context
from madfunc.engine import distributed as _distributed
from madfunc.engine import replicas as _replicas
from madfunc.engine import traced as _traced
from madfunc.engine.replicas import Reduction
from madfunc.plan import PlanLike, as_plan

__all__ = ["mixed_grad", "mixed_grad_and_value", "use_plan"]

ArgNums = int | tuple[int, ...]
ProcessGroupLike = Any  # a torch.distributed.ProcessGroup, "world" or None (typed loosely: dist may be absent)


def _planned(
    fn: Callable[..., Any],
    plan: PlanLike,
    where: str,
    generator: torch.Generator | None,
    allow_unused: bool,
    argnums: ArgNums = 0,
) -> Callable[..., Any]:
    """``fn`` run with ``plan`` active; checks that every plan key was used, before any backward work."""
    checked = as_plan(plan)
    if not callable(fn):
        raise TypeError(f"{where}(fn, ...): expected a callable, got {type(fn).__name__} {fn!r}.")
    _check_generator(where, generator)

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        call = _distributed.current_call()  # set by _distributed.reducing under a process group
        if call is not None:
            call.bind(args, argnums)  # the differentiated arguments as torch.func.grad wrapped them
        with _context.planned_call(checked, where, generator=generator, allow_unused=allow_unused,
                                   replicas=None if call is None else call.replicas, functional=call):
            return fn(*args, **kwargs)

    return inner


def _eager(transformed: Callable[..., Any]) -> Callable[..., Any]:
    """``transformed`` run eagerly inside a ``torch.compile``d step (one graph break around it).

    Dynamo cannot trace a forward segment (an autograd.Function with a custom ``jvp``, torch's RNG state,
    ContextVars): traced, the call broke into ~130 frames that ran slower than eager, and the tangent
    seed, a Python int, was specialised into guards, so each new seed recompiled. Left to eager, the
    code around the call still compiles, and nothing in madfunc is ever guarded on.
    """
    return functools.wraps(transformed)(torch.compiler.disable(transformed, recursive=True))


def _traceable(where: str, traceable: Any, generator: Any, process_group: Any) -> bool:
    """Validate ``traceable=`` and the options it excludes; True for the traceable form (``_traced``)."""
    if not isinstance(traceable, bool):
        raise TypeError(
            f"{where}(traceable=...): expected True or False, got {type(traceable).__name__} {traceable!r}."
        )
    if traceable and generator is not None:
        raise ValueError(
            f"{where}(traceable=True, generator=...): a traceable transform draws its tangents inside the graph "
            "from torch's default generator; drop generator= (seed with torch.manual_seed), or use traceable=False."
        )
    if traceable and process_group is not None:
        raise ValueError(
            f"{where}(traceable=True, process_group=...): data parallelism needs the default engine; "
            "use traceable=False."
        )
    return traceable


def _checked_plan(fn: Any, plan: PlanLike, where: str) -> Any:
    """The plan of a traceable transform, its strategies checked now rather than at the first call."""
    checked = as_plan(plan)
    if not callable(fn):
        raise TypeError(f"{where}(fn, ...): expected a callable, got {type(fn).__name__} {fn!r}.")
    entries = {key: checked[key] for key in checked}
    for key, strategy in entries.items():
        _traced.check_strategy(key, strategy)
    return entries


def _check_generator(where: str, generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}(generator=...): expected a torch.Generator or None, got {type(generator).__name__} "
            f"{generator!r:.60}."
        )


def mixed_grad_and_value(
    fn: Callable[..., Any],
    plan: PlanLike = None,
    argnums: ArgNums = 0,
    has_aux: bool = False,
    *,
    generator: torch.Generator | None = None,
    allow_unused: bool = False,
    process_group: ProcessGroupLike = None,
    reduction: Reduction = "mean",
    traceable: bool = False,
) -> Callable[..., Any]:
    """Like ``torch.func.grad_and_value``, with each segment differentiated as ``plan`` says.

    Args:
        fn: a function returning a scalar tensor (and, with ``has_aux``, a pair ``(scalar, aux)``)
            that calls segments made by :func:`fwd` / :func:`rev` and any other PyTorch code.
        plan: a dict or :class:`Plan` from segment names or fnmatch patterns to strategies
            (:class:`Reverse`, :class:`Exact`, :class:`Random`, or ``"rev"``/``"exact"``). Segments it
            does not name keep their default. Default: ``None`` (every segment its default).
        argnums: which positional argument(s) to differentiate. Default: ``0``.
        has_aux: whether ``fn`` returns ``(loss, aux)``. Default: ``False``.
        generator: where ``Random`` segments' tangents come from: one number is drawn from it per call.
            ``None`` derives them from torch's default generator (docs/guides/randomness.md).
            Default: ``None``.
        allow_unused: if True, a plan key that matches no segment of a call is not an error (for segments
            that run only on some steps). Default: ``False``.
        process_group: data parallelism (docs/guides/distributed.md): a ``torch.distributed`` process group (or
            ``"world"`` for the default one) over which the returned gradient is reduced: each ``Random``
            segment all-reduces its k coefficients and rebuilds its parameters' gradients from the shared
            seed, and the other gradients are all-reduced in one call per dtype. Every differentiated
            argument is taken to be replicated (parameters). The value (and aux) stay this rank's.
            Default: ``None`` (one process, no communication).
        reduction: ``"mean"`` (the gradient of the mean of the ranks' losses, as DDP) or ``"sum"``.
            Default: ``"mean"``.
        traceable: if True, forward segments run as plain torch code with the same estimator
            (docs/guides/compile.md), which ``torch.compile`` traces into the step's graph (``fullgraph=True``
            works). Tangents are then drawn in the graph from torch's default generator (other numbers than
            the default engine's) and kept for backward; segments take ``Reverse``, ``Exact`` or ``Random``
            with Gaussian or Rademacher tangents; ``generator`` and ``process_group`` are unavailable.
            Default: ``False``.

    Returns:
        A function returning ``(grad, value)``; with ``has_aux``, ``(grad, (value, aux))``. ``grad``
        has the structure of argument ``argnums`` (a tuple of such for a tuple ``argnums``).

    Examples:
        >>> import torch, madfunc as mf
        >>> square = mf.fwd(torch.square, name="square")
        >>> g, value = mf.mixed_grad_and_value(lambda x: square(x).sum())(torch.tensor([1.0, 2.0]))
        >>> g, value
        (tensor([2., 4.]), tensor(5.))
    """
    return _transform(fn, plan, argnums, has_aux, "mixed_grad_and_value", generator, allow_unused, process_group,
                      reduction, traceable)


def _transform(fn: Callable[..., Any], plan: PlanLike, argnums: ArgNums, has_aux: bool, where: str,
               generator: torch.Generator | None, allow_unused: bool, process_group: ProcessGroupLike,
               reduction: Reduction, traceable: bool) -> Callable[..., Any]:
    """``mixed_grad_and_value``, with ``where`` (the public name) in its messages. The engine is chosen here,
    once: the traceable form (engine/traced.py) or the default engine, eager inside a compiled step."""
    _replicas.check_options(where, process_group, reduction)
    if _traceable(where, traceable, generator, process_group):
        planned = _traced.planned(fn, _checked_plan(fn, plan, where), where, allow_unused)
        return torch.func.grad_and_value(planned, argnums, has_aux)
    transformed = torch.func.grad_and_value(_planned(fn, plan, where, generator, allow_unused, argnums), argnums,
                                            has_aux)
    if process_group is None:
        return _eager(transformed)
    grads = _distributed.split_grads(has_aux, with_value=True)
    return _eager(_distributed.reducing(transformed, where, process_group, reduction, grads))


def mixed_grad(
    fn: Callable[..., Any],
    plan: PlanLike = None,
    argnums: ArgNums = 0,
    has_aux: bool = False,
    *,
    generator: torch.Generator | None = None,
    allow_unused: bool = False,
    process_group: ProcessGroupLike = None,
    reduction: Reduction = "mean",
    traceable: bool = False,
) -> Callable[..., Any]:
    """Like ``torch.func.grad``, with each segment differentiated as ``plan`` says.

    It is :func:`mixed_grad_and_value` without the value (as ``torch.func.grad`` is ``grad_and_value``
    without it); the arguments are the same, documented there.

    Args:
        fn: a function returning a scalar tensor (and, with ``has_aux``, a pair ``(scalar, aux)``)
            that calls segments made by :func:`fwd` / :func:`rev` and any other PyTorch code.
        plan: a dict or :class:`Plan` from segment names or fnmatch patterns to strategies.
            Default: ``None`` (every segment its default).
        argnums: which positional argument(s) to differentiate. Default: ``0``.
        has_aux: whether ``fn`` returns ``(loss, aux)``. Default: ``False``.
        generator: as for :func:`mixed_grad_and_value`. Default: ``None``.
        allow_unused: as for :func:`mixed_grad_and_value`. Default: ``False``.
        process_group: as for :func:`mixed_grad_and_value`. Default: ``None``.
        reduction: as for :func:`mixed_grad_and_value`. Default: ``"mean"``.
        traceable: as for :func:`mixed_grad_and_value`. Default: ``False``.

    Returns:
        A function returning the gradient (structured like argument ``argnums``, a tuple for a tuple
        ``argnums``); with ``has_aux``, ``(grad, aux)``.

    Examples:
        >>> import torch, madfunc as mf
        >>> layer = mf.fwd(lambda w, x: torch.tanh(x @ w), name="layer")
        >>> def loss(w, x):
        ...     return layer(w, x).pow(2).sum()
        >>> w, x = torch.randn(3, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> exact = mf.mixed_grad(loss)(w, x)                       # forward mode, exact
        >>> torch.allclose(exact, torch.func.grad(loss)(w, x))
        True
        >>> _ = torch.manual_seed(0)
        >>> estimate = mf.mixed_grad(loss, plan={"layer": mf.Random(k=4)})(w, x)   # unbiased estimate
        >>> estimate.shape
        torch.Size([3, 2])
        >>> traced = mf.mixed_grad(loss, plan={"layer": mf.Random(k=4)}, traceable=True)  # plain torch code:
        >>> traced(w, x).shape                           # torch.compile(traced, fullgraph=True) makes one graph
        torch.Size([3, 2])
    """
    grad_and_value = _transform(fn, plan, argnums, has_aux, "mixed_grad", generator, allow_unused, process_group,
                                reduction, traceable)

    @functools.wraps(fn)
    def grad(*args: Any, **kwargs: Any) -> Any:
        g, value = grad_and_value(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    return grad


def use_plan(
    plan: PlanLike = None,
    *,
    generator: torch.Generator | None = None,
    allow_unused: bool = False,
    process_group: ProcessGroupLike = None,
    reduction: Reduction = "mean",
) -> contextlib.AbstractContextManager[None]:
    """Make segments honour ``plan`` under plain autograd (``loss.backward()``) inside the block.

    The strategy of each segment call is fixed when it runs in the block; ``backward`` may run later.
    On leaving the block, a plan key that matched no segment is an error.

    Args:
        plan: as for :func:`mixed_grad`. Default: ``None``.
        generator: as for :func:`mixed_grad`: the source of ``Random`` tangents. Default: ``None``.
        allow_unused: as for :func:`mixed_grad`. Default: ``False``.
        process_group: data parallelism (docs/guides/distributed.md): each ``Random`` segment call's backward
            all-reduces its k coefficients over this ``torch.distributed`` process group (or ``"world"``)
            and gives its parameters (leaf tensors) the gradient rebuilt from them, identical on every
            rank; its activation inputs keep this rank's share. Register :func:`ddp_comm_hook` on the DDP
            model so that DDP leaves those gradients alone. Default: ``None``.
        reduction: ``"mean"`` (as DDP) or ``"sum"``. Default: ``"mean"``.

    Examples:
        >>> import torch, madfunc as mf
        >>> layer = mf.fwd(torch.nn.Linear(3, 1), name="layer")
        >>> with mf.use_plan({"layer": mf.Random(k=8, distribution="rademacher")}):
        ...     loss = layer(torch.ones(2, 3)).sum()
        ...     loss.backward()
        >>> layer.module.weight.grad.shape
        torch.Size([1, 3])
    """
    _check_generator("use_plan", generator)
    checked = as_plan(plan)
    replicas = _replicas.resolve("use_plan", process_group, reduction)

    return _PlanBlock(lambda: _context.planned_call(checked, "use_plan", generator=generator,
                                                    allow_unused=allow_unused, replicas=replicas))


class _PlanBlock(contextlib.AbstractContextManager):
    """A ``use_plan`` block. Entry and exit run eagerly inside a ``torch.compile``d step (see ``_eager``):
    Dynamo guarded on the tangents' base seed read at exit, so every step recompiled; the block's body
    (the user's model) still compiles, with a graph break at each segment. Each entry makes a fresh call
    state (the tangents' seed comes from torch's generator *at entry*), so one block object can be reused."""

    def __init__(self, make_block: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.make_block = make_block
        self.entered: list[contextlib.AbstractContextManager] = []

    @torch.compiler.disable
    def __enter__(self) -> None:
        block = self.make_block()
        block.__enter__()
        self.entered.append(block)

    @torch.compiler.disable
    def __exit__(self, *exc: Any) -> None:
        self.entered.pop().__exit__(*exc)
