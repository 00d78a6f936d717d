"""Fixtures shared across test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, which spin and stall when tests share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
