"""A content-keyed folder of gist caches: compressing the same prompt twice is a lookup.

The key is a SHA-256 over canonical JSON of everything that decides the cache's content::

    {"base_fingerprint": ..., "dtype": "bfloat16", "num_gist_tokens": N, "prompt_sha256": ..., "run_fingerprint": ...,
     "template": ...}

(sorted keys, no spaces; never Python's `hash`, which changes between processes). The run
fingerprint covers the run's mask and positions (its config.json), so they need no place of their
own in the key; the dtype has one, so a float32 and a bfloat16 user of one store keep an entry each.
An entry keyed before the dtype was (`legacy_key`) is moved under its key on the first lookup that
asks for its prompt. A store folder holds only what it made::

    STORE/.gistcache-store          the marker, written when the store is created
    STORE/<key>.safetensors         an entry: an ordinary cache file
    STORE/<key>.prompt.txt          the instruction it was compressed from (for `gist cache verify`)
    STORE/exports/                  exported runs (`gist serve`)

A lookup checks that the entry's own fields are the ones asked for (prompt SHA-256, both
fingerprints, N, template, mask, positions): an entry that holds another prompt's cache (copied or
renamed under the wrong key), or that cannot be read, is a miss, and is removed. A hit touches the
file's modification time, which is what `prune` orders by: least recently used first. There is no
index to go stale; listing reads only the safetensors headers.

`remove` and `prune` delete only in a folder that carries the marker, only regular files named
`<64 hex digits>.safetensors` or `.prompt.txt`, and never follow a symbolic link. A folder that
holds anything else is never made a store: `put` refuses it (so `gist compress --store RUN` cannot
turn a run folder into one). A store made before the marker existed (only entries in it) is marked
on its next `put`, or by `adopt` (`gist cache adopt`); until then `gist cache ls` lists it and
`rm`/`prune` refuse it with that command.

The folder is `--store DIR`, else `$GISTCACHE_HOME`, else `$XDG_CACHE_HOME/gistcache`, else
`~/.cache/gistcache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gistcache._io import atomic_write_text, sha256_text
from gistcache.cache import FORMAT_VERSION, GistCache, load_cache, read_cache_metadata, save_cache
from gistcache.compression import compress
from gistcache.config import dtype_name
from gistcache.errors import GistError
from gistcache.identity import ModelIdentity, check_cache, model_identity
from gistcache.model import GistModel

SUFFIX = ".safetensors"
PROMPT_SUFFIX = ".prompt.txt"
MARKER = ".gistcache-store"
STORE_FORMAT = "gistcache-store"
EXPORTS_DIR = "exports"  # `gist serve` exports runs here
_KEY = re.compile(r"[0-9a-f]{64}")
_OWN = re.compile(r"([0-9a-f]{64})(\.safetensors|\.prompt\.txt)")  # the only names rm and prune touch
_OWN_TMP = re.compile(r"\.[0-9a-f]{64}(\.safetensors|\.prompt\.txt)\.tmp-[0-9]+")  # a write cut short


def default_store_dir() -> Path:
    if os.environ.get("GISTCACHE_HOME"):
        return Path(os.environ["GISTCACHE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gistcache"


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
    readable: bool = True  # False: a damaged entry (prune still reaches it; ls does not show it)

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


def _regular(path: Path) -> os.stat_result | None:
    """The file's own status when it is a regular file (a symbolic link is never followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


