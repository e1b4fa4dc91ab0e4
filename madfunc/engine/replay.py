"""Record a forward segment's tangent pass once, replay it after (issue 11's record-and-replay engine).

A tangent pass (``vmap(jvp(body))`` over a batch of tangents) costs, in eager mode, functorch's
wrapping of every op (13-18 us each) plus the work forward-mode rules do on tangents known to be zero.
For a pass that ran cleanly under the op seam once (no rule, no fallback, no dropped tangent), the second
sighting of the same *key* traces it with ``make_fx`` in fake mode into an aten graph, ``_graphclean``
drops the zero-tangent work, and every later sighting runs the graph: plain aten calls, no functorch.

The key is what the recorded program may depend on: the function (and the module whose segment it is),
which inputs are seeded, the shapes, dtypes, devices and requires-grad pattern of every tensor, the
non-tensor arguments, grad mode, and the ``training`` flags of the modules involved, plus hashable
scalars held by the function's closure. Python state outside those (a global flag, a module attribute
reassigned between calls) is not seen: such a segment is marked ``fwd(..., record=False)``. Functions
and modules are keyed weakly: a recording goes when the model it was made for is dropped.

A pass is never recorded (it stays on the eager engine, with the reason in ``REFUSED``) when its body
branches on tensor values (fake tracing raises) or makes shapes from them (``nonzero``), draws random
numbers (replay would need the RNG handling of ``_rng`` inside the graph), reads tensors that are not its
inputs other than its modules' buffers (they would be frozen into the graph; buffers are read at each
run) or the memory layout of its own (``as_strided``), writes to
an input in place, or updates module buffers; when an op took a rule or the double-vjp fallback; or under an outer
``vmap`` (per-example gradients). A trace that fails for any other reason is a refusal too.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.func import vmap

from madfunc.core.autocast import enabled_devices
from madfunc.core.functorch import is_batched, layer_depth, restore_layer_depth
from madfunc.core.registry import REGISTRY
from madfunc.engine.graphclean import mutates, simplify
from madfunc.engine.recordable import Refused, check_recordable
from madfunc.ops.scalars import ScalarForms

__all__ = [
    "MAX_RECORDED_CALLS", "RECORD_AFTER", "REFUSED", "Replay", "clear", "key_of", "lookup", "note_clean", "replayed",
]

# key -> clean eager sightings so far (int) | Replay | a refusal reason (str). Least recently used first.
_CACHE: collections.OrderedDict[tuple, Any] = REGISTRY.register(
    "replay.recordings", collections.OrderedDict, "recorded passes (or sightings, or refusals) by replay key")
_CAPACITY = 256
# Clean eager sightings of a key before it is recorded: a pass seen once (one-off shapes, a closure made
# per call) is not worth the tracing (0.1-0.5 s). The sweeps set 1 to replay every case on its second call.
RECORD_AFTER = 2
# The most torch calls (of the body, seen by the op seam, times the passes recorded as one graph) that are
# recorded. Tracing with make_fx through vmap(jvp(...)) costs 1-5 ms a torch call (the fake-tensor and proxy
# bookkeeping of the 3-6 aten ops that each becomes; measured on a 1,500-step rollout, 1 CPU thread, linear in
# the calls), 20-50x the eager pass, and ~10 KB of memory a node while it runs: above this many calls (a
# recording of 2-5 s), a pass stays eager, and the refusal is decided from the eager pass's count, before any
# tracing. Below it, a recording pays for itself after ~25-50 calls of the segment.
MAX_RECORDED_CALLS = 1000
# Why passes were not recorded, by segment name (tests and inspection read it).
REFUSED: dict[str, str] = REGISTRY.register("replay.refused", dict, "why passes were not recorded, by segment")
# The scalar types a non-tensor argument may have for its pass to be recorded (keyed by value).
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def clear() -> None:
    _CACHE.clear()
    REFUSED.clear()


def replayed(name: str) -> int:
    """How many recorded passes of segment ``name`` are in the cache."""
    return sum(isinstance(v, Replay) and v.name == name for v in _CACHE.values())


def _scalars(fn: Any) -> tuple:
    """Hashable scalars in the closure of ``fn`` (values the traced program may have baked in)."""
    cells = getattr(getattr(fn, "__func__", fn), "__closure__", None) or ()
    out = []
    for cell in cells:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _SCALARS):
            out.append(value)
    return tuple(out)


# One tangent pass: the inputs it seeds (indices into the engine's tensors) and their tangent batches.
Pass = tuple[Sequence[int], Sequence[torch.Tensor]]


# Finalizers of the functions and modules that recordings are keyed on, by id: recordings name them weakly,
# so a model dropped by the user is not kept alive by its recordings, which go with it.
_WATCHED: dict[int, weakref.finalize] = {}


def _identity(*objects: Any) -> tuple:
    """Weak identities of ``objects`` (a bound method: of its object and function), for the key."""
    out: list[Any] = []
    for obj in objects:
        if inspect.ismethod(obj):
            out += _identity(obj.__self__, obj.__func__)
            continue
        try:
            if id(obj) not in _WATCHED:
                _WATCHED[id(obj)] = weakref.finalize(obj, _forget, id(obj))
        except TypeError:  # None and builtins cannot be weakly referenced (and live as long as the process)
            out.append(("object", obj))
            continue
        out.append(("weak", id(obj)))
    return tuple(out)


def _forget(ident: int) -> None:
    _WATCHED.pop(ident, None)
    for key in [k for k in _CACHE if ("weak", ident) in k[0]]:
        del _CACHE[key]


def key_of(engine: Any, tensors: Sequence[torch.Tensor], passes: Sequence[Pass], watch: bool = False):
    """The replay key of ``passes`` (one recording: ``Exact`` records its leaf groups' passes as one
    graph, so that their common primal work is done once), or None if they cannot be replayed at all.
    ``watch``: the pass must also say which seeded inputs the body read (``Random``), so its recording
    keeps that, and is another recording than an unwatched one."""
    if engine.buffers or engine.measure or not engine.record_passes:
        return None
    tangents = [t for _, ts in passes for t in ts]
    if any(is_batched(t) for t in tensors) or any(t.requires_grad for t in tangents):
        return None
    others = []
    for i, leaf in enumerate(engine.leaves):
        if i in engine.positions_set:
            continue
        if not isinstance(leaf, _SCALARS):
            return None  # a tensor outside the positions, or an object whose state we cannot key on
        others.append(leaf)
    modules = engine.modules()
    try:
        key = (
            _identity(engine.fn, engine.owner), engine.spec, tuple(others), tuple(engine.diff),
            tuple((t.shape, t.dtype, t.device, t.requires_grad, t.stride()) for t in tensors),
            tuple((tuple(which), tuple((t.shape, t.dtype) for t in ts)) for which, ts in passes), engine.grad_mode,
            tuple(m.training for m in modules), _scalars(engine.fn), _scalars(engine.owner),
            # what creation ops and casts inside the body read from torch's global state at trace time
            torch.get_default_dtype(), torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), watch,
        )
        hash(key)
    except TypeError:  # an unhashable non-tensor argument: nothing to key on
        return None
    return key


class Replay:
    """One recording: ``run(tensors, passes) -> (ys, ydots)``, each ydot the passes' batches concatenated."""

    def __init__(self, name: str, gm: torch.fx.GraphModule, n_out: int, out_spec: Any, buffers: list) -> None:
        self.name = name
        self.gm = gm
        self.n_out = n_out
        self.out_spec = out_spec
        self.buffers = buffers  # (module weakref, buffer name, shape, dtype, device): read at each run
        self.used: list[bool] | None = None  # a watched pass's: which seeded inputs the body read
        self.calls = 0  # the torch calls of the passes it was made from (their size: MAX_RECORDED_CALLS)
        # The graph holds autocast's casts as they ran while recording: it runs with autocast off, or autocast
        # would cast its float32 matmuls (autocast-off regions, attention's math kernel) again.
        self.autocast = enabled_devices()

    def run(self, tensors: Sequence[torch.Tensor], passes: Sequence[Pass]) -> tuple[tuple, list] | None:
        """The recorded pass on these tensors; None if a buffer it reads is gone or changed its kind."""
        extra = []
        for ref, name, shape, dtype, device in self.buffers:
            module = ref()
            b = None if module is None else module._buffers.get(name)
            if b is None or b.shape != shape or b.dtype != dtype or b.device != device:
                return None
            extra.append(b)
        with contextlib.ExitStack() as stack:  # (the key holds autocast's state: it is the recording's)
            for device in self.autocast:
                stack.enter_context(torch.autocast(device, enabled=False))
            out = self.gm(*tensors, *(t for _, ts in passes for t in ts), *extra)
        return tuple(out[: self.n_out]), list(out[self.n_out :])


