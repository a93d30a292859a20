"""Helpers of the GPU run (eval/gpu_bench/): one-line progress messages, device synchronization and memory,
the time budget (OutOfTime, deadline), the median."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import sys
import threading

import torch

from .shapes import PREFIX


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


def median(xs: list[float]) -> float:
    return statistics.median(xs)
