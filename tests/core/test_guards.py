"""The size guard and cost warning of ``Exact`` (madfunc/core/guards.py), called with what the body reads."""

from __future__ import annotations

import warnings

import pytest
import torch

import madfunc as mf
from madfunc.core.guards import EXACT_BASIS_BYTES, EXACT_WARN_TANGENTS, check_basis_size, warn_exact_cost


def test_basis_size_counts_only_the_seeded_inputs() -> None:
    """The block's bytes are ``count`` tangents of the inputs in ``which``; a huge input left out (unread)
    does not count."""
    small, huge = torch.zeros(8, 8), torch.zeros(2**20)
    check_basis_size("guarded", [small, huge], [0], 64)  # 64 x 64 x 4 bytes: far below the limit
    count = EXACT_BASIS_BYTES // (huge.numel() * huge.element_size()) + 1
    with pytest.raises(MemoryError, match=r"segment 'guarded'.*Exact\(chunk_size=\.\.\.\)"):
        check_basis_size("guarded", [small, huge], [1], count)


def test_cost_warning_once_per_segment_above_the_threshold() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.PerformanceWarning)
        warn_exact_cost("cheap_guarded", EXACT_WARN_TANGENTS)  # at the threshold: silent
    with pytest.warns(mf.PerformanceWarning, match=r"segment 'costly_guarded'.*body reads, 4097 here"):
        warn_exact_cost("costly_guarded", EXACT_WARN_TANGENTS + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mf.PerformanceWarning)
        warn_exact_cost("costly_guarded", EXACT_WARN_TANGENTS + 1)  # once per segment
