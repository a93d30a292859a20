"""`gist eval` by instruction length (eval/length.py): buckets, per-bucket metrics on literal inputs, the
truncation budget that matches the gist cache, and the table in an evaluation's outputs (tiny run)."""

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

import tiny
from gistcache.eval.conditions import instruction_token_count, truncate_budget, truncate_prompt
from gistcache.eval.config import EvalConfig
from gistcache.eval.length import bucket_of, length_records, length_rows, length_table
from gistcache.eval.loop import evaluate
from gistcache.eval.report import length_rich_table
from gistcache.model import load_run
from gistcache.prompts import fixed_prefix_ids


@pytest.mark.parametrize("tokens, label", [
    (0, "<=128"), (1, "<=128"), (128, "<=128"), (129, "129-256"), (256, "129-256"), (257, "257-512"),
    (512, "257-512"), (513, "513-1024"), (1024, "513-1024"), (1025, "1025-2048"), (2048, "1025-2048"),
    (2049, ">2048"), (10_000, ">2048"),
])
def test_bucket_edges(tokens, label):
    """Each bucket holds its two edges: <=128, 129-256, 257-512, 513-1024, 1025-2048, then >2048."""
    assert bucket_of(tokens) == label


def record(tokens, prompt, gist, full, none, truncate, gist_cached=5, trunc_cached=6):
    """One example whose reference is 'a b'; each condition's answer is right (1) or wrong (0)."""
    say = {1: "a b", 0: "x"}
    return {"instruction_tokens": tokens, "prompt_positions": prompt, "reference": "a b",
            "outputs": {"gist": say[gist], "full": say[full], "none": say[none], "truncate": say[truncate]},
            "cached_positions": {"gist": gist_cached, "full": prompt, "none": 4, "truncate": trunc_cached}}


LITERAL = [
    record(10, 30, 1, 1, 0, 0),
    record(128, 150, 1, 1, 0, 1),
    record(300, 320, 1, 1, 0, 0, gist_cached=10),
    record(400, 420, 0, 1, 0, 0, gist_cached=10),
]


def test_bucket_numbers_on_literal_examples():
    """Per bucket: ROUGE-L and EM of each condition, retention, gap closed, gist - truncate, compression."""
    rows = length_rows(LITERAL, resamples=200)
    assert [(r["bucket"], r["examples"]) for r in rows] == [("<=128", 2), ("257-512", 2)]  # empty buckets left out
    short, long = rows
    assert short["instruction_tokens_mean"] == 69 and short["prompt_positions_mean"] == 90
    rl = {c: v["rouge_l"]["mean"] for c, v in short["conditions"].items()}
    assert rl == {"gist": 100, "full": 100, "none": 0, "truncate": 50}
    assert {c: v["exact_match"]["mean"] for c, v in short["conditions"].items()} == rl
    assert short["gist_retention"] == {"mean": 100, "ci_low": 100, "ci_high": 100}
    assert short["gist_gap_closed"]["mean"] == 100 and short["truncate_retention"]["mean"] == 50
    assert short["truncate_gap_closed"]["mean"] == 50 and short["gist_minus_truncate"]["mean"] == 50
    assert short["conditions"]["gist"]["cached_positions_mean"] == 5
    assert short["conditions"]["gist"]["compression_mean"] == (30 / 5 + 150 / 5) / 2  # the mean of per-example ratios
    assert short["conditions"]["truncate"]["compression_mean"] == (30 / 6 + 150 / 6) / 2
    assert short["conditions"]["full"]["compression_mean"] == 1
    assert long["conditions"]["gist"]["rouge_l"]["mean"] == 50 and long["gist_retention"]["mean"] == 50
    assert long["gist_gap_closed"]["mean"] == 50 and long["truncate_retention"]["mean"] == 0
    assert long["conditions"]["gist"]["compression_mean"] == (320 / 10 + 420 / 10) / 2
    lo, hi = long["gist_retention"]["ci_low"], long["gist_retention"]["ci_high"]
    assert lo <= 50 <= hi and (lo, hi) != (50, 50)  # two examples that differ: a real interval


def test_conditions_missing_give_none():
    """Without truncate (or none) the metrics that need it are None; the rest is still there."""
    exs = [{**r, "outputs": {c: r["outputs"][c] for c in ("gist", "full")}} for r in LITERAL[:2]]
    (row,) = length_rows(exs, resamples=50)
    assert set(row["conditions"]) == {"gist", "full"} and row["gist_retention"]["mean"] == 100
    assert row["gist_gap_closed"] is None and row["truncate_retention"] is None and row["gist_minus_truncate"] is None


