"""`fingerprint_model`: a SHA-256 over a model's architecture and a strided sample of every weight."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def fingerprint_model(model: nn.Module, *, as_dtype: torch.dtype | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """A SHA-256 over the architecture and a strided sample of every weight.

    Cheap for large models (it reads at most 4096 values a tensor, in the weights' own dtype and on
    their own device; only the sample is upcast to float32) yet different for any other
    checkpoint, so a cache or run made with one base model is refused by another. Float32 weights
    and weights stored in the dtype they are loaded in give the same value. `as_dtype` rounds the
    sample to that dtype first: computed on float32 weights, it is the fingerprint the same weights
    have once loaded in `as_dtype` (what a run records for its other dtypes). `state_dict` replaces
    the model's own weights (its config still names the architecture).
    """
    h = hashlib.sha256()
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "head_dim")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in sorted((model.state_dict() if state_dict is None else state_dict).items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096]
        if as_dtype is not None:
            sample = sample.to(as_dtype)
        sample = sample.to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
