"""`compress_cached`: compress through a store, so compressing the same prompt twice is a lookup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gistcache._io import sha256_text
from gistcache.cache import GistCache
from gistcache.cache.identity import ModelIdentity, check_cache, model_identity
from gistcache.config import dtype_name
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import GistModel
from gistcache.store.folder import CacheStore
from gistcache.store.keys import Wanted, key_of


@dataclass
class CompressResult:
    """A cache from `compress_cached`: where it lives in the store and whether it was already there."""

    cache: GistCache
    key: str
    path: Path
    hit: bool

    def summary(self, path: str | Path | None = None) -> dict:
        """What `gist compress` reports: sizes and ratios, read from the file at `path` (default: the store entry)."""
        path = self.path if path is None else Path(path)
        c, size = self.cache, path.stat().st_size
        return {"key": self.key, "store": "hit" if self.hit else "compressed", "path": str(path),
                "prompt_preview": c.prompt_preview, "prompt_tokens": c.num_prompt_tokens,
                "gist_tokens": c.num_gist_tokens, "compression_ratio": round(c.compression_ratio, 2),
                "bytes_on_disk": size, "full_prompt_kv_bytes": c.full_prompt_kv_bytes,
                "bytes_ratio": round(c.full_prompt_kv_bytes / size, 2), "key_start": c.key_start,
                "input_position": c.offset, "context_used": c.context_used}


def compress_cached(model: GistModel, instructions: str | list[str], store: CacheStore, *,
                    batch_size: int = 8) -> list[CompressResult]:
    """Look each instruction up in `store`; compress the misses in batches and store them (with their text)."""
    texts = [instructions] if isinstance(instructions, str) else list(instructions)
    if not texts:
        raise GistError("no instructions to compress: give at least one")
    store.check_claimable()  # a folder that is not a store is refused before any work
    identity: ModelIdentity = model_identity(model)
    dtype = dtype_name(model.model.dtype)  # what compress makes: the weights' dtype
    wanted = [Wanted.of(identity, model.num_gist_tokens, sha256_text(t), dtype) for t in texts]
    keys = [w.key for w in wanted]
    found: dict[str, GistCache | None] = {}
    for key, want in dict(zip(keys, wanted)).items():
        cache = store.get(key, wanted=want)
        if cache is not None:
            check_cache(model, cache, identity=identity, source=f"stored cache {key[:12]}")
        found[key] = cache
    hits = {key for key, cache in found.items() if cache is not None}
    misses = [i for i, key in enumerate(keys) if key not in hits]
    first_miss = list(dict.fromkeys(keys[i] for i in misses))
    miss_texts = [texts[keys.index(k)] for k in first_miss]
    if miss_texts:
        for key, text, cache in zip(first_miss, miss_texts, compress(model, miss_texts, batch_size=batch_size)):
            assert key_of(cache) == key, "store key and cache fields disagree"
            store.put(cache, text)
            found[key] = cache
    return [CompressResult(cache=found[k], key=k, path=store.path_for(k), hit=k in hits) for k in keys]
