"""The op seam: what happens to each torch op inside a forward segment's tangent pass.

``rules.py`` (``RULES``, ``register_forward_rule``, ops learned at run time to drop tangents), the
double-vjp ``fallback.py`` for ops without a forward rule, and ``dropout.py`` (the plain code's masks).
Add an op rule here: one entry in ``RULES`` plus a case in ``tests/ops/``.
"""
