"""Load and faults against `gist serve` (issue 26 item 2): bounded, on 127.0.0.1, stopping by itself.

`run_load(LoadConfig(...))` starts `gist serve` of the shipped run (exported into a store of its own) and:

1. **load**: N requests at concurrency C, about 10% of them bad (an unknown cache key, a tampered store entry, a
   cache of another run, a file named by path, an input longer than the context, malformed JSON, a missing
   field), the good ones over /v1/completions (by key and by `gist_prompt`) and /v1/chat/completions. Every good
   one must be answered, the answers of a sample of (instruction, input) pairs must equal `gist generate`
   (greedy, the same instruction and input), every answer to one pair must be the same, every bad one must get a
   4xx whose reason is one line and says what is wrong, and the resident memory of the server's process tree
   after the load must be within `memory_slack` of what it was after a warmup;
2. **replace**: while requests for one key run, that key's store entry is replaced on disk over and over (by
   another prompt's sealed cache, by its own bytes again, and by its own bytes written in place in two halves
   over the other's, so a reader can see a file that is half of each): every answer must be the key's own
   cache's answer or a refusal, never the other prompt's or anything else (a mix), and after the file is put back
   the key answers as before. A refusal is a one-line 4xx from the API server's check, or, when the file changes
   between that check and the engine's read, a 500 from vLLM for a request the engine failed (its connector logs
   why; counted apart, and only as many as the log shows);
3. **kill**: the server (API process and engine, its process group) is killed with SIGKILL in the middle of a
   load that writes new entries into the store (`gist_prompt` requests of new instructions); every store entry is
   then verified as `gist cache verify --run` does (file, fit, compressed again; `gistcache.verify`), `gist serve`
   is started again on the same port and store, and requests after the restart must be answered (and equal
   `gist generate` on the sample).

The report (`LoadReport.to_dict()`, and `print_report` as a rich table) gives the counts: answered, equal to
gist generate, refused with a reason, crashed (5xx, a server that exits by itself, tracebacks in its log),
restarts survived, memory before/after.

    python -m gistcache.eval.serve_load --requests 500 --concurrency 32 --out load.json

Everything is bounded: request counts, a timeout per request, a deadline for the whole run; the server is
killed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# instructions of the load: each is compressed into the server's store (the good requests name them by key, by
# text, or as a chat's system message)
INSTRUCTIONS = [
    "Name the capital city of the given country. Answer with the city name only.",
    "Translate the word into French.",
    "Give the opposite of the given word.",
    "Write the plural of the given noun.",
    "Name the continent the given country is in.",
    "Give a synonym of the given word.",
]
INPUTS = ["France", "Japan", "apple", "happy", "Brazil", "child", "Kenya", "cold"]
# another instruction: its cache is copied over the replaced entry (phase 2)
OTHER = "Uppercase every letter of the given word."
TAMPERED = "Count the letters of the given word."  # its store entry gets bytes flipped
FOREIGN = "Reverse the given word."  # compressed by another run into the server's store
BAD_KINDS = ("unknown_key", "tampered", "foreign_run", "file_path", "too_long", "malformed_json", "missing_field")
GOOD_MODES = ("key", "prompt", "chat")
MODEL_NAME = "gist"


@dataclass
class LoadConfig:
    requests: int = 500  # phase 1
    concurrency: int = 32
    bad_fraction: float = 0.1  # at least one of each bad kind
    instructions: int = 4  # of INSTRUCTIONS, the good requests' pool (x len(INPUTS) pairs)
    sample: int = 16  # (instruction, input) pairs whose answers are compared with gist generate
    max_tokens: int = 16
    replace_requests: int = 48  # phase 2 (0: skip)
    kill_requests: int = 48  # phase 3 (0: skip); the server is killed after a third of them are answered
    after_requests: int = 16  # answered after the restart
    memory_slack: float = 0.20
    max_model_len: int = 1024
    request_timeout_s: float = 300.0
    start_timeout_s: float = 600.0
    deadline_s: float = 3600.0  # the whole run
    workdir: str | None = None  # default: a temporary folder, removed after
    port: int | None = None  # default: a free one
    seed: int = 0
    extra_args: tuple[str, ...] = ("--enforce-eager", "--seed", "0")  # to vLLM's server

    def check(self) -> None:
        from gistcache.errors import GistError

        if self.requests < 1 or self.concurrency < 1 or self.instructions < 1 or self.max_tokens < 1:
            raise GistError("--requests, --concurrency, --instructions and --max-tokens must be >= 1")
        if not 0 <= self.bad_fraction < 1:
            raise GistError(f"--bad-fraction must be in [0, 1), got {self.bad_fraction}")
        if self.instructions > len(INSTRUCTIONS):
            raise GistError(f"--instructions takes at most {len(INSTRUCTIONS)}")
        if min(self.replace_requests, self.kill_requests, self.after_requests, self.sample) < 0:
            raise GistError("request counts and --sample must be >= 0")


@dataclass
class Result:
    """One request's outcome."""

    phase: str
    kind: str  # a GOOD_MODES mode, or a BAD_KINDS kind
    pair: tuple[int, int] | None  # (instruction, input) indices of a good request
    status: int | None = None  # HTTP status; None: no answer (connection lost, timeout)
    text: str | None = None  # the answer of a 200
    reason: str | None = None  # the error message of a non-200, or the transport error
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.kind in GOOD_MODES


