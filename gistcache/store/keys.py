"""A store entry's key: SHA-256 over canonical JSON of everything that decides the cache's content, and what
a lookup asks for (`Wanted`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from gistcache.cache import GistCache
from gistcache.cache.identity import ModelIdentity
from gistcache.config import dtype_name


def cache_key(base_fingerprint: str, run_fingerprint: str, template: str, num_gist_tokens: int,
              prompt_sha256: str, dtype: str) -> str:
    """SHA-256 (hex) of the canonical JSON of what determines a cache; `dtype` by its name ("float32")."""
    return _sha256_json({"base_fingerprint": base_fingerprint, "run_fingerprint": run_fingerprint,
                         "template": template, "num_gist_tokens": int(num_gist_tokens),
                         "prompt_sha256": prompt_sha256, "dtype": dtype})


def legacy_key(base_fingerprint: str, run_fingerprint: str, template: str, num_gist_tokens: int,
               prompt_sha256: str) -> str:
    """The key of a store entry written before the key held the dtype (a lookup moves it, `CacheStore.get`)."""
    return _sha256_json({"base_fingerprint": base_fingerprint, "run_fingerprint": run_fingerprint,
                         "template": template, "num_gist_tokens": int(num_gist_tokens),
                         "prompt_sha256": prompt_sha256})


def _sha256_json(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def key_of(cache: GistCache) -> str:
    # the run's N (per chunk): a chunked run's M follows from the prompt, and its ratio from the run fingerprint
    return cache_key(cache.base_fingerprint, cache.run_fingerprint, cache.template, cache.gist_per_chunk,
                     cache.prompt_sha256, dtype_name(cache.dtype))


def legacy_key_of(cache: GistCache) -> str:
    """The key `cache` had in a store written before the key held the dtype (`legacy_key`)."""
    return legacy_key(cache.base_fingerprint, cache.run_fingerprint, cache.template, cache.num_gist_tokens,
                      cache.prompt_sha256)


@dataclass(frozen=True)
class Wanted:
    """What a lookup asks for: the key's fields, and the mask and positions a cache of the model must have."""

    base_fingerprint: str
    run_fingerprint: str
    template: str
    num_gist_tokens: int
    prompt_sha256: str
    mask: str
    positions: str
    dtype: str  # its name: "float32", "bfloat16", ...

    @classmethod
    def of(cls, identity: ModelIdentity, num_gist_tokens: int, prompt_sha256: str, dtype: str) -> Wanted:
        return cls(identity.base_fingerprint, identity.run_fingerprint, identity.template, num_gist_tokens,
                   prompt_sha256, identity.mask, identity.positions, dtype)

    @property
    def key(self) -> str:
        return cache_key(self.base_fingerprint, self.run_fingerprint, self.template, self.num_gist_tokens,
                         self.prompt_sha256, self.dtype)

    @property
    def legacy_key(self) -> str:
        return legacy_key(self.base_fingerprint, self.run_fingerprint, self.template, self.num_gist_tokens,
                          self.prompt_sha256)

    def mismatch(self, cache: GistCache) -> str | None:
        """The first field of `cache` that is not the one asked for, or None."""
        for name in ("prompt_sha256", "base_fingerprint", "run_fingerprint", "num_gist_tokens", "template", "mask",
                     "positions"):
            held = cache.gist_per_chunk if name == "num_gist_tokens" else getattr(cache, name)  # N, as the key
            if held != getattr(self, name):
                return name
        return None if dtype_name(cache.dtype) == self.dtype else "dtype"
