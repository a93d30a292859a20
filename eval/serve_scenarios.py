"""The oversubscribed scenario of `gist bench serve` without vLLM: its flags, the request stream, the cache size.

The stream: `requests` requests, each naming one of `instructions` distinct instructions drawn uniformly with a
seeded generator (so instructions repeat and a prefix cache can hit), arriving all at once (rate 0, a burst) or
as a Poisson process of `rate` requests/s (seeded exponential gaps, the first request at t = 0):

    rate 2/s, seed 0:  t = 0.00  0.38  0.81  0.87  1.52 ...   (mean gap -> 1 / rate)

The KV cache is sized, per block size, to hold `instructions // oversubscription` full prompts (each with its
new tokens) and no more: the distinct instructions outnumber what it holds as full prompts `oversubscription`
times. Nothing here imports vLLM, so the tests run it in the main virtualenv.
"""

from __future__ import annotations

import math
import random
from typing import Callable

from gistcache.errors import GistError
from gistcache.eval.bench import WORDS

SCENARIOS = ("burst", "oversubscribed")
GIB = 2 ** 30


def parse_list(text: str | None, flag: str, convert: Callable[[str], float | int], example: str) -> list | None:
    """`--block-size 32,128` -> [32, 128]: comma- or space-separated numbers; None stays None. A part that is not a
    number is refused naming it (the values themselves are checked by BenchServeConfig)."""
    if text is None:
        return None
    parts = str(text).replace(",", " ").split()
    if not parts:
        raise GistError(f"{flag} takes numbers, got {text!r}: e.g. {flag} {example}")
    values = []
    for part in parts:
        try:
            values.append(convert(part))
        except ValueError:
            raise GistError(f"{flag} takes numbers, got {part!r}: e.g. {flag} {example}") from None
    return values


def arrival_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """(n,) arrival times in seconds from the start of a pass: all 0.0 for rate 0 (one burst), else a Poisson
    process of `rate` requests/s (exponential gaps from random.Random(seed)), non-decreasing, starting at 0."""
    assert n >= 0 and rate >= 0, f"n={n}, rate={rate}"
    if rate == 0:
        return [0.0] * n
    rng, t, times = random.Random(seed), 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


def draw_instructions(requests: int, instructions: int, seed: int = 0) -> list[int]:
    """(requests,) instruction indices in [0, instructions), uniform with repeats, from random.Random(seed)."""
    assert requests >= 1 and instructions >= 1, f"requests={requests}, instructions={instructions}"
    rng = random.Random(f"pool {seed}")  # not the arrivals' stream: the same seed draws both
    return [rng.randrange(instructions) for _ in range(requests)]


def blocks_for(tokens: int, block_size: int) -> int:
    """KV blocks that vLLM allocates for a request of `tokens` tokens (prompt + generated)."""
    return math.ceil(tokens / block_size)


def held_prompts(instructions: int, oversubscription: int) -> int:
    """Full prompts the KV cache is sized to hold: 1/oversubscription of the distinct instructions, at least 1."""
    return max(1, instructions // oversubscription)


def cache_blocks(full_tokens: int, new_tokens: int, block_size: int, held: int) -> int:
    """vLLM's num_gpu_blocks for a cache that holds `held` full prompts of `full_tokens` tokens, each with its
    `new_tokens`: held x ceil((full + new) / block size), plus the null block vLLM keeps back."""
    return held * blocks_for(full_tokens + new_tokens, block_size) + 1


def kv_cache_gib(blocks: int, block_size: int, bytes_per_token: int) -> int:
    """Whole GiB (VLLM_CPU_KVCACHE_SPACE takes an integer) that `blocks` blocks fit in, at least 1."""
    return max(1, math.ceil(blocks * block_size * bytes_per_token / GIB))


def kv_bytes_per_token(hf_config: dict, dtype_bytes: int = 4) -> int:
    """Bytes of K and V one token takes in every layer, from an exported folder's config.json."""
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return 2 * hf_config["num_hidden_layers"] * hf_config.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 100]) of the values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def rate_label(rate: float) -> str:
    return "burst" if rate == 0 else f"{rate:g}/s"


def synth_input(i: int) -> str:
    """The two-word input of the i-th request of a serving benchmark (deterministic, different for neighbours)."""
    return f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i + 3) % len(WORDS)]}"
