"""`gist bench serve --scenario oversubscribed` without vLLM (issue 26 item 1): the seeded Poisson arrivals, the
draw from the instruction pool, the KV cache sizing, one pass's numbers, the "where the gain comes from" line,
the table at 40 and 300 columns, and every bad flag refused in one line before any engine starts.
The engine run itself is tests/serving/test_vllm_serve_bench.py (.venv-vllm)."""

from __future__ import annotations

import json
import statistics
from unittest import mock

import pytest
from typer.testing import CliRunner

from clitools import one_line_error
from gistcache.cli import common
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.eval.serve_bench import BURST_FIELDS, BenchServeConfig
from gistcache.eval.serve_report import RequestRecord, gains, pass_stats, render_lines
from gistcache.eval.serve_scenarios import (arrival_offsets, blocks_for, cache_blocks, draw_instructions,
                                            held_prompts, kv_bytes_per_token, kv_cache_gib, parse_list, percentile)

runner = CliRunner()
SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --- the stream ---------------------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_and_average_one_over_the_rate():
    """400 arrivals at 2/s: 400 times from 0, non-decreasing, mean gap 0.5 s within 15%; the seed fixes them."""
    times = arrival_offsets(400, 2.0, seed=0)
    assert len(times) == 400 and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 0 for g in gaps)
    assert abs(statistics.mean(gaps) - 0.5) < 0.075, statistics.mean(gaps)
    assert statistics.stdev(gaps) > 0.3  # exponential gaps (stdev = mean), not a fixed interval
    assert arrival_offsets(400, 2.0, seed=0) == times and arrival_offsets(400, 2.0, seed=1) != times
    fast = arrival_offsets(300, 10.0, seed=3)
    assert abs(fast[-1] / 299 - 0.1) < 0.02, fast[-1] / 299


def test_rate_zero_is_one_burst():
    assert arrival_offsets(5, 0.0) == [0.0] * 5


def test_the_pool_draw_repeats_instructions_and_is_seeded():
    """512 requests over 256 instructions: indices in range, repeats (a prefix cache can hit), about 1 - 1/e^2 of
    the pool drawn, the same for the same seed, another for another; the arrivals' seed does not couple to it."""
    pool = draw_instructions(512, 256, seed=0)
    assert len(pool) == 512 and all(0 <= i < 256 for i in pool)
    distinct = len(set(pool))
    assert 190 < distinct < 250, distinct  # expected 256 (1 - e^-2) = 221
    assert draw_instructions(512, 256, seed=0) == pool and draw_instructions(512, 256, seed=1) != pool
    assert set(draw_instructions(2000, 8, seed=0)) == set(range(8))


# --- the KV cache size --------------------------------------------------------------------------------------

def test_kv_cache_holds_a_quarter_of_the_full_prompts():
    """256 instructions, 547-token full prompts + 32 new tokens: 64 prompts of 5 blocks of 128 (19 of 32), plus
    vLLM's null block; SmolLM2-135M's float32 K and V take 46,080 bytes a token, so 2 GiB for the 128 cache."""
    held = held_prompts(256, 4)
    assert held == 64 and held_prompts(3, 4) == 1
    assert blocks_for(579, 128) == 5 and blocks_for(579, 32) == 19 and blocks_for(576, 32) == 18
    assert cache_blocks(547, 32, 128, held) == 321 and cache_blocks(547, 32, 32, held) == 1217
    per_token = kv_bytes_per_token(SMOLLM2)
    assert per_token == 2 * 30 * 3 * 64 * 4 == 46_080
    assert kv_cache_gib(321, 128, per_token) == 2 and kv_cache_gib(1, 32, per_token) == 1
    assert kv_bytes_per_token({**SMOLLM2, "head_dim": 128}) == 2 * 30 * 3 * 128 * 4


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    assert percentile([4.0, 1.0, 2.0, 3.0], 50) == 2.0


# --- one pass, the gain, the table --------------------------------------------------------------------------

def record(prompt, instruction, cached, ttft, preemptions=0):
    return RequestRecord(prompt, instruction, 4, cached, ttft, seen_before=True, preemptions=preemptions)