def test_gist_against_truncate_end_per_bucket():
    """With truncate-end run, each bucket also holds gist minus truncate-end and the table gains its column;
    without it the key is None and the column is absent."""
    exs = [{**r, "outputs": {**r["outputs"], "truncate-end": r["outputs"]["gist"] if i in (1, 2) else "x"},
            "cached_positions": {**r["cached_positions"], "truncate-end": 6}} for i, r in enumerate(LITERAL)]
    short, long = length_rows(exs, resamples=200)
    assert short["gist_minus_truncate_end"]["mean"] == 50 and long["gist_minus_truncate_end"]["mean"] == 0
    assert short["gist_minus_truncate"]["mean"] == 50  # the first truncation unchanged beside it
    headers, cells = length_table([{"split": "dev", **r} for r in (short, long)])
    assert "truncate-end R-L" in headers and headers.index("gist-trunc") < headers.index("gist-trunc-end")
    assert cells[0][headers.index("gist-trunc-end")].startswith("50.0 [")
    (row,) = length_rows(LITERAL[:2], resamples=50)
    assert row["gist_minus_truncate_end"] is None and "gist-trunc-end" not in length_table([row])[0]


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_narrow_length_table_never_cuts_a_number(width):
    """With every condition (six columns of ROUGE-L) and a long bucket label, the narrow screen table keeps every
    cell whole: a table inside the width, or one line per bucket when the table would not fit."""
    exs = [{**r, "instruction_tokens": 1500 if i == 3 else r["instruction_tokens"],
            "outputs": {**r["outputs"], "truncate-end": "x", "echo": "x", "base": "a b"},
            "cached_positions": {**r["cached_positions"], "truncate-end": 6, "echo": 0, "base": r["prompt_positions"]}}
           for i, r in enumerate(LITERAL)]
    rows = [{"split": "long_label_dev160", **row} for row in length_rows(exs, resamples=50)]
    console = Console(width=width, record=True, file=io.StringIO(), soft_wrap=True)
    console.print(length_rich_table({"length": rows}, narrow=True, width=width))
    text = console.export_text()
    assert "…" not in text
    for row in rows:
        line = next(line for line in text.splitlines() if line.strip().startswith(row["bucket"] + " "))
        assert f"{row['conditions']['gist']['compression_mean']:.1f}x" in line
        assert all(f"{c['rouge_l']['mean']:.1f}" in line for c in row["conditions"].values())
    if width >= 120:
        assert max(len(line) for line in text.splitlines()) <= width and "truncate-end" in text.splitlines()[2]


def test_records_from_columns_and_table_text():
    """length_records turns per-condition columns into records; length_table writes one line per bucket."""
    recs = length_records([10, 300], [30, 320], ["a b", "a b"], {"gist": ["a b", "x"], "full": ["a b", "a b"]},
                          {"gist": [5, 10], "full": [30, 320]})
    assert recs[1] == {"instruction_tokens": 300, "prompt_positions": 320, "reference": "a b",
                       "outputs": {"gist": "x", "full": "a b"}, "cached_positions": {"gist": 10, "full": 320}}
    rows = [{"run": "r", "split": "dev", **row} for row in length_rows(recs, resamples=50)]
    headers, cells = length_table(rows)
    assert headers[:5] == ["split", "tokens", "n", "gist R-L", "full R-L"]
    assert cells[0][:5] == ["dev", "<=128", "1", "100.0", "100.0"]
    assert cells[1][headers.index("gist ret.")] == "0.0% [0.0, 0.0]"
    assert cells[0][headers.index("gist comp.")] == "6.0x" and cells[0][headers.index("trunc comp.")] == "—"


def test_truncate_budget_matches_the_gist_slots():
    """truncate keeps as many instruction tokens as the cache has gist slots: N, or N per chunk of K past F."""
    tok = tiny.make_tokenizer()
    paper = SimpleNamespace(mask="paper", num_gist_tokens=2, gist_every=0, raw_tail=0)
    assert truncate_budget(tok, paper, "chat", 500) == 2
    assert truncate_budget(tok, paper, "chat", 500, fixed=7) == 7
    chunked = SimpleNamespace(mask="paper", num_gist_tokens=2, gist_every=64, raw_tail=0)
    assert truncate_budget(tok, chunked, "chat", 129) == 2 * 3  # ceil(129 / 64) chunks
    prefix = SimpleNamespace(mask="prefix", num_gist_tokens=1, gist_every=64, raw_tail=0)
    f = len(fixed_prefix_ids(tok, "chat"))
    assert f > 0 and truncate_budget(tok, prefix, "chat", f + 128) == 2 and truncate_budget(tok, prefix, "chat",
                                                                                              f + 129) == 3


