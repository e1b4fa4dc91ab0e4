"""madfunc: mixed-mode automatic differentiation on torch.func.

Mark parts of a model as segments (:func:`fwd`, :func:`rev`, or by module path: :func:`mark_segments`),
then choose per segment, with a plan, between reverse mode, exact forward mode and randomized forward
gradients.
"""

from ._checks import ForwardModeError as ForwardModeError
from ._diagnostics import compare as compare
from ._diagnostics import inspect as inspect
from ._distributed import ddp_comm_hook as ddp_comm_hook
from ._guards import PerformanceWarning as PerformanceWarning
from ._marking import SegmentHandle as SegmentHandle
from ._marking import mark_segments as mark_segments
from ._ops import register_forward_rule as register_forward_rule
from ._plan import Activity as Activity
from ._plan import Exact as Exact
from ._plan import Guessed as Guessed
from ._plan import Plan as Plan
from ._plan import Random as Random
from ._plan import Reverse as Reverse
from ._plan import Strategy as Strategy
from ._reports import CompareReport as CompareReport
from ._reports import GradientFigures as GradientFigures
from ._reports import InspectReport as InspectReport
from ._reports import SegmentRow as SegmentRow
from ._segment import ModuleSegment as ModuleSegment
from ._segment import Segment as Segment
from ._segment import fwd as fwd
from ._segment import rev as rev
from ._transforms import mixed_grad as mixed_grad
from ._transforms import mixed_grad_and_value as mixed_grad_and_value
from ._transforms import use_plan as use_plan

__version__ = "0.1.0"

__all__ = [
    "Activity",
    "CompareReport",
    "Exact",
    "ForwardModeError",
    "GradientFigures",
    "Guessed",
    "InspectReport",
    "ModuleSegment",
    "PerformanceWarning",
    "Plan",
    "Random",
    "Reverse",
    "Segment",
    "SegmentHandle",
    "SegmentRow",
    "Strategy",
    "compare",
    "ddp_comm_hook",
    "fwd",
    "inspect",
    "mark_segments",
    "mixed_grad",
    "mixed_grad_and_value",
    "register_forward_rule",
    "rev",
    "use_plan",
]