@dataclass
class LoadReport:
    config: dict
    phases: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    server: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failures": self.failures, "phases": self.phases, "memory": self.memory,
                "server": self.server, "wall_s": round(self.wall_s, 1), "config": self.config}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, what: str) -> float:
        from gistcache.errors import GistError

        left = self.end - time.monotonic()
        if left <= 0:
            raise GistError(f"the load run went past its deadline before {what}: raise --deadline")
        return left


# ---- the server ------------------------------------------------------------------------------------------------


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


# ---- the requests ----------------------------------------------------------------------------------------------


@dataclass
class Fixtures:
    """What the requests name: keys of the pool's instructions, the bad kinds' keys and files, the references."""

    keys: list[str]  # of INSTRUCTIONS[:n]
    tampered_key: str
    foreign_key: str
    other_key: str  # OTHER's cache: copied over the replaced entry
    file_path: str  # a real cache file named by path
    references: dict[tuple[int, int], str]  # (instruction, input) -> gist generate's answer
    other_references: dict[int, str]  # input -> OTHER's answer (a mix would give it)
    expected: dict[str, str]  # bad kind -> what its refusal must say
    protected: dict[str, str]  # store entries the run damages on purpose: key -> SHA-256 of the bytes left


def good_body(mode: str, instruction: str, key: str, text: str, max_tokens: int) -> tuple[str, dict]:
    common = {"model": MODEL_NAME, "max_tokens": max_tokens, "temperature": 0}
    if mode == "key":
        return "/v1/completions", {**common, "prompt": text, "kv_transfer_params": {"gist_cache": key}}
    if mode == "prompt":
        return "/v1/completions", {**common, "prompt": text, "kv_transfer_params": {"gist_prompt": instruction}}
    return "/v1/chat/completions", {**common, "messages": [{"role": "system", "content": instruction},
                                                           {"role": "user", "content": text}]}