def test_instruction_token_count_is_truncation_count():
    """The bucket key is the instruction's own tokens: what truncate_prompt counts."""
    tok = tiny.make_tokenizer()
    text = "Spell the word backwards."
    assert instruction_token_count(tok, text, "chat") == truncate_prompt(tok, text, "chat", 3).instruction_tokens
    assert instruction_token_count(tok, text, "chat") == len(text)  # byte-level: one token per character


# --- end to end ----------------------------------------------------------------------------------------

ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "Write the word in capital letters. " * 5, "input": "dog", "output": "DOG"},
    {"instruction": "Reverse the letters of the word you are given, and answer with nothing else. " * 4,
     "input": "red", "output": "der"},
]


@pytest.fixture(scope="module")
def run_dir(make_tiny_run):
    return make_tiny_run(2)


def test_evaluate_reports_length_table(run_dir, tmp_path):
    """results.json holds one length row per bucket present, with every condition; results.md the section."""
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(ROWS))
    out = tmp_path / "eval"
    results = evaluate(EvalConfig(runs=str(run_dir), splits=[str(data)], out=str(out), max_new_tokens=2,
                                  batch_size=2, flops_examples=0, baselines=["full", "none", "truncate"]),
                       show_progress=False)
    lengths = [len(r["instruction"].strip()) for r in ROWS]  # byte-level tokenizer
    assert lengths[0] <= 128 < lengths[1] <= 256 < lengths[2] <= 512
    rows = json.loads((out / "results.json").read_text())["length"]
    assert [(r["split"], r["bucket"], r["examples"]) for r in rows] == [
        ("dev", "<=128", 1), ("dev", "129-256", 1), ("dev", "257-512", 1)]
    assert rows[1]["instruction_tokens_mean"] == lengths[1]
    gm = load_run(str(run_dir))
    for r in rows:
        assert set(r["conditions"]) == {"gist", "full", "none", "truncate"}
        assert r["conditions"]["gist"]["cached_positions_mean"] == gm.num_prefix_tokens + 2  # the cache's context_used
        assert r["conditions"]["truncate"]["cached_positions_mean"] < r["prompt_positions_mean"]
        assert r["conditions"]["gist"]["compression_mean"] == pytest.approx(
            r["prompt_positions_mean"] / (gm.num_prefix_tokens + 2), rel=1e-3)
    assert "## By instruction length" in (out / "results.md").read_text()
    assert [r["bucket"] for r in results["length"]] == [r["bucket"] for r in rows]
    assert length_rich_table(results).row_count == 3
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(length_rich_table(results, narrow=True))  # a narrow terminal: ROUGE-L by condition, unbroken
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80 and not any("…" in line for line in lines), lines
    for r in rows:
        assert any(line.split()[:2] == [r["bucket"], "1"] and f"{r['conditions']['gist']['rouge_l']['mean']:.1f}" in
                   line and f"{r['conditions']['gist']['compression_mean']:.1f}x" in line for line in lines), lines
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds[2]["instruction_only_tokens"] == lengths[2] and preds[2]["truncate_kept_tokens"] == 2


def test_chunked_run_truncates_to_its_gist_slots(make_tiny_run, tmp_path):
    """A chunked run (gist_every K): per example, truncate keeps M = N * ceil((P - F) / K) instruction tokens, the
    gist cache's slot count, and the gist's cached positions are its context_used, F + M."""
    from gistcache.masks import count_gist_slots

    run = make_tiny_run(1, mask="prefix", gist_every=32)
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(ROWS))
    results = evaluate(EvalConfig(runs=str(run), splits=[str(data)], out=str(tmp_path / "eval"),
                                  max_new_tokens=2, batch_size=2, flops_examples=0, baselines=["full", "truncate"]),
                       show_progress=False)
    gm = load_run(str(run))
    f = gm.num_prefix_tokens
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for pred in preds:
        m = count_gist_slots(pred["instruction_tokens"], 1, 32, f)
        assert m == gm.num_gist_slots(pred["instruction_tokens"])
        assert pred["truncate_kept_tokens"] == min(m, pred["instruction_only_tokens"])
        assert pred["cached_positions"]["gist"] == f + m
    assert [p["cached_positions"]["gist"] - f for p in preds] == [1, 6, 10]  # grows with the prompt
    assert [r["bucket"] for r in results["length"]] == ["<=128", "129-256", "257-512"]
    rows = {row["condition"]: row for row in results["rows"]}
    assert rows["gist"]["prompt_state_positions_mean"] == pytest.approx((1 + 6 + 10) / 3, abs=1e-3)  # M, not N
    assert rows["truncate"]["truncate_tokens"] is None  # per prompt, not one budget
    assert results["runs"][0]["gist_every"] == 32
    assert "N=1 per 32 tokens" in (tmp_path / "eval" / "results.md").read_text()


