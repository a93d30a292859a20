"""`CacheStore`: a folder of `<key>.safetensors` gist caches; lookups, writes, listing, rm and prune."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from gistcache._io import atomic_write_text, sha256_text
from gistcache.cache import FORMAT_VERSION, GistCache, load_cache, read_cache_metadata, save_cache
from gistcache.cache.identity import check_cache
from gistcache.errors import GistError
from gistcache.model import GistModel
from gistcache.store.files import (_KEY, _OWN, _OWN_TMP, EXPORTS_DIR, MARKER, PROMPT_SUFFIX, STORE_FORMAT, SUFFIX,
                                   StoreEntry, _regular, default_store_dir)
from gistcache.store.keys import Wanted, key_of, legacy_key_of


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
        if legacy_key_of(cache) != old:
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
            path = self.prompt_path(legacy_key_of(cache))
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
