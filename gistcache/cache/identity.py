"""Which model a gist cache belongs to, and the check that a cache fits a model.

A cache is only meaningful for the base weights, the trained run, the template and the mask variant
that made it, and only fits a model of the same layer count, shapes and dtype. `check_cache`
compares field by field and names the first that differs, with how to fix it.

This module knows nothing of the cache file: the cache package imports it to check what it loads, and
the checks read a cache through `CacheFields`, the fields they compare (a `GistCache` has them all).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import torch

from gistcache.config import dtype_name
from gistcache.errors import GistError
from gistcache.model import GistModel, fingerprint_model


class CacheFields(Protocol):
    """What `check_identity` and `check_cache` read of a cache: `gistcache.cache.GistCache`'s fields."""

    keys: list[torch.Tensor]  # per layer (1, kv_heads, N, head_dim)
    values: list[torch.Tensor]
    num_gist_tokens: int
    base_fingerprint: str
    run_fingerprint: str
    template: str
    mask: str
    positions: str
    key_start: int
    gist_every: int
    gist_per_chunk: int
    raw_tail: int

    @property
    def num_layers(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def context_used(self) -> int: ...


@dataclass(frozen=True)
class ModelIdentity:
    """What a cache must match: the base weights, the trained run, the template."""

    base_fingerprint: str
    run_fingerprint: str
    template: str
    mask: str
    positions: str = "compact"
    gist_every: int = 0  # K of a chunked run (masks.py); 0: one chunk
    raw_tail: int = 0  # W of a run with a raw tail (masks.py); 0: none


def model_identity(model: GistModel) -> ModelIdentity:
    """Fingerprints of a model from `GistModel.from_pretrained` (read from the run), or of an in-memory GistModel.

    An in-memory model (no run folder) gets a run fingerprint over its current weights, its gist
    embedding, N and its tokenizer (vocabulary and chat template), so a cache made from it fits it and
    nothing else (its mask and positions are compared field by field, `check_identity`).
    """
    template = model.template
    base = model.base_fingerprint or fingerprint_model(model.model)
    run = model.run_fingerprint
    if run is None:
        h = hashlib.sha256(b"gistcache-unsaved-run|")
        h.update(fingerprint_model(model.model).encode())
        h.update(str(model.num_gist_tokens).encode())
        if model.gist_every:
            h.update(f"|every {model.gist_every}".encode())
        if model.raw_tail:
            h.update(f"|tail {model.raw_tail}".encode())
        if model.chunk_attention != "causal":
            h.update(f"|chunks {model.chunk_attention}".encode())
        h.update(model.gist_embedding.detach().float().cpu().numpy().tobytes())
        h.update(tokenizer_fingerprint(model.tokenizer).encode())
        run = h.hexdigest()
    return ModelIdentity(base_fingerprint=base, run_fingerprint=run, template=template, mask=model.mask,
                         positions=model.positions, gist_every=model.gist_every, raw_tail=model.raw_tail)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over a tokenizer's vocabulary (its backend's JSON for a fast tokenizer) and its chat template.

    Kept on the tokenizer while its size and chat template stay the same (serializing a large vocabulary
    takes a tenth of a second, and every compress asks).
    """
    template = json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True)
    tag = (len(tokenizer), template)
    kept = getattr(tokenizer, "_gistcache_fingerprint", None)
    if kept is not None and kept[0] == tag:
        return kept[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    fingerprint = hashlib.sha256(f"{vocab}|{template}".encode("utf-8")).hexdigest()
    try:
        tokenizer._gistcache_fingerprint = (tag, fingerprint)
    except AttributeError:  # a tokenizer that takes no attributes: computed each time
        pass
    return fingerprint


def model_kv_shape(model: GistModel) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) from the model config."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


FIX = "compress the prompt again with this run (gist compress ... --run RUN)"


def check_identity(cache: CacheFields, identity: ModelIdentity, num_gist_tokens: int, *,
                   source: str = "the cache") -> None:
    """Refuse a cache made by another base model, run, mask, ratio, N or template, naming the first field that
    differs. `num_gist_tokens` is the run's N (gist tokens after each chunk)."""
    if cache.base_fingerprint != identity.base_fingerprint:
        raise GistError(f"{source} was made with another base model (base_fingerprint {cache.base_fingerprint[:12]} "
                        f"!= {identity.base_fingerprint[:12]} of this model): {FIX}")
    if cache.mask != identity.mask:
        raise GistError(f"{source} was made by a run trained with the {cache.mask!r} mask, this run was trained with "
                        f"the {identity.mask!r} mask: {FIX}")
    if cache.positions != identity.positions:
        raise GistError(f"{source} was made by a run trained in the {cache.positions!r} positions, this run was "
                        f"trained in the {identity.positions!r} positions: {FIX}")
    if cache.gist_every != identity.gist_every:
        def ratio(k: int) -> str:
            return f"gist tokens after every {k} instruction tokens" if k else "one chunk (no --gist-every)"
        raise GistError(f"{source} was made with {ratio(cache.gist_every)}, this run puts "
                        f"{ratio(identity.gist_every)}: {FIX}")
    if cache.raw_tail != identity.raw_tail:
        def tail(w: int) -> str:
            return f"a raw tail of up to {w} tokens" if w else "no raw tail (no --raw-tail)"
        raise GistError(f"{source} was made with {tail(cache.raw_tail)}, this run keeps {tail(identity.raw_tail)}: "
                        f"{FIX}")
    if cache.run_fingerprint != identity.run_fingerprint:
        raise GistError(f"{source} was made with another run (run_fingerprint {cache.run_fingerprint[:12]} "
                        f"!= {identity.run_fingerprint[:12]} of this run): {FIX}")
    if cache.gist_per_chunk != num_gist_tokens:
        raise GistError(f"{source} has num_gist_tokens {cache.gist_per_chunk}"
                        f"{' per chunk' if cache.gist_every else ''}, this run uses {num_gist_tokens}: {FIX}")
    if cache.template != identity.template:
        raise GistError(f"{source} has template {cache.template!r}, this run uses {identity.template!r}: {FIX}")


