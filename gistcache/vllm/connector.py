"""`GistConnector`: a vLLM KV connector that answers requests from gist caches.

A request naming a cache (`kv_transfer_params = {"gist_cache": KEY_OR_FILE}`) starts with F+N
placeholder ids (see requests.py). The connector tells vLLM's scheduler that those F+N tokens are
already computed, and before the forward pass that computes the input it writes the cache's keys
and values into the KV blocks vLLM allocated for them, layer by layer, with the attention
backend's own cache writer (`impl.do_kv_cache_update`, what the backend runs for computed tokens),
so the layout is whatever the backend in use keeps. The slots are `gistcache.serving.export.served_kv`:
the run's fixed prefix (prefix mask only) turned to the cache's `prefix_start`, then the gist,
keys already rotated, exactly as `generate` lays them out. vLLM gives the input positions F+N..,
as `generate` does, and never re-rotates cached keys.

    scheduler side   get_num_new_matched_tokens: resolve + check the cache -> F+N - locally cached tokens
                     build_connector_meta: the block ids of each request to fill (or to fail)
    worker side      start_load_kv: write the slots [start, F+N) of each request into its blocks

A request whose cache cannot be used (unknown key, another model or run, a malformed entry, a
cache_salt that is not the cache's key, a prompt that does not start with the placeholders) is
failed alone: its blocks are reported as failed loads, and with `kv_load_failure_policy="fail"`
vLLM finishes that request with an error while the others go on. The reason is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                 KVConnectorRole)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from gistcache.cache import PLACEHOLDER_ID, load_cache
from gistcache.errors import GistError
from gistcache.serving.export import read_export, read_prefix_kv, served_kv
from gistcache.store import CacheStore, key_of
from gistcache.vllm.requests import PARAM, CacheResolver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)


@dataclass
class Plan:
    """One request's slots to fill: positions [start, stop) from the cache file at `path`; or `error`."""

    path: str | None
    start: int
    stop: int
    error: str | None = None
    key: str | None = None  # the cache's store key, as checked: the worker loads only a file that still holds it


@dataclass
class Load:
    req_id: str
    path: str | None
    slots: list[int]  # vLLM slot (block_id * block_size + offset) of each position in [start, stop)
    start: int
    stop: int
    block_ids: list[int]  # the blocks holding those slots (reported as failed when `error` is set)
    error: str | None = None
    key: str | None = None


@dataclass
class GistConnectorMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


class GistConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.export_dir = Path(extra.get("export_dir") or vllm_config.model_config.model)
        self.info = read_export(self.export_dir)
        self.block_size = vllm_config.cache_config.block_size
        self.dtype = vllm_config.model_config.dtype  # keys/values as the model computes them; the writer casts
        self.resolve = CacheResolver(self.info, CacheStore(extra.get("store")),
                                     allow_files=bool(extra.get("allow_files", True)))
        self._plans: dict[str, Plan] = {}  # scheduler: requests to load, by request id
        self._slots: dict[str, list] | None = None  # worker: served slots per cache file
        self._prefix = None
        self._failed_blocks: set[int] = set()

    # ---- scheduler side -------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if not params or PARAM not in params:
            self._plans.pop(request.request_id, None)
            return 0, False
        stop = self.info.num_cached  # F + N; a chunked run's cache names its own F + M below
        plan = Plan(path=None, start=num_computed_tokens, stop=stop)
        try:
            plan.path, stop, plan.key = self._check(request)
            plan.stop = stop
        except GistError as exc:
            plan.error = str(exc)
        except Exception as exc:  # a damaged request must not take the engine down
            plan.error = f"{type(exc).__name__}: {exc}"
        if plan.error is None and num_computed_tokens >= stop:
            self._plans.pop(request.request_id, None)
            return 0, False  # vLLM's prefix cache already holds the slots (same cache: same salt)
        plan.start = min(num_computed_tokens, stop)
        self._plans[request.request_id] = plan
        return stop - plan.start, False

    def _check(self, request: "Request") -> tuple[str, int, str]:
        """(cache file, F + M slots it fills, its key) of a request, after every check; a GistError names what is
        wrong."""
        params = request.kv_transfer_params
        if not isinstance(params, dict):
            raise GistError(f"kv_transfer_params must be an object such as {{\"{PARAM}\": KEY}}, got {params!r}")
        cache, key, path = self.resolve(params[PARAM])
        n = cache.offset  # F + M: M = N for one chunk, N * ceil(P / K) for a chunked run
        ids = list(request.prompt_token_ids or [])
        if len(ids) <= n or any(t != PLACEHOLDER_ID for t in ids[:n]):
            raise GistError(f"a request from a gist cache starts with {n} placeholder ids ({PLACEHOLDER_ID}) and "
                            f"then the input: build it with GistRequests.prompt or send text to `gist serve`")
        if request.cache_salt != key:
            raise GistError(f"the request's cache_salt must be its cache key {key} (so the prefix cache never mixes "
                            f"caches), got {request.cache_salt!r}")
        return str(path), n, key

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens == 0:
            self._plans.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = GistConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            if req.req_id in self._plans:
                meta.loads.append(self._load(req.req_id, req.block_ids[0]))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # resumed after preemption: all its blocks are new
            if req_id in self._plans and req_id in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                meta.loads.append(self._load(req_id, cached.new_block_ids[i][0]))
        return meta

    def _load(self, req_id: str, block_ids: list[int]) -> Load:
        plan = self._plans.pop(req_id)
        bs = self.block_size
        slots = [block_ids[p // bs] * bs + p % bs for p in range(plan.start, plan.stop)]
        blocks = sorted({block_ids[p // bs] for p in range(plan.start, plan.stop)})
        if plan.error:
            logger.error("gist request %s failed: %s", req_id, plan.error)
        return Load(req_id=req_id, path=plan.path, slots=slots, start=plan.start, stop=plan.stop, block_ids=blocks,
                    error=plan.error, key=plan.key)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        return False, None

    # ---- worker side ----------------------------------------------------------------------------

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, GistConnectorMetadata)
        if not meta.loads:
            return
        layers = {name: layer for name, layer in forward_context.no_compile_layers.items()
                  if isinstance(getattr(layer, "kv_cache", None), torch.Tensor) and layer.kv_cache.numel()
                  and hasattr(getattr(layer, "impl", None), "do_kv_cache_update")}
        for load in meta.loads:
            if load.error is None:
                try:
                    self._write(load, layers)
                    continue
                except Exception as exc:  # fail this request, keep serving
                    logger.error("gist request %s failed while loading %s: %s", load.req_id, load.path, exc)
            self._failed_blocks.update(load.block_ids)

    def _write(self, load: Load, layers: dict) -> None:
        kv = self._served(load.path, load.key)
        slots = torch.tensor(load.slots, dtype=torch.int64)
        for name, layer in layers.items():
            keys, values = kv[extract_layer_index(name)]  # (1, kv_heads, F+N, head_dim)
            cache = layer.kv_cache
            k = keys[0, :, load.start:load.stop].transpose(0, 1).contiguous()  # (T, kv_heads, head_dim)
            v = values[0, :, load.start:load.stop].transpose(0, 1).contiguous()
            slot_mapping = slots.to(cache.device)
            layer.impl.do_kv_cache_update(layer, k.to(cache.device, self.dtype), v.to(cache.device, self.dtype), cache,
                                          slot_mapping)

    def _served(self, path: str, key: str | None) -> list:
        """The F+N slots of the cache at `path`, per layer (kept for the last 256 files, by size and mtime). The file
        is read again here, after the scheduler's check: one replaced in between (another prompt's cache copied
        over it) must fail the request, never fill its blocks, so it must still hold the cache of `key`."""
        if self._slots is None:
            self._slots, self._prefix = {}, read_prefix_kv(self.export_dir, self.info)
        stat = Path(path).stat()
        tag = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if tag not in self._slots:
            cache = load_cache(path)
            self._slots[tag] = (key_of(cache), served_kv(cache, *self._prefix))
            while len(self._slots) > 256:
                self._slots.pop(next(iter(self._slots)))
        held, kv = self._slots[tag]
        if key is not None and held != key:
            raise GistError(f"{path} was replaced after it was checked: it holds the cache of key {held[:12]}, not "
                            f"{key[:12]}")
        return kv

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        return

