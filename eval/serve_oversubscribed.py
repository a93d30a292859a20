"""`gist bench serve --scenario oversubscribed`: more distinct instructions than the KV cache holds as full prompts.

A stream of `requests` requests draws from `instructions` distinct instructions of `instruction_tokens` tokens
(seeded, with repeats: eval/serve_scenarios.py), each request with its own short input. For each block size one
vLLM engine (gist connector, prefix caching on) gets a KV cache sized to hold `instructions // oversubscription`
full prompts; then, for full prompts and for gist caches in turn, the prefix cache is emptied, the stream is sent
once as a warm-up (one burst, one new token each, untimed) and then once per `--rate` (0: one burst; R: Poisson
arrivals of R requests/s), each generating exactly `new_tokens` tokens (EOS ignored). Requests are added to the
engine when their arrival time has come, between engine steps, with that arrival time, so vLLM's time to first
token counts the wait for a step to end and the queue.

Per pass (eval/serve_report.py): requests/s, TTFT p50/p90/p99, prompt tokens computed (prompt minus what vLLM
reports as cached or loaded), the peak of KV blocks held by running requests (vLLM's kv_cache_usage_perc gauge,
read after every step), blocks a request needs, how many instructions came from a cache and how many the cache
had evicted and were computed again, and vLLM's preemptions.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from gistcache.errors import GistError
from gistcache.eval.bench import machine_info, synth_instruction
from gistcache.eval.serve_report import RequestRecord, gains, pass_stats
from gistcache.eval.serve_scenarios import (arrival_offsets, blocks_for, cache_blocks, draw_instructions,
                                            held_prompts, kv_bytes_per_token, kv_cache_gib, rate_label,
                                            synth_input)
from gistcache.model import GistModel
from gistcache.prompts import encode_input, encode_instruction
from gistcache.serving.export import export_model
from gistcache.store import CacheStore, compress_cached
from gistcache.vllm import GistRequests, kv_transfer_config

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def default_block_sizes(cpu: bool) -> list[int]:
    """The smallest block the platform's attention takes, and vLLM's CPU default: vLLM's CPU attention kernel
    takes multiples of 32 only."""
    return [32, 128] if cpu else [16, 128]


def check_block_sizes(block_sizes: list[int], cpu: bool) -> None:
    bad = [b for b in block_sizes if b % 32] if cpu else []
    if bad:
        raise GistError(f"--block-size {bad[0]}: vLLM's CPU attention takes block sizes that are multiples of 32; "
                        f"use e.g. --block-size 32,128 on the CPU (16 runs on a GPU)")


@contextlib.contextmanager
def kv_cache_space(gib: int):
    """vLLM's CPU KV cache space (GiB) while the block runs, unless the caller set one; removed afterwards."""
    unset = os.environ.get(KV_CACHE_ENV) is None
    if unset:
        os.environ[KV_CACHE_ENV] = str(gib)
    try:
        yield
    finally:
        if unset:
            os.environ.pop(KV_CACHE_ENV, None)


def blocks_in_use(engine, usable: int) -> int | None:
    """KV blocks held by running requests now (cached blocks no request holds are free: vLLM can evict them)."""
    for metric in engine.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc" and hasattr(metric, "value"):
            return round(metric.value * usable)
    return None


def drive(engine, prompts: list[dict], params: list, offsets: list[float], tag: str, usable: int):
    """Send the requests at their arrival offsets (seconds from now) and step the engine until all finish.
    Returns (outputs in request order, wall seconds, peak KV blocks held)."""
    t0, start = time.time(), time.perf_counter()
    n, i, done, peak = len(prompts), 0, {}, None
    while len(done) < n:
        now = time.time() - t0
        while i < n and offsets[i] <= now:
            engine.add_request(f"{tag}-{i}", prompts[i], params[i], arrival_time=t0 + offsets[i])
            i += 1
        if not engine.has_unfinished_requests():
            if i == n:
                break  # nothing left to wait for (a request that failed never reports finished)
            time.sleep(min(0.5, max(0.0, offsets[i] - (time.time() - t0))))
            continue
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        used = blocks_in_use(engine, usable)
        if used is not None:
            peak = used if peak is None else max(peak, used)
    missing = n - len(done)
    if missing:
        raise GistError(f"{missing} of {n} requests of pass {tag} did not finish: see vLLM's log above")
    return [done[f"{tag}-{j}"] for j in range(n)], time.perf_counter() - start, peak


