"""The GPU run's `Bench` (eval/gpu_bench/): its arguments, the stages run one by one (a failure recorded, the run
going on), the checks, and the set-up stages (the model, the prompts, compress). The measurements are its mixins:
ttft.py (TTFT, the gist checks), throughput.py (generate, the decode loop)."""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import time
from typing import Callable

import torch

from gistcache._version import __version__
from gistcache.cache.identity import model_kv_shape
from gistcache.environment import cpu_name, package_versions
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import GistModel, fingerprint_model
from gistcache.model.byte_tokenizer import byte_tokenizer
from gistcache.prompts import encode_input, encode_instruction

from .shapes import DTYPES, model_config, synth_instruction
from .table import _count
from .throughput import ThroughputStages
from .timing import OutOfTime, deadline, first_line, free_memory, median, say, sync
from .ttft import TTFTStages


class Bench(TTFTStages, ThroughputStages):
    """The run: its arguments, what each stage left for the next, and the result that the table is drawn from."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.stopped: str | None = None  # why every later stage is skipped
        self.gm: GistModel | None = None
        self.caches = None
        self.texts = None
        self.gen_tokens: dict[str, torch.Tensor] = {}  # the generate engine's tokens, for the decode loop's check
        self.result: dict = {
            "benchmark": "eval/gpu_bench.py", "config": dict(vars(args)), "machine": {}, "model": {}, "prompt": {},
            "compress": {}, "kv_bytes": {}, "ttft": {}, "throughput": {}, "checks": {}, "errors": {}, "skipped": {},
        }

    def describe_machine(self) -> None:
        """The machine's name and software, first (it is in the table whatever fails later)."""
        device = self.device
        machine = {"device": str(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                   "platform": platform.platform(), "python": platform.python_version(),
                   **package_versions(), "gistcache": __version__, "torch_threads": torch.get_num_threads()}
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            machine.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                           cuda=torch.version.cuda)
        self.result["machine"] = machine
        say(f"machine: {machine.get('gpu', machine['cpu'])} ({device}), torch {machine['torch']}, transformers "
            f"{machine['transformers']}")

    def left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.start)

    def stage(self, name: str, fn: Callable[[], None], needs: tuple[str, ...] = ()) -> None:
        """Run one stage; a failure is recorded (the table's rows say why) and the run goes on."""
        errors, skipped = self.result["errors"], self.result["skipped"]
        missing = [n for n in needs if getattr(self, n) is None]
        if self.stopped or missing:
            skipped[name] = self.stopped or f"skipped: needs the {', '.join(missing)} of an earlier stage, which failed"
            say(f"{name}: {skipped[name]}")
            return
        if self.left() <= 0:
            self.stopped = skipped[name] = f"skipped: the time budget of {self.args.time_budget:g} s ran out"
            say(f"{name}: {skipped[name]}")
            return
        say(f"{name} ...")
        t = time.perf_counter()
        try:
            with deadline(self.left()):
                fn()
        except OutOfTime as exc:
            self.stopped = f"skipped: the run was stopped ({exc})"
            errors[name] = f"stopped after {time.perf_counter() - t:.0f} s: {exc}"
            say(f"{name}: {errors[name]}")
        except Exception as exc:  # any failure of a measurement: its rows say why, the others still run
            errors[name] = first_line(exc)
            say(f"{name} failed: {errors[name]}")
        else:
            say(f"{name}: done in {time.perf_counter() - t:.1f} s")
        free_memory(self.device)

    def check(self, name: str, got: list, want: list, what: str) -> None:
        """Record whether two lists of token rows are equal, row by row."""
        same = sum(a == b for a, b in zip(got, want))
        ok = same == len(want) == len(got)
        distinct = len({str(w) for w in want})
        detail = f"{same}/{len(want)} {what} equal ({distinct} distinct)"
        if not ok:
            i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 0)
            detail += f"; first difference: row {i}: {str(got[i])[:60]} vs {str(want[i])[:60]}"
        self.result["checks"][name] = {"ok": ok, "detail": detail, "rows": len(want), "equal": same,
                                       "distinct": distinct}
        say(f"check {name}: {'ok' if ok else 'DIFFERS'} ({detail})")

    # ---- stages

    def setup(self) -> None:
        from transformers import AutoModelForCausalLM  # deferred: transformers takes seconds to import

        args, device, res = self.args, self.device, self.result
        tok = byte_tokenizer()
        config = model_config(args.shape, args.arch)
        torch.manual_seed(args.seed)
        sync(device)
        t = time.perf_counter()
        with torch.device(device):  # initialized where it runs: no minutes of CPU init for 8B
            base = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="sdpa")
        base.eval()
        sync(device)
        init_s = time.perf_counter() - t
        gm = GistModel(base, tok, args.gist_tokens, mask=args.mask, base_fingerprint=fingerprint_model(base)).eval()
        # as load_run sets it (read, not recomputed): caches check against it without hashing the weights each call
        gm.run_fingerprint = hashlib.sha256(f"untrained|{gm.base_fingerprint}".encode()).hexdigest()
        layers, kv_heads, head_dim = model_kv_shape(gm)
        res["model"] = {"arch": args.arch, "shape": args.shape, "weights": "random (from a config)",
                        "parameters": sum(p.numel() for p in base.parameters()), "layers": layers,
                        "kv_heads": kv_heads, "head_dim": head_dim, "hidden_size": config.hidden_size,
                        "vocab_size": config.vocab_size, "dtype": args.dtype, "attention": "sdpa",
                        "init_s": init_s, "gist_tokens": args.gist_tokens, "mask": gm.mask,
                        "positions": gm.positions, "fixed_prefix_tokens": gm.num_prefix_tokens}
        say(f"model: {args.arch} {args.shape}-shaped, {_count(res['model']['parameters'])} parameters, "
            f"{args.dtype}, initialized on {device} in {init_s:.1f} s")
        self.gm = gm

    def prompts(self) -> None:
        args, gm = self.args, self.gm
        tok = gm.tokenizer
        instructions = [synth_instruction(tok, args.prompt_tokens, args.seed * 100003 + i) for i in range(args.batch)]
        if len(set(instructions)) != len(instructions):
            raise GistError("two synthetic instructions are equal: use another --seed")
        inputs = [f"Request {i:03d}: answer in one short paragraph." for i in range(args.batch)]
        prompt_ids = [encode_instruction(tok, s, gm.template) for s in instructions]
        input_ids = [encode_input(tok, x, gm.template) for x in inputs]
        lengths = {len(p) + len(x) for p, x in zip(prompt_ids, input_ids)}
        if len(lengths) != 1:  # the decode loop and the full batch have no padding
            raise GistError(f"the requests are not all the same length ({sorted(lengths)})")
        P, L = len(prompt_ids[0]), len(input_ids[0])
        need = P + gm.num_gist_slots(P) + L + args.new_tokens
        if need > gm.max_context():
            raise GistError(f"--prompt-tokens {args.prompt_tokens}: {need} positions exceed the model's context of "
                            f"{gm.max_context()}")
        self.texts = {"instructions": instructions, "inputs": inputs, "prompt_ids": prompt_ids,
                      "input_ids": input_ids, "P": P, "L": L}
        self.result["prompt"] = {"instruction_tokens": args.prompt_tokens, "prompt_tokens": P, "input_tokens": L,
                                 "template_tokens": P - args.prompt_tokens, "requests": args.batch,
                                 "new_tokens": args.new_tokens}

    def compress_stage(self) -> None:
        args, gm, device, t = self.args, self.gm, self.device, self.texts
        instructions = t["instructions"]
        compress(gm, instructions[0])  # warm-up
        one = []
        for _ in range(min(args.repeats, 3)):
            sync(device)
            start = time.perf_counter()
            compress(gm, instructions[0])
            sync(device)
            one.append(time.perf_counter() - start)
        sync(device)
        start = time.perf_counter()
        caches = compress(gm, instructions, batch_size=args.compress_batch)
        sync(device)
        batch_s = time.perf_counter() - start
        c = caches[0]
        layers, kv_heads, head_dim = model_kv_shape(gm)
        per_token = layers * 2 * kv_heads * head_dim * DTYPES[args.dtype].itemsize
        slots = c.offset  # what the input reads: the fixed prefix F and the M gist slots
        self.result["compress"] = {"one_s": median(one), "one_runs_s": one, "batch_s": batch_s,
                                   "batch_size": args.compress_batch, "instructions": len(caches)}
        self.result["kv_bytes"] = {"per_token": per_token, "full_per_request": t["P"] * per_token,
                                   "gist_per_request": slots * per_token, "gist_file_tensors": c.nbytes,
                                   "gist_slots": slots, "gist_tokens": c.num_gist_tokens,
                                   "fixed_prefix_tokens": c.key_start}
        self.result["prompt"]["gist_slots"] = slots
        self.caches = caches