def lookup(key: tuple | None) -> Replay | None:
    if key is None:
        return None
    entry = _CACHE.get(key)
    if isinstance(entry, Replay):
        _CACHE.move_to_end(key)
        return entry
    return None


def note_clean(engine: Any, key: tuple | None, tensors: Sequence[torch.Tensor], passes: Sequence[Pass],
               expected: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]], used: list[bool] | None = None) -> None:
    """Passes with this key ran eagerly and cleanly, giving ``expected`` (ys, ydots) and, when watched,
    ``used``: after ``RECORD_AFTER`` such sightings, record them, and keep the recording only if it
    reproduces ``expected``."""
    if key is None:
        return
    seen = _CACHE.get(key, 0)
    if not isinstance(seen, int):
        return
    _CACHE[key] = seen + 1
    while len(_CACHE) > _CAPACITY:
        _CACHE.popitem(last=False)
    if seen + 1 < RECORD_AFTER:
        return
    size = engine.op_count * len(passes)
    if size > MAX_RECORDED_CALLS:  # decided before tracing: a long loop costs nothing to refuse
        _CACHE[key] = REFUSED[engine.name] = (
            f"its passes make {size} torch calls, above replay.MAX_RECORDED_CALLS = {MAX_RECORDED_CALLS} (tracing "
            "costs 1-5 ms a call, 20-50x the eager pass)")
        return
    with _restored_state():
        try:
            recording = _record(engine, tensors, passes)
            recording.used, recording.calls = used, size
            _verify(recording, tensors, passes, expected)
            _CACHE[key] = recording
        except Refused as refusal:
            _CACHE[key] = REFUSED[engine.name] = str(refusal)
        except Exception as error:  # noqa: BLE001 - any tracing failure: the eager engine stays, never a wrong graph
            data = "DataDependent" in type(error).__name__ or "data-dependent" in str(error).lower()
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            failed = f"tracing failed: {type(error).__name__}: {first}"
            reason = "its body branches on tensor values" if data else failed
            _CACHE[key] = REFUSED[engine.name] = reason


