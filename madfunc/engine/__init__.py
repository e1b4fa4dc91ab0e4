"""How a segment call runs: the call context, the forward-mode engine, the reverse runner, the traceable
engine and data parallelism.

``context.py`` (the transform call's state, ``planned_call``), ``forward.py`` (the autograd.Function),
``runner.py`` (``Engine``: one call's passes, and the ``EngineView`` strategies see), ``pushes.py`` (one
vmap(jvp) pass), ``passes.py`` (recovering from ops that drop tangents), ``lazy.py`` (lazy seeding),
``replay.py``/``recordable.py``/``graphclean.py`` (record and replay), ``state.py``/``rng.py`` (side
effects and randomness), ``captured.py`` (tensors read from outside the arguments), ``reverse.py``,
``traced.py`` (``mixed_grad(traceable=True)``), ``distributed.py``/``replicas.py``.
"""
