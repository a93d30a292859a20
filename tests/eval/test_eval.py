"""`gist eval`: metrics, FLOP counts, how each condition is built, and the verb end to end (tiny runs)."""

import json
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

import tiny
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.eval import flops as F
from gistcache.eval.conditions import template_only_ids, truncate_prompt
from gistcache.eval.config import EvalConfig
from gistcache.eval.loop import evaluate
from gistcache.eval.rouge import bootstrap_ci, exact_match, rouge_l, summarize
from gistcache.inference.generation import generate_causal
from gistcache.prompts import encode_input, encode_instruction
from clitools import one_line_error

runner = CliRunner()
LONG = ("Read the sentence you are given, find every word that names an animal, and answer with those words "
        "in the order they appear, separated by commas, without any other text.")
SHORT = "Name the animals."


# --- metrics ---------------------------------------------------------------------------------------

def test_rouge_l_known_value():
    """LCS 5 of a 5-word prediction and a 6-word reference: P=1, R=5/6, F=10/11."""
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat sat on the mat") == 0.0


def test_rouge_l_stems_words():
    """With the Porter stemmer, 'cats running' matches 'cat run' exactly; without it, not at all."""
    assert rouge_l("cats running", "cat run") == pytest.approx(1.0)
    assert rouge_l("cats running", "cat run", use_stemmer=False) == 0.0


def test_exact_match_normalizes_case_and_space():
    """Exact match compares stripped, lower-cased text."""
    assert exact_match("  Paris \n", "paris") == 1.0
    assert exact_match("Paris.", "paris") == 0.0


def test_bootstrap_ci_contains_mean_and_is_seeded():
    """The interval holds the mean, is the same for the same seed, and moves with another seed."""
    values = torch.rand(50, generator=torch.Generator().manual_seed(1)).tolist()
    low, high = bootstrap_ci(values, resamples=1000, seed=0)
    mean = sum(values) / len(values)
    assert low < mean < high
    assert bootstrap_ci(values, resamples=1000, seed=0) == (low, high)
    assert bootstrap_ci(values, resamples=1000, seed=1) != (low, high)
    s = summarize(values)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["mean"] == pytest.approx(mean * 100, abs=1e-3)


# --- conditions and FLOPs ---------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["plain", "chat"])
def test_truncate_keeps_m_tokens(template):
    """The truncated prompt is the full prompt's ids with only the instruction's first M tokens kept."""
    tok = tiny.make_tokenizer()
    full = encode_instruction(tok, LONG, template)
    before = len(tok("Instruction: " if template == "plain" else "<|im_start|>user\n", add_special_tokens=False).input_ids)
    n = len(LONG)  # byte tokenizer: one token per character
    for m in (1, 2, 7):
        cut = truncate_prompt(tok, LONG, template, m)
        assert (cut.kept, cut.instruction_tokens) == (m, n)
        assert cut.ids == full[:before + m] + full[before + n:]
        assert len(cut.ids) == len(template_only_ids(tok, template)) + m
        assert cut.ids == encode_instruction(tok, LONG[:m], template)  # same as writing the short instruction
    assert truncate_prompt(tok, LONG, template, 10_000).ids == full  # a budget past the instruction cuts nothing


def test_truncate_text_is_the_instruction_prefix():
    """Plain template, M=4: the prompt reads 'Instruction: Read\\n'."""
    tok = tiny.make_tokenizer()
    assert tok.decode(truncate_prompt(tok, LONG, "plain", 4).ids) == "Instruction: Read\n"


def test_none_keeps_only_the_template():
    """The no-instruction prompt is the template with an empty instruction slot."""
    tok = tiny.make_tokenizer()
    assert tok.decode(template_only_ids(tok, "plain")) == "Instruction: \n"
    assert tok.decode(template_only_ids(tok, "chat")) == "<|im_start|>user\n"