def fake_result() -> dict:
    """Two block sizes x (full, gist) x (burst, 2/s), from records: full prompts of 547 tokens (536 of them the
    instruction) that find their instruction cached for one request in four; gist prompts of 36 (25 slots)."""
    passes = []
    for bs in (32, 128):
        for rate in (0.0, 2.0):
            full = [record(547, 536, 536 // bs * bs if j % 4 == 0 else bs, 10.0 + j, preemptions=j % 2)
                    for j in range(8)]
            gist = [record(36, 25, 25, 0.5 + 0.1 * j) for j in range(8)]
            passes.append({"kind": "full", "block_size": bs, "rate": rate, **pass_stats(full, 8.0, bs, 40)})
            passes.append({"kind": "gist", "block_size": bs, "rate": rate,
                           **pass_stats(gist, 1.0 + bs / 1000, bs, 8)})
    engines = {str(bs): {"kv_blocks_total": 2 * blocks_for(579, bs) + 1, "kv_cache_gib": 1, "full_prompts_held": 2,
                         "blocks_per_full_prompt": blocks_for(579, bs), "blocks_per_gist_prompt": blocks_for(68, bs),
                         "warmup_s": {"full": 8.0, "gist": 1.0}} for bs in (32, 128)}
    config = {**{k: None for k in BURST_FIELDS}, "instructions": 8, "instruction_tokens": 512, "new_tokens": 4,
              "seed": 0, "scenario": "oversubscribed", "rates": [0.0, 2.0], "block_sizes": [32, 128]}
    return {"scenario": "oversubscribed", "config": config,
            "machine": {"vllm": "0.32.0", "cpu": "Test CPU", "load_before": 2.4, "load_after": 2.5},
            "pool": {"requests": 8, "distinct": 6, "repeats": 2}, "prompt_tokens": {"full": 547.0, "gist": 36.0},
            "compress_s": 1.0, "engines": engines, "passes": passes, "gains": gains(passes)}


def test_pass_numbers_come_from_the_records():
    """Prompt tokens computed are prompt minus cached; an instruction is cached when its whole blocks are; a
    request seen before whose instruction was not cached was evicted and computed again."""
    recs = [record(547, 536, 512, 1.0), record(547, 536, 128, 3.0, preemptions=1), record(547, 536, 0, 2.0)]
    p = pass_stats(recs, 2.0, 128, 11)
    assert p["requests_per_s"] == 1.5 and p["prompt_tokens_computed"] == 35 + 419 + 547
    assert (p["ttft_p50_s"], p["ttft_p90_s"], p["ttft_p99_s"]) == (2.0, 3.0, 3.0)
    assert (p["instructions_cached"], p["instructions_recomputed"], p["preemptions"]) == (1, 2, 1)
    assert p["kv_blocks_per_request"] == 5 and p["kv_blocks_peak"] == 11
    gist = pass_stats([record(36, 25, 25, 0.1)], 1.0, 128, 1)
    assert gist["instructions_cached"] == 1 and gist["prompt_tokens_computed"] == 11  # loaded slots count


def test_the_gain_line_compares_each_kind_at_its_best_block_size():
    result = fake_result()
    lines = {g["rate"]: g for g in result["gains"]}
    assert set(lines) == {0.0, 2.0}
    g = lines[0.0]
    assert g["gist_block_size"] == 32  # its passes ran faster at 32 in the fake
    assert g["line"].startswith("burst: gist (block 32) vs full prompts, prefix cache warm")
    assert "found 2 of 8 instructions in the prefix cache and computed 6 again" in g["line"]
    assert "fewer prompt tokens (88 vs " in g["line"] and "preemptions 0 vs 4" in g["line"]
    assert lines[2.0]["line"].startswith("2/s: ")
    slower = [{**p, "ttft_p50_s": 20.0} if p["kind"] == "gist" else p for p in result["passes"]]
    assert "TTFT p50 1.5x higher (20.00 s vs 13.00 s)" in gains(slower)[0]["line"]  # said as it is, not "0.7x lower"


@pytest.mark.parametrize("width", [40, 300])
def test_the_table_is_one_line_a_row_at_any_width(monkeypatch, width):
    """At 40 and 300 columns the verb prints the same lines: header lines, a markdown table with one line a pass,
    the gain lines; nothing wrapped."""
    result = fake_result()
    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "width", width)
    with mock.patch("gistcache.eval.serve_bench.bench_serve", return_value=result) as bench:
        out = invoke("bench", "serve", "--scenario", "oversubscribed", "--instructions", 8, "--requests", 8,
                     "--rate", "0,2", "--block-size", "32,128", "--new-tokens", 4)
    assert out.exit_code == 0, out.output
    (config,), _ = bench.call_args
    assert (config.scenario, config.requests, config.rates, config.block_sizes) == ("oversubscribed", 8, [0.0, 2.0],
                                                                                    [32, 128])
    lines = out.stdout.splitlines()
    assert lines == render_lines(result)
    rows = [line for line in lines if line.startswith("| gist") or line.startswith("| full warm")]
    assert len(rows) == 8 and len({len(line) for line in rows}) == 1
    assert sum(line.startswith("where the gain comes from, ") for line in lines) == 2


