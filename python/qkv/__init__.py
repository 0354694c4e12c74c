"""qkv: fast, lean, exact attention for PyTorch.

Importing qkv loads the C++ extension, which registers the ``torch.ops.qkv`` operators.

Python API:
- :class:`MultiheadAttention`: drop-in replacement for ``torch.nn.MultiheadAttention``;
  :func:`convert` swaps it into an existing model.
- :class:`SelfAttention`, :class:`CausalSelfAttention`, :class:`CrossAttention`: batch-first
  modules, each on one projection op (``torch.ops.qkv.multi_head_attention``,
  ``masked_self_attention``, ``cross_attention``: project, attend, project back in one op).
- :mod:`qkv.functional`: ``multi_head_attention_forward`` and ``scaled_dot_product_attention``.
- :func:`flash_attn_func`, :func:`flash_attn_qkvpacked_func`, :func:`flash_attn_kvpacked_func`,
  :func:`flash_attn_varlen_func`, :func:`flash_attn_with_kvcache`: flash-attn's API (GQA/MQA, sliding
  windows, ALiBi, softcap, packed q/k/v, packed batches, KV-cache decoding) on every device; see
  docs/flash-attn-api.md.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.qkv.*)

# Chooses which copy of the CPU kernels runs (QKV_CPU_CAPABILITY, else the best this CPU
# supports), so that a bad value of the variable fails here, not at the first call.
_C._cpu_capability()
from . import functional
from .convert import convert
from .flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                         flash_attn_with_kvcache)
from .modules import CausalSelfAttention, CrossAttention, MultiheadAttention, SelfAttention

__version__ = "0.1.0"

__all__ = [
    "MultiheadAttention",
    "SelfAttention",
    "CausalSelfAttention",
    "CrossAttention",
    "convert",
    "functional",
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
]
