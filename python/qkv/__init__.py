"""qkv: fast, lean, exact attention for PyTorch.

Importing qkv loads the C++ extension, which registers the ``torch.ops.qkv`` operators.

Python API:
- :class:`MultiheadAttention`: drop-in replacement for ``torch.nn.MultiheadAttention``;
  :func:`convert` swaps it into an existing model.
- :class:`SelfAttention`, :class:`CausalSelfAttention`, :class:`CrossAttention`: batch-first
  modules, each on one projection op (``torch.ops.qkv.multi_head_attention``,
  ``masked_self_attention``, ``cross_attention``: project, attend, project back in one op).
- :mod:`qkv.functional`: ``multi_head_attention_forward`` and ``scaled_dot_product_attention``.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)
from . import functional
from .convert import convert
from .modules import CausalSelfAttention, CrossAttention, MultiheadAttention, SelfAttention

__version__ = "0.1.0"

__all__ = [
    "MultiheadAttention",
    "SelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
    "convert",
    "functional",
]
