"""Adapters that plug qkv into other libraries. Each submodule imports its library lazily (only
when imported itself), so ``import qkv`` never needs them."""
