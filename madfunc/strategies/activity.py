"""``Activity``: activity perturbation (Ren, Kornblith, Liao and Hinton, ICLR 2023): random tangents on a
segment's activation inputs, drawn and contracted *per example*.

With ``u_{j,b}`` example ``b``'s tangent and ``s_{j,b} = <ydot_{j,b}, ybar_b>``, example ``b``'s input
cotangent is estimated by ``(1/k) sum_j s_{j,b} u_{j,b}``; reverse mode then carries it exactly into the
upstream layers' weights. Its relative variance is that of a forward gradient in ``R^m``, ``m`` the
per-example width, instead of in ``R^(B m)`` for the whole batch (``Random``).

Parameters of the segment (leaf tensors: ``nn.Parameter``, ``mixed_grad``'s differentiated leaves) get
weight tangents ``v_j`` shared by the batch in the same passes, contracted over the batch (joint
perturbation). Both estimates stay unbiased; each gains the other's noise. With ``a_b`` example ``b``'s
activation gradient, ``w_b`` its share of the parameter gradient ``g_W = sum_b w_b``, ``n_W`` the number of
parameter scalars and ``L(n) = n + 1`` (Gaussian) or ``n - 1`` (Rademacher):

* activations: ``E||a^_b - a_b||^2 = (L(m) ||a_b||^2 + m ||w_b||^2) / k``;
* parameters: ``E||g^_W - g_W||^2 = (L(n_W) ||g_W||^2 + n_W sum_b ||a_b||^2) / k``

(from ``E[(x.u)^2 ||u||^2] = (m+2)||x||^2`` Gaussian, ``m ||x||^2`` signs, and ``E[(y.v)^2 ||u||^2] =
m ||y||^2`` for independent ``u``, ``v``). The segment must be batch-separable (example ``b``'s outputs
depend on example ``b``'s inputs only): the first call of each segment checks it with one extra pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from madfunc.core.autocast import without_autocast
from madfunc.core.functorch import is_batched
from madfunc.core.registry import REGISTRY
from madfunc.strategies.base import EngineView, Meta, Passes, SegmentStats, Shared, Strategy, StrategyState, zeros
from madfunc.strategies.kernels import accumulation_dtype, combine_tangents, contract
from madfunc.strategies.random import RandomState, check_distribution, parse_random_fields, push_random, regenerate
from madfunc.strategies.tangents import DISTRIBUTIONS

__all__ = ["Activity"]

# Segments (and input shapes) already found batch-separable in this process: the check runs once each.
_SEPARABLE: set[tuple] = REGISTRY.register("activity.separable", set, "segments found batch-separable")


@dataclasses.dataclass(frozen=True)
class Activity(Strategy, kind="activity", fields=("K", "DISTRIBUTION", "SEEDING", "BATCH_DIM")):
    """Estimate the gradient by activity perturbation: random tangents per example on the activation inputs.

    Activation inputs (tensors computed upstream, e.g. a layer's pre-activations) get tangents drawn
    independently for every example along ``batch_dim`` and are contracted per example, so the relative
    variance of each example's input gradient is ``(m+1)/k`` (``"gaussian"``) or ``(m-1)/k``
    (``"rademacher"``) with ``m`` the width of one example, not of the whole batch (Ren et al., ICLR 2023,
    arXiv 2210.03310). Parameters of the segment get shared weight tangents in the same passes (joint
    perturbation, see ``madfunc/strategies/activity.py`` for the variance laws); keep them out of the segment
    (``rev()`` layers before it) for pure activity perturbation.

    The segment must be batch-separable: example ``b``'s outputs may depend only on example ``b``'s inputs
    (no BatchNorm in training mode, no loss reduced over the batch: return per-example losses, e.g.
    ``cross_entropy(..., reduction="none")``, and reduce outside the segment). The first call of each
    segment checks this with one extra pass.

    Args:
        k: number of tangents per example. Default: ``1``.
        distribution: ``"gaussian"`` or ``"rademacher"``. Default: ``"gaussian"``.
        seeding: ``"auto"``, ``"lazy"``, ``"eager"`` or ``"kept"``, as for :class:`Random`. Default: ``"auto"``.
        batch_dim: the batch dimension of activation inputs and outputs, or a tuple of dimensions that all
            index independent units (e.g. ``(0, 1)`` for examples x groups of channels, each group with its
            own local loss: the estimate is then per example and group, with ``m`` the width of one unit).
            Default: ``0``.

    Examples:
        >>> import torch, madfunc as mf
        >>> import torch.nn.functional as F
        >>> head = mf.fwd(lambda z, y: F.cross_entropy(torch.relu(z), y, reduction="none"), name="head")
        >>> loss = lambda w, x, y: head(x @ w, y).mean()  # per-example losses, reduced outside the segment
        >>> w, x, y = torch.randn(5, 3), torch.randn(8, 5), torch.randint(0, 3, (8,))
        >>> g = mf.mixed_grad(loss, {"head": mf.Activity(k=4)})(w, x, y)  # x @ w's cotangent, estimated per example
        >>> g.shape
        torch.Size([5, 3])
    """

    k: int = 1
    distribution: str = "gaussian"
    seeding: str = "auto"
    batch_dim: int | tuple[int, ...] = 0
    stochastic: ClassVar[bool] = True
    per_rank_tangents: ClassVar[bool] = True  # per-example tangents: independent across ranks' examples too

    def __post_init__(self) -> None:
        check_distribution("Activity", self.distribution, self.seeding, self.k)
        if DISTRIBUTIONS[self.distribution].draw is None:
            raise ValueError(
                f"Activity(distribution={self.distribution!r}): its directions are drawn jointly over all inputs, "
                "not per example; use 'gaussian' or 'rademacher' (or Random(distribution="
                f"{self.distribution!r}) for weight perturbation)."
            )
        dims = self.batch_dim if isinstance(self.batch_dim, tuple) else (self.batch_dim,)
        if not dims or len(set(dims)) != len(dims) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims
        ):
            raise ValueError(
                f"Activity(batch_dim={self.batch_dim!r}): expected an int >= 0 or a tuple of distinct ones."
            )
        # One form per set of dims (sorted; a single one as an int), so equal strategies compare equal and
        # the string form reads back to the same value.
        object.__setattr__(self, "batch_dim", dims[0] if len(dims) == 1 else tuple(sorted(dims)))

    def __repr__(self) -> str:
        extra = "" if self.seeding == "auto" else f", seeding={self.seeding!r}"
        extra += "" if self.batch_dim == 0 else f", batch_dim={self.batch_dim!r}"
        return f"Activity(k={self.k}, distribution={self.distribution!r}{extra})"

    def to_string(self) -> str:
        extra = "" if self.seeding == "auto" and self.batch_dim == 0 else f":{self.seeding}"
        extra += "" if self.batch_dim == 0 else ":" + "/".join(map(str, self.dims))
        return f"activity:{self.k}:{self.distribution}{extra}"

    @classmethod
    def _from_fields(cls, fields: list[str], where: str) -> Strategy:
        k, distribution, seeding = parse_random_fields(fields[:3], where, "activity")
        dims = fields[3].split("/") if len(fields) == 4 else ["0"]
        if not all(d.isascii() and d.isdigit() for d in dims):
            raise ValueError(
                f"{where}: activity:K:DISTRIBUTION:SEEDING:BATCH_DIM: BATCH_DIM must be an integer >= 0 or several "
                "joined by '/' (e.g. 0/1)."
            )
        try:
            return cls(k, distribution, seeding, int(dims[0]) if len(dims) == 1 else tuple(map(int, dims)))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    # -- the passes ----------------------------------------------------------------------------------
    def push(self, engine: EngineView, tensors: Sequence[torch.Tensor], diff_tensors: Sequence[torch.Tensor],
             n: int) -> tuple[Passes, StrategyState]:
        batch = self._classify(engine, diff_tensors)
        result, state = push_random(self, engine, tensors, diff_tensors)
        ys, ydots, buffers = result
        if batch is not None:
            outputs = [(i, y) for i, y in enumerate(ys) if y.is_floating_point() or y.is_complex()]
            self._check_outputs(engine.name, batch, outputs)
            self._check_separable(engine, tensors, diff_tensors, batch, [i for i, _ in outputs])
        return result, state

    @property
    def dims(self) -> tuple[int, ...]:
        """The unit dimensions, sorted (``batch_dim`` as a tuple)."""
        return self.batch_dim if isinstance(self.batch_dim, tuple) else (self.batch_dim,)

    def _units(self, t: torch.Tensor, lead: int) -> torch.Tensor:
        """``t`` (with ``lead`` leading dims before the tensor's own, e.g. the tangent index) as
        ``(*lead dims, U, rest...)``: the unit dims moved after the leading ones and flattened into one."""
        dims = [lead + d for d in self.dims]
        moved = t.movedim(dims, list(range(lead, lead + len(dims))))
        return moved.reshape(*moved.shape[:lead], -1, *moved.shape[lead + len(dims) :])

    def _unshape(self, g: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """The inverse of ``_units`` for a tensor without leading dims."""
        g = g.reshape(*sizes, *g.shape[1:])
        return g.movedim(list(range(len(sizes))), list(self.dims))

    def _classify(self, engine: EngineView, diff_tensors: Sequence[torch.Tensor]) -> tuple[int, ...] | None:
        """The common sizes of the unit dims of the activation inputs (``engine.activation``: computed
        upstream, they have a grad_fn), or None if every differentiated input is a parameter."""
        activation = engine.activation
        stats = engine.stats
        stats.parameter_numel = sum(t.numel() for t, a in zip(diff_tensors, activation, strict=True) if not a)
        inputs = [t for t, a in zip(diff_tensors, activation, strict=True) if a]
        if not inputs:
            return None
        short = [list(t.shape) for t in inputs if t.dim() <= self.dims[-1]]
        if short:
            raise ValueError(
                f"segment {engine.name!r}: Activity(batch_dim={self.batch_dim}) perturbs activation inputs per "
                f"example along dims {list(self.dims)}, but an activation input has shape {short[0]}. Pass the batch "
                "dimension as batch_dim, or use Random(k) for this segment."
            )
        sizes = {tuple(t.shape[d] for d in self.dims) for t in inputs}
        if len(sizes) > 1:
            raise ValueError(
                f"segment {engine.name!r}: Activity needs one batch size along dims {list(self.dims)}; its activation "
                f"inputs have {sorted(sizes)}. Pass batch_dim, or use Random(k) for this segment."
            )
        size = sizes.pop()
        units = math.prod(size)
        stats.per_example_numel = sum(t.numel() for t in inputs) // max(units, 1)
        return size

    def _check_outputs(self, name: str, sizes: tuple[int, ...], outputs: Sequence[tuple[int, torch.Tensor]]) -> None:
        for i, y in outputs:
            if y.dim() <= self.dims[-1] or tuple(y.shape[d] for d in self.dims) != sizes:
                raise ValueError(
                    f"segment {name!r}: Activity contracts per example, so every output needs the batch dimension "
                    f"(dims {list(self.dims)}, sizes {list(sizes)}); output {i} has shape {list(y.shape)}. Return "
                    "per-example values (e.g. cross_entropy(..., reduction='none')) and reduce outside the segment, "
                    "or use Random(k)."
                )

    def _check_separable(self, engine: EngineView, tensors: Sequence[torch.Tensor],
                         diff_tensors: Sequence[torch.Tensor], sizes: tuple[int, ...], outputs: Sequence[int]) -> None:
        """One extra pass, once per segment and shapes: a tangent on example 0's activation inputs alone must
        leave every other example's output tangents exactly zero."""
        key = (*engine.identity, tuple(tuple(t.shape) for t in tensors))
        if key in _SEPARABLE or math.prod(sizes) < 2:
            return
        probe = []
        for t, a in zip(diff_tensors, engine.activation, strict=True):
            if not a:  # parameters: no tangent
                probe.append(torch.zeros((1, *t.shape), dtype=t.dtype, device=t.device))
                continue
            units = self._units(torch.zeros(t.shape, dtype=t.dtype, device=t.device), 0)
            units[0] = 1
            probe.append(self._unshape(units, sizes).unsqueeze(0))
        engine.begin_pass()
        _, ydots, _ = engine.push(tensors, engine.diff, probe, check=False)
        for i in outputs:
            rest = self._units(ydots[i][0], 0)[1:]
            if is_batched(rest):  # under an outer vmap its values cannot be read: check on a plain call
                return
            if rest.count_nonzero():
                raise ValueError(
                    f"segment {engine.name!r}: Activity needs a batch-separable segment (example b's outputs may "
                    f"depend only on example b's inputs, along dims {list(self.dims)}), but output {i} of other "
                    "examples moves with example 0's input. Typical causes: BatchNorm in training mode, a loss "
                    "reduced over the batch, attention whose batch is not dim 0 (pass batch_dim). Use Random(k) "
                    "for this segment, or move the layer that mixes examples out of it."
                )
        _SEPARABLE.add(key)

    # -- backward ------------------------------------------------------------------------------------
    def contract(self, engine: EngineView, state: StrategyState, ydots: Sequence[torch.Tensor],
                 ybars: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor | None, StrategyState]:
        """``s[j, b] = <ydot_{j,b}, ybar_b>``, shape ``(k, U)`` for ``U`` units (or ``(k,)`` without
        activation inputs)."""
        return contract(ydots, ybars, self._units if any(engine.activation) else None), state

    @without_autocast  # (the per-example einsum: in float32 even inside an autocast block)
    def combine(self, engine: EngineView, state: StrategyState, s: torch.Tensor | None, meta: Sequence[Meta],
                shared: Shared | None = None) -> list[torch.Tensor | None]:
        assert isinstance(state, RandomState) and engine.seed is not None
        if s is None or s.numel() == 0:
            return zeros(meta)
        activation = engine.activation
        per_example = s * (1.0 / self.k)
        summed = per_example.sum(1) if per_example.dim() == 2 else per_example  # parameters: over the batch
        grads = []
        tangents = regenerate(self, engine.seed, meta, engine.used, s.device, state.tangents)
        for v, a, (shape, dtype, _) in zip(tangents, activation, meta, strict=True):
            if v is None:  # never used: an exact zero
                grads.append(torch.zeros(shape, dtype=dtype, device=s.device))
            elif not a:  # (kept tangents may serve a second backward: never overwritten)
                grads.append(combine_tangents(summed, v, dtype, reuse=state.tangents is None))
            else:
                acc = accumulation_dtype(v.dtype)
                g = torch.einsum("kb,kb...->b...", per_example.to(acc), self._units(v, 1).to(acc))
                grads.append(self._unshape(g, tuple(shape[d] for d in self.dims)).to(dtype))
        return grads

    def variance(self, stats: SegmentStats) -> float | None:
        m = stats.per_example_numel or 0
        if stats.parameter_numel or m < 1:
            return None  # joint perturbation: depends on the gradients' norms (module docstring)
        return DISTRIBUTIONS[self.distribution].variance(m, self.k)
