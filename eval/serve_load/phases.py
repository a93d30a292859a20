"""The load run's fault phases (eval/serve_load/): a store entry replaced on disk while its key is served
(`Replacer`, `replace_phase`), and a SIGKILL of the server mid-load, the store verified, a restart (`kill_phase`)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

from .checks import one_line, tally, verify_store
from .config import INPUTS, INSTRUCTIONS, Deadline, Fixtures, LoadConfig
from .server import ServeProcess
from .traffic import good_body, good_specs, run_requests


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