def test_raw_tail_run_truncates_to_its_slots_and_truncate_end_keeps_the_end(make_tiny_run, tmp_path):
    """A run with a raw tail: truncate and truncate-end keep as many instruction tokens as its cache holds slots
    (M + t), the first ones and the last ones; the gist's cached positions are F + M + t."""
    from gistcache.masks import count_gist_slots

    run = make_tiny_run(1, mask="prefix", gist_every=32, raw_tail=8)
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(ROWS))
    evaluate(EvalConfig(runs=str(run), splits=[str(data)], out=str(tmp_path / "eval"), max_new_tokens=2,
                        batch_size=2, flops_examples=0, baselines=["truncate", "truncate-end"]), show_progress=False)
    gm = load_run(str(run))
    f = gm.num_prefix_tokens
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    for pred in preds:
        slots = count_gist_slots(pred["instruction_tokens"], 1, 32, f, raw_tail=8)
        assert pred["cached_positions"]["gist"] == f + slots
        assert pred["cached_positions"]["truncate"] == pred["cached_positions"]["truncate-end"]
        assert pred["truncate_kept_tokens"] == min(slots, pred["instruction_only_tokens"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all("mean" in row["gist_minus_truncate_end"] for row in results["length"])  # the by-length table has it
    tails = [p["cached_positions"]["gist"] - f - count_gist_slots(p["instruction_tokens"], 1, 32, f) for p in preds]
    assert tails == [0, 8, 8]  # the short instruction has none
    tok = gm.tokenizer
    start, end = (truncate_prompt(tok, ROWS[2]["instruction"], gm.template, 11, keep) for keep in ("start", "end"))
    assert "Reverse the" in tok.decode(start.ids) and "thing else." not in tok.decode(start.ids)
    assert "thing else." in tok.decode(end.ids) and "Reverse" not in tok.decode(end.ids)


def test_echo_control_answers_the_input_and_runs_no_model(run_dir, tmp_path):
    """--baseline echo: each answer is the example's own input (stripped), scored like any condition, with no
    prompt state, no compression and no FLOPs; where the reference is the input it scores 100 in ROUGE-L and EM."""
    from gistcache.eval.conditions import condition_sequences
    from gistcache.errors import GistError

    rows = [{**r, "input": f"  word{i} ", "output": f"word{i}" if i == 0 else f"[tag: word{i}]"}
            for i, r in enumerate(ROWS)]
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "eval"
    results = evaluate(EvalConfig(runs=str(run_dir), splits=[str(data)], out=str(out), max_new_tokens=2,
                                  batch_size=2, flops_examples=1, baselines=["none", "echo"]), show_progress=False)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["outputs"]["echo"] for p in preds] == ["word0", "word1", "word2"]
    assert [p["cached_positions"]["echo"] for p in preds] == [0, 0, 0]
    echo = next(r for r in results["rows"] if r["condition"] == "echo")
    assert echo["exact_match"]["mean"] == pytest.approx(100 / 3, abs=0.01)  # only the first reference is the input
    assert 100 / 3 < echo["rouge_l"]["mean"] < 100  # the others hold it beside a tag: partial credit
    assert echo["compression_mean"] is None and echo["prompt_state_positions_mean"] == 0
    assert echo["prefill_flops"] is None and echo["prefill_reduction_vs_full"] is None
    length = results["length"]
    assert all("echo" in r["conditions"] for r in length)
    assert length[0]["conditions"]["echo"]["rouge_l"]["mean"] == 100
    assert all(r["conditions"]["echo"]["compression_mean"] is None for r in length)
    headers, _ = length_table(length)
    assert "echo R-L" in headers and "echo EM" in headers
    assert "| echo |" in (out / "results.md").read_text()
    with pytest.raises(GistError, match="runs no model"):
        condition_sequences("echo", [], [], [])
