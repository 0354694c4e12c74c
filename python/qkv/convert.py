"""``qkv.convert(model)``: swap every ``torch.nn.MultiheadAttention`` in a model for
``qkv.MultiheadAttention``, in place, keeping the very same Parameter objects."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .modules import MultiheadAttention, _keep_transformer_slow_path

__all__ = ["convert"]


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.nn.MultiheadAttention`` in ``model`` (recursively) by a
    :class:`qkv.MultiheadAttention` and returns the model.

    The replacement carries the same Parameter objects (so optimizers, their state, weight tying
    and ``state_dict`` keys are unaffected), the same device, dtype, training mode, configuration
    and any hooks or extra attributes of the original. No random numbers are drawn. A module
    shared at several places is replaced by one shared replacement. If ``model`` itself is a
    MultiheadAttention, the replacement is returned.

    Only exact ``torch.nn.MultiheadAttention`` instances are converted: subclasses (for example
    torch.ao's quantizable one) may override ``forward`` and are left alone.

    ``nn.TransformerEncoder``'s nested-tensor inference path (``use_nested_tensor``) is kept: qkv
    takes the NestedTensors it hands the attention (unpadded, through the varlen kernel).
    """
    replacements: dict[int, MultiheadAttention] = {}
    if type(model) is nn.MultiheadAttention:
        return _replacement(model, replacements)
    _convert_children(model, replacements)
    return model


def _convert_children(module: nn.Module, replacements: dict[int, MultiheadAttention]) -> None:
    # _modules, not named_children(): the latter skips a module's second appearance, and a shared
    # attention module must be replaced everywhere it is referenced.
    for name, child in list(module._modules.items()):
        if type(child) is nn.MultiheadAttention:
            setattr(module, name, _replacement(child, replacements))
        elif child is not None:
            _convert_children(child, replacements)


def _replacement(torch_mha: nn.MultiheadAttention, replacements: dict[int, MultiheadAttention]) -> MultiheadAttention:
    """A qkv MultiheadAttention whose state *is* the torch module's (shallow copy of its __dict__,
    with fresh containers so the two modules do not alias each other's registries)."""
    key = id(torch_mha)
    if key not in replacements:
        new = MultiheadAttention.__new__(MultiheadAttention)
        state = {
            name: (value.copy() if isinstance(value, (dict, OrderedDict)) else value)
            for name, value in torch_mha.__dict__.items()
        }
        new.__dict__.update(state)
        if _keep_transformer_slow_path not in new._forward_pre_hooks.values():
            new.register_forward_pre_hook(_keep_transformer_slow_path)
        replacements[key] = new
    return replacements[key]