@contextlib.contextmanager
def _restored_state() -> Iterator[None]:
    """Thread-local state as it was before tracing, even when tracing fails half-way.

    A trace that raises inside functorch's transforms can leave dispatch keys excluded (seen with
    layer_norm's reference under fake tensors in torch 2.13), after which every forward-mode op in the
    process fails an internal assertion; torch's RNG state is restored too, whatever tracing did to it.
    """
    keys = list(torch._C.DispatchKey.__members__.values())
    included = torch._C._dispatch_tls_is_dispatch_key_included
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded
    tls = [(k, included(k), excluded(k)) for k in keys]
    depth = layer_depth()
    rng, fwd_grad, grad = torch.get_rng_state(), torch._C._is_fwd_grad_enabled(), torch.is_grad_enabled()
    try:
        yield
    finally:
        restore_layer_depth(depth)
        for k, was_included, was_excluded in tls:
            if included(k) != was_included:
                torch._C._dispatch_tls_set_dispatch_key_included(k, was_included)
            if excluded(k) != was_excluded:
                torch._C._dispatch_tls_set_dispatch_key_excluded(k, was_excluded)
        torch._C._set_fwd_grad_enabled(fwd_grad)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(rng)


# Ops whose result depends on storage, offsets or strides, which the clean-up passes may change (a view
# that becomes a copy) and the key does not fully pin (the storage's size).
def _verify(recording: Replay, tensors: Sequence[torch.Tensor], passes: Sequence[Pass], expected: tuple) -> None:
    """The recording, run once on the inputs the eager passes just had, must give their values (up to the
    rounding of reordered sums: pooling by slices, CSE). A safety net under the clean-up passes: any
    disagreement keeps the segment on the eager engine."""
    got = recording.run(tensors, passes)
    if got is None:
        raise Refused("its recording could not run on the inputs it was made from")
    for a, b in zip((*got[0], *got[1]), (*expected[0], *expected[1]), strict=True):
        if not (a.is_floating_point() or a.is_complex()):
            same = a.shape == b.shape and torch.equal(a, b)
        else:
            tol = 1e-9 if a.dtype == torch.float64 else 1e-4
            scale = float(b.abs().max()) if b.numel() else 0.0
            same = a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol * (1.0 + scale), equal_nan=True)
        if not same:
            raise Refused("its recording disagreed with the eager pass (please report this; it stays eager)")


