#!/usr/bin/env python3
"""The GPU run of issue 26 item 4 as one prepared command: time to first token (TTFT) and batched throughput of
gist caches against full prompts, measured side by side in one process, printed as one table (and JSON).

    PYTHONPATH=. python3 eval/gpu_bench.py                      # 8B-shaped Llama, bfloat16, cuda: ~5 min on an H200
    python3 eval/gpu_bench.py --shape tiny --device cpu --prompt-tokens 128 --batch 4 --new-tokens 4   # seconds

Nothing is downloaded and no weights are needed: the model is a Llama (or Qwen2, `--arch`) of the chosen shape
built from a config with random weights, initialized directly on the device (speed does not depend on the
weights), and the tokenizer is a byte-level one built in memory (one token a byte), so an instruction of
`--prompt-tokens` 2048 is exactly 2,048 tokens. Around it sits an untrained `GistModel` in the shipped run's
layout (`--mask prefix`, compact positions, `--gist-tokens` 1), and every gist cache comes from the library's
own `gistcache.compress`. The script imports only this repository and what it already needs (torch,
transformers with its tokenizers, safetensors, rich): nothing to install on a bare GPU machine.

Measured, all on the device, timed between `torch.cuda.synchronize()` calls, medians after warm-up runs:

* compress: one instruction (median of up to 3), and the `--batch` distinct instructions in one call;
* TTFT at batch 1, one instruction + one input (the three modes interleaved in every repeat):
  - full:   the whole prompt and the input, no cache;
  - cached: the prompt's own KV prefilled once beforehand (a copy per repeat, made outside the timed region);
  - gist:   the gist cache (its few slots: the run's fixed prefix + the gist), from its `GistCache`;
  each two ways: "generate call" (a whole call that returns 1 new token: transformers' `generate` for full and
  cached, `gistcache.generate_ids` for gist, so the gist's checks, the copy of its slots to the device and the
  layout of the batch count) and "prefill forward" (the forward over what is not cached, and the argmax);
* throughput of `--batch` distinct requests at once, `--new-tokens` new tokens each (EOS held off), gist caches
  against full prompts (tokens/s = batch x new tokens / seconds, prefill included):
  - "generate": `gistcache.generate_ids` on the batch of caches vs transformers' `generate` on the full
    prompts: DynamicCache, eager, as the library answers today;
  - the decode loop: prefill (eager, as above), then greedy decoding over a transformers `StaticCache`, the
    decode step compiled the way transformers' `generate` compiles it (`get_compiled_call` with its
    `CompileConfig`: torch.compile, mode reduce-overhead); if compiling fails, or on a CPU, the same loop
    eager; the table says which engine ran and why. It also reports decode-only tokens/s (after the first
    token), which is what the full prompts would get with their prefixes already cached.

Checks, reported in the table (on a GPU in bfloat16 kernels of different shapes round differently, so a
differing near-tie is possible there; tests/test_gpu_bench.py requires every check on the CPU in float32):
the gist answer equals the masked reference (`generate_masked_ids`, the definition, no cache); the batched
gist answers (`--check-tokens` tokens) equal each cache decoded alone; the cached prefix gives the full prompt's
first token; the decode loop's tokens equal the generate engine's, for gist and for full.

Output: progress on stderr, one line a message at any terminal width (`gpu_bench: ...`); then on stdout the
result as one line of JSON and the table, in markdown, drawn at its natural width whatever COLUMNS says, so
every row is one line. A measurement that fails leaves its row saying why and the rest still runs; the table
is printed at the end in every case. `--time-budget` (default 480 s) stops the run in time to print it: a stage
still running then is stopped, later ones are skipped, each row saying so. Exit code 0, 1 when a stage failed
or was skipped, 2 for bad options.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import from the repository root, never from eval/ itself
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from gistcache._io import atomic_write_text  # noqa: E402
from gistcache._version import __version__  # noqa: E402
from gistcache.byte_tokenizer import VOCAB_SIZE, byte_tokenizer  # noqa: E402
from gistcache.compression import compress  # noqa: E402
from gistcache.environment import cpu_name, package_versions  # noqa: E402
from gistcache.errors import GistError  # noqa: E402
from gistcache.generation import (GREEDY, build_batch, generate_ids, generate_masked_ids,  # noqa: E402
                                  suppressed_token_ids)
from gistcache.identity import model_kv_shape  # noqa: E402
from gistcache.model import (GistModel, cache_kwarg, cache_layers, fingerprint_model,  # noqa: E402
                             quiet_transformers, returned_cache)
from gistcache.prompts import encode_input, encode_instruction  # noqa: E402

PREFIX = "gpu_bench:"
FAILED, USAGE = 1, 2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=8192, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=3, pad_token_id=1)
# model shapes: "8b" is Llama-3-8B (Qwen2-7B for --arch qwen2), "1b" Llama-3.2-1B; vocabularies as the real ones
SHAPES = {
    "tiny": {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
             "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)},
    "1b": {"llama": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
           "qwen2": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0)},
    "8b": {"llama": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
           "qwen2": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0)},
}
WORDS = (
    "river stone garden lantern copper window autumn signal harbor meadow pencil orbit violet thunder marble "
    "canvas ladder forest silver engine pocket bridge candle winter planet shadow velvet anchor basket crystal "
    "falcon mirror tunnel summer feather island puzzle rocket saddle timber valley whistle yellow zipper"
).split()
MODES = ("full", "cached", "gist")


# ---------------------------------------------------------------------------------------------------- options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        say(f"error: {message} (--help lists the options)")
        raise SystemExit(USAGE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="eval/gpu_bench.py", description="TTFT and batched throughput of gist caches vs full "
                "prompts on one accelerator (random weights of a real model's shape; see the module docstring).")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="model shape (default 8b)")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="instruction tokens (default 2048)")
    p.add_argument("--batch", type=int, default=64, help="distinct requests for the throughput (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens a request for the throughput (default 64)")
    p.add_argument("--gist-tokens", type=int, default=1, help="N gist tokens (default 1, as the shipped run)")
    p.add_argument("--mask", choices=["prefix", "paper"], default="prefix", help="default prefix, as the shipped run")
    p.add_argument("--repeats", type=int, default=7, help="timed TTFT runs a mode, after 2 warm-ups (default 7)")
    p.add_argument("--batch-repeats", type=int, default=3, help="timed throughput runs, after 1 warm-up (default 3)")
    p.add_argument("--decode", choices=["auto", "compile", "static"], default="auto",
                   help="decode loop engine: compile (static cache + torch.compile), static (static cache, eager); "
                        "auto: compile on cuda, static on cpu; a failed compile falls back to static")
    p.add_argument("--check-tokens", type=int, default=4,
                   help="tokens a row the gist checks compare (masked reference, batched vs alone; default 4)")
    p.add_argument("--compress-batch", type=int, default=8, help="compress batch size (default 8)")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds from the start after which running stages stop and the table is printed")
    p.add_argument("--compile-reserve", type=float, default=150.0,
                   help="seconds of the budget the compiled loop needs left to be tried (default 150)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    for name, low in (("prompt_tokens", 1), ("batch", 1), ("new_tokens", 2), ("gist_tokens", 1), ("repeats", 1),
                      ("batch_repeats", 1), ("check_tokens", 1), ("compress_batch", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.batch > 1000:
        p.error(f"--batch must be <= 1000 (the inputs are numbered with 3 digits), got {args.batch}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device: use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device (torch {torch.__version__})")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device}: only cuda and cpu are measured")
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    if args.out is not None and Path(args.out).is_dir():
        p.error(f"--out {args.out} is a folder: give a file name such as {Path(args.out) / 'gpu-bench.json'}")
    return args


# ---------------------------------------------------------------------------------------------------- helpers


def say(msg: str) -> None:
    """One progress line on stderr, whatever the terminal's width: never wrapped, newlines folded."""
    print(f"{PREFIX} {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class OutOfTime(Exception):
    """The time budget ran out (or the process was asked to stop) while a stage ran."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise OutOfTime in the main thread once `seconds` have passed (SIGALRM; nothing where there is none)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise OutOfTime("the time budget ran out")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def model_config(shape: str, arch: str):
    from transformers import LlamaConfig, Qwen2Config  # deferred: transformers takes seconds to import

    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**{**COMMON, **SHAPES[shape][arch]})


def synth_instruction(tokenizer, n_tokens: int, seed: int) -> str:
    """Words from WORDS, cut to exactly `n_tokens` tokens of the byte tokenizer (no space at either end)."""
    rng = random.Random(seed)
    text = ""
    while len(text) < n_tokens + 1:
        text += rng.choice(WORDS) + " "
    text = text[:n_tokens]
    if text[-1] == " ":
        text = text[:-1] + "s"
    if len(tokenizer(text, add_special_tokens=False).input_ids) != n_tokens:
        raise GistError(f"the synthetic instruction is not {n_tokens} tokens long: the tokenizer is not byte-level")
    return text


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


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------------- the bench


class Bench:
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


# ---------------------------------------------------------------------------------------------------- the table


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f} ms"


def _s(s: float | None) -> str:
    return "-" if s is None else f"{s:,.2f} s"


def _tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} tok/s"


def _x(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


COLUMNS = ("measurement", "full prompt", "cached prefix", "gist cache", "gist vs full", "gist vs cached", "note")


def table_rows(res: dict) -> list[list[str]]:
    """The table: one row a measurement, always all of them; a row whose stage failed or was skipped says why."""
    cfg, errors, skipped = res["config"], res["errors"], res["skipped"]
    B, T = cfg["batch"], cfg["new_tokens"]

    def why(*stages: str) -> str:
        for s in stages:
            if s in errors:
                return f"failed ({s}): {errors[s]}"
            if s in skipped:
                return f"{s} {skipped[s]}"
        return ""

    m, model, prompt, kv = res["machine"], res["model"], res["prompt"], res["kv_bytes"]
    rows = []
    cpu = f"{m.get('cpu', '-')} x{m.get('cpu_count', '-')}"
    if m.get("gpu"):
        peak = f"; peak {_bytes(res['peak_gpu_memory_bytes'])} allocated" if res.get("peak_gpu_memory_bytes") else ""
        where = f"{m['gpu']} ({m['device']}, {_bytes(m['gpu_memory_bytes'])}, CUDA {m.get('cuda')}){peak}; CPU {cpu}"
    else:
        where = f"CPU {cpu} ({m.get('device', cfg['device'])}, torch threads: {m.get('torch_threads')})"
    rows.append(["machine", "", "", "", "", "", where if m else why("setup")])
    rows.append(["software", "", "", "", "", "", f"torch {m.get('torch')}, transformers {m.get('transformers')}, "
                 f"python {m.get('python')}, gistcache {m.get('gistcache')}" if m else why("setup")])
    rows.append(["model", "", "", "", "", "", (
        f"{model['arch']} {model['shape']}-shaped, random weights: {_count(model['parameters'])} parameters, "
        f"{model['layers']} layers, {model['kv_heads']} KV heads x {model['head_dim']}, vocab {model['vocab_size']:,}, "
        f"{model['dtype']}, sdpa; {model['gist_tokens']} gist token{'s' if model['gist_tokens'] > 1 else ''}, "
        f"{model['mask']} mask")
        if model else why("setup")])
    if prompt:
        slots = prompt.get("gist_slots")
        rows.append(["prompt (tokens)", f"{prompt['prompt_tokens']:,} + {prompt['input_tokens']}",
                     f"{prompt['prompt_tokens']:,} cached + {prompt['input_tokens']}",
                     f"{slots} slots + {prompt['input_tokens']}" if slots else "-", "", "",
                     f"{prompt['instruction_tokens']:,} instruction tokens + {prompt['template_tokens']} of the "
                     f"template; input {prompt['input_tokens']} tokens" + (
                         f"; gist slots = {kv.get('fixed_prefix_tokens')} fixed-prefix + {kv.get('gist_tokens')} "
                         f"gist" if kv else "")])
    else:
        rows.append(["prompt (tokens)", "-", "-", "-", "", "", why("setup", "prompts")])
    if kv:
        rows.append(["prompt KV per request", _bytes(kv["full_per_request"]), _bytes(kv["full_per_request"]),
                     _bytes(kv["gist_per_request"]), _x(kv["full_per_request"] / kv["gist_per_request"]) + " less",
                     _x(kv["full_per_request"] / kv["gist_per_request"]) + " less",
                     f"x{B}: {_bytes(B * kv['full_per_request'])} vs {_bytes(B * kv['gist_per_request'])}; cache file "
                     f"tensors {_bytes(kv['gist_file_tensors'])}"])
    else:
        rows.append(["prompt KV per request", "-", "-", "-", "", "", why("setup", "prompts", "compress")])
    c = res["compress"]
    rows.append(["compress 1 instruction", "", "", _ms(c.get("one_s")), "", "",
                 "median; the cost of one prefill of the prompt, paid once per instruction" if c
                 else why("setup", "prompts", "compress")])
    rows.append([f"compress {B} instructions", "", "", _s(c.get("batch_s")), "", "",
                 f"one call, batch size {c['batch_size']}" if c else why("setup", "prompts", "compress")])
    for how, label, note in (
            ("generate", "TTFT, generate call",
             "a call returning 1 token: transformers generate (full, cached), gistcache generate_ids (gist)"),
            ("forward", "TTFT, prefill forward", "the forward over what is not cached, and its argmax")):
        r = _get(res, "ttft", how)
        if r:
            rows.append([label, _ms(r["full"]["median_s"]), _ms(r["cached"]["median_s"]),
                         _ms(r["gist"]["median_s"]), _x(r["speedup_vs_full"]), _x(r["speedup_vs_cached"]),
                         f"batch 1, median of {cfg['repeats']}; {note}"])
        else:
            rows.append([label, "-", "-", "-", "-", "-", why("setup", "prompts", "compress", "ttft")])
    g = _get(res, "throughput", "generate")
    label = f"x{B} generate: tokens/s"
    if g:
        rows.append([label, _tps(g["full"]["tokens_per_s"]), "", _tps(g["gist"]["tokens_per_s"]), _x(g["speedup"]),
                     "", f"{B} distinct requests x {T} new tokens, prefill included (full {_s(g['full']['total_s'])}, "
                         f"gist {_s(g['gist']['total_s'])}); DynamicCache, eager; median of {cfg['batch_repeats']}"])
    else:
        rows.append([label, "-", "", "-", "-", "", why("setup", "prompts", "compress", "throughput generate")])
    lp = _get(res, "throughput", "loop") or {}
    engine = {"compile": "static cache + compiled step", "static": "static cache, eager"}.get(lp.get("engine"))
    notes = "; ".join(lp.get("notes") or [])
    if engine:
        how = (f"torch.compile {lp['compile_config'].get('mode')} (transformers' CompileConfig)"
               if lp.get("compile_config") else "eager")
        rows.append([f"x{B} {engine}: tokens/s", _tps(lp["full"]["tokens_per_s"]), "",
                     _tps(lp["gist"]["tokens_per_s"]), _x(lp["speedup"]), "",
                     f"prefill included (full {_s(lp['full']['total_s'])}, gist {_s(lp['gist']['total_s'])}); "
                     f"decode step {how}" + (f"; {notes}" if notes else "")])
        rows.append([f"x{B} {engine}: decode tokens/s", _tps(lp["full"]["decode_tokens_per_s"]),
                     _tps(lp["full"]["decode_tokens_per_s"]), _tps(lp["gist"]["decode_tokens_per_s"]),
                     _x(lp["decode_speedup"]), _x(lp["decode_speedup"]),
                     f"after the first token ({T - 1} steps): what {B} prefixes cached beforehand would decode at"])
    else:
        reason = why("setup", "prompts", "compress", "decode loop") or notes
        rows.append([f"x{B} decode loop: tokens/s", "-", "", "-", "-", "", reason])
        rows.append([f"x{B} decode loop: decode tokens/s", "-", "-", "-", "-", "-", reason])
    check_stage = {"cached = full (first token)": "ttft", "gist forward = gist generate (first token)": "ttft",
                   "gist = masked reference": "checks", "gist batched = each cache alone": "checks",
                   "decode loop = generate (gist)": "decode loop", "decode loop = generate (full)": "decode loop"}
    for name, stage in check_stage.items():
        ch = res["checks"].get(name)
        if ch:
            rows.append([f"check: {name}", "", "", "", "", "", f"{'ok' if ch['ok'] else 'DIFFERS'}: {ch['detail']}"])
        else:
            rows.append([f"check: {name}", "", "", "", "", "",
                         why("setup", "prompts", "compress", stage, "throughput generate") or "not run"])
    for stage, reason in res["errors"].items():
        rows.append([f"failed: {stage}", "", "", "", "", "", reason])
    for stage, reason in res["skipped"].items():
        rows.append([f"skipped: {stage}", "", "", "", "", "", reason])
    n_err, n_skip = len(res["errors"]), len(res["skipped"])
    rows.append(["run", "", "", "", "", "", f"{res.get('elapsed_s', 0):.0f} s of the {cfg['time_budget']:g} s "
                 f"budget; " + ("all measured" if not n_err + n_skip else f"{n_err} stages failed, {n_skip} skipped")])
    return rows


def render_table(rows: list[list[str]]) -> str:
    """The rows as a markdown table drawn by rich at its natural width (every row one line, whatever COLUMNS)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.MARKDOWN, show_edge=True)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if 0 < i < len(COLUMNS) - 1 else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    b = Bench(args)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def term(signum, frame):
            raise OutOfTime("the process was asked to stop (SIGTERM)")
        old_term = signal.signal(signal.SIGTERM, term)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if b.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(b.device)
            b.describe_machine()
            b.stage("setup", b.setup)
            b.stage("prompts", b.prompts, needs=("gm",))
            b.stage("compress", b.compress_stage, needs=("gm", "texts"))
            b.stage("ttft", b.ttft, needs=("gm", "caches"))
            b.stage("checks", b.checks, needs=("gm", "caches"))
            b.stage("throughput generate", b.throughput_generate, needs=("gm", "caches"))
            b.stage("decode loop", b.throughput_loop, needs=("gm", "caches"))
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        torch.set_num_threads(threads)
    b.result["elapsed_s"] = time.perf_counter() - b.start
    if b.device.type == "cuda":
        b.result["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(b.device)
    b.result["table"] = table_rows(b.result)
    return b.result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        say(f"wrote {args.out}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    print(render_table(result["table"]), flush=True)
    return FAILED if result["errors"] or result["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
