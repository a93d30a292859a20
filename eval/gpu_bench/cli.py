"""The GPU run's entry (eval/gpu_bench/): `run` (the stages in order, under the time budget and SIGTERM) and
`main` (options, the JSON file, the JSON line and the table, the exit code)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import warnings

import torch

from gistcache._io import atomic_write_text
from gistcache.model import quiet_transformers

from .bench import Bench
from .options import parse_args
from .shapes import FAILED
from .table import render_table, table_rows
from .timing import OutOfTime, say


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
