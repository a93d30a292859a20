"""The GPU run's options (eval/gpu_bench/): parsed and checked, every error one `gpu_bench:` line and exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .shapes import DTYPES, SHAPES, USAGE
from .timing import say


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
