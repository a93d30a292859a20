"""The TTFT stage and the gist checks of the GPU run's `Bench` (bench.py), a mixin: it reads `self.args`, `gm`,
`device`, `texts`, `caches` and records into `self.result` through `self.check`."""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from gistcache.inference.generation import GREEDY, generate_ids, generate_masked_ids, suppressed_token_ids
from gistcache.model import cache_kwarg, returned_cache

from .decode import banned_ids, gist_prefill, pick
from .shapes import MODES
from .timing import median, say, sync


class TTFTStages:
    """`Bench.ttft` and `Bench.checks` (see `Bench`)."""

    def ttft(self) -> None:
        """TTFT at batch 1, the three modes interleaved in each repeat, after 2 warm-ups."""
        args, gm, device, t = self.args, self.gm, self.device, self.texts
        lm, ckw, banned = gm.model, cache_kwarg(gm.stock_model), banned_ids(gm)
        P = t["P"]
        full = torch.tensor([t["prompt_ids"][0] + t["input_ids"][0]], device=device)  # (1, P+L)
        ones = torch.ones_like(full)
        cache0, input0 = self.caches[0], t["inputs"][0]
        gen = dict(max_new_tokens=1, min_new_tokens=1, eos_token_id=gm.tokenizer.eos_token_id,
                   pad_token_id=gm.tokenizer.pad_token_id, suppress_tokens=suppressed_token_ids(gm) or None, **GREEDY)
        with torch.no_grad():
            prefix = returned_cache(lm(input_ids=full[:, :P], use_cache=True, logits_to_keep=1))

        def last(out):  # 1-token generate output (1, P+L+1) -> the new token
            return int(out[0, -1])

        runs: dict[tuple[str, str], Callable] = {
            ("generate", "full"): lambda _: last(lm.generate(input_ids=full, attention_mask=ones, **gen)),
            ("generate", "cached"): lambda past: last(lm.generate(input_ids=full, attention_mask=ones,
                                                                  **{ckw: past}, **gen)),
            ("generate", "gist"): lambda _: generate_ids(gm, cache0, input0, max_new_tokens=1, min_new_tokens=1,
                                                         **GREEDY)[0][0],
            ("forward", "full"): lambda _: int(pick(lm(input_ids=full, use_cache=True,
                                                       logits_to_keep=1).logits[:, -1], banned)),
            ("forward", "cached"): lambda past: int(pick(lm(input_ids=full[:, P:], use_cache=True, logits_to_keep=1,
                                                            **{ckw: past}).logits[:, -1], banned)),
            ("forward", "gist"): lambda _: int(pick(gist_prefill(gm, [cache0], [input0], 1)()[0], banned)),
        }
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        first: dict[tuple[str, str], int] = {}
        with torch.no_grad():
            for r in range(2 + args.repeats):
                for key, fn in runs.items():
                    past = copy.deepcopy(prefix) if key[1] == "cached" else None  # outside the timed region
                    sync(device)
                    start = time.perf_counter()
                    first[key] = fn(past)
                    sync(device)
                    if r >= 2:
                        times[key].append(time.perf_counter() - start)
                    del past
                if r >= 2:
                    say(f"ttft repeat {r - 1}/{args.repeats}: " + ", ".join(
                        f"{how} {mode} {times[(how, mode)][-1] * 1e3:.1f} ms" for how, mode in runs))
        out = self.result["ttft"]
        for how in ("generate", "forward"):
            out[how] = {mode: {"median_s": median(times[(how, mode)]), "runs_s": times[(how, mode)],
                               "first_token": first[(how, mode)]} for mode in MODES}
            out[how]["speedup_vs_full"] = out[how]["full"]["median_s"] / out[how]["gist"]["median_s"]
            out[how]["speedup_vs_cached"] = out[how]["cached"]["median_s"] / out[how]["gist"]["median_s"]
        self.check("cached = full (first token)",
                   [first[("generate", "cached")], first[("forward", "cached")], first[("forward", "full")]],
                   [first[("generate", "full")]] * 3, "first tokens (cached generate, cached forward, full forward)")
        self.check("gist forward = gist generate (first token)", [first[("forward", "gist")]],
                   [first[("generate", "gist")]], "first tokens")

    def checks(self) -> None:
        """The gist answer path against its references (token ids, greedy)."""
        args, gm, t = self.args, self.gm, self.texts
        k, n = args.check_tokens, args.batch
        m = min(2, n)
        with torch.no_grad():
            lib = [generate_ids(gm, c, x, max_new_tokens=k, **GREEDY)[0]
                   for c, x in zip(self.caches[:m], t["inputs"][:m])]
            ref = generate_masked_ids(gm, t["instructions"][:m], t["inputs"][:m], max_new_tokens=k)
            self.check("gist = masked reference", lib, ref, f"answers of up to {k} tokens")
            batched = generate_ids(gm, self.caches[:n], t["inputs"][:n], max_new_tokens=k, min_new_tokens=k, **GREEDY)
            alone = [generate_ids(gm, c, x, max_new_tokens=k, min_new_tokens=k, **GREEDY)[0]
                     for c, x in zip(self.caches[:n], t["inputs"][:n])]
            self.check("gist batched = each cache alone", batched, alone, f"rows of {k} tokens")
