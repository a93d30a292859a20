"""The requests of the load run (eval/serve_load/): the good ones' bodies (by key, by text, as a chat), each bad
kind's body, sending them at a concurrency (httpx), and the mixed load's specs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from typing import Callable

from .config import BAD_KINDS, GOOD_MODES, INPUTS, INSTRUCTIONS, MODEL_NAME, Fixtures, LoadConfig, Result


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
