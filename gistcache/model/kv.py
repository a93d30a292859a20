"""The KV cache of a stock transformers forward: the argument's and output's names in this transformers
version (`cache_kwarg`, `returned_cache`) and its layers (`cache_layers`)."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """The name this transformers version gives the KV-cache argument (`cache` in 5.24, else `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    """The KV cache a stock forward returned, under either name (see `cache_kwarg`)."""
    return output["cache"] if "cache" in output else output.past_key_values


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (B, kv_heads, T, head_dim), of a transformers Cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers
