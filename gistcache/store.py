"""A content-keyed folder of gist caches: compressing the same prompt twice is a lookup.

The key is a SHA-256 over canonical JSON of everything that decides the cache's content::

    {"base_fingerprint": ..., "num_gist_tokens": N, "prompt_sha256": ..., "run_fingerprint": ..., "template": ...}

(sorted keys, no spaces; never Python's `hash`, which changes between processes). Each entry is
`STORE/<key>.safetensors`, an ordinary cache file. A lookup touches the file's modification time,
which is what `prune` orders by: least recently used first. There is no index to go stale;
listing reads only the safetensors headers.

The folder is `--store DIR`, else `$GISTCACHE_HOME`, else `$XDG_CACHE_HOME/gistcache`, else
`~/.cache/gistcache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gistcache._io import sha256_text
from gistcache.cache import FORMAT_VERSION, GistCache, load_cache, read_cache_metadata, save_cache
from gistcache.compression import compress
from gistcache.errors import GistError
from gistcache.identity import ModelIdentity, check_cache, model_identity
from gistcache.model import GistModel

SUFFIX = ".safetensors"


def default_store_dir() -> Path:
    if os.environ.get("GISTCACHE_HOME"):
        return Path(os.environ["GISTCACHE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gistcache"


def cache_key(base_fingerprint: str, run_fingerprint: str, template: str, num_gist_tokens: int,
              prompt_sha256: str) -> str:
    """SHA-256 (hex) of the canonical JSON of what determines a cache."""
    fields = {"base_fingerprint": base_fingerprint, "run_fingerprint": run_fingerprint, "template": template,
              "num_gist_tokens": int(num_gist_tokens), "prompt_sha256": prompt_sha256}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def key_of(cache: GistCache) -> str:
    return cache_key(cache.base_fingerprint, cache.run_fingerprint, cache.template, cache.num_gist_tokens,
                     cache.prompt_sha256)


@dataclass
class StoreEntry:
    """One cache in the store, as `gist cache ls` shows it (read from the header only)."""

    key: str
    path: Path
    prompt_preview: str
    prompt_sha256: str
    num_prompt_tokens: int
    num_gist_tokens: int
    bytes: int
    created: str
    last_used: float  # file mtime, seconds since the epoch

    def to_dict(self) -> dict:
        return {"key": self.key, "path": str(self.path), "prompt_preview": self.prompt_preview,
                "prompt_sha256": self.prompt_sha256, "num_prompt_tokens": self.num_prompt_tokens,
                "num_gist_tokens": self.num_gist_tokens, "bytes": self.bytes, "created": self.created,
                "last_used": self.last_used}


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


class CacheStore:
    """A folder of `<key>.safetensors` gist caches."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        if self.root.exists() and not self.root.is_dir():
            raise GistError(f"cache store {self.root} is a file: give a folder with --store or GISTCACHE_HOME")

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str, model: GistModel | None = None) -> GistCache | None:
        """The cache under `key` (its use time touched), or None when absent or unreadable."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            cache = load_cache(path, model)
        except GistError:
            return None  # a damaged entry is a miss; the next put replaces it
        try:
            os.utime(path)  # last use, for prune
        except OSError:
            pass
        return cache

    def put(self, cache: GistCache) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return save_cache(cache, self.path_for(key_of(cache)))

    def entries(self) -> list[StoreEntry]:
        """Every readable cache in the store, most recently used first."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                # a version 1 entry is listed, pruned and removed like any; a lookup misses it and replaces it
                meta = read_cache_metadata(path, versions=(1, FORMAT_VERSION))
                st = path.stat()
                out.append(StoreEntry(key=path.name[:-len(SUFFIX)], path=path,
                                      prompt_preview=meta.get("prompt_preview", ""),
                                      prompt_sha256=meta["prompt_sha256"],
                                      num_prompt_tokens=int(meta["num_prompt_tokens"]),
                                      num_gist_tokens=int(meta["num_gist_tokens"]), bytes=st.st_size,
                                      created=meta.get("created", ""), last_used=st.st_mtime))
            except (GistError, ValueError, OSError):
                continue  # not ours or damaged: ls shows only usable entries
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def resolve(self, prefix: str) -> Path:
        """The one entry whose key starts with `prefix`; refuse none or several."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix.lower()):
            raise GistError(f"cache key {prefix!r} is not a hex key: copy it from `gist cache ls`")
        matches = sorted(self.root.glob(f"{prefix.lower()}*{SUFFIX}")) if self.root.is_dir() else []
        if not matches:
            raise GistError(f"no cache in {self.root} has a key starting with {prefix!r}: see `gist cache ls`")
        if len(matches) > 1:
            raise GistError(f"cache key prefix {prefix!r} matches {len(matches)} caches: give more characters")
        return matches[0]

    def remove(self, prefixes: list[str]) -> list[str]:
        """Delete the entries named by key prefixes; all are resolved before anything is deleted."""
        if not prefixes:
            raise GistError("give at least one cache key (or a unique prefix) to remove: see `gist cache ls`")
        paths = [self.resolve(p) for p in prefixes]
        removed = []
        for path in dict.fromkeys(paths):
            path.unlink(missing_ok=True)
            removed.append(path.name[:-len(SUFFIX)])
        return removed

    def prune(self, max_bytes: int) -> list[StoreEntry]:
        """Remove least-recently-used entries until the store holds at most `max_bytes`; return them."""
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise GistError(f"--max-bytes must be a whole number >= 0, got {max_bytes!r}")
        entries = sorted(self.entries(), key=lambda e: e.last_used)  # oldest use first
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= max_bytes:
                break
            entry.path.unlink(missing_ok=True)
            total -= entry.bytes
            removed.append(entry)
        return removed

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())


def compress_cached(model: GistModel, instructions: str | list[str], store: CacheStore, *,
                    batch_size: int = 8) -> list[CompressResult]:
    """Look each instruction up in `store`; compress the misses in batches and store them."""
    texts = [instructions] if isinstance(instructions, str) else list(instructions)
    if not texts:
        raise GistError("no instructions to compress: give at least one")
    identity: ModelIdentity = model_identity(model)
    keys = [cache_key(identity.base_fingerprint, identity.run_fingerprint, identity.template, model.num_gist_tokens,
                      sha256_text(t)) for t in texts]
    found: dict[str, GistCache | None] = {}
    for key in dict.fromkeys(keys):
        cache = store.get(key)
        if cache is not None and cache.dtype != model.model.dtype:
            cache = None  # the key has no dtype: a cache made in another dtype is recompressed and replaced
        if cache is not None:
            check_cache(model, cache, identity=identity, source=f"stored cache {key[:12]}")
        found[key] = cache
    hits = {key for key, cache in found.items() if cache is not None}
    misses = [i for i, key in enumerate(keys) if key not in hits]
    first_miss = list(dict.fromkeys(keys[i] for i in misses))
    miss_texts = [texts[keys.index(k)] for k in first_miss]
    if miss_texts:
        for key, cache in zip(first_miss, compress(model, miss_texts, batch_size=batch_size)):
            assert key_of(cache) == key, "store key and cache fields disagree"
            store.put(cache)
            found[key] = cache
    return [CompressResult(cache=found[k], key=k, path=store.path_for(k), hit=k in hits) for k in keys]

