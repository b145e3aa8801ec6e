"""Fixtures shared by more than one test module."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_torch_thread():
    """Small networks: one thread is fastest, and two stall when other processes hold a core.

    Not autouse: a module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch  # here, not at the top: every test module loads this file, and most need no torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
