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

from gistcache.store.compress import CompressResult, compress_cached
from gistcache.store.files import (EXPORTS_DIR, MARKER, PROMPT_SUFFIX, STORE_FORMAT, SUFFIX, StoreEntry,
                                   default_store_dir)
from gistcache.store.folder import CacheStore
from gistcache.store.keys import Wanted, cache_key, key_of, legacy_key, legacy_key_of

__all__ = ["EXPORTS_DIR", "MARKER", "PROMPT_SUFFIX", "STORE_FORMAT", "SUFFIX", "CacheStore", "CompressResult",
           "StoreEntry", "Wanted", "cache_key", "compress_cached", "default_store_dir", "key_of", "legacy_key",
           "legacy_key_of"]
