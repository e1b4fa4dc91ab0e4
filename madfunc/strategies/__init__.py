"""How one segment is differentiated: the strategy contract (``base``) and one module per estimator.

Open ``base.py`` for the contract (``Strategy``, ``EngineView``, ``StrategyState``, ``SegmentStats``), a
strategy's own module for its estimator, ``tangents.py`` for the tangent distributions and ``kernels.py``
for the contractions they share. Strategies import nothing of the engine: the engine calls them.
"""

import importlib
import pkgutil

# Imported in the order their kinds are listed in the string syntax (registration order).
# isort: off
from madfunc.strategies.base import StrategyState, EngineView, SegmentStats, Shared, Strategy
from madfunc.strategies.exact import Exact
from madfunc.strategies.random import Random
from madfunc.strategies.activity import Activity
from madfunc.strategies.guessed import Guessed
from madfunc.strategies.spsa import SPSA
# isort: on

# Every other module of the package is imported too, so that a new estimator's file registers its string kind
# (``kind=``) by being there: adding a strategy is that one file plus a row in the shared test table.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

from madfunc.strategies.checkpointed import Checkpointed  # noqa: E402  (registered by the loop, after the above)

__all__ = [
    "Activity", "Checkpointed", "EngineView", "Exact", "Guessed", "Random", "SPSA", "SegmentStats", "Shared",
    "Strategy", "StrategyState",
]