def run_oversubscribed(config, say: Callable[[str], None]) -> dict:
    from vllm import LLM, SamplingParams  # deferred: vLLM is optional and slow to import
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    block_sizes = config.block_sizes or default_block_sizes(cpu)
    check_block_sizes(block_sizes, cpu)
    n = config.requests or 2 * config.instructions
    pool = draw_instructions(n, config.instructions, config.seed)
    drawn = sorted(set(pool))
    load_before = os.getloadavg()[0]
    model = GistModel.from_pretrained(config.run)
    tok, template = model.tokenizer, model.template
    texts = {i: synth_instruction(tok, config.instruction_tokens, seed=i) for i in drawn}
    inputs = [synth_input(j) for j in range(n)]
    input_ids = [encode_input(tok, text, template) for text in inputs]
    instruction_ids = {i: encode_instruction(tok, texts[i], template) for i in drawn}
    with tempfile.TemporaryDirectory(prefix="gist-bench-serve-") as tmp:
        export, store = Path(tmp) / "hf", Path(tmp) / "store"
        say("exporting the run")
        export_model(model, export)
        say(f"compressing {len(drawn)} instructions of {config.instruction_tokens} tokens")
        start = time.perf_counter()
        keys = dict(zip(drawn, (r.key for r in compress_cached(model, [texts[i] for i in drawn], CacheStore(store)))))
        compress_s = time.perf_counter() - start
        requests = GistRequests(export, store, tokenizer=tok)
        # a gist request is the cache's F+N placeholders, then the templated input (gistcache.serving.export.request_ids):
        # each cache is resolved (read and checked) once, not once a request
        gist_head = {}
        for j, i in enumerate(pool):
            if i not in gist_head:
                p = requests.prompt(keys[i], inputs[j])
                gist_head[i] = (p["prompt_token_ids"][:len(p["prompt_token_ids"]) - len(input_ids[j])], p["cache_salt"])
        kinds = {"full": [{"prompt_token_ids": [*instruction_ids[i], *ids]} for i, ids in zip(pool, input_ids)],
                 "gist": [{"prompt_token_ids": [*gist_head[i][0], *ids], "cache_salt": gist_head[i][1]}
                          for i, ids in zip(pool, input_ids)]}
        refs = {"full": [None] * n, "gist": [keys[i] for i in pool]}
        full_tokens = max(len(p["prompt_token_ids"]) for p in kinds["full"])
        gist_tokens = max(len(p["prompt_token_ids"]) for p in kinds["gist"])
        bytes_per_token = kv_bytes_per_token(json.loads((export / "config.json").read_text()))
        del model
        held = held_prompts(config.instructions, config.oversubscription)

        def params(key, max_tokens=config.new_tokens):
            extra = {"kv_transfer_params": GistRequests.params(key)} if key else None
            return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)

        engines, passes = {}, []
        for bs in block_sizes:
            blocks = None if config.kv_cache_gib else cache_blocks(full_tokens, config.new_tokens, bs, held)
            gib = config.kv_cache_gib or kv_cache_gib(blocks, bs, bytes_per_token)
            say(f"starting vLLM, block size {bs}" + (f", {blocks - 1} KV blocks" if blocks else f", {gib} GiB KV"))
            with kv_cache_space(gib):
                llm = LLM(model=str(export), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15,
                          max_model_len=full_tokens + config.new_tokens, generation_config="vllm",
                          enable_prefix_caching=True, disable_log_stats=False, distributed_executor_backend="uni",
                          seed=0, block_size=bs, num_gpu_blocks_override=blocks,
                          kv_transfer_config=kv_transfer_config(export, store))
            engine = llm.llm_engine
            total = engine.vllm_config.cache_config.num_gpu_blocks
            per_full = blocks_for(full_tokens + config.new_tokens, bs)

            llm.generate([kinds["gist"][0]], [params(refs["gist"][0])], use_tqdm=False)  # engine warm-up, untimed
            warmup_s = {}
            for kind, prompts in kinds.items():
                llm.reset_prefix_cache()
                say(f"block {bs}, {kind}: warm-up (the stream, one burst, 1 new token each)")
                start = time.perf_counter()
                drive(engine, prompts, [params(k, 1) for k in refs[kind]], [0.0] * n, f"{bs}-{kind}-warm", total - 1)
                warmup_s[kind] = time.perf_counter() - start
                for rate in config.rates:
                    say(f"block {bs}, {kind}: {rate_label(rate)}")
                    offsets = arrival_offsets(n, rate, config.seed)
                    outs, wall_s, peak = drive(engine, prompts, [params(k) for k in refs[kind]], offsets,
                                               f"{bs}-{kind}-{rate:g}", total - 1)
                    records = [RequestRecord(len(p["prompt_token_ids"]), len(p["prompt_token_ids"]) - len(ids),
                                             len(o.outputs[0].token_ids),
                                             o.num_cached_tokens or 0,
                                             o.metrics.first_token_latency if o.metrics is not None else None,
                                             seen_before=True,  # the warm-up sent the whole stream
                                             preemptions=o.metrics.num_preemptions if o.metrics is not None else 0)
                               for p, ids, o in zip(prompts, input_ids, outs)]
                    passes.append({"kind": kind, "block_size": bs, "rate": rate,
                                   **pass_stats(records, wall_s, bs, peak)})
            engines[str(bs)] = {"kv_blocks_total": total, "kv_cache_gib": gib,
                                "full_prompts_held": (total - 1) // per_full,
                                "blocks_per_full_prompt": per_full,
                                "blocks_per_gist_prompt": blocks_for(gist_tokens + config.new_tokens, bs),
                                "warmup_s": warmup_s}
            del llm, engine
            gc.collect()
    machine = {**machine_info("cpu", "float32"), "threads": torch.get_num_threads(), "vllm": _vllm_version(),
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    return {"scenario": "oversubscribed", "config": {**asdict(config), "block_sizes": block_sizes, "requests": n},
            "machine": machine, "pool": {"requests": n, "distinct": len(drawn), "repeats": n - len(drawn)},
            "prompt_tokens": {kind: statistics.mean(len(p["prompt_token_ids"]) for p in prompts)
                              for kind, prompts in kinds.items()},
            "compress_s": compress_s, "engines": engines, "passes": passes, "gains": gains(passes)}


def _vllm_version() -> str:
    import vllm  # deferred: vLLM is optional and slow to import

    return vllm.__version__