def bad_body(kind: str, fx: Fixtures, config: LoadConfig, i: int) -> tuple[str, dict | bytes]:
    common = {"model": MODEL_NAME, "max_tokens": config.max_tokens, "temperature": 0, "prompt": INPUTS[i % len(INPUTS)]}
    if kind == "unknown_key":
        return "/v1/completions", {**common, "kv_transfer_params": {"gist_cache": hashlib.sha256(
            f"unknown {i}".encode()).hexdigest()}}
    if kind == "tampered":
        return "/v1/completions", {**common, "kv_transfer_params": {"gist_cache": fx.tampered_key}}
    if kind == "foreign_run":
        return "/v1/completions", {**common, "kv_transfer_params": {"gist_cache": fx.foreign_key}}
    if kind == "file_path":
        return "/v1/completions", {**common, "kv_transfer_params": {"gist_cache": fx.file_path}}
    if kind == "too_long":
        if i % 2:
            return "/v1/completions", {**common, "prompt": "word " * (config.max_model_len + 64),
                                       "kv_transfer_params": {"gist_cache": fx.keys[0]}}
        return "/v1/chat/completions", {**{k: v for k, v in common.items() if k != "prompt"}, "messages": [
            {"role": "system", "content": INSTRUCTIONS[0]},
            {"role": "user", "content": "word " * (config.max_model_len + 64)}]}
    if kind == "malformed_json":
        raw = json.dumps({**common, "kv_transfer_params": {"gist_cache": fx.keys[0]}}).encode()
        return ("/v1/completions" if i % 2 else "/v1/chat/completions"), raw[:len(raw) // 2]
    if kind == "missing_field":
        if i % 2:
            return "/v1/completions", {k: v for k, v in common.items() if k != "prompt"} | {
                "kv_transfer_params": {"gist_cache": fx.keys[0]}}
        return "/v1/chat/completions", {k: v for k, v in common.items() if k != "prompt"}
    raise ValueError(kind)


def answer_text(path: str, body: dict) -> str | None:
    try:
        choice = body["choices"][0]
        return choice["message"]["content"] if path.endswith("/chat/completions") else choice["text"]
    except (KeyError, IndexError, TypeError):
        return None


async def send_one(client, url: str, phase: str, kind: str, pair, path: str, body, sem: asyncio.Semaphore,
                   done: list) -> Result:
    result = Result(phase, kind, pair)
    async with sem:
        t0 = time.monotonic()
        try:
            if isinstance(body, bytes):
                r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
            else:
                r = await client.post(url + path, json=body)
            result.status = r.status_code
            try:
                payload = r.json()
            except ValueError:
                payload = None
            if r.status_code == 200:
                result.text = answer_text(path, payload) if isinstance(payload, dict) else None
                if result.text is None:
                    result.reason = f"a 200 without an answer: {r.text[:200]!r}"
            else:
                message = payload.get("error", {}).get("message") if isinstance(payload, dict) and isinstance(
                    payload.get("error"), dict) else None
                result.reason = message if isinstance(message, str) else f"(no error message) {r.text[:200]!r}"
        except Exception as exc:  # noqa: BLE001  (a lost connection is a result here)
            result.reason = f"{type(exc).__name__}: {exc}"[:300]
        result.seconds = time.monotonic() - t0
    done.append(result)
    return result


async def run_requests(url: str, specs: list[tuple], concurrency: int, timeout: float, *,
                       phase: str, on_done: Callable[[int], None] | None = None) -> list[Result]:
    """specs: (kind, pair, path, body) each; sent at `concurrency`, answers in the specs' order."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    done: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [asyncio.ensure_future(send_one(client, url, phase, kind, pair, path, body, sem, done))
                 for kind, pair, path, body in specs]
        if on_done is not None:
            async def watch():
                seen = 0
                while seen < len(tasks):
                    await asyncio.sleep(0.05)
                    if len(done) != seen:
                        seen = len(done)
                        on_done(seen)
            watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*tasks)
        if on_done is not None:
            watcher.cancel()
    return list(results)


def good_specs(count: int, config: LoadConfig, fx: Fixtures, rng: random.Random, *, referenced: bool = False
               ) -> list[tuple]:
    pairs = sorted(fx.references) if referenced else [(a, b) for a in range(config.instructions)
                                                      for b in range(len(INPUTS))]
    out = []
    for i in range(count):
        pair = pairs[i % len(pairs)] if referenced else rng.choice(pairs)
        mode = GOOD_MODES[i % len(GOOD_MODES)]
        path, body = good_body(mode, INSTRUCTIONS[pair[0]], fx.keys[pair[0]], INPUTS[pair[1]], config.max_tokens)
        out.append((mode, pair, path, body))
    return out


def load_specs(config: LoadConfig, fx: Fixtures, rng: random.Random) -> list[tuple]:
    bad = 0 if config.bad_fraction == 0 else max(len(BAD_KINDS), round(config.requests * config.bad_fraction))
    bad = min(bad, config.requests)
    specs = good_specs(config.requests - bad, config, fx, rng)
    for i in range(bad):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        path, body = bad_body(kind, fx, config, i)
        specs.append((kind, None, path, body))
    rng.shuffle(specs)
    return specs


# ---- checks ----------------------------------------------------------------------------------------------------


def one_line(reason: str | None) -> bool:
    return isinstance(reason, str) and bool(reason.strip()) and "\n" not in reason and len(reason) <= 400


def tally(results: list[Result], fx: Fixtures, failures: list[str], phase: str) -> dict:
    """Counts of a load; every miss appended to `failures` as one line."""
    good = [r for r in results if r.good]
    bad = [r for r in results if not r.good]
    answered = [r for r in good if r.status == 200 and r.text is not None]
    compared = [r for r in answered if r.pair in fx.references]
    equal = [r for r in compared if r.text == fx.references[r.pair]]
    answers: dict[tuple, set] = {}
    for r in answered:
        answers.setdefault(r.pair, set()).add(r.text)
    inconsistent = [p for p, texts in answers.items() if len(texts) > 1]
    refused = [r for r in bad if r.status is not None and 400 <= r.status < 500 and one_line(r.reason)
               and expected_ok(r.kind, r.reason, fx)]
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    lost = [r for r in results if r.status is None]
    reasons: dict[str, str] = {}
    for r in bad:
        reasons.setdefault(r.kind, f"{r.status} {r.reason}")
    for r in good:
        if r not in answered:
            failures.append(f"{phase}: a good {r.kind} request for pair {r.pair} got {r.status}: {r.reason}")
    for r in compared:
        if r.text != fx.references[r.pair]:
            failures.append(f"{phase}: {r.kind} answer to pair {r.pair} is {r.text!r}, gist generate says "
                            f"{fx.references[r.pair]!r}")
    for p in inconsistent:
        failures.append(f"{phase}: pair {p} got {len(answers[p])} different answers: {sorted(answers[p])!r}")
    for r in bad:
        if r not in refused:
            failures.append(f"{phase}: bad request {r.kind} got {r.status} {str(r.reason)[:300]!r}, not a one-line "
                            f"4xx saying {fx.expected[r.kind]!r}")
    seconds = sorted(r.seconds for r in answered)
    return {"sent": len(results), "good": len(good), "answered": len(answered), "compared": len(compared),
            "equal": len(equal), "pairs": len(answers), "inconsistent_pairs": len(inconsistent), "bad": len(bad),
            "refused_with_reason": len(refused), "server_errors": len(server_errors), "lost": len(lost),
            "latency_p50_s": round(seconds[len(seconds) // 2], 3) if seconds else None,
            "latency_max_s": round(seconds[-1], 3) if seconds else None,
            "bad_kinds": {k: sum(r.kind == k for r in bad) for k in BAD_KINDS if any(r.kind == k for r in bad)},
            "reasons": reasons}


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_store(store_dir: Path, model, protected: dict[str, str]) -> dict:
    """Every entry of the store as `gist cache verify --run` checks it; the entries damaged on purpose must hold the
    bytes the run left there."""
    from gistcache.store import SUFFIX, CacheStore
    from gistcache.verify import verify_caches

    store = CacheStore(store_dir)
    entries = store.entries(unreadable=True)
    paths = [e.path for e in entries if e.key not in protected]
    verdicts = verify_caches(paths, model, store) if paths else []
    bad = [f"{v.path.name}: {v.file if v.file != 'ok' else v.fits if v.fits != 'ok' else v.recompressed}"
           for v in verdicts if not v.ok]
    changed = [key[:12] for key, sha in protected.items()
               if not (store.root / f"{key}{SUFFIX}").is_file() or file_sha(store.root / f"{key}{SUFFIX}") != sha]
    leftovers = [p.name for p in store.root.iterdir() if ".tmp-" in p.name]
    return {"entries": len(entries), "verified_ok": sum(v.ok for v in verdicts), "failed": bad,
            "recompressed": sum(v.recompressed == "ok" for v in verdicts), "damaged_on_purpose": len(protected),
            "damaged_on_purpose_changed": changed, "cut_short_writes_left": len(leftovers)}


# ---- set-up ----------------------------------------------------------------------------------------------------


def another_run(into: Path) -> Path:
    """A second run: the shipped run's files with its trained gist embedding moved a little (what another training
    run gives): its run fingerprint, and so its caches, differ."""
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from gistcache.run import GIST_FILE, resolve_run_dir

    src = resolve_run_dir(None)
    shutil.copytree(src, into, ignore=shutil.ignore_patterns("metrics.json", "README.md"))
    tensors = load_file(src / GIST_FILE)
    with safe_open(str(src / GIST_FILE), "pt") as f:
        meta = f.metadata()
    save_file({k: v + 0.01 * torch.ones_like(v) for k, v in tensors.items()}, str(into / GIST_FILE), metadata=meta)
    return into


def make_fixtures(model, store_dir: Path, work: Path, config: LoadConfig, progress) -> Fixtures:
    from gistcache.cache import load_cache
    from gistcache.errors import GistError
    from gistcache.generation import GREEDY, generate
    from gistcache.model import GistModel
    from gistcache.store import CacheStore, compress_cached

    store = CacheStore(store_dir)
    pool = INSTRUCTIONS[:config.instructions]
    results = compress_cached(model, [*pool, OTHER, TAMPERED], store)
    keys = [r.key for r in results[:len(pool)]]
    other, tampered = results[-2], results[-1]
    # a tampered entry: bytes flipped in the tensor data (the end of the file) of a store entry
    path = store.path_for(tampered.key)
    data = bytearray(path.read_bytes())
    for j in range(len(data) - 24, len(data) - 16):
        data[j] ^= 0x5A
    path.write_bytes(bytes(data))
    try:
        load_cache(path)
        raise GistError("flipping bytes in a cache file went unnoticed by load_cache")
    except GistError as exc:
        if "unnoticed" in str(exc):
            raise
    progress("another run: the shipped run with its gist embedding moved, compressing one instruction")
    foreign_model = GistModel.from_pretrained(another_run(work / "another-run"))
    foreign = compress_cached(foreign_model, FOREIGN, store)[0]
    del foreign_model
    if foreign.key in keys:
        raise GistError("the other run's cache has the key of one of the shipped run's")
    file_path = work / "named-by-path.safetensors"
    shutil.copyfile(store.path_for(keys[0]), file_path)

    pairs = [(a, b) for b in range(len(INPUTS)) for a in range(config.instructions)][:config.sample]
    progress(f"gist generate (greedy, {config.max_tokens} new tokens) on {len(pairs)} (instruction, input) pairs")
    references = {}
    for a in sorted({a for a, _ in pairs}):
        texts = [INPUTS[b] for aa, b in pairs if aa == a]
        outs = generate(model, results[a].cache, texts, max_new_tokens=config.max_tokens, **GREEDY)
        references.update({(a, INPUTS.index(t)): o for t, o in zip(texts, outs)})
    # the replace phase asks the pool's first instruction for its first two inputs
    rin = [0, 1]
    for b in rin:
        if (0, b) not in references:
            references[(0, b)] = generate(model, results[0].cache, [INPUTS[b]], max_new_tokens=config.max_tokens,
                                          **GREEDY)[0]
    other_refs = dict(zip(rin, generate(model, other.cache, [INPUTS[b] for b in rin],
                                        max_new_tokens=config.max_tokens, **GREEDY)))
    expected = {"unknown_key": "no cache in", "tampered": "tensor bytes do not match", "foreign_run": "another run",
                "file_path": "store keys only", "too_long": "maximum context length", "malformed_json": "JSON",
                "missing_field": " or ".join(MISSING)}
    protected = {tampered.key: file_sha(store.path_for(tampered.key)),
                 foreign.key: file_sha(store.path_for(foreign.key))}
    return Fixtures(keys=keys, tampered_key=tampered.key, foreign_key=foreign.key, other_key=other.key,
                    file_path=str(file_path), references=references, other_references=other_refs,
                    expected=expected, protected=protected)


# missing fields: the completion's `prompt` or the chat's `messages`
MISSING = ("`prompt` is the input text", "`messages` must hold")


def expected_ok(kind: str, reason: str, fx: Fixtures) -> bool:
    if kind == "missing_field":
        return any(m in reason for m in MISSING)
    return fx.expected[kind] in reason


# ---- phases ----------------------------------------------------------------------------------------------------


class Replacer(threading.Thread):
    """Replaces one store entry on disk in a loop until stopped: by another prompt's cache (atomic rename), by its
    own bytes (atomic rename: a new mtime), by its own bytes written in place over the other's in two halves (a
    reader may see half of each), by its own bytes again."""

    def __init__(self, path: Path, own: bytes, other: bytes, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.path, self.own, self.other, self.every_s = path, own, other, every_s
        self.stop_event = threading.Event()
        self.swaps = 0

    def put(self, data: bytes) -> None:
        tmp = self.path.with_name(f".replace-{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)

    def run(self) -> None:
        step = 0
        while not self.stop_event.is_set():
            kind = step % 4
            if kind in (0, 2):
                self.put(self.other)
            elif kind == 1:
                with open(self.path, "r+b") as f:  # over the other's bytes: half of each for a moment
                    half = len(self.own) // 2
                    f.write(self.own[:half])
                    f.flush()
                    time.sleep(self.every_s / 2)
                    f.write(self.own[half:])
                    f.truncate(len(self.own))
            else:
                self.put(self.own)
            self.swaps += 1
            step += 1
            # its own bytes stay longest (answers, not only refusals)
            self.stop_event.wait(self.every_s * (1 if kind in (0, 2) else 3))
        self.put(self.own)


def replace_phase(server: ServeProcess, fx: Fixtures, config: LoadConfig, deadline: Deadline, failures: list[str]
                  ) -> dict:
    from gistcache.store import CacheStore

    store = CacheStore(server.store)
    path, key = store.path_for(fx.keys[0]), fx.keys[0]
    own, other = path.read_bytes(), store.path_for(fx.other_key).read_bytes()
    specs = []
    for i in range(config.replace_requests):
        b = i % 2
        _, body = good_body("key", INSTRUCTIONS[0], key, INPUTS[b], config.max_tokens)
        specs.append(("key", (0, b), "/v1/completions", body))
    replacer = Replacer(path, own, other)
    replacer.start()
    try:  # a few at a time, so that their checks fall on different states of the file (a burst sees one)
        results = asyncio.run(asyncio.wait_for(run_requests(
            server.url, specs, min(config.concurrency, 4), config.request_timeout_s, phase="replace"),
            deadline.left("the replace phase")))
    finally:
        replacer.stop_event.set()
        replacer.join(30)
    intact = path.read_bytes() == own
    own_answers = sum(r.status == 200 and r.text == fx.references[r.pair] for r in results)
    other_answers = [r for r in results if r.status == 200 and r.text == fx.other_references[r.pair[1]]
                     and r.text != fx.references[r.pair]]
    neither = [r for r in results if r.status == 200 and r.text not in (fx.references[r.pair],
                                                                         fx.other_references[r.pair[1]])]
    refused = [r for r in results if r.status is not None and 400 <= r.status < 500 and one_line(r.reason)]
    # a file replaced after the API server's check but before the engine reads it: the engine fails the request
    # (its connector logs why) and vLLM answers 500; a refusal, counted apart
    engine = [r for r in results if r.status == 500]
    logged = server.log.read_text(errors="replace").count("gist request ") if engine else 0
    errors = [r for r in results if r.status is None or (r.status >= 500 and r.status != 500) or (
        r.status not in (200, 500) and not one_line(r.reason))]
    if len(engine) > logged:
        failures.append(f"replace: {len(engine)} requests got a 500 but the engine logged {logged} failed gist "
                        f"loads")
    for r in other_answers:
        failures.append(f"replace: a request for key {key[:12]} got the other prompt's answer {r.text!r} (a mix)")
    for r in neither:
        failures.append(f"replace: a request for key {key[:12]} got {r.text!r}, neither cache's answer (a mix)")
    for r in errors:
        failures.append(f"replace: a request got {r.status} {str(r.reason)!r} (not an answer or a refusal)")
    # put back: the key answers as before (no other prompt's values stayed in vLLM's prefix cache)
    after = asyncio.run(run_requests(server.url, specs[:4], config.concurrency, config.request_timeout_s,
                                     phase="replace-after"))
    after_ok = sum(r.status == 200 and r.text == fx.references[r.pair] for r in after)
    if after_ok != len(after) or not intact:
        failures.append(f"replace: after the file was put back {after_ok} of {len(after)} answers equal gist "
                        f"generate (file intact: {intact})")

    def why(reason: str) -> str:
        if "holds the cache of key" in reason:
            return "another prompt's cache under this key"
        if "tensor bytes do not match" in reason or "not a readable" in reason or "seal" in reason:
            return "a half-written file (seal or tensor hash)"
        return reason[:60]

    reasons = sorted({why(r.reason) for r in refused})
    return {"sent": len(results), "swaps": replacer.swaps, "own_answers": own_answers, "refused": len(refused),
            "refused_by_engine_500": len(engine), "mixed": len(other_answers) + len(neither), "errors": len(errors),
            "after_put_back_equal": after_ok,
            "after_put_back": len(after), "refusal_kinds": reasons[:6]}


def kill_phase(server: ServeProcess, model, fx: Fixtures, config: LoadConfig, deadline: Deadline,
               failures: list[str], rng: random.Random, progress) -> dict:
    """SIGKILL the server a third of the way through a load that writes new store entries; verify the store;
    start again; requests after the restart are answered."""
    specs = []
    for i in range(config.kill_requests):
        text = INPUTS[i % len(INPUTS)]
        if i % 2 == 0:  # a new instruction each: the server compresses it and writes a store entry
            instruction = f"{INSTRUCTIONS[i % config.instructions]} (variant {i} of the kill run)"
            _, body = good_body("prompt", instruction, "", text, config.max_tokens)
            specs.append(("prompt", None, "/v1/completions", body))
        else:
            specs.extend(good_specs(1, config, fx, rng))
    answered_at_kill = []

    def on_done(n: int) -> None:
        if not answered_at_kill and n >= max(1, len(specs) // 3):
            answered_at_kill.append(n)
            server.kill()

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run_requests(
        server.url, specs, config.concurrency, config.request_timeout_s, phase="kill", on_done=on_done),
        deadline.left("the kill phase")))
    if not answered_at_kill:  # the load ended before the watcher saw a third: kill now
        answered_at_kill.append(len(results))
        server.kill()
    answered_before = sum(r.status == 200 for r in results)
    progress(f"killed with SIGKILL after {answered_at_kill[0]} of {len(specs)} answers; verifying the store")
    store = verify_store(server.store, model, fx.protected)
    for line in store["failed"]:
        failures.append(f"kill: store entry failed verification after SIGKILL: {line}")
    if store["damaged_on_purpose_changed"]:
        failures.append(f"kill: entries damaged on purpose changed: {store['damaged_on_purpose_changed']}")
    progress("starting gist serve again (same port, same store)")
    restart_s = server.start(deadline)
    after = asyncio.run(asyncio.wait_for(run_requests(
        server.url, good_specs(config.after_requests, config, fx, rng, referenced=True), config.concurrency,
        config.request_timeout_s, phase="after-restart"), deadline.left("the requests after the restart")))
    counts = tally(after, fx, failures, "after restart")
    return {"sent_before_kill": len(specs), "killed_after_answers": answered_at_kill[0],
            "answered_before_kill": answered_before, "lost_to_kill": sum(r.status is None for r in results),
            "server_errors_before_kill": sum(r.status is not None and r.status >= 500 for r in results),
            "kill_wall_s": round(time.monotonic() - t0, 1), "store": store, "restart_s": round(restart_s, 1),
            "after_restart": {k: counts[k] for k in ("sent", "answered", "compared", "equal", "server_errors")}}


# ---- the run ---------------------------------------------------------------------------------------------------


def run_load(config: LoadConfig, progress: Callable[[str], None] | None = None) -> LoadReport:
    """The three phases (module docstring) on a server of its own; the server is stopped at the end, always."""
    from gistcache.model import GistModel

    config.check()
    progress = progress or (lambda msg: None)
    deadline = Deadline(config.deadline_s)
    t_start = time.monotonic()
    rng = random.Random(config.seed)
    report = LoadReport(config=asdict(config))
    failures = report.failures
    own_work = config.workdir is None
    work = Path(tempfile.mkdtemp(prefix="gist-serve-load-")) if own_work else Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = work / "store"
    port = config.port or free_port()
    server = ServeProcess(store_dir, port, work / "serve.log", config)
    try:
        # the store (with the run exported into it) comes first: gist serve exports on its first start
        progress(f"starting gist serve on 127.0.0.1:{port} (store {store_dir})")
        from gistcache.store import CacheStore

        CacheStore(store_dir).claim()
        t0 = time.monotonic()
        holder: dict = {}

        def start():
            try:
                holder["start_s"] = server.start(deadline)
            except Exception as exc:  # noqa: BLE001  (raised in the main thread below)
                holder["error"] = exc

        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        progress("loading the shipped run for gist generate (while the server starts)")
        model = GistModel.from_pretrained(None)
        fx = make_fixtures(model, store_dir, work, config, progress)
        starter.join(deadline.left("the server started"))
        if "error" in holder:
            raise holder["error"]
        if starter.is_alive():
            raise TimeoutError("gist serve did not start in time")
        report.server["first_start_s"] = round(holder["start_s"], 1)
        report.server["setup_s"] = round(time.monotonic() - t0, 1)

        progress("warmup: each instruction by key, by text and as a chat")
        warm = [(mode, (a, 0), *good_body(mode, INSTRUCTIONS[a], fx.keys[a], INPUTS[0], config.max_tokens))
                for a in range(config.instructions) for mode in GOOD_MODES]
        asyncio.run(run_requests(server.url, warm, config.concurrency, config.request_timeout_s, phase="warmup"))
        asyncio.run(run_requests(server.url, warm, config.concurrency, config.request_timeout_s, phase="warmup"))
        time.sleep(2)
        before = server.rss()

        specs = load_specs(config, fx, rng)
        progress(f"load: {len(specs)} requests at concurrency {config.concurrency}")
        t0 = time.monotonic()
        results = asyncio.run(asyncio.wait_for(run_requests(
            server.url, specs, config.concurrency, config.request_timeout_s, phase="load"),
            deadline.left("the load")))
        wall = time.monotonic() - t0
        counts = tally(results, fx, failures, "load")
        counts["wall_s"] = round(wall, 1)
        counts["requests_per_s"] = round(len(results) / wall, 2)
        counts["server_up_after"] = server.alive() and server.healthy()
        if not counts["server_up_after"]:
            failures.append("load: the server is not up after the load")
        report.phases["load"] = counts

        if config.replace_requests:
            progress(f"replace: {config.replace_requests} requests for one key while its store entry is replaced")
            report.phases["replace"] = replace_phase(server, fx, config, deadline, failures)
        time.sleep(2)
        after = server.rss()
        report.memory = {"before_mib": round(before / 2**20), "after_mib": round(after / 2**20),
                         "change": round(after / before - 1, 3) if before else None,
                         "processes": len(server.pids())}
        if before and after > before * (1 + config.memory_slack):
            failures.append(f"memory: the server's resident memory grew from {before / 2**20:.0f} to "
                            f"{after / 2**20:.0f} MiB (+{after / before - 1:.0%}), more than "
                            f"{config.memory_slack:.0%}")
        if not server.alive():
            failures.append(f"the server exited by itself (code {server.proc.returncode})")

        if config.kill_requests:
            progress(f"kill: {config.kill_requests} requests, SIGKILL after a third, verify the store, restart")
            report.phases["kill"] = kill_phase(server, model, fx, config, deadline, failures, rng, progress)
        report.server.update(starts=server.starts, killed_by_us=server.killed_by_us,
                             restarts_survived=server.starts - 1 if server.alive() and server.healthy() else 0,
                             exited_by_itself=0 if server.alive() else 1, tracebacks_in_log=server.tracebacks(),
                             log=str(server.log))
        if server.tracebacks():
            failures.append(f"the server's log has {server.tracebacks()} tracebacks ({server.log})")
        kill = report.phases.get("kill", {})
        errors_5xx = (report.phases["load"]["server_errors"] + report.phases.get("replace", {}).get("errors", 0)
                      + kill.get("server_errors_before_kill", 0) + kill.get("after_restart", {}).get("server_errors", 0))
        report.server["crashed"] = errors_5xx + report.server["exited_by_itself"]
    except Exception as exc:  # noqa: BLE001  (the report says what stopped the run)
        failures.append(f"the run stopped: {type(exc).__name__}: {str(exc)[:300]}")
        report.server.setdefault("log", str(server.log))
    finally:
        server.stop()
        report.wall_s = time.monotonic() - t_start
        if own_work and report.ok:
            shutil.rmtree(work, ignore_errors=True)
    return report


# ---- the report ------------------------------------------------------------------------------------------------


def report_rows(report: dict) -> list[tuple[str, str]]:
    """(check, result) rows of the table: what docs/benchmarks.md shows."""
    rows = []
    load = report["phases"].get("load")
    if load:
        rows += [("requests (bad ones mixed in)", f"{load['sent']} ({load['bad']} bad) at concurrency "
                                                  f"{report['config']['concurrency']}, {load['wall_s']} s, "
                                                  f"{load['requests_per_s']} req/s"),
                 ("good answered", f"{load['answered']} / {load['good']}"),
                 ("equal to gist generate (sample)", f"{load['equal']} / {load['compared']}"),
                 ("same answer per (instruction, input)", f"{load['pairs'] - load['inconsistent_pairs']} / "
                                                          f"{load['pairs']} pairs"),
                 ("bad refused with a one-line 4xx reason", f"{load['refused_with_reason']} / {load['bad']}")]
    replace = report["phases"].get("replace")
    if replace:
        rows.append(("cache file replaced while serving", f"{replace['sent']} requests, {replace['swaps']} swaps: "
                                                          f"{replace['own_answers']} own answer, {replace['refused']} "
                                                          f"refused 4xx, {replace['refused_by_engine_500']} failed "
                                                          f"by the engine (500), {replace['mixed']} mixed"))
    kill = report["phases"].get("kill")
    if kill:
        store = kill["store"]
        rows += [("SIGKILL mid-load", f"after {kill['killed_after_answers']} of {kill['sent_before_kill']} "
                                      f"answers, {kill['lost_to_kill']} in flight lost"),
                 ("store after SIGKILL (gist cache verify)", f"{store['verified_ok']} / "
                                                              f"{store['entries'] - store['damaged_on_purpose']} "
                                                              f"entries ok (+{store['damaged_on_purpose']} damaged "
                                                              f"on purpose, unchanged)"),
                 ("answered after restart", f"{kill['after_restart']['answered']} / {kill['after_restart']['sent']}"
                                            f" ({kill['after_restart']['equal']} / {kill['after_restart']['compared']}"
                                            f" equal), restart {kill['restart_s']} s")]
    server = report["server"]
    if "crashed" in server:
        rows += [("crashed (exits, tracebacks, 5xx but the replaced file's)",
                  f"{server['crashed']} ({server['tracebacks_in_log']} tracebacks)"),
                 ("restarts survived", str(server["restarts_survived"]))]
    memory = report["memory"]
    if memory:
        rows.append(("server RSS before / after load", f"{memory['before_mib']} / {memory['after_mib']} MiB "
                                                       f"({memory['change']:+.1%})"))
    rows.append(("verdict", "ok" if report["ok"] else f"{len(report['failures'])} failures"))
    return rows


def print_report(report: dict, console=None) -> None:
    """The table, then each failure and each refusal's reason as one line (rich never wraps them: soft_wrap)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(soft_wrap=True)
    table = Table(title="gist serve under load and faults", header_style="bold")
    table.add_column("check", overflow="fold")
    table.add_column("result", overflow="fold")
    for check, result in report_rows(report):
        table.add_row(escape(check), escape(result))
    console.print(table)
    for kind, reason in report["phases"].get("load", {}).get("reasons", {}).items():
        console.print(f"refused {escape(kind)}: {escape(reason)}", highlight=False, soft_wrap=True)
    for line in report["failures"]:
        console.print(f"[bold red]failed:[/] {escape(line)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    from gistcache.errors import GistError

    p = argparse.ArgumentParser(prog="python -m gistcache.eval.serve_load", description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction)
    p.add_argument("--instructions", type=int, default=d.instructions)
    p.add_argument("--sample", type=int, default=d.sample, help="(instruction, input) pairs checked against gist "
                   "generate")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--replace-requests", type=int, default=d.replace_requests)
    p.add_argument("--kill-requests", type=int, default=d.kill_requests)
    p.add_argument("--after-requests", type=int, default=d.after_requests)
    p.add_argument("--deadline", type=float, default=d.deadline_s, help="seconds for the whole run")
    p.add_argument("--workdir", default=None, help="keep the store and the server log here")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    a = p.parse_args(argv)
    config = LoadConfig(requests=a.requests, concurrency=a.concurrency, bad_fraction=a.bad_fraction,
                        instructions=a.instructions, sample=a.sample, max_tokens=a.max_tokens,
                        replace_requests=a.replace_requests, kill_requests=a.kill_requests,
                        after_requests=a.after_requests, deadline_s=a.deadline, workdir=a.workdir, port=a.port)
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    try:
        report = run_load(config, progress=lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)).to_dict()
    except GistError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
