"""The throughput stages of the GPU run's `Bench` (bench.py), a mixin: `--batch` distinct requests through the
library's generate engine against transformers' generate, and through the static-cache decode loop."""

from __future__ import annotations

import time
from typing import Callable

import torch

from gistcache.inference.generation import GREEDY, generate_ids, suppressed_token_ids

from .decode import DecodeLoop, full_prefill, gist_prefill
from .timing import OutOfTime, first_line, free_memory, median, say, sync


class ThroughputStages:
    """`Bench.throughput_generate` and `Bench.throughput_loop` (see `Bench`)."""

    def throughput_generate(self) -> None:
        """The library's answer path on the batch of caches vs transformers' generate on the full prompts."""
        args, gm, device, t = self.args, self.gm, self.device, self.texts
        lm, B, T = gm.model, args.batch, args.new_tokens
        full = torch.tensor([p + x for p, x in zip(t["prompt_ids"], t["input_ids"])], device=device)  # (B, P+L)
        ones = torch.ones_like(full)
        caches, inputs = self.caches[:B], t["inputs"][:B]

        def run_full(n: int) -> torch.Tensor:
            out = lm.generate(input_ids=full, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
                              eos_token_id=gm.tokenizer.eos_token_id, pad_token_id=gm.tokenizer.pad_token_id,
                              suppress_tokens=suppressed_token_ids(gm) or None, **GREEDY)
            return out[:, full.shape[1]:]

        def run_gist(n: int) -> torch.Tensor:
            return torch.tensor(generate_ids(gm, caches, inputs, max_new_tokens=n, min_new_tokens=n, **GREEDY))

        self.result["throughput"]["generate"] = self._measure({"gist": run_gist, "full": run_full}, "generate")

    def _measure(self, runs: dict[str, Callable[[int], torch.Tensor]], engine: str) -> dict:
        """Warm-up (2 new tokens), then `--batch-repeats` timed runs of T new tokens, the modes interleaved."""
        args, device = self.args, self.device
        B, T = args.batch, args.new_tokens
        totals: dict[str, list[float]] = {m: [] for m in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn(2)
            for r in range(args.batch_repeats):
                for mode, fn in runs.items():
                    sync(device)
                    start = time.perf_counter()
                    tokens = fn(T)
                    sync(device)
                    totals[mode].append(time.perf_counter() - start)
                    if tuple(tokens.shape) != (B, T):
                        raise RuntimeError(f"{engine} {mode}: {tuple(tokens.shape)} tokens, expected ({B}, {T})")
                    self.gen_tokens[mode] = tokens.cpu()
                say(f"{engine} repeat {r + 1}/{args.batch_repeats}: " + ", ".join(
                    f"{m} {v[-1]:.2f} s ({B * T / v[-1]:,.0f} tok/s)" for m, v in totals.items()))
        out = {m: {"total_s": median(v), "runs_s": v, "tokens_per_s": B * T / median(v)} for m, v in totals.items()}
        out["speedup"] = out["gist"]["tokens_per_s"] / out["full"]["tokens_per_s"]
        return out

    def throughput_loop(self) -> None:
        """The decode loop over a static cache, compiled where it can be; falls back to eager and says why."""
        args, gm, device, t = self.args, self.gm, self.device, self.texts
        B = args.batch
        wanted = {"auto": ["compile", "static"] if device.type == "cuda" else ["static"],
                  "compile": ["compile", "static"], "static": ["static"]}[args.decode]
        notes = []
        if args.decode == "auto" and device.type != "cuda":
            notes.append("compile not tried on cpu (--decode compile tries it)")
        full = torch.tensor([p + x for p, x in zip(t["prompt_ids"], t["input_ids"])], device=device)  # (B, P+L)
        prefills = {"gist": gist_prefill(gm, self.caches[:B], t["inputs"][:B], args.new_tokens),
                    "full": full_prefill(gm, full)}
        for engine in wanted:
            if engine == "compile" and self.left() < args.compile_reserve:
                notes.append(f"compile skipped: {self.left():.0f} s of the time budget left, it needs "
                             f"{args.compile_reserve:.0f} s (--compile-reserve)")
                continue
            try:
                loop = DecodeLoop(gm, engine)
                res = self._measure_loop(loop, prefills, engine)
            except OutOfTime:
                raise
            except Exception as exc:
                notes.append(f"{engine} failed: {first_line(exc)}")
                say(f"decode loop: {notes[-1]}")
                loop = None
                if engine == "compile":
                    torch._dynamo.reset()
                free_memory(device)
                continue
            res.update(engine=engine, notes=notes, compile_config=loop.compile_config)
            self.result["throughput"]["loop"] = res
            return
        self.result["throughput"]["loop"] = {"engine": None, "notes": notes}
        raise RuntimeError("; ".join(notes) or "no decode engine ran")

    def _measure_loop(self, loop: "DecodeLoop", prefills: dict, engine: str) -> dict:
        args = self.args
        B, T = args.batch, args.new_tokens
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in prefills}
        tokens: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for mode, prefill in prefills.items():  # warm-up: compiles the step for each cache shape
                sync(self.device)
                start = time.perf_counter()
                loop.run(mode, prefill, T, steps=min(T, 4))
                say(f"decode loop ({engine}) warm-up {mode}: {time.perf_counter() - start:.1f} s")
            for r in range(args.batch_repeats):
                for mode, prefill in prefills.items():
                    tokens[mode], prefill_s, total_s = loop.run(mode, prefill, T)
                    runs[mode].append((prefill_s, total_s))
                say(f"decode loop ({engine}) repeat {r + 1}/{args.batch_repeats}: " + ", ".join(
                    f"{m} {v[-1][1]:.2f} s ({B * T / v[-1][1]:,.0f} tok/s, decode "
                    f"{B * (T - 1) / (v[-1][1] - v[-1][0]):,.0f} tok/s)" for m, v in runs.items()))
        out = {}
        for mode, v in runs.items():
            total = median([b for _, b in v])
            decode = median([b - a for a, b in v])
            out[mode] = {"total_s": total, "prefill_s": median([a for a, _ in v]), "decode_s": decode,
                         "runs_s": [b for _, b in v], "tokens_per_s": B * T / total,
                         "decode_tokens_per_s": B * (T - 1) / decode}
        out["speedup"] = out["gist"]["tokens_per_s"] / out["full"]["tokens_per_s"]
        out["decode_speedup"] = out["gist"]["decode_tokens_per_s"] / out["full"]["decode_tokens_per_s"]
        out["tokens_sample"] = {mode: tokens[mode][:2, :8].tolist() for mode in prefills}  # the first 2 rows
        for mode in prefills:
            if mode in self.gen_tokens:
                self.check(f"decode loop = generate ({mode})", tokens[mode].cpu().tolist(),
                           self.gen_tokens[mode].tolist(), f"rows of {T} tokens")
        return out
