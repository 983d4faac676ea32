import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--shapes", default=os.environ.get("FASTCONV_BENCH_SHAPES"),
                     help="comma-separated substrings of shape names to run (default: all)")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
