"""`gist bench cache`: what a gist cache saves, measured side by side on this machine.

For instructions of exactly L tokens (synthesized from a fixed word list), it measures:

* bytes: the gist cache file on disk vs the KV cache of the full prompt (measured from mode b);
* compress: one forward over prompt + N gist tokens, keeping the gist KV (`gistcache.compress`);
* generation of exactly `new_tokens` greedy tokens (EOS held off with min_new_tokens) from
  (a) `full`:   the full prompt and the input, no cache: prefill + decode;
  (b) `cached`: the prompt prefilled once beforehand; a deep copy per repeat, made outside the
                timed region; timed: prefill of the input + decode;
  (c) `gist`:   the gist cache file loaded from disk (inside the timed region: load, checks,
                SHA-256 verification) + prefill of the input + decode.

Time to first token comes from a streamer-style callback in the same run as the total (the time of
the first generated token's `put`). Every number is the median of `repeats` timed runs after one
untimed warm-up per mode. The model is an untrained GistModel over the base model: speed does not
depend on the weights, so no run folder is needed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gistcache._io import atomic_write_text
from gistcache.cache import load_cache, save_cache
from gistcache.config import torch_dtype
from gistcache.environment import cpu_name, package_versions
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate_ids
from gistcache.model import (GistModel, cache_kwarg, cache_layers, fingerprint_model, load_base_config, load_base_model,
                             load_tokenizer, returned_cache)
from gistcache.prompts import encode_input, encode_instruction, resolve_template

WORDS = (
    "river stone garden lantern copper window autumn signal harbor meadow pencil orbit violet thunder marble "
    "canvas ladder forest silver engine pocket bridge candle winter planet shadow velvet anchor basket crystal "
    "falcon mirror tunnel summer feather island puzzle rocket saddle timber valley whistle yellow zipper "
    "compass blanket cotton dragon fabric glacier hammer jungle kettle lemon"
).split()
INPUT = "Answer in one short paragraph."


@dataclass
class BenchCacheConfig:
    model: str = "smollm2-135m"
    lengths: list[int] = field(default_factory=lambda: [128, 512, 2048])
    repeats: int = 5
    new_tokens: int = 64
    num_gist_tokens: int = 1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    out: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise GistError(f"--lengths must be token counts >= 1, got {self.lengths}")
        if self.repeats < 1:
            raise GistError(f"--repeats must be >= 1, got {self.repeats}")
        if self.new_tokens < 1:
            raise GistError(f"--new-tokens must be >= 1, got {self.new_tokens}")
        if self.num_gist_tokens < 1:
            raise GistError(f"--num-gist must be >= 1, got {self.num_gist_tokens}")
        if self.threads is not None and self.threads < 1:
            raise GistError(f"--threads must be >= 1, got {self.threads}")
        torch_dtype(self.dtype)
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise GistError(f"--device {self.device!r} is not a device: use cpu, cuda or cuda:N") from exc


class TokenTimer:
    """A streamer-style callback: `put` is called with the prompt, then once per new token."""

    def __init__(self, start: float):
        self.start = start
        self.calls = 0
        self.first_token: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token is None:  # call 1 is the prompt
            self.first_token = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def synth_instruction(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """Instruction text from WORDS that the tokenizer encodes (alone) to exactly `n_tokens` tokens."""
    rng = random.Random(seed)
    words: list[str] = []
    ids: list[int] = []
    while len(ids) < n_tokens + 16:
        words += [rng.choice(WORDS) for _ in range(max(8, n_tokens // 2))]
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids
    for k in sorted(range(max(1, n_tokens - 8), n_tokens + 9), key=lambda k: abs(k - n_tokens)):
        text = tokenizer.decode(ids[:k]).strip()
        if len(tokenizer(text, add_special_tokens=False).input_ids) == n_tokens:
            return text
    raise GistError(f"could not cut the synthetic instruction to exactly {n_tokens} tokens")


def machine_info(device: str, dtype: str) -> dict:
    info = {"cpu": cpu_name(), "platform": platform.platform(), "python": platform.python_version(),
            **package_versions(), "device": device, "dtype": dtype,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _loadavg() -> float | None:
    """1-minute load average: how busy the machine was (other processes skew CPU timings)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_cache(config: BenchCacheConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark of the module docstring; return (and with `config.out`, write) a JSON-able dict."""
    if config.out is not None and Path(config.out).is_dir():
        raise GistError(f"--out {config.out} is a folder: give a file name such as {Path(config.out) / 'bench.json'}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:  # --threads holds for this call only
        return _bench_cache(config, progress)
    finally:
        torch.set_num_threads(threads)


def _bench_cache(config: BenchCacheConfig, progress: Callable[[str], None] | None) -> dict:
    from transformers import GenerationConfig  # deferred: transformers takes seconds to import

    say = progress or (lambda msg: None)
    load_start = _loadavg()
    dtype = torch_dtype(config.dtype)
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(tokenizer, "auto")
    input_ids = encode_input(tokenizer, INPUT, template)
    context = int(getattr(load_base_config(config.model), "max_position_embeddings", 2048))  # GistModel.max_context
    instructions = {}
    for length in config.lengths:  # every length checked before the model loads: a refusal is the only line
        rest = config.num_gist_tokens + len(input_ids) + config.new_tokens
        if length + rest > context:  # the template's own tokens come on top
            raise GistError(f"--lengths {length}: at least {length + rest} positions exceed the model's context of "
                            f"{context}")
        instructions[length] = synth_instruction(tokenizer, length, config.seed)
        need = len(encode_instruction(tokenizer, instructions[length], template)) + rest
        if need > context:
            raise GistError(f"--lengths {length}: {need} positions exceed the model's context of {context}")
    t = time.perf_counter()
    base = load_base_model(config.model, dtype=dtype, device=config.device)
    model = GistModel(base, tokenizer, config.num_gist_tokens, base_fingerprint=fingerprint_model(base)).eval()
    # as load_run sets it (read, not recomputed); hex like every fingerprint a cache file holds
    model.run_fingerprint = hashlib.sha256(f"untrained|{model.base_fingerprint}".encode()).hexdigest()
    say(f"loaded {config.model} in {time.perf_counter() - t:.1f}s")
    device = model.device
    lm = model.model
    gen_config = GenerationConfig(max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False,
                                  num_beams=1, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    warm_config = copy.deepcopy(gen_config)
    warm_config.max_new_tokens = warm_config.min_new_tokens = 2
    ckw = cache_kwarg(lm)

    def timed(fn) -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        timer = TokenTimer(start)
        n = fn(timer)
        _sync(device)
        total = time.perf_counter() - start
        assert n == config.new_tokens, f"generated {n} tokens, expected {config.new_tokens}"
        return timer.first_token, total

    results = []
    with tempfile.TemporaryDirectory(prefix="gist-bench-") as tmp:
        for length in config.lengths:
            instruction = instructions[length]
            prompt_ids = encode_instruction(tokenizer, instruction, template)
            P = len(prompt_ids)
            full_ids = torch.tensor([prompt_ids + input_ids], device=device)  # (1, P+L)
            full_mask = torch.ones_like(full_ids)

            # compress (and the file it leaves)
            compress(model, instruction)  # warm-up
            compress_times, cache = [], None
            for _ in range(config.repeats):
                _sync(device)
                start = time.perf_counter()
                cache = compress(model, instruction)
                _sync(device)
                compress_times.append(time.perf_counter() - start)
            path = save_cache(cache, Path(tmp) / f"gist-{length}.safetensors")
            say(f"{length} tokens: compress {statistics.median(compress_times):.3f}s")

            # (a) full prompt, no cache
            def run_full(timer, cfg=gen_config):
                out = lm.generate(input_ids=full_ids, attention_mask=full_mask, generation_config=cfg, streamer=timer)
                return out.shape[1] - full_ids.shape[1]

            # (b) prompt prefilled once; each repeat continues a deep copy made outside the timed region
            with torch.no_grad():
                prefilled = lm(input_ids=full_ids[:, :P], use_cache=True)
            prefix = returned_cache(prefilled)
            full_kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                                for k, v in cache_layers(prefix))

            def run_cached(timer, past, cfg=gen_config):
                out = lm.generate(input_ids=full_ids, attention_mask=full_mask, generation_config=cfg,
                                  streamer=timer, **{ckw: past})
                return out.shape[1] - full_ids.shape[1]

            # (c) gist cache loaded from disk inside the timed region
            def run_gist(timer, n=config.new_tokens):
                loaded = load_cache(path, model)
                rows = generate_ids(model, loaded, INPUT, max_new_tokens=n, min_new_tokens=n, streamer=timer,
                                    **GREEDY)
                return len(rows[0])

            timings: dict[str, list[tuple[float, float]]] = {"full": [], "cached": [], "gist": []}
            with torch.no_grad():
                run_full(TokenTimer(0.0), warm_config)
                run_cached(TokenTimer(0.0), copy.deepcopy(prefix), warm_config)
                run_gist(TokenTimer(0.0), 2)
                for r in range(config.repeats):  # the three modes interleaved, side by side
                    timings["full"].append(timed(run_full))
                    past = copy.deepcopy(prefix)  # outside the timed region
                    timings["cached"].append(timed(lambda timer: run_cached(timer, past)))
                    del past
                    timings["gist"].append(timed(run_gist))
                    say(f"{length} tokens: repeat {r + 1}/{config.repeats} "
                        + " ".join(f"{k} {v[-1][1]:.2f}s" for k, v in timings.items()))
            file_bytes = path.stat().st_size
            row = {
                "instruction_tokens": length, "prompt_tokens": P, "input_tokens": len(input_ids),
                "gist_tokens": config.num_gist_tokens, "new_tokens": config.new_tokens,
                "gist_file_bytes": file_bytes, "gist_tensor_bytes": cache.nbytes, "full_prompt_kv_bytes": full_kv_bytes,
                "bytes_ratio": full_kv_bytes / file_bytes,
                "compress_s": statistics.median(compress_times), "compress_runs_s": compress_times,
            }
            for mode, runs in timings.items():
                row[mode] = {"ttft_s": statistics.median(x for x, _ in runs),
                             "total_s": statistics.median(y for _, y in runs),
                             "runs_ttft_s": [x for x, _ in runs], "runs_total_s": [y for _, y in runs]}
            for mode in ("full", "cached"):
                row[f"ttft_speedup_vs_{mode}"] = row[mode]["ttft_s"] / row["gist"]["ttft_s"]
                row[f"total_speedup_vs_{mode}"] = row[mode]["total_s"] / row["gist"]["total_s"]
            results.append(row)

    result = {
        "benchmark": "gist bench cache",
        "config": asdict(config),
        "machine": {**machine_info(str(device), config.dtype), "loadavg_1min_start": load_start,
                    "loadavg_1min_end": _loadavg()},
        "notes": [
            "untrained GistModel on the base model: weights do not change speed, so no run folder is needed",
            f"every time is the median of {config.repeats} runs after one untimed warm-up per mode; modes interleaved",
            f"each run generates exactly {config.new_tokens} tokens greedily (min_new_tokens = max_new_tokens)",
            "TTFT: time to the first generated token, from a streamer-style put() callback in the same run",
            "full: prompt + input, no cache (prefill + decode)",
            "cached: prompt prefilled once; a deep copy per repeat made outside the timed region",
            "gist: cache file loaded from disk (load + checks + SHA-256) inside the timed region",
            "full KV: the prefilled prompt's KV cache "
            "(prompt tokens x layers x 2 x kv_heads x head_dim x dtype bytes); "
            "gist file: the safetensors file on disk",
        ],
        "results": results,
    }
    if config.out:
        atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
    return result
