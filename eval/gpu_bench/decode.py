"""The decode side of the GPU run (eval/gpu_bench/): greedy picks with banned ids, the compiled decode step,
the prefills of the gist batch and of the full prompts, and the static-cache decode loop."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from gistcache.errors import GistError
from gistcache.inference.generation import build_batch, suppressed_token_ids
from gistcache.model import GistModel, cache_kwarg, cache_layers, returned_cache

from .timing import sync


def banned_ids(gm: GistModel) -> torch.Tensor:
    """Ids greedy decoding never picks here: the gist token (as the library) and EOS (as min_new_tokens does)."""
    return torch.tensor(sorted({*suppressed_token_ids(gm), gm.tokenizer.eos_token_id}), device=gm.device)


def pick(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B, 1) greedy ids, `banned` ids never chosen."""
    logits = logits.float()  # a copy: the logits of a compiled step live in its CUDA graph's memory
    logits[:, banned] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def compiled_step(lm) -> tuple[Callable, dict]:
    """The model's forward compiled as transformers' `generate` compiles its decode step (`get_compiled_call` with
    the default `CompileConfig`), and that config."""
    from transformers import CompileConfig  # deferred: transformers takes seconds to import

    with contextlib.suppress(Exception):  # dynamo's and inductor's warnings are many lines each: errors only
        torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    config = CompileConfig()
    settings = {k: v for k, v in config.to_dict().items() if isinstance(v, (str, int, float, bool, type(None)))}
    if hasattr(lm, "get_compiled_call"):
        return lm.get_compiled_call(config), settings
    return torch.compile(lm.__call__, fullgraph=config.fullgraph, dynamic=config.dynamic, backend=config.backend,
                         mode=config.mode), settings


def gist_prefill(gm: GistModel, caches, inputs: list[str], new_tokens: int) -> Callable:
    """The prefill of the library's batch layout (`build_batch`: the caches' slots copied to the device, the
    inputs after them): () -> ((B, V) last logits, the cache holding slots + input)."""
    ckw = cache_kwarg(gm.stock_model)

    def run():
        batch = build_batch(gm, caches, inputs, max_new_tokens=new_tokens)
        S = batch.num_cached
        with gm.decoding():
            out = gm.model(input_ids=batch.input_ids[:, S:], attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids[:, S:], use_cache=True, logits_to_keep=1,
                           **{ckw: batch.cache})
        if not bool(batch.attention_mask.all()):  # the decode loop continues at the cache's length, no padding
            raise GistError("the gist batch is padded: the decode loop needs requests of one length")
        return out.logits[:, -1], returned_cache(out)

    return run


def full_prefill(gm: GistModel, ids: torch.Tensor) -> Callable:
    """() -> ((B, V) last logits, the cache of the full prompts): one causal forward, no mask (no padding)."""
    def run():
        out = gm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], returned_cache(out)

    return run


class DecodeLoop:
    """Prefill (eager, a DynamicCache), copied into a transformers StaticCache, then greedy decode steps over it:
    the step compiled (`engine` "compile", see `compiled_step`) or eager ("static"). One StaticCache per workload
    is kept and reset between runs: a new one would recompile the step."""

    def __init__(self, gm: GistModel, engine: str):
        self.gm, self.lm = gm, gm.model
        self.ckw = cache_kwarg(gm.stock_model)
        self.banned = banned_ids(gm)
        self.static: dict[str, object] = {}
        self.compiled = engine == "compile"
        self.compile_config = None
        self.step = self.lm
        if self.compiled:
            self.step, self.compile_config = compiled_step(self.lm)

    def run(self, key: str, prefill: Callable, new_tokens: int, steps: int | None = None):
        """-> (tokens (B, steps), seconds to the first token with the static cache filled, seconds in all)."""
        from transformers import StaticCache  # deferred: transformers takes seconds to import

        device = self.gm.device
        sync(device)
        start = time.perf_counter()
        with self.gm.decoding():
            logits, dynamic = prefill()
            tok = pick(logits, self.banned)
            layers = cache_layers(dynamic)
            length = layers[0][0].shape[2]
            cache = self.static.get(key)
            if cache is None:
                cache = self.static[key] = StaticCache(config=self.lm.config, max_cache_len=length + new_tokens)
            else:
                cache.reset()
            for i, (k, v) in enumerate(layers):
                cache.update(k, v, i)
            del layers, dynamic
            sync(device)
            first = time.perf_counter() - start
            out = [tok]
            for _ in range((steps or new_tokens) - 1):
                if self.compiled and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                step = self.step(input_ids=tok, use_cache=True, **{self.ckw: cache})
                tok = pick(step.logits[:, -1], self.banned)
                out.append(tok)
            tokens = torch.cat(out, dim=1)
        sync(device)
        return tokens, first, time.perf_counter() - start