def test_json_is_the_result():
    result = fake_result()
    with mock.patch("gistcache.eval.serve_bench.bench_serve", return_value=result):
        out = invoke("bench", "serve", "--scenario", "oversubscribed", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == json.loads(json.dumps(result))


# --- today's burst, unchanged ------------------------------------------------------------------------------

def test_burst_flags_build_todays_config():
    """Today's flags build the burst config, whose JSON names exactly today's fields (kv_cache_gib 1)."""
    with mock.patch("gistcache.eval.serve_bench.bench_serve", side_effect=GistError("stop")) as bench:
        invoke("bench", "serve", "--instructions", 8, "--instruction-tokens", 64, "--new-tokens", 4)
    (config,), _ = bench.call_args
    assert (config.scenario, config.rates, config.block_sizes, config.requests) == ("burst", [0.0], None, None)
    assert BURST_FIELDS == ("run", "instructions", "instruction_tokens", "new_tokens", "kv_cache_gib",
                            "max_model_len", "out")


# --- bad flags: one line, exit code 2, no engine ------------------------------------------------------------

@pytest.mark.parametrize("args, text", [
    (["--scenario", "oversubscribed", "--rate", "-1"], "--rate must be requests/s >= 0"),
    (["--scenario", "oversubscribed", "--rate", "fast"], "--rate takes numbers, got 'fast'"),
    (["--scenario", "oversubscribed", "--rate", "nan"], "--rate must be requests/s >= 0"),
    (["--scenario", "oversubscribed", "--block-size", "0"], "--block-size must be tokens a KV block >= 1"),
    (["--scenario", "oversubscribed", "--block-size", "16,x"], "--block-size takes numbers, got 'x'"),
    (["--scenario", "oversubscribed", "--block-size", ","], "--block-size takes numbers"),
    (["--scenario", "oversubscribed", "--requests", "0"], "--requests must be a whole number >= 1, got 0"),
    (["--scenario", "oversubscribed", "--oversubscription", "0"], "--oversubscription must be a whole number"),
    (["--scenario", "oversubscribed", "--kv-cache-gib", "0"], "--kv-cache-gib must be a whole number >= 1"),
    (["--scenario", "sometimes"], "--scenario must be one of burst, oversubscribed, got 'sometimes'"),
    (["--rate", "2"], "--rate applies to --scenario oversubscribed"),
    (["--block-size", "32"], "--block-size applies to --scenario oversubscribed"),
    (["--requests", "9"], "--requests applies to --scenario oversubscribed"),
])
def test_bad_flags_are_one_line_before_any_engine(args, text):
    with mock.patch("gistcache.eval.serve_bench.bench_serve") as bench:
        one_line_error(invoke("bench", "serve", *args), text)
    bench.assert_not_called()


def test_the_library_refuses_what_the_cli_refuses():
    with pytest.raises(GistError, match="--rate must be"):
        BenchServeConfig(scenario="oversubscribed", rates=[-1.0])
    with pytest.raises(GistError, match="--block-size must be"):
        BenchServeConfig(scenario="oversubscribed", block_sizes=[])
    with pytest.raises(GistError, match="takes numbers"):
        parse_list("1,,two", "--rate", float, "0,2")
    assert parse_list("0, 2 4", "--rate", float, "0,2") == [0.0, 2.0, 4.0] and parse_list(None, "--rate", float,
                                                                                           "0") is None


def test_cpu_block_sizes_must_be_multiples_of_32():
    """vLLM's CPU attention takes multiples of 32: 16 is refused there with what to use, and allowed on a GPU."""
    from gistcache.eval.serve_oversubscribed import check_block_sizes, default_block_sizes

    with pytest.raises(GistError, match="--block-size 16: vLLM's CPU attention takes block sizes that are "
                                        "multiples of 32"):
        check_block_sizes([16, 128], cpu=True)
    check_block_sizes([16, 128], cpu=False)
    check_block_sizes(default_block_sizes(cpu=True), cpu=True)
    assert default_block_sizes(cpu=False) == [16, 128]