def check_cache(model: GistModel, cache: CacheFields, *, identity: ModelIdentity | None = None,
                source: str = "the cache") -> None:
    """Refuse a cache that does not fit `model`, naming the first field that differs."""
    check_identity(cache, identity or model_identity(model), model.num_gist_tokens, source=source)
    if cache.key_start != model.num_prefix_tokens:
        raise GistError(f"{source} has its keys from position key_start {cache.key_start}, after this run's fixed "
                        f"prefix of {model.num_prefix_tokens} tokens they start at {model.num_prefix_tokens}: {FIX}")
    num_layers, kv_heads, head_dim = model_kv_shape(model)
    if cache.num_layers != num_layers:
        raise GistError(f"{source} has num_layers {cache.num_layers}, the model has {num_layers}: {FIX}")
    want = (1, kv_heads, cache.num_gist_tokens, head_dim)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        for kind, t in (("keys", k), ("values", v)):
            if tuple(t.shape) != want:
                raise GistError(f"{source} layer {i} {kind} shape {tuple(t.shape)} does not fit the model "
                                f"(1, kv_heads={kv_heads}, {cache.num_gist_tokens}, head_dim={head_dim}): {FIX}")
    model_dtype = model.model.dtype
    if cache.dtype != model_dtype:
        raise GistError(f"{source} has dtype {dtype_name(cache.dtype)}, the model runs in {dtype_name(model_dtype)}: "
                        f"load the run with --dtype {dtype_name(cache.dtype)} or compress again")
    if cache.context_used >= model.max_context():
        raise GistError(f"{source} uses {cache.context_used} positions of the model's context of "
                        f"{model.max_context()}: compress a shorter prompt")
