"""madfunc: mixed-mode automatic differentiation on torch.func.

Mark parts of a model as segments (:func:`fwd`, :func:`rev`, or by module path: :func:`mark_segments`),
then choose per segment, with a plan, between reverse mode, exact forward mode and randomized forward
gradients.
"""

from madfunc.core.checks import ForwardModeError as ForwardModeError
from madfunc.core.guards import PerformanceWarning as PerformanceWarning
from madfunc.core.memory import PeakMemory as PeakMemory
from madfunc.core.memory import measure_peak as measure_peak
from madfunc.engine.distributed import ddp_comm_hook as ddp_comm_hook
from madfunc.marking import SegmentHandle as SegmentHandle
from madfunc.marking import mark_segments as mark_segments
from madfunc.ops.rules import register_forward_rule as register_forward_rule
from madfunc.optim import SeedSGD as SeedSGD
from madfunc.plan import Activity as Activity
from madfunc.plan import Checkpointed as Checkpointed
from madfunc.plan import Exact as Exact
from madfunc.plan import Guessed as Guessed
from madfunc.plan import Plan as Plan
from madfunc.plan import Random as Random
from madfunc.plan import Reverse as Reverse
from madfunc.plan import Strategy as Strategy
from madfunc.planner.auto import auto_plan as auto_plan
from madfunc.planner.report import PlanReport as PlanReport
from madfunc.segment import ModuleSegment as ModuleSegment
from madfunc.segment import Segment as Segment
from madfunc.segment import fwd as fwd
from madfunc.segment import rev as rev
from madfunc.strategies.spsa import SPSA as SPSA
from madfunc.tools.diagnostics import compare as compare
from madfunc.tools.diagnostics import inspect as inspect
from madfunc.tools.reports import CompareReport as CompareReport
from madfunc.tools.reports import GradientFigures as GradientFigures
from madfunc.tools.reports import InspectReport as InspectReport
from madfunc.tools.reports import SegmentRow as SegmentRow
from madfunc.transforms import mixed_grad as mixed_grad
from madfunc.transforms import mixed_grad_and_value as mixed_grad_and_value
from madfunc.transforms import use_plan as use_plan

__version__ = "0.1.0"

__all__ = [
    "Activity",
    "Checkpointed",
    "CompareReport",
    "Exact",
    "ForwardModeError",
    "GradientFigures",
    "Guessed",
    "InspectReport",
    "ModuleSegment",
    "PeakMemory",
    "PerformanceWarning",
    "Plan",
    "PlanReport",
    "Random",
    "Reverse",
    "SPSA",
    "SeedSGD",
    "Segment",
    "SegmentHandle",
    "SegmentRow",
    "Strategy",
    "auto_plan",
    "compare",
    "ddp_comm_hook",
    "fwd",
    "inspect",
    "mark_segments",
    "measure_peak",
    "mixed_grad",
    "mixed_grad_and_value",
    "register_forward_rule",
    "rev",
    "use_plan",
]
