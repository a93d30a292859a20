"""Naming a gist cache in a vLLM request, without vLLM: resolve a key or file, build the prompt and its params.

A request that is answered from a gist cache is, for the engine, an ordinary prompt of token ids:
F+N placeholders (`GistCache.input_ids()`) and the templated input (`gistcache.serving.export.request_ids`),
with `kv_transfer_params = {"gist_cache": KEY_OR_FILE}`, which tells the connector
(`gistcache.vllm.connector`) to fill the placeholders' KV slots from the cache, and `cache_salt =
KEY`, so vLLM's prefix cache never shares blocks between two caches (their placeholder ids are the
same). `GistRequests` builds both for Python callers; `gist serve` does it for HTTP requests.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

from gistcache.cache import GistCache, load_cache
from gistcache.errors import GistError
from gistcache.serving.export import ExportInfo, check_served_cache, read_export, request_ids
from gistcache.store import CacheStore, key_of, legacy_key_of

CONNECTOR = "GistConnector"
CONNECTOR_MODULE = "gistcache.vllm.connector"
PARAM = "gist_cache"  # the kv_transfer_params entry naming the cache
_KEY = re.compile(r"[0-9a-f]{6,64}")


def kv_transfer_config(export_dir: str | Path, store: str | Path | None = None, *, allow_files: bool = True) -> dict:
    """The `kv_transfer_config` (as a dict: `LLM(kv_transfer_config=...)`, `--kv-transfer-config JSON`) that
    installs the gist connector for an exported folder."""
    extra = {"export_dir": str(Path(export_dir).resolve()), "allow_files": allow_files}
    if store is not None:
        extra["store"] = str(Path(store).expanduser().resolve())
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_consumer",
            "kv_load_failure_policy": "fail", "kv_connector_extra_config": extra}


class CacheResolver:
    """Turns the `gist_cache` entry of a request (a store key, a unique key prefix, or a cache file) into the
    checked cache, its store key and its file. Caches read are kept (by file, size and mtime), up to `keep`."""

    def __init__(self, info: ExportInfo, store: CacheStore, *, allow_files: bool = True, keep: int = 256):
        self.info, self.store, self.allow_files, self.keep = info, store, allow_files, keep
        self._read: OrderedDict[tuple, tuple[GistCache, str]] = OrderedDict()

    def __call__(self, ref: object) -> tuple[GistCache, str, Path]:
        if not isinstance(ref, str) or not ref:
            raise GistError(f"kv_transfer_params.{PARAM} must be a cache key (see `gist cache ls`) or a cache file, "
                            f"got {ref!r}")
        if _KEY.fullmatch(ref.lower()):
            path = self.store.resolve(ref)
        elif not self.allow_files:
            raise GistError(f"{PARAM} {ref[:80]!r} is not a cache key: this server takes store keys only "
                            f"(`gist compress ... --store {self.store.root}` prints them)")
        else:
            path = Path(ref)
            if not path.is_file():
                raise GistError(f"{PARAM} {ref[:80]!r} is neither a cache key in {self.store.root} nor a cache file")
        stat = path.stat()
        tag = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if tag in self._read:
            self._read.move_to_end(tag)
            cache, key = self._read[tag]
            return cache, key, path
        cache = load_cache(path)  # format, metadata and tensor SHA-256 checked
        check_served_cache(self.info, cache, source=f"cache {ref[:64]}")
        key = key_of(cache)
        name = path.name.split(".")[0]
        # an entry a store kept since before its keys named the dtype is named by its old key (`legacy_key`): it
        # is that prompt's cache, served under its key now (a `gist compress --store` lookup moves it there)
        if _KEY.fullmatch(ref.lower()) and name not in (key, legacy_key_of(cache)):
            # an entry copied or renamed under another key holds another prompt's cache: never serve it for this one
            raise GistError(f"store entry {path.name} holds the cache of key {key[:12]}, not its own: it was copied "
                            f"or renamed; compress the prompt again")
        self._read[tag] = (cache, key)
        while len(self._read) > self.keep:
            self._read.popitem(last=False)
        return cache, key, path


class GistRequests:
    """Prompts for an engine serving an exported folder: `prompt(ref, text)` is a vLLM `TokensPrompt` (a dict)
    and `params(ref)` the `kv_transfer_params` to put in `SamplingParams(extra_args={"kv_transfer_params": ...})`.
    """

    def __init__(self, export_dir: str | Path, store: str | Path | None = None, *, tokenizer=None):
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

        from gistcache.model import add_gist_token

        self.export_dir = Path(export_dir)
        self.info = read_export(export_dir)
        self.store = CacheStore(store)
        self.tokenizer = tokenizer or add_gist_token(AutoTokenizer.from_pretrained(self.export_dir))
        self.resolve = CacheResolver(self.info, self.store)

    def prompt(self, ref: str | os.PathLike, text: str) -> dict:
        cache, key, _ = self.resolve(str(ref))
        return {"prompt_token_ids": request_ids(self.tokenizer, self.info.identity.template, cache, text),
                "cache_salt": key}

    @staticmethod
    def params(ref: str | os.PathLike) -> dict:
        return {PARAM: str(ref)}
