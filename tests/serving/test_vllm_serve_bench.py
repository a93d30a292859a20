"""`gist bench serve --scenario oversubscribed` end to end in vLLM, tiny: a random Llama run, 6 instructions of
60 tokens (byte tokens: synth_instruction cannot cut every seed's text at exactly 64), 12 requests in a burst and
at 50/s, block size 32, a KV cache sized for 2 full prompts. Checks the shape and the consistency of what it
reports, not its speed. Skipped where vLLM is not installed (.venv-vllm runs it:
`.venv-vllm/bin/python -m pytest -q tests/serving/test_vllm_serve_bench.py`)."""

import json

import pytest

pytest.importorskip("vllm")

from typer.testing import CliRunner  # noqa: E402

import tiny  # noqa: E402
from gistcache.cli.main import app  # noqa: E402

pytestmark = pytest.mark.slow


def test_oversubscribed_smoke(tmp_path, monkeypatch, capsys):
    """Every pass ran every request; the gist passes compute fewer prompt tokens and take fewer blocks a request;
    each full-prompt request either found its instruction cached or computed it again; the table has its rows."""
    run = tiny.save_vllm_run(tmp_path)  # head size 32: vLLM's CPU attention takes it
    monkeypatch.setenv("GISTCACHE_DEBUG", "1")  # a failure shows its traceback, not one line
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "serve", "--scenario", "oversubscribed", "--run", str(run),
                                      "--instructions", "6", "--instruction-tokens", "60", "--new-tokens", "4",
                                      "--requests", "12", "--rate", "0,50", "--block-size", "32",
                                      "--oversubscription", "3", "--out", str(out)])
    with capsys.disabled():
        print("\n" + result.stdout)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    engine = res["engines"]["32"]
    assert engine["full_prompts_held"] == 2 and engine["kv_blocks_total"] == 2 * engine["blocks_per_full_prompt"] + 1
    passes = {(p["kind"], p["rate"]): p for p in res["passes"]}
    assert set(passes) == {(k, r) for k in ("full", "gist") for r in (0.0, 50.0)}
    for p in passes.values():
        assert p["requests"] == 12 and p["generated_tokens"] == 12 * 4 and p["block_size"] == 32
        assert 0 < p["ttft_p50_s"] <= p["ttft_p90_s"] <= p["ttft_p99_s"]
        assert p["kv_blocks_peak"] is not None and 0 < p["kv_blocks_peak"] <= engine["kv_blocks_total"] - 1
    for rate in (0.0, 50.0):
        full, gist = passes[("full", rate)], passes[("gist", rate)]
        assert gist["prompt_tokens_computed"] < full["prompt_tokens_computed"]
        assert gist["kv_blocks_per_request"] < full["kv_blocks_per_request"]
        assert gist["instructions_cached"] == 12  # the connector loads every gist cache
        assert full["instructions_cached"] + full["instructions_recomputed"] == 12
    assert [g["rate"] for g in res["gains"]] == [0.0, 50.0]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| gist", "| full warm"))]
    assert len(rows) == 4