def _masked_greedy(gm, ids, condition, steps):
    """Reference: greedy decoding re-running the whole masked forward every step."""
    new = []
    for _ in range(steps):
        x = torch.tensor([ids + new])
        with torch.no_grad():
            token = int(gm(x, torch.ones_like(x), condition=condition).logits[0, -1].argmax())
        if token == gm.tokenizer.eos_token_id:
            break
        new.append(token)
    return gm.tokenizer.decode(new, skip_special_tokens=True)


def test_causal_generation_matches_masked_reference(gm):
    """`full` (batched, left-padded) and `neg_control` (input alone at positions P+N..) equal the
    masked forward of pos_control and neg_control token for token."""
    tok, G = gm.tokenizer, [gm.gist_token_id] * 2
    prompts = [encode_instruction(tok, t, "chat") for t in (LONG, SHORT)]
    inputs = [encode_input(tok, t, "chat") for t in ("a cat and a dog", "owl")]
    seqs = [[*p, *G, *i] for p, i in zip(prompts, inputs)]
    full = generate_causal(gm, seqs, max_new_tokens=5, batch_size=2)
    assert full == [_masked_greedy(gm, s, "pos_control", 5) for s in seqs]
    neg = generate_causal(gm, inputs, max_new_tokens=5, batch_size=2,
                          position_offsets=[len(p) + 2 for p in prompts])
    assert neg == [_masked_greedy(gm, s, "neg_control", 5) for s in seqs]


def test_flops_scale_with_prompt_but_not_for_gist(gm):
    """A longer instruction costs more full-prompt prefill (and decode: attention is counted), while
    the gist prefill over the same input is the same; only the one-time compress grows."""
    from gistcache.inference.compression import compress

    tok, G = gm.tokenizer, [gm.gist_token_id] * 2
    inp = encode_input(tok, "a cat and a dog", "chat")
    full = {t: F.causal_flops(gm, [*encode_instruction(tok, t, "chat"), *G, *inp], max_new_tokens=3) for t in (SHORT, LONG)}
    assert full[LONG].prefill > full[SHORT].prefill > 0
    assert full[LONG].decode > full[SHORT].decode > 0  # same tokens decoded, longer context to attend to
    gist, squeeze = {}, {}
    for t in (SHORT, LONG):
        cache, squeeze[t] = F.count_flops(compress, gm, t, batch_size=1)
        gist[t] = F.gist_flops(gm, cache, "a cat and a dog", max_new_tokens=3)
    assert gist[LONG].prefill == gist[SHORT].prefill > 0
    assert gist[LONG].prefill < full[SHORT].prefill
    assert squeeze[LONG] > squeeze[SHORT] > 0
    assert F.compress_flops(gm, LONG) == squeeze[LONG]


def test_flop_counter_counts_cpu_attention():
    """The fused CPU attention kernel is counted (4*b*h*s_q*s_k*d), not silently zero."""
    q = torch.randn(1, 4, 10, 8)
    _, flops = F.count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q, is_causal=True)
    assert flops == 4 * 1 * 4 * 10 * 10 * 8


# --- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(make_tiny_run):
    """A tiny gist run and its pos/neg control runs (gist embedding only, untrained)."""
    return {name: str(make_tiny_run(2, condition=condition))
            for name, condition in (("run", "gist"), ("pos", "pos_control"), ("neg", "neg_control"))}


