"""The oversubscribed run (eval/serve_oversubscribed.py) against a stand-in for vLLM, in the main virtualenv: the
engines it asks for (block size, KV blocks sized for 1/oversubscription of the full prompts), requests added no
earlier than their Poisson arrival and carrying it, the warm-up before each kind's measured passes, and the
result's shape. The stand-in finishes every request at the next step; a prompt whose first 8 tokens it saw
since the last reset reports its whole blocks as cached. The real engine: tests/serving/test_vllm_serve_bench.py."""

from __future__ import annotations

import sys
import time
import types
from types import SimpleNamespace

import pytest

from gistcache.eval import serve_bench
from gistcache.eval.serve_scenarios import arrival_offsets, blocks_for, cache_blocks


class FakeEngine:
    def __init__(self, kwargs: dict, log: list):
        cache = SimpleNamespace(num_gpu_blocks=kwargs["num_gpu_blocks_override"], block_size=kwargs["block_size"])
        self.vllm_config = SimpleNamespace(cache_config=cache)
        self.pending, self.seen, self.log, self.t0 = [], set(), log, None

    def add_request(self, request_id, prompt, params, arrival_time):
        self.log.append((request_id, time.time(), arrival_time, params.kwargs["max_tokens"]))
        self.pending.append((request_id, prompt, params, arrival_time))

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        outs, bs = [], self.vllm_config.cache_config.block_size
        for request_id, prompt, params, arrival in self.pending:
            ids = prompt["prompt_token_ids"]
            head = (prompt.get("cache_salt"), tuple(ids[:8]))
            cached = (len(ids) - 1) // bs * bs if head in self.seen else 0
            if prompt.get("cache_salt"):
                cached = max(cached, len(ids) - 20)  # the connector loads the gist slots
            self.seen.add(head)
            outs.append(SimpleNamespace(request_id=request_id, finished=True, num_cached_tokens=cached,
                                        outputs=[SimpleNamespace(token_ids=[5] * params.kwargs["max_tokens"])],
                                        metrics=SimpleNamespace(first_token_latency=time.time() - arrival,
                                                                num_preemptions=0)))
        self.pending = []
        return outs

    def get_metrics(self):
        return [SimpleNamespace(name="vllm:kv_cache_usage_perc", value=0.5)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """`vllm` as far as the run uses it: LLM (its kwargs and engine kept), SamplingParams, current_platform."""
    engines, log = [], []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.llm_engine = kwargs, FakeEngine(kwargs, log)
            engines.append(self)

        def generate(self, prompts, params, use_tqdm=False):
            return []

        def reset_prefix_cache(self):
            self.llm_engine.seen.clear()
            log.append(("reset", time.time(), None, None))

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.__version__ = LLM, "0.0-fake"
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(serve_bench, "vllm_available", lambda: True)
    return engines, log


def test_the_run_drives_the_engines_as_specified(fake_vllm, make_tiny_run):
    engines, log = fake_vllm
    config = serve_bench.BenchServeConfig(run=str(make_tiny_run(1)), scenario="oversubscribed", instructions=8,
                                          instruction_tokens=48, new_tokens=3, requests=24, rates=[0.0, 200.0],
                                          block_sizes=[32, 64], oversubscription=4, seed=1)
    res = serve_bench.bench_serve(config)
    assert [e.kwargs["block_size"] for e in engines] == [32, 64]
    for engine in engines:
        bs = engine.kwargs["block_size"]
        assert engine.kwargs["enable_prefix_caching"] and engine.kwargs["num_gpu_blocks_override"] == res["engines"][
            str(bs)]["kv_blocks_total"]
        e = res["engines"][str(bs)]
        assert e["full_prompts_held"] == 2 and e["blocks_per_full_prompt"] == blocks_for(engine.kwargs[
            "max_model_len"], bs)  # the longest full prompt + its new tokens
        assert e["kv_blocks_total"] == cache_blocks(engine.kwargs["max_model_len"] - 3, 3, bs, 2)
    assert [(p["kind"], p["block_size"], p["rate"]) for p in res["passes"]] == [
        (k, bs, r) for bs in (32, 64) for k in ("full", "gist") for r in (0.0, 200.0)]
    # per engine and kind: the prefix cache emptied, the warm-up (1 token each), then the passes (3 tokens each)
    tags = [entry[0].rsplit("-", 1)[0] if entry[0] != "reset" else "reset" for entry in log]
    order = list(dict.fromkeys(tags))
    assert order == ["reset", "32-full-warm", "32-full-0", "32-full-200", "32-gist-warm", "32-gist-0",
                     "32-gist-200", "64-full-warm", "64-full-0", "64-full-200", "64-gist-warm", "64-gist-0",
                     "64-gist-200"]
    assert all(m == 1 for tag, (_, _, _, m) in zip(tags, log) if tag.endswith("warm"))
    # the Poisson pass: each request added at or after its arrival, carrying it; arrivals as the seed draws them
    sent = [(t, a) for (rid, t, a, _) in log if rid.startswith("32-full-200-")]
    offsets = arrival_offsets(24, 200.0, seed=1)
    assert len(sent) == 24 and all(t >= a - 1e-6 for t, a in sent)
    assert [round(a - sent[0][1], 6) for _, a in sent] == [round(o, 6) for o in offsets]
    for p in res["passes"]:
        assert p["requests"] == 24 and p["generated_tokens"] == 72 and p["kv_blocks_peak"] is not None
        assert p["instructions_cached"] + p["instructions_recomputed"] == 24
    assert res["pool"]["requests"] == 24 and res["pool"]["distinct"] <= 8 and res["config"]["block_sizes"] == [32, 64]
    assert [g["rate"] for g in res["gains"]] == [0.0, 200.0]


def test_16_is_refused_on_the_cpu_before_any_engine(fake_vllm, tmp_path):
    engines, _ = fake_vllm
    config = serve_bench.BenchServeConfig(run=str(tmp_path / "no-run"), scenario="oversubscribed",
                                          block_sizes=[16, 128])
    with pytest.raises(serve_bench.GistError, match="--block-size 16: vLLM's CPU attention"):
        serve_bench.bench_serve(config)
    assert engines == []
