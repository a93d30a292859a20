"""`run_load` (eval/serve_load/): the server of its own, the fixtures, a warmup, the load, then the fault phases
(phases.py); the server stopped at the end, always."""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .checks import tally
from .config import GOOD_MODES, INPUTS, INSTRUCTIONS, Deadline, LoadConfig, LoadReport
from .fixtures import make_fixtures
from .phases import kill_phase, replace_phase
from .server import ServeProcess, free_port
from .traffic import good_body, load_specs, run_requests


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
