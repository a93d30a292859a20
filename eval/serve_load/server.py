"""`gist serve` for the load run (eval/serve_load/): a free port, the command, and `ServeProcess` (its own process
group: started and waited for on /health, its memory, SIGKILL, stop, its log)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import Deadline, LoadConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gist_command() -> list[str]:
    script = Path(sys.executable).parent / "gist"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gistcache.cli.main"]


class ServeProcess:
    """`gist serve` in its own process group (the API server and the engine process it starts)."""

    def __init__(self, store: Path, port: int, log: Path, config: LoadConfig):
        self.store, self.port, self.log, self.config = store, port, log, config
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts, self.killed_by_us = 0, 0

    def start(self, deadline: Deadline) -> float:
        """Start and wait for /health; the seconds it took."""
        t0 = time.monotonic()
        cmd = [*gist_command(), "serve", "--store", str(self.store), "--port", str(self.port), "--",
               "--max-model-len", str(self.config.max_model_len), *self.config.extra_args]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        with open(self.log, "ab") as log:
            log.write(f"\n==== start {self.starts + 1}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.starts += 1
        self.wait_health(min(self.config.start_timeout_s, deadline.left("the server started")))
        return time.monotonic() - t0

    def wait_health(self, timeout: float) -> None:
        import urllib.request

        from gistcache.errors import GistError

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise GistError(f"gist serve exited with {self.proc.returncode} while starting: {self.tail(1)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise GistError(f"gist serve did not answer /health in {timeout:.0f} s (log: {self.log})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=30) as r:
                return r.status == 200
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The server's process tree."""
        import psutil

        if not self.alive():
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        """Resident bytes of the server's process tree."""
        import psutil

        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        self.killed_by_us += 1
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._reap()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(60)
        except ProcessLookupError:
            pass
        self._reap()

    def _reap(self) -> None:
        """Processes of the group left behind (the engine, when the API server died first): killed."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def tracebacks(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Traceback (most recent call last)")
        except OSError:
            return 0
