"""`GistCache`: the keys and values of the N gist positions of every layer, and the first slots of a request
laid out from caches (`cached_slots`, `stack_layers`, `slot_mask`). See `gistcache.cache` for the file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from gistcache._version import __version__
from gistcache.cache.format import (FORMAT, FORMAT_VERSION, PLACEHOLDER_ID, SEAL, TAIL_FIELD, metadata_sha256,
                                    tensor_sha256)
from gistcache.cache.identity import check_cache
from gistcache.config import dtype_name
from gistcache.errors import GistError
from gistcache.masks import POSITIONS, check_raw_tail, count_gist_slots
from gistcache.model import GistModel
from gistcache.model.rotary import model_inv_freq, move_keys


@dataclass(eq=False)
class GistCache:
    """The keys and values of the N gist positions of every layer, for one instruction.

    keys[i], values[i]: (1, kv_heads, N, head_dim) for layer i, on the CPU.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_gist_tokens: int
    num_prompt_tokens: int  # tokens before the first gist token (template text included)
    prompt_sha256: str  # SHA-256 of the instruction text (UTF-8)
    template: str  # resolved: "plain" or "chat"
    base_fingerprint: str
    run_fingerprint: str
    prompt_preview: str = ""
    mask: str = "paper"  # the mask variant of the run that made it ("prefix": add the run's fixed-prefix keys/values)
    key_start: int = 0  # rotary position of the first gist key: the run's fixed-prefix tokens (prefix mask), else 0
    positions: str = "compact"  # the run's position layout (masks.py): where the input reads the fixed prefix
    # a chunked run (masks.py): N = gist_per_chunk gist tokens after every gist_every instruction tokens, so the
    # cache holds num_gist_tokens = M = N * ceil((num_prompt_tokens - key_start) / gist_every) slots; 0: one chunk
    gist_every: int = 0
    gist_per_chunk: int = 0  # N; 0 reads as num_gist_tokens (one chunk)
    # W of a run with a raw tail (masks.py): the instruction's last t = min(W, P - K) tokens follow the M gist slots
    # as their own keys/values, so num_gist_tokens counts M + t slots; 0: none
    raw_tail: int = 0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise GistError(f"a gist cache needs one key and one value tensor per layer, got {len(self.keys)} keys "
                            f"and {len(self.values)} values")
        if self.num_gist_tokens < 1 or self.num_prompt_tokens < 0 or not 0 <= self.key_start <= self.num_prompt_tokens:
            raise GistError(f"num_gist_tokens {self.num_gist_tokens} must be >= 1, num_prompt_tokens "
                            f"{self.num_prompt_tokens} >= 0 and key_start {self.key_start} between 0 and it")
        if self.positions not in POSITIONS:
            raise GistError(f"unknown positions {self.positions!r}: known are {', '.join(POSITIONS)}")
        if not self.gist_every:
            self.gist_per_chunk = self.gist_per_chunk or self.num_gist_tokens
        check_raw_tail(self.raw_tail, self.gist_every)
        expected = count_gist_slots(self.num_prompt_tokens, self.gist_per_chunk, self.gist_every, self.key_start,
                                    self.raw_tail)
        if self.gist_every < 0 or self.gist_per_chunk < 1 or self.num_gist_tokens != expected:
            tail = f" and a raw tail of up to {self.raw_tail}" if self.raw_tail else ""
            raise GistError(f"num_gist_tokens {self.num_gist_tokens} does not fit gist_per_chunk {self.gist_per_chunk}"
                            f" after every {self.gist_every} of {self.num_prompt_tokens - self.key_start} instruction "
                            f"tokens{tail} ({expected} slots)")
        dtype = self.keys[0].dtype
        for i, t in enumerate([*self.keys, *self.values]):
            layer, kind = i % len(self.keys), "keys" if i < len(self.keys) else "values"
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != self.num_gist_tokens:
                raise GistError(f"layer {layer} {kind} have shape {tuple(t.shape)}: expected "
                                f"(1, kv_heads, {self.num_gist_tokens}, head_dim)")
            if t.dtype != dtype:
                raise GistError(f"layer {layer} {kind} are {dtype_name(t.dtype)}, layer 0 keys {dtype_name(dtype)}: "
                                f"all tensors of a cache share one dtype")

    @property
    def offset(self) -> int:
        """Rotary position of the first token after the gist: key_start + N (the prompt's length does not count)."""
        return self.key_start + self.num_gist_tokens

    @property
    def prefix_start(self) -> int:
        """Rotary position of the run's first fixed-prefix key in this cache: 0, or key_start - P for a
        prefix-mask run in the original positions (the prefix stays P+N before the input)."""
        return self.key_start - self.num_prompt_tokens if self.key_start and self.positions == "original" else 0

    @property
    def context_used(self) -> int:
        """Positions of the model's context the cache uses up: from its first key to the first input position.

        N under the paper's mask; F + N under the prefix mask in the compact positions (a plain
        prefix); P + N in the original positions, where the input reads the fixed prefix at the
        distance it had after the whole prompt.
        """
        return self.offset - self.prefix_start

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (the file adds a small JSON header)."""
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    @property
    def full_prompt_kv_bytes(self) -> int:
        """Bytes of the KV cache the uncompressed prompt (+ N gist positions) would take."""
        return self.nbytes // self.num_gist_tokens * (self.num_prompt_tokens + self.num_gist_tokens)

    @property
    def compression_ratio(self) -> float:
        return self.num_prompt_tokens / self.num_gist_tokens

    def metadata(self) -> dict[str, str]:
        """The string metadata written into the safetensors header, sealed (`sha256`, see `metadata_sha256`)."""
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "gistcache_version": __version__,
            "base_fingerprint": self.base_fingerprint,
            "run_fingerprint": self.run_fingerprint,
            "num_gist_tokens": str(self.num_gist_tokens),
            "position_free": "true",
            "key_start": str(self.key_start),
            "prefix_start": str(self.prefix_start),
            "positions": self.positions,
            "input_position": str(self.offset),
            "num_prompt_tokens": str(self.num_prompt_tokens),
            "prompt_sha256": self.prompt_sha256,
            "prompt_preview": self.prompt_preview,
            "template": self.template,
            "mask": self.mask,
            "dtype": dtype_name(self.dtype),
            "num_layers": str(self.num_layers),
            "key_shapes": json.dumps([list(t.shape) for t in self.keys]),
            "value_shapes": json.dumps([list(t.shape) for t in self.values]),
            "tensor_sha256": tensor_sha256(self.tensors()),
            "created": self.created,
        }
        if self.gist_every:  # a one-chunk cache is written as before gist_every existed, byte for byte
            meta.update(gist_every=str(self.gist_every), gist_per_chunk=str(self.gist_per_chunk))
        if self.raw_tail:
            meta[TAIL_FIELD] = str(self.raw_tail)
        return {**meta, SEAL: metadata_sha256(meta)}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"layers.{i}.keys"] = k
            out[f"layers.{i}.values"] = v
        return out

    def input_ids(self, placeholder_id: int = PLACEHOLDER_ID) -> torch.Tensor:
        """(1, key_start + N) placeholder ids that stand for the cached positions in a stock `generate` call.

        transformers slices them off before the first forward (the cache already holds those
        positions), so they are never embedded. Any id in the vocabulary works except the pad id,
        which `generate` would mask out when no attention mask is given.
        """
        return torch.full((1, self.offset), placeholder_id, dtype=torch.long)

    def to_dynamic_cache(self, model: GistModel | object, *, device: str | torch.device | None = None):
        """A transformers `DynamicCache` holding this cache as a plain prefix of key_start + N positions.

        `model` is the `GistModel` the cache belongs to (checked field by field; it supplies the
        config and, for prefix-mask runs, the fixed prefix's keys/values, which no cache file
        holds), or for a paper-mask cache a bare transformers config. The cache is built with the
        config, so sliding-window layers are set up as the model expects. Continue with
        `generate(input_ids=torch.cat([cache.input_ids(), ids], dim=1), past_key_values=...)` and
        no position ids: the input takes positions key_start + N onwards.
        """
        from transformers import DynamicCache  # deferred: transformers takes seconds to import

        if isinstance(model, GistModel):
            check_cache(model, self)
            layers = stack_layers(model, [self], device or model.device)
            config = model.config
        else:
            if self.key_start:
                raise GistError(f"this cache was made by a run trained with the {self.mask!r} mask: the keys/values "
                                f"of its {self.key_start} fixed-prefix tokens come from the run, not the file; pass "
                                f"the GistModel: cache.to_dynamic_cache(model)")
            layers = [(k.to(device or "cpu"), v.to(device or "cpu")) for k, v in zip(self.keys, self.values)]
            config = model
        return DynamicCache(ddp_cache_data=layers, config=config)


def stack_layers(model: GistModel, caches: list[GistCache],
                 device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (B, kv_heads, S, head_dim): `cached_slots` with the model's own fixed
    prefix (prefix mask only, F = 0 otherwise)."""
    prefix = model.prefix_kv()  # [(keys, values)] at positions 0..F-1; [] under the paper's mask
    return cached_slots(caches, prefix, model_inv_freq(model.stock_model) if prefix else None, device)


