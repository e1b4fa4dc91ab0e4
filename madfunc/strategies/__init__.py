"""How one segment is differentiated: the strategy contract (``base``) and one module per estimator.

Open ``base.py`` for the contract (``Strategy``, ``EngineView``, ``StrategyState``, ``SegmentStats``), a
strategy's own module for its estimator, ``tangents.py`` for the tangent distributions and ``kernels.py``
for the contractions they share. Strategies import nothing of the engine: the engine calls them.
"""

# Imported in the order their kinds are listed in the string syntax (registration order).
# isort: off
from madfunc.strategies.base import StrategyState, EngineView, SegmentStats, Shared, Strategy
from madfunc.strategies.exact import Exact
from madfunc.strategies.random import Random
from madfunc.strategies.activity import Activity
from madfunc.strategies.guessed import Guessed
# isort: on

__all__ = [
    "Activity", "EngineView", "Exact", "Guessed", "Random", "SegmentStats", "Shared", "Strategy", "StrategyState",
]