def _record(engine: Any, tensors: Sequence[torch.Tensor], passes: Sequence[Pass]) -> Replay:
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    n = len(tensors)
    out_spec: list[Any] = [None]

    def one_pass(ts: Sequence[torch.Tensor], which: Sequence[int], tans: Sequence[torch.Tensor]) -> tuple:
        def single(*tangent: torch.Tensor) -> tuple:
            def body(*seeded: torch.Tensor, passed: list) -> tuple:
                with ScalarForms():  # (the forms the eager pass ran under the op seam)
                    outs = engine.seeded_call(ts, which, seeded, passed)
                out_spec[0] = engine.out_spec
                return outs

            return engine._jvp(body, tuple(ts[i] for i in which), tangent, [])

        if tans[0].shape[0] == 1:
            ys, ydots = single(*(t[0] for t in tans))
            return ys, [d.unsqueeze(0) for d in ydots]
        ys, ydots = vmap(single, in_dims=0, out_dims=0, randomness="same")(*tans)
        return [y[0] for y in ys], ydots

    def traced(*flat: torch.Tensor) -> tuple:
        ts, rest = flat[:n], list(flat[n:])
        parts: list[list[torch.Tensor]] = []
        for which, tans in passes:
            ys, ydots = one_pass(ts, which, rest[: len(tans)])
            rest = rest[len(tans) :]
            parts.append(ydots)
        ydots = [torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts, strict=True)]
        return (*ys, *ydots)

    # Quiet: the eager pass already reported vmap's warnings (as PerformanceWarning), and a trace that fails
    # is a refusal, not an error worth the fake-tensor logger's traceback.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = (*tensors, *(t for _, ts in passes for t in ts))
            gm = make_fx(traced, tracing_mode="fake", _allow_non_fake_inputs=True)(*flat)
    finally:
        fake_log.setLevel(level)
    buffers = _lift_buffers(gm, engine.modules())
    check_recordable(gm)
    if simplify(gm) or not any(mutates(node) for node in gm.graph.nodes):
        # The passes of one recording share their primal work (each pass computes the same primal values):
        # common subexpressions are computed once. Only without in-place ops (simplify leaves a graph with
        # them as it is), and no random op is left.
        cse = CSEPass()(gm)
        assert cse is not None  # (CSEPass.call always returns a PassResult; PassBase types it Optional)
        gm = cse.graph_module
    _flat_code(gm)
    outputs = next(iter(reversed(gm.graph.nodes))).args[0]
    return Replay(engine.name, gm, len(outputs) // 2, out_spec[0], buffers)  # one tangent batch per output


def _flat_code(gm: torch.fx.GraphModule) -> None:
    """Flat tensors in, a flat tuple out: plain code generation, without make_fx's pytree (un)flattening of
    inputs and outputs on every call (~0.2 ms a call). The code reads no metadata: its fake tensors (one a
    node, ~10 KB with their bookkeeping) go."""
    from torch.fx.graph import CodeGen

    gm.graph._codegen = CodeGen()
    gm.recompile()
    for node in gm.graph.nodes:
        node.meta.clear()


def _lift_buffers(gm: torch.fx.GraphModule, modules: Sequence[torch.nn.Module]) -> list:
    """Turn the constants that are buffers of the segment's modules (eval-mode BatchNorm's running
    statistics) into graph inputs read from their module at every run, so that the recording follows
    updates and reassignments of them; other constants stay (and are refused)."""
    owners = {id(b): (m, name) for m in modules for name, b in m._buffers.items() if b is not None}
    lifted = []
    last = next(n for n in reversed(gm.graph.nodes) if n.op == "placeholder")
    for node in list(gm.graph.nodes):
        value = getattr(gm, node.target, None) if node.op == "get_attr" else None
        if not isinstance(value, torch.Tensor) or id(value) not in owners:
            continue
        module, name = owners[id(value)]
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(f"buffer_{len(lifted)}")
        last.meta = dict(node.meta)
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)
        lifted.append((weakref.ref(module), name, value.shape, value.dtype, value.device))
    return lifted