ROWS = [
    {"instruction": "Repeat the word you are given twice, separated by a space.", "input": "cat", "output": "cat cat"},
    {"instruction": "Write the word you are given in capital letters.", "input": "dog", "output": "DOG"},
    {"instruction": "Answer with the first letter of the word.", "input": "sun", "output": "s"},
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "Reverse the letters of the word you are given.", "input": "red", "output": "der"},
]


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "alpaca_plus_validation_human.json").write_text(json.dumps(ROWS))
    (folder / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n")
    return folder


def test_evaluate_writes_every_output(runs, data_dir, tmp_path):
    """All baselines and both controls on a named split and a file: the table's rows, the JSON,
    the markdown, one prediction line per example with every condition, and both plots."""
    out = tmp_path / "eval"
    config = EvalConfig(runs=runs["run"], splits=["human", str(data_dir / "mine.jsonl")], data_dir=str(data_dir),
                        control_runs=f"pos={runs['pos']},neg={runs['neg']}", out=str(out), max_new_tokens=4,
                        batch_size=2, flops_examples=2)
    results = evaluate(config, show_progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n != "fidelity.png"] == ["predictions.jsonl", "results.json", "results.md",
                                                         "rouge_by_condition.png", "rouge_vs_compression.png"]
    assert not list(tmp_path.glob(".eval.tmp-*"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["split_files"]["human"].endswith("alpaca_plus_validation_human.json")
    conditions = ["gist", "full", "none", "truncate", "base", "pos_control", "neg_control"]
    assert [(r["split"], r["condition"]) for r in saved["rows"]] == (
        [(s, c) for s in ("human", "mine") for c in conditions[:5]] + [(s, c) for c in conditions[5:] for s in ("human", "mine")])
    assert [(f["split"], f["examples"]) for f in saved["fidelity"]] == [("human", len(ROWS)), ("mine", 3)]
    for f in saved["fidelity"]:
        for key in ("agreement_full_rouge_l", "agreement_base_rouge_l", "agreement_full_em", "agreement_base_em"):
            assert 0 <= f[key]["mean"] <= 100, (key, f[key])
    assert "## Fidelity" in (out / "results.md").read_text()
    by = {(r["split"], r["condition"]): r for r in results["rows"]}
    assert set(by) == {(s, c) for s in ("human", "mine") for c in conditions}
    gist, full = by["human", "gist"], by["human", "full"]
    assert gist["prompt_state_positions_mean"] == 2 and gist["compression_mean"] == pytest.approx(
        full["instruction_tokens_mean"] / 2)
    assert gist["prefill_flops"] < full["prefill_flops"] and gist["compress_flops"] > 0
    assert 0 < gist["prefill_reduction_vs_full"] < 1 and full["prefill_reduction_vs_full"] == 0
    assert by["human", "truncate"]["truncate_kept_mean"] == 2 and by["human", "neg_control"]["compression_mean"] is None
    # the plot's x counts the positions held before the input alike for every condition (template included), so
    # gist and truncate at one state sit at one compression, and the full prompt at 1
    assert full["state_compression_mean"] == 1
    assert by["human", "truncate"]["state_compression_mean"] == pytest.approx(gist["state_compression_mean"])
    assert by["human", "neg_control"]["prompt_state_bytes_mean"] == 0
    assert full["prompt_state_bytes_mean"] == full["instruction_tokens_mean"] * saved["runs"][0]["kv_bytes_per_position"]
    for r in results["rows"]:
        assert r["rouge_l"]["ci_low"] <= r["rouge_l"]["mean"] <= r["rouge_l"]["ci_high"]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == len(ROWS) + 3
    assert set(lines[0]["outputs"]) == set(conditions) and lines[0]["truncate_kept_tokens"] == 2
    assert lines[0]["reference"] == "cat cat" and lines[0]["split"] == "human"
    md = (out / "results.md").read_text()
    assert "| run | split | condition | n | ROUGE-L [95% CI] | EM | compression | prefill FLOPs | vs full |" in md
    assert md.count("| human |") == len(conditions) + 2  # and its fidelity row and by-length row (one bucket)


def test_evaluate_truncate_alone(runs, data_dir, tmp_path):
    """`--baseline truncate` alone: gist and truncate, the prefill reduction still against the full prompt."""
    results = evaluate(EvalConfig(runs=[runs["run"]], baselines=["truncate"], splits=["human"], data_dir=str(data_dir),
                                  out=str(tmp_path / "e"), max_new_tokens=2, limit=2, flops_examples=1),
                       show_progress=False)
    assert [r["condition"] for r in results["rows"]] == ["gist", "truncate"]
    assert results["fidelity"][0]["retention"] is None  # no full prompt evaluated: nothing to compare with
    assert all(r["examples"] == 2 and 0 < r["prefill_reduction_vs_full"] < 1 for r in results["rows"])
    assert len((tmp_path / "e" / "predictions.jsonl").read_text().splitlines()) == 2



def test_cli_bad_input_one_line_exit_2(runs, data_dir, tmp_path):
    """Unknown split or baseline, a folder that is not a run, --limit 0, a truncation budget past the
    longest instruction: one line each, exit 2, nothing written."""
    out = tmp_path / "out"
    ok = ["--run", runs["run"], "--split", "human", "--data-dir", str(data_dir), "--out", str(out)]
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    for args, text in [
        ([*ok, "--split", "bogus"], "unknown split 'bogus'"),
        ([*ok, "--baseline", "oracle"], "unknown baseline 'oracle'"),
        (["--run", str(not_a_run), "--split", "human", "--data-dir", str(data_dir)], "is not a gist run"),
        ([*ok, "--limit", "0"], "--limit must be a whole number >= 1"),
        ([*ok, "--truncate-tokens", "500"], "larger than the prompt"),
        ([*ok, "--control-runs", f"pos={runs['neg']}"], "not 'pos_control'"),
        ([*ok, "--control-runs", "both=x"], "pos=RUN,neg=RUN"),
    ]:
        result = runner.invoke(app, ["eval", *args])
        assert text in one_line_error(result), (args, result.output)
    assert not out.exists()


def test_named_split_needs_data(runs, tmp_path, monkeypatch):
    """Without --data-dir, $GISTCACHE_DATA or ../shared/data/alpaca_plus, a split name says what to pass."""
    monkeypatch.delenv("GISTCACHE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GistError, match="pass --data-dir"):
        evaluate(EvalConfig(runs=[runs["run"]], splits=["seen"]), show_progress=False)


def test_cli_flags_reach_the_config(runs, data_dir, tmp_path):
    """`gist eval` turns its flags into one EvalConfig and calls the library once."""
    fake = {"out": str(tmp_path / "o"), "runs": [], "rows": [], "plots": []}
    with mock.patch("gistcache.eval.loop.evaluate", return_value=fake) as evaluate_:
        result = runner.invoke(app, ["eval", "--run", runs["run"], "--baseline", "truncate", "--split", "human",
                                     "--data-dir", str(data_dir), "--limit", "3", "--truncate-tokens", "4",
                                     "--control-runs", f"neg={runs['neg']}", "--max-new-tokens", "16", "--json"])
    assert result.exit_code == 0, result.output
    (config,), kwargs = evaluate_.call_args
    assert (config.baselines, config.limit, config.truncate_tokens, config.max_new_tokens) == (["truncate"], 3, 4, 16)
    assert config.control_runs == {"neg": runs["neg"]} and kwargs == {"show_progress": False}
    assert config.runs == [runs["run"]] and list(config.split_files) == ["human"]


def test_several_runs_are_labelled_and_plotted(runs, data_dir, tmp_path):
    """Two --run folders: rows and predictions carry `run:condition` labels, the compression plot is
    drawn, and --flops-examples 0 leaves the FLOP columns empty."""
    out = tmp_path / "e"
    results = evaluate(EvalConfig(runs=[runs["run"], runs["run"]], baselines=["none"], splits=["human"],
                                  data_dir=str(data_dir), out=str(out), max_new_tokens=2, limit=2, flops_examples=0),
                       show_progress=False)
    assert [r["label"] for r in results["rows"]] == ["run:gist", "run:none", "run-2:gist", "run-2:none"]
    assert all(r["prefill_flops"] is None and r["prefill_reduction_vs_full"] is None for r in results["rows"])
    assert set(json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["outputs"]) == {
        "run:gist", "run:none", "run-2:gist", "run-2:none"}
    assert (out / "rouge_vs_compression.png").stat().st_size > 0


def test_narrow_terminal_table_keeps_the_compared_columns(runs, data_dir, tmp_path, monkeypatch):
    """On an 80-column terminal the screen table drops EM, the FLOP count columns and wall time, and says
    that results.md has every column; condition, ROUGE-L, compression and the prefill reduction stay whole."""
    from gistcache.cli import common

    row = {"run": "run", "split": "human", "condition": "neg_control", "examples": 3,
           "rouge_l": {"mean": 31.25, "ci_low": 20.0, "ci_high": 40.0}, "exact_match": {"mean": 0.0},
           "compression_mean": 12.5, "compression_max": 20.0, "prefill_flops": 1e9, "prefill_reduction_vs_full": 0.6,
           "generation_flops": 2e9, "compress_flops": 3e9, "prompt_state_bytes_mean": 46080, "wall_s": 1.5}
    fake = {"out": str(tmp_path / "o"), "runs": [], "rows": [row], "plots": []}
    monkeypatch.setattr(common.console, "width", 80)
    with mock.patch("gistcache.eval.loop.evaluate", return_value=fake):
        result = runner.invoke(app, ["eval", "--run", runs["run"], "--split", "human", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.split("(narrow terminal")[0].splitlines()  # the table; a message is one line, however long
    assert max(len(line) for line in lines) <= 80, result.output
    for shown in ("neg_control", "31.2 [20.0, 40.0]", "12.5x (max 20x)", "-60%", "45 KiB"):
        assert shown in result.output, shown
    assert "gen FLOPs" not in result.output.split("(narrow terminal")[0]
    assert "all columns are in results.md" in result.output


def test_fidelity_row_metrics():
    """Retention, gap closed and agreement from known answers: the ratios of the per-condition means."""
    from gistcache.eval.fidelity import fidelity_row

    refs = ["a b c d", "e f g h"]
    answers = {"gist": ["a b", "e f g h"], "full": ["a b c d", "e f g h"], "none": ["x", "e"],
               "base": ["a b c d", "e f"]}
    row = fidelity_row(answers, refs, resamples=200)
    # ROUGE-L F of "a b" against "a b c d" is 2/3, of "e" against "e f g h" 0.4
    gist, full, none, base = (2 / 3 + 1) / 2, 1.0, (0 + 0.4) / 2, (1 + 2 / 3) / 2
    assert row["retention"]["mean"] == pytest.approx(100 * gist / full, abs=1e-3)
    assert row["gap_closed"]["mean"] == pytest.approx(100 * (gist - none) / (full - none), abs=1e-3)
    assert row["retention_vs_base"]["mean"] == pytest.approx(100 * gist / base, abs=1e-3)
    assert row["agreement_full_em"]["mean"] == 50.0 and row["agreement_base_em"]["mean"] == 0.0
    assert row["agreement_full_rouge_l"]["mean"] == pytest.approx(100 * (2 / 3 + 1) / 2, abs=1e-3)
    assert row["retention"]["ci_low"] <= row["retention"]["mean"] <= row["retention"]["ci_high"]


def test_default_out_of_a_shipped_run_is_outside_the_package(tmp_path):
    """`gist eval --run NAME` of a shipped run (by name or by its folder) writes under runs/ in the current folder,
    never into the installed package; any other run gets RUN/eval-<timestamp>."""
    from gistcache.eval.config import default_out
    from gistcache.run import DEFAULT_RUN, PRETRAINED_DIR

    for given in (DEFAULT_RUN, str(PRETRAINED_DIR / DEFAULT_RUN)):
        out = default_out(given)
        assert out.startswith(f"runs/{DEFAULT_RUN}-eval-"), out
    run = tmp_path / "r"  # a folder that is no shipped run's: the path as given
    assert default_out(str(run)).startswith(f"{run}/eval-")
