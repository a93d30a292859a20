"""`gist compress`, `gist generate`, `gist cache ls|rm|prune`, `gist bench cache`: thin verbs, one-line refusals."""

import json
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from gistcache.cache import load_cache
from gistcache.cli.main import app
from gistcache.inference.generation import generate
from gistcache.model import load_run
from clitools import one_line_error

runner = CliRunner()
PROMPT = "Reverse the word you are given"


@pytest.fixture(scope="module")
def runs(make_tiny_run):
    """Three run folders: `run`, `other_run` (same base, other gist embedding), `other_base` (other base weights)."""
    return {"run": str(make_tiny_run(2, shift=1.0)), "other_run": str(make_tiny_run(2, shift=-1.0)),
            "other_base": str(make_tiny_run(2, shift=1.0, base_seed=1))}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)



def test_compress_then_hit(runs, tmp_path):
    """A second compress of the same prompt is a store lookup, and says so."""
    store = tmp_path / "store"
    first = ok_json(invoke("compress", PROMPT, "--run", runs["run"], "--store", store, "--json"))
    assert first["store"] == "compressed" and first["gist_tokens"] == 2
    # position-free: the input follows the run's fixed prefix (6 tokens, prefix mask) and the 2 gist tokens
    assert first["key_start"] == 6 and first["input_position"] == 6 + 2
    assert first["context_used"] == 6 + 2  # compact positions: the cache is a plain prefix, the prompt uses no context
    assert first["full_prompt_kv_bytes"] == (first["prompt_tokens"] + 2) * 2 * 2 * 2 * 8 * 4
    second = ok_json(invoke("compress", PROMPT, "--run", runs["run"], "--store", store, "--json"))
    assert second["store"] == "hit" and second["key"] == first["key"]
    table = invoke("compress", PROMPT, "--run", runs["run"], "--store", store)
    assert table.exit_code == 0 and "hit" in table.stdout and "full KV" in table.stdout


