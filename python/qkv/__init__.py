"""qkv: fast, lean, exact attention for PyTorch.

Importing qkv loads the C++ extension, which registers the ``torch.ops.qkv`` operators.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)

__version__ = "0.1.0"