class CacheStore:
    """A folder of `<key>.safetensors` gist caches, marked as a store by its `.gistcache-store` file."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        if self.root.exists() and not self.root.is_dir():
            raise GistError(f"cache store {self.root} is a file: give a folder with --store or GISTCACHE_HOME")

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise GistError(f"{str(key)[:80]!r} is not a cache key (64 hex digits): see `gist cache ls`")
        return self.root / f"{key}{SUFFIX}"

    def prompt_path(self, key: str) -> Path:
        return self.path_for(key).with_name(f"{key}{PROMPT_SUFFIX}")

    # --- the marker ---------------------------------------------------------------------------------

    def is_marked(self) -> bool:
        """Whether the folder carries the store marker (a regular file naming the store format)."""
        marker = self.root / MARKER
        if _regular(marker) is None:
            return False
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("format") == STORE_FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def foreign(self) -> list[str]:
        """Names in the folder that a store does not hold (none for a store, or a folder not made yet)."""
        if not self.root.is_dir():
            return []
        out = []
        with os.scandir(self.root) as it:
            for entry in it:
                own = _OWN.fullmatch(entry.name) or _OWN_TMP.fullmatch(entry.name) or entry.name == MARKER
                if not (own and entry.is_file(follow_symlinks=False)) and not (
                        entry.name == EXPORTS_DIR and entry.is_dir(follow_symlinks=False)):
                    out.append(entry.name)
        return sorted(out)

    def check_claimable(self) -> None:
        """Refuse, before any work, a folder that is not a store and holds other files: it never becomes one."""
        if self.is_marked():
            return
        foreign = self.foreign()
        if foreign:
            raise GistError(f"--store {self.root} is not a gist cache store and holds other files ({foreign[0]!r}"
                            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): give a new or empty "
                            f"folder")

    def claim(self) -> None:
        """Create the store (its folder and marker), or mark a folder that holds only store files."""
        if self.is_marked():
            return
        self.check_claimable()
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / MARKER, json.dumps(
            {"format": STORE_FORMAT, "version": 1, "created": datetime.now(timezone.utc).isoformat(
                timespec="seconds")}) + "\n")

    def adopt(self) -> bool:
        """Mark a store made before the marker existed; False when it was marked already."""
        if not self.root.is_dir():
            raise GistError(f"cache store {self.root} does not exist: nothing to adopt")
        if self.is_marked():
            return False
        self.claim()
        return True

    def _check_marked(self, verb: str) -> None:
        if self.root.is_dir() and not self.is_marked():
            raise GistError(f"{self.root} is not marked as a gist cache store (no {MARKER} file), so `gist cache "
                            f"{verb}` deletes nothing there; if it is a store made by an older gistcache, adopt it "
                            f"first: gist cache adopt --store {self.root}")

    # --- entries -------------------------------------------------------------------------------------

    def _own(self) -> Iterator[tuple[str, str, os.DirEntry]]:
        """(key, suffix, entry) for every regular file named by the store's own pattern (links skipped)."""
        if not self.root.is_dir():
            return
        with os.scandir(self.root) as it:
            for entry in it:
                m = _OWN.fullmatch(entry.name)
                if m and entry.is_file(follow_symlinks=False):
                    yield m.group(1), m.group(2), entry

    def _unlink(self, path: Path) -> None:
        """Delete `path` only when it is a regular file of the store named by its pattern (never a link's target)."""
        if path.parent != self.root or not _OWN.fullmatch(path.name) or _regular(path) is None:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _discard(self, key: str) -> None:
        """Remove a bad entry (a lookup's miss); a store that cannot be written keeps it."""
        try:
            self._unlink(self.path_for(key))
        except OSError:
            pass

    def get(self, key: str, model: GistModel | None = None, *, wanted: Wanted | None = None) -> GistCache | None:
        """The cache under `key` (its use time touched), or None when absent, unreadable or not the cache the key
        names (its own fields, and `wanted`'s mask and positions, are checked); such an entry is removed.

        With `model`, a cache that does not fit it is a miss too, but stays.
        """
        path = self.path_for(key)
        if _regular(path) is None and wanted is not None:
            self._move_legacy(wanted.legacy_key)
        if _regular(path) is None:
            return None  # absent, or a link: never read as an entry
        try:
            cache = load_cache(path)
        except (GistError, OSError):
            self._discard(key)  # damaged, or of an older format: the next put replaces it
            return None
        if key_of(cache) != key or (wanted is not None and (wanted.key != key or wanted.mismatch(cache))):
            self._discard(key)  # another prompt's or run's cache under this key
            return None
        if model is not None:
            try:
                check_cache(model, cache, source=f"stored cache {key[:12]}")
            except GistError:
                return None
        try:
            os.utime(path)  # last use, for prune
        except OSError:
            pass
        return cache

    def _move_legacy(self, old: str) -> None:
        """Move the entry that a store written before the key held the dtype kept under `old` (and its prompt) to
        its key now; one that cannot be read is removed, one that cannot be moved (a read-only store) stays."""
        path = self.path_for(old)
        if _regular(path) is None:
            return
        try:
            cache = load_cache(path)
        except (GistError, OSError):
            self._discard(old)
            return
        if legacy_key(cache.base_fingerprint, cache.run_fingerprint, cache.template, cache.num_gist_tokens,
                      cache.prompt_sha256) != old:
            self._discard(old)  # another prompt's cache under this name
            return
        new = key_of(cache)
        try:
            if _regular(self.prompt_path(old)) is not None:
                os.replace(self.prompt_path(old), self.prompt_path(new))
            os.replace(path, self.path_for(new))
        except OSError:
            pass

    def put(self, cache: GistCache, prompt: str | None = None) -> Path:
        """Store `cache` under its key (creating the store), with the instruction it was made from when given."""
        self.claim()
        key = key_of(cache)
        path = save_cache(cache, self.path_for(key))
        if prompt is not None:
            if sha256_text(prompt) != cache.prompt_sha256:
                raise GistError("the prompt given to store beside a cache is not the one it was compressed from")
            atomic_write_text(self.prompt_path(key), prompt)
        return path

    def prompt_for(self, cache: GistCache) -> str | None:
        """The instruction `cache` was compressed from, when this store kept it (checked by its SHA-256)."""
        path = self.prompt_path(key_of(cache))
        if _regular(path) is None:  # an entry kept since before the key held the dtype
            path = self.prompt_path(legacy_key(cache.base_fingerprint, cache.run_fingerprint, cache.template,
                                               cache.num_gist_tokens, cache.prompt_sha256))
        if _regular(path) is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return text if sha256_text(text) == cache.prompt_sha256 else None

    def entries(self, *, unreadable: bool = False) -> list[StoreEntry]:
        """Every readable cache in the store, most recently used first (with `unreadable`, the damaged ones too)."""
        out = []
        for key, suffix, item in self._own():
            if suffix != SUFFIX:
                continue
            path = self.root / item.name
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            try:
                # a version 1 entry, or one from before the seal, is listed, pruned and removed like any; a
                # lookup misses it and replaces it
                meta = read_cache_metadata(path, versions=(1, FORMAT_VERSION))
                out.append(StoreEntry(key=key, path=path, prompt_preview=meta.get("prompt_preview", ""),
                                      prompt_sha256=meta["prompt_sha256"],
                                      num_prompt_tokens=int(meta["num_prompt_tokens"]),
                                      num_gist_tokens=int(meta["num_gist_tokens"]), bytes=st.st_size,
                                      created=meta.get("created", ""), last_used=st.st_mtime))
            except (GistError, OSError):
                if unreadable:
                    out.append(StoreEntry(key=key, path=path, prompt_preview="(damaged)", prompt_sha256="",
                                          num_prompt_tokens=0, num_gist_tokens=0, bytes=st.st_size, created="",
                                          last_used=st.st_mtime, readable=False))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def resolve(self, prefix: str) -> Path:
        """The one entry whose key starts with `prefix`; refuse none or several."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix.lower()):
            raise GistError(f"cache key {prefix!r} is not a hex key: copy it from `gist cache ls`")
        prefix = prefix.lower()
        matches = sorted(self.root / item.name for key, suffix, item in self._own()
                         if suffix == SUFFIX and key.startswith(prefix))
        if not matches:
            raise GistError(f"no cache in {self.root} has a key starting with {prefix!r}: see `gist cache ls`")
        if len(matches) > 1:
            raise GistError(f"cache key prefix {prefix!r} matches {len(matches)} caches: give more characters")
        return matches[0]

    def remove(self, prefixes: list[str]) -> list[str]:
        """Delete the entries named by key prefixes (and their prompts); all are resolved before anything is deleted."""
        if not prefixes:
            raise GistError("give at least one cache key (or a unique prefix) to remove: see `gist cache ls`")
        self._check_marked("rm")
        paths = [self.resolve(p) for p in prefixes]
        removed = []
        for path in dict.fromkeys(paths):
            key = path.name[:-len(SUFFIX)]
            self._unlink(path)
            self._unlink(self.prompt_path(key))
            removed.append(key)
        return removed

    def prune(self, max_bytes: int) -> list[StoreEntry]:
        """Remove least-recently-used entries (damaged ones included) until the cache files take at most
        `max_bytes`, and prompts left without their cache; return the entries removed."""
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise GistError(f"--max-bytes must be a whole number >= 0, got {max_bytes!r}")
        self._check_marked("prune")
        entries = sorted(self.entries(unreadable=True), key=lambda e: e.last_used)  # oldest use first
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= max_bytes:
                break
            self._unlink(entry.path)
            self._unlink(self.prompt_path(entry.key))
            total -= entry.bytes
            removed.append(entry)
        caches = {key for key, suffix, _ in self._own() if suffix == SUFFIX}
        for key, suffix, item in list(self._own()):
            if suffix == PROMPT_SUFFIX and key not in caches:
                self._unlink(self.root / item.name)
        return removed

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries(unreadable=True))


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
