"""Shared fixtures: float64 by default for the exactness tests, fixed seeds, one thread.

The tests use tiny tensors, for which one torch thread is fastest; more threads only contend
on a small shared CI machine (subprocesses inherit OMP_NUM_THREADS).
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_precision():
    torch.manual_seed(1234)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