def test_compress_out_then_generate_matches_library(runs, tmp_path):
    """`compress --out` + `generate --cache` prints what the library returns for the same pairs."""
    path = tmp_path / "c.safetensors"
    ok_json(invoke("compress", PROMPT, "--run", runs["run"], "--store", tmp_path / "s", "--out", path, "--json"))
    out = ok_json(invoke("generate", "--run", runs["run"], "--cache", path, "--input", "stone", "--input", "ab",
                         "--max-new-tokens", 8, "--json"))
    model = load_run(runs["run"])
    expected = generate(model, load_cache(path, model), ["stone", "ab"], max_new_tokens=8)
    assert [row["output"] for row in out] == expected and [row["input"] for row in out] == ["stone", "ab"]
    streamed = invoke("generate", "--run", runs["run"], "--cache", path, "--input", "stone", "--max-new-tokens", 8,
                      "--stream")
    assert streamed.exit_code == 0 and streamed.stdout.strip() == expected[0].strip()
    plain = invoke("generate", "--run", runs["run"], "--cache", path, "--input", "stone", "--max-new-tokens", 8)
    assert plain.exit_code == 0 and "input:  stone" in plain.stdout
    shown = expected[0].strip() or "no text: the model ended its answer at once"
    assert "answer:" in plain.stdout and shown in plain.stdout
    sample = ["--do-sample", "--max-new-tokens", 8, "--temperature", "1.5", "--top-k", "20", "--seed", "3", "--json"]
    sampled = [ok_json(invoke("generate", "--run", runs["run"], "--cache", path, "--input", "stone", *sample))
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_generate_from_prompt_uses_the_store(runs, tmp_path):
    """`generate --prompt` compresses into the store once; a later compress is a hit."""
    store = tmp_path / "store"
    ok_json(invoke("generate", "--run", runs["run"], "--prompt", PROMPT, "--input", "x", "--store", store,
                   "--max-new-tokens", 4, "--json"))
    assert ok_json(invoke("compress", PROMPT, "--run", runs["run"], "--store", store, "--json"))["store"] == "hit"


def test_compress_file_batches(runs, tmp_path):
    """--file takes JSON objects with "instruction" or JSON strings per line; --out is then a folder."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Add one"}) + "\n\n" + json.dumps("Uppercase it") + "\n"
                       + json.dumps({"instruction": PROMPT, "input": "ignored"}) + "\n")
    rows = ok_json(invoke("compress", "--file", prompts, "--run", runs["run"], "--store", tmp_path / "s",
                          "--out", tmp_path / "out", "--batch-size", 2, "--json"))
    assert [r["store"] for r in rows] == ["compressed"] * 3
    assert len({r["key"] for r in rows}) == 3 and all(
        Path(r["path"]).is_file() and Path(r["path"]).parent == tmp_path / "out" for r in rows)
    assert rows[0]["prompt_preview"] == "Add one"


def test_cache_ls_rm_prune(runs, tmp_path):
    """ls lists the store; rm takes a unique prefix; prune removes least-recently-used first."""
    store = tmp_path / "store"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in ["Add one", "Uppercase it", "Reverse it"]) + "\n")
    rows = ok_json(invoke("compress", "--file", prompts, "--run", runs["run"], "--store", store, "--json"))
    listed = ok_json(invoke("cache", "ls", "--store", store, "--json"))
    assert sorted(e["key"] for e in listed) == sorted(r["key"] for r in rows)
    table = invoke("cache", "ls", "--store", store)
    assert table.exit_code == 0 and "3 caches" in table.stdout and rows[0]["key"][:12] in table.stdout
    removed = invoke("cache", "rm", rows[0]["key"][:12], "--store", store)
    assert removed.exit_code == 0 and rows[0]["key"] in removed.stdout
    pruned = ok_json(invoke("cache", "prune", "--max-bytes", "0", "--store", store, "--json"))
    assert sorted(pruned["removed"]) == sorted(r["key"] for r in rows[1:]) and pruned["bytes_left"] == 0
    assert ok_json(invoke("cache", "ls", "--store", store, "--json")) == []


def test_refusals_one_line_exit_2(runs, tmp_path):
    """Foreign, damaged or missing caches and bad flags: one red line, exit code 2, nothing written."""
    store = tmp_path / "store"
    path = tmp_path / "c.safetensors"
    ok_json(invoke("compress", PROMPT, "--run", runs["run"], "--store", store, "--out", path, "--json"))
    gen = ["generate", "--input", "x", "--max-new-tokens", 4]
    one_line_error(invoke(*gen, "--run", runs["other_run"], "--cache", path), "another run (run_fingerprint")
    one_line_error(invoke(*gen, "--run", runs["other_base"], "--cache", path), "another base model (base_fingerprint")
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[:-40])
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", short), "not a readable safetensors file")
    altered = tmp_path / "altered.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", altered), "tensor_sha256")
    text = tmp_path / "text.safetensors"
    text.write_text("not a cache")
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", text), "not a readable safetensors file")
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", tmp_path / "none.safetensors"), "does not exist")
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", path, "--prompt", "p"), "not both or neither")
    one_line_error(invoke(*gen, "--run", runs["run"]), "not both or neither")
    one_line_error(invoke("generate", "--run", runs["run"], "--cache", path, "--input", "y" * 600),
                   "over the model's context of 512")
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", path, "--temperature", "0"), "--temperature")
    one_line_error(invoke(*gen, "--run", runs["run"], "--cache", path, "--dtype", "int8"), "--dtype 'int8'")

    fresh = tmp_path / "fresh-store"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{oops\n')
    one_line_error(invoke("compress", "--file", bad, "--run", runs["run"], "--store", fresh), "line 2 is not JSON")
    one_line_error(invoke("compress", "--run", runs["run"], "--store", fresh), "not both or neither")
    one_line_error(invoke("compress", "  ", "--run", runs["run"], "--store", fresh), "the instruction is empty")
    one_line_error(invoke("compress", PROMPT, "--run", tmp_path / "norun", "--store", fresh), "does not exist")
    one_line_error(invoke("compress", PROMPT, "--run", runs["run"], "--store", fresh, "--out", tmp_path),
                   "is a folder")
    assert not fresh.exists()  # refused before anything was created

    one_line_error(invoke("cache", "rm", "abcdef", "--store", store), "no cache in")
    one_line_error(invoke("cache", "prune", "--max-bytes", "lots", "--store", store), "--max-bytes 'lots'")
    assert len(ok_json(invoke("cache", "ls", "--store", store, "--json"))) == 1


FAKE_BENCH = {
    "config": {"model": "smollm2-135m"},
    "machine": {"device": "cpu", "cpu": "Test CPU", "dtype": "float32", "threads": 1, "torch": "2.x"},
    "notes": ["untrained GistModel"],
    "results": [{"instruction_tokens": 128, "prompt_tokens": 140, "gist_file_bytes": 10000,
                 "full_prompt_kv_bytes": 1000000, "bytes_ratio": 100.0, "compress_s": 0.3,
                 "full": {"ttft_s": 0.5, "total_s": 3.0}, "cached": {"ttft_s": 0.1, "total_s": 2.5},
                 "gist": {"ttft_s": 0.09, "total_s": 2.4}}],
}


def test_bench_cache_flags_reach_the_config(monkeypatch):
    """`gist bench cache --lengths 128 512 2048` (space- or comma-separated) builds the config; table renders."""
    from gistcache.cli import common

    monkeypatch.setattr(common.console, "width", 200)  # a table fits the terminal: its cells wrap at COLUMNS=40
    with mock.patch("gistcache.eval.bench.bench_cache", return_value=FAKE_BENCH) as bench:
        result = invoke("bench", "cache", "--lengths", 128, 512, 2048, "--repeats", 5, "--new-tokens", 64,
                        "--threads", 1, "--model", "smollm2-135m")
        assert result.exit_code == 0, result.output
        (config,), _ = bench.call_args
        assert (config.lengths, config.repeats, config.new_tokens, config.threads) == ([128, 512, 2048], 5, 64, 1)
        assert "Test CPU" in result.stdout and "100x" in result.stdout
        result = invoke("bench", "cache", "--lengths", "16,32", "--json")
        assert bench.call_args[0][0].lengths == [16, 32] and json.loads(result.stdout) == FAKE_BENCH
    one_line_error(invoke("bench", "cache", "--lengths", 128, "big"), "--lengths takes token counts")
    one_line_error(invoke("bench", "cache", "--repeats", 0), "--repeats must be >= 1")
