"""`gist bench serve`: batched serving in vLLM, from gist caches vs from full prompts, in one engine.

For `instructions` distinct instructions of exactly `instruction_tokens` tokens (synthesized as in
`gist bench cache`), each with one short input, the run's exported model (LoRA merged) is served
by one vLLM engine with the gist connector and prefix caching on, and three passes of all the
requests at once, each generating exactly `new_tokens` tokens (EOS ignored), are timed:

* `gist`:       the prompt is F+N placeholders + the input; the connector loads each gist cache
                (compressed beforehand, outside the timing);
* `full cold`:  the whole templated instruction + input, prefix cache emptied first;
* `full warm`:  the same full prompts again, right after the cold pass left them in the prefix
                cache (the cold pass is the warm-up pass).

Per pass: requests/s (requests / wall time of the pass), time to first token (vLLM's per-request
first-token latency, queueing in the burst included: median and p90), prompt tokens computed
(prompt tokens minus those vLLM reports as cached or loaded) and KV blocks used (sum over requests
of ceil((prompt + generated tokens) / block size): what vLLM allocates for each running request), beside
the engine's whole KV cache (`kv_blocks_total`): full prompts that need more blocks than that run
in waves, and evict each other's cached prefixes.

`scenario="oversubscribed"` is another run: a stream of requests over more distinct instructions than the KV
cache holds as full prompts, in a burst and at Poisson rates, at several block sizes (eval/serve_oversubscribed.py).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gistcache._io import atomic_write_text
from gistcache.errors import GistError
from gistcache.eval.bench import machine_info, synth_instruction
from gistcache.eval.serve_oversubscribed import kv_cache_space, run_oversubscribed
from gistcache.eval.serve_scenarios import SCENARIOS, synth_input
from gistcache.model import GistModel
from gistcache.prompts import encode_input, encode_instruction
from gistcache.serving.export import export_model
from gistcache.store import CacheStore, compress_cached
from gistcache.vllm import GistRequests, kv_transfer_config, vllm_available


@dataclass
class BenchServeConfig:
    run: str | None = None  # None: the shipped run
    instructions: int = 64
    instruction_tokens: int = 512
    new_tokens: int = 32
    kv_cache_gib: int | None = None  # VLLM_CPU_KVCACHE_SPACE on the CPU backend; burst: 1, oversubscribed: sized
    max_model_len: int = 2048
    out: str | None = None
    scenario: str = "burst"
    # the oversubscribed scenario only (eval/serve_oversubscribed.py)
    requests: int | None = None  # the stream's length; None: 2 x instructions
    rates: list[float] = field(default_factory=lambda: [0.0])  # requests/s; 0: one burst
    block_sizes: list[int] | None = None  # None: 16 and 128 (32 and 128 on the CPU)
    oversubscription: int = 4  # the KV cache holds instructions // oversubscription full prompts
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise GistError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}")
        for name in ("instructions", "instruction_tokens", "new_tokens", "oversubscription"):
            if not _whole(getattr(self, name)):
                raise GistError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("kv_cache_gib", "requests"):
            if getattr(self, name) is not None and not _whole(getattr(self, name)):
                raise GistError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {getattr(self, name)!r}")
        bad = [r for r in self.rates if not (isinstance(r, (int, float)) and math.isfinite(r) and r >= 0)]
        if not self.rates or bad:
            raise GistError(f"--rate must be requests/s >= 0 (0: one burst), e.g. --rate 0,2; got "
                            f"{bad[0] if bad else 'none'!r}")
        bad = [b for b in self.block_sizes or [] if not _whole(b)]
        if self.block_sizes is not None and (not self.block_sizes or bad):
            raise GistError(f"--block-size must be tokens a KV block >= 1, e.g. --block-size 32,128; got "
                            f"{bad[0] if bad else 'none'!r}")
        if self.scenario == "burst":
            given = [flag for flag, value, default in (
                ("--requests", self.requests, None), ("--rate", self.rates, [0.0]),
                ("--block-size", self.block_sizes, None), ("--oversubscription", self.oversubscription, 4),
                ("--seed", self.seed, 0)) if value != default]
            if given:
                raise GistError(f"{given[0]} applies to --scenario oversubscribed; the burst scenario sends each "
                                f"instruction once, all at once")
        if self.instruction_tokens + self.new_tokens + 64 > self.max_model_len:
            raise GistError(f"--instruction-tokens {self.instruction_tokens} + --new-tokens {self.new_tokens} do not "
                            f"fit --max-model-len {self.max_model_len}")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# the fields a burst run's JSON names, as before the oversubscribed scenario
BURST_FIELDS = ("run", "instructions", "instruction_tokens", "new_tokens", "kv_cache_gib", "max_model_len", "out")


def bench_serve(config: BenchServeConfig, progress: Callable[[str], None] | None = None) -> dict:
    if not vllm_available():
        raise GistError("gist bench serve needs vLLM: `make vllm-venv`, then .venv-vllm/bin/gist bench serve")
    if config.scenario == "oversubscribed":
        result = run_oversubscribed(config, progress or (lambda msg: None))
        if config.out:
            atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
        return result
    with kv_cache_space(config.kv_cache_gib or 1):  # vLLM's CPU KV cache size, unless the caller set one
        return _bench_serve(config, progress)


def _bench_serve(config: BenchServeConfig, progress: Callable[[str], None] | None) -> dict:
    from vllm import LLM, SamplingParams  # deferred: vLLM is optional and slow to import

    say = progress or (lambda msg: None)
    load_before = os.getloadavg()[0]  # 1-minute load average: other processes share these cores
    model = GistModel.from_pretrained(config.run)
    tok, template = model.tokenizer, model.template
    instructions = [synth_instruction(tok, config.instruction_tokens, seed=i) for i in range(config.instructions)]
    inputs = [synth_input(i) for i in range(config.instructions)]
    with tempfile.TemporaryDirectory(prefix="gist-bench-serve-") as tmp:
        export, store = Path(tmp) / "hf", Path(tmp) / "store"
        say("exporting the run")
        export_model(model, export)
        say(f"compressing {config.instructions} instructions of {config.instruction_tokens} tokens")
        start = time.perf_counter()
        keys = [r.key for r in compress_cached(model, instructions, CacheStore(store))]
        compress_s = time.perf_counter() - start
        requests = GistRequests(export, store, tokenizer=tok)
        gist = [requests.prompt(k, text) for k, text in zip(keys, inputs)]
        full = [{"prompt_token_ids": [*encode_instruction(tok, ins, template), *encode_input(tok, text, template)]}
                for ins, text in zip(instructions, inputs)]
        del model
        say("starting vLLM")
        llm = LLM(model=str(export), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15,
                  max_model_len=config.max_model_len, generation_config="vllm", enable_prefix_caching=True,
                  disable_log_stats=False, distributed_executor_backend="uni", seed=0,
                  kv_transfer_config=kv_transfer_config(export, store))
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        kv_blocks_total = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks  # the engine's whole KV cache

        def params(key=None):
            extra = {"kv_transfer_params": GistRequests.params(key)} if key else None
            return SamplingParams(temperature=0.0, max_tokens=config.new_tokens, ignore_eos=True, extra_args=extra)

        llm.generate([gist[0]], [params(keys[0])], use_tqdm=False)  # engine warm-up, untimed
        passes = {}
        for name, prompts, with_keys, reset in (("full cold", full, False, True), ("full warm", full, False, False),
                                                ("gist", gist, True, True)):
            if reset:
                llm.reset_prefix_cache()
            say(f"pass: {name}")
            start = time.perf_counter()
            outs = llm.generate(prompts, [params(k if with_keys else None) for k in keys], use_tqdm=False)
            passes[name] = pass_stats(prompts, outs, time.perf_counter() - start, block_size)
        del llm
    machine = {**machine_info("cpu", "float32"), "threads": torch.get_num_threads(), "vllm": vllm_version(),
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    burst = {k: v for k, v in asdict(config).items() if k in BURST_FIELDS} | {"kv_cache_gib": config.kv_cache_gib or 1}
    result = {"config": burst, "machine": machine, "block_size": block_size, "kv_blocks_total": kv_blocks_total,
              "prompt_tokens": {"gist": statistics.mean(len(p["prompt_token_ids"]) for p in gist),
                                "full": statistics.mean(len(p["prompt_token_ids"]) for p in full)},
              "compress_s": compress_s, "passes": passes}
    if config.out:
        atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
    return result


def vllm_version() -> str:
    import vllm  # deferred: vLLM is optional and slow to import

    return vllm.__version__


def pass_stats(prompts: list[dict], outs, wall_s: float, block_size: int) -> dict:
    ttft = sorted(o.metrics.first_token_latency for o in outs if o.metrics is not None)
    lengths = [(len(p["prompt_token_ids"]), len(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)]
    return {"requests": len(outs), "wall_s": wall_s, "requests_per_s": len(outs) / wall_s,
            "ttft_median_s": statistics.median(ttft) if ttft else None,
            "ttft_p90_s": ttft[min(len(ttft) - 1, math.ceil(0.9 * len(ttft)) - 1)] if ttft else None,
            "prompt_tokens_computed": sum(n - (o.num_cached_tokens or 0) for (n, _), o in zip(lengths, outs)),
            "kv_blocks": sum(math.ceil((n + g) / block_size) for n, g in lengths),
            "generated_tokens": sum(g for _, g in lengths)}
