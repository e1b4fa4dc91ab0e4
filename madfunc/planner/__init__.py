"""The memory-budget planner: ``auto_plan`` picks each segment's strategy for the fastest step within a budget.

``budget.py`` (reading ``"50MiB"``), ``profile.py`` (running a step under a plan and cutting its memory
timeline into per-segment windows, timing single-segment variations), ``costs.py`` (the cost table and the
model that predicts a plan's time and peak from it), ``solve.py`` (exact search and a DP over memory
buckets), ``report.py`` (the printable report) and ``auto.py`` (the public ``auto_plan``).
"""
