import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import qkv  # noqa: E402,F401  (registers torch.ops.qkv)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)