def cached_slots(caches: list[GistCache], prefix: list[tuple[torch.Tensor, torch.Tensor]],
                 inv_freq: torch.Tensor | None, device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first slots of a request, per layer (B, kv_heads, S, head_dim), one row per cache: the fixed
    prefix `prefix` (per layer (1, kv_heads, F, head_dim) at positions 0..F-1; [] when F = 0) turned to the
    cache's `prefix_start`, then its M gist slots. Caches of different M (chunked runs) are laid out
    [prefix F][zeros][gist M_b], S = F + the largest M; `slot_mask` says which slots are real. `generate`
    (through `stack_layers`) and a serving engine (the exported prefix, `gistcache.serving.export.served_kv`) both lay
    out a request with it."""
    width = max(c.num_gist_tokens for c in caches)
    kv = []
    for layer in range(caches[0].num_layers):
        keys = torch.cat([_left_pad_slots(c.keys[layer], width) for c in caches]).to(device)  # (B, kv_heads, M, hd)
        values = torch.cat([_left_pad_slots(c.values[layer], width) for c in caches]).to(device)
        if prefix:
            pk, pv = prefix[layer]  # (1, kv_heads, F, head_dim)
            pk = torch.cat([move_keys(pk, inv_freq, 0, inv_freq, c.prefix_start) for c in caches])  # (B, ...)
            keys = torch.cat([pk.to(device, keys.dtype), keys], dim=2)
            values = torch.cat([pv.to(device, values.dtype).expand(len(caches), -1, -1, -1), values], dim=2)
        kv.append((keys, values))
    return kv


def slot_mask(caches: list[GistCache], num_prefix_tokens: int) -> torch.Tensor:
    """(B, F + largest M) long: 1 on the real slots of `cached_slots`' layout, 0 on its padding."""
    width = max(c.num_gist_tokens for c in caches)
    return torch.tensor([[1] * num_prefix_tokens + [0] * (width - c.num_gist_tokens) + [1] * c.num_gist_tokens
                         for c in caches], dtype=torch.long)


def _left_pad_slots(t: torch.Tensor, width: int) -> torch.Tensor:
    """(1, kv_heads, M, head_dim) -> (1, kv_heads, width, head_dim), zeros before the M slots."""
    missing = width - t.shape[2]
    return t if not missing else torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)
