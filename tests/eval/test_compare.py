"""`gist compare` (eval/compare.py): the paired difference of two evaluations on the rows they share, on literal
records and on `gist eval` folders of a tiny run; the table at any width; refusals."""

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

from clitools import one_line_error
from gistcache.cli import common
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.eval.compare import compare_evaluations
from gistcache.eval.config import EvalConfig
from gistcache.eval.loop import evaluate

runner = CliRunner()


def write_eval(folder, rows):
    """A `gist eval` folder holding only predictions.jsonl, from (split, reference, tokens, {label: answer}) rows."""
    folder.mkdir()
    with open(folder / "predictions.jsonl", "w") as f:
        for i, (split, reference, tokens, outputs) in enumerate(rows):
            f.write(json.dumps({"split": split, "index": i, "instruction": f"rule {i}", "input": f"in {i}",
                                "reference": reference, "outputs": outputs, "instruction_only_tokens": tokens}) + "\n")
    return folder


@pytest.fixture
def two_evals(tmp_path):
    # A answers two of four rows right; B three. B holds a fifth row A lacks: it is left out.
    refs = ["blick", "stoorp", "zaimsh", "drond"]
    a = write_eval(tmp_path / "a", [("dev", r, t, {"gist": ans, "full": r})
                                    for r, t, ans in zip(refs, [100, 100, 300, 300], ["blick", "no", "zaimsh", "no"])])
    b = write_eval(tmp_path / "b", [("dev", r, t, {"gist": ans}) for r, t, ans in
                                    zip(refs + ["extra"], [100, 100, 300, 300, 300],
                                        ["blick", "stoorp", "zaimsh", "no", "extra"])])
    return a, b


def test_paired_difference_on_literal_records(two_evals):
    """Only the rows both hold, only the conditions both hold; means, difference and exact match x100."""
    result = compare_evaluations(*two_evals, by_length=True)
    rows = {(r["bucket"], r["a_condition"]): r for r in result["rows"]}
    assert set(rows) == {("all", "gist"), ("<=128", "gist"), ("257-512", "gist")}  # empty buckets left out
    whole = rows["all", "gist"]
    assert whole["examples"] == 4 and whole["b_condition"] == "gist"
    assert whole["rouge_a"]["mean"] == 50 and whole["rouge_b"]["mean"] == 75
    assert whole["difference"]["mean"] == 25 and whole["em_a"] == 50 and whole["em_b"] == 75
    assert whole["difference"]["ci_low"] <= 25 <= whole["difference"]["ci_high"]
    assert whole["difference"]["ci_low"] >= 0  # B is never below A on any row, so no resample is
    short = rows["<=128", "gist"]
    assert short["examples"] == 2 and short["difference"]["mean"] == 50
    long = rows["257-512", "gist"]
    assert long["difference"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_named_pairs_and_one_folder_against_itself(two_evals):
    """A_LABEL=B_LABEL pairs different conditions; the same folder twice sets two of its conditions side by side."""
    a, b = two_evals
    row, = compare_evaluations(a, a, conditions=["gist=full"])["rows"]
    assert (row["a_condition"], row["b_condition"]) == ("gist", "full")
    assert row["rouge_b"]["mean"] == 100 and row["difference"]["mean"] == 50
    row, = compare_evaluations(a, b, conditions=["full=gist"])["rows"]
    assert row["difference"]["mean"] == -25


def test_compare_real_evaluations(make_tiny_run, tmp_path):
    """Two `gist eval` folders of a tiny run, one with a larger --limit: compared on the smaller one's rows, the
    difference of two conditions equals the difference of the means each evaluation reported."""
    rows = [{"instruction": "Repeat the word you are given." * (1 + i), "input": f"word{i}", "output": f"word{i}"}
            for i in range(5)]
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(rows))
    run = make_tiny_run(1)
    common_args = dict(runs=str(run), splits=[str(data)], max_new_tokens=2, batch_size=2, flops_examples=0)
    small = evaluate(EvalConfig(**common_args, limit=3, out=str(tmp_path / "small"), baselines=["none", "echo"]),
                     show_progress=False)
    evaluate(EvalConfig(**common_args, out=str(tmp_path / "big"), baselines=["echo"]), show_progress=False)
    row, = compare_evaluations(tmp_path / "small", tmp_path / "small", conditions=["none=echo"])["rows"]
    reported = {r["condition"]: r["rouge_l"]["mean"] for r in small["rows"]}
    assert row["examples"] == 3 and reported["echo"] == 100 and row["rouge_b"]["mean"] == 100
    assert row["difference"]["mean"] == pytest.approx(reported["echo"] - reported["none"], abs=1e-3)
    pairs = compare_evaluations(tmp_path / "small", tmp_path / "big")["rows"]
    assert [(r["a_condition"], r["examples"]) for r in pairs] == [("gist", 3), ("echo", 3)]
    assert all(r["difference"]["mean"] == 0 for r in pairs)  # greedy decoding: the same answers on the same rows


@pytest.mark.parametrize("width", [40, 80, 200])
def test_cli_table_at_any_width(two_evals, monkeypatch, width):
    """The table's numbers survive any terminal width; --json gives the library's rows."""
    monkeypatch.setattr(common, "console", Console(width=width, file=io.StringIO(), soft_wrap=True, record=True))
    from gistcache.cli import compare_cmd
    monkeypatch.setattr(compare_cmd, "console", common.console)
    result = runner.invoke(app, ["compare", *map(str, two_evals), "--by-length"])
    assert result.exit_code == 0, result.output
    lines = common.console.export_text().splitlines()
    assert lines[:2] == [f"A: {two_evals[0]}", f"B: {two_evals[1]}"]
    body = "\n".join(lines[2:])
    assert "…" not in body and body.count("25.0 [") == 1 and body.count("50.0 [") == 1  # all rows, short bucket
    if width >= 110:  # the table, inside the terminal
        assert max(len(line) for line in lines[2:]) <= width and "<=128" in body
    else:  # one line per row, numbers whole
        assert lines[2:] == [line for line in lines[2:] if line.startswith("dev ")] and len(lines) == 5
    result = runner.invoke(app, ["compare", *map(str, two_evals), "--json"])
    assert result.exit_code == 0 and json.loads(common.console.export_text())["rows"][0]["difference"]["mean"] == 25


def test_refusals_are_one_line(two_evals, tmp_path):
    a, b = two_evals
    one_line_error(runner.invoke(app, ["compare", str(a), str(tmp_path)]), "no predictions.jsonl")
    one_line_error(runner.invoke(app, ["compare", str(a), str(b), "--condition", "truncate"]),
                   "has no condition 'truncate'")
    other = write_eval(tmp_path / "other", [("dev", "else", 100, {"gist": "x"})])
    one_line_error(runner.invoke(app, ["compare", str(a), str(other)]), "did not evaluate the same rows")
    elsewhere = write_eval(tmp_path / "elsewhere", [("test", "blick", 100, {"gist": "x"})])
    one_line_error(runner.invoke(app, ["compare", str(a), str(elsewhere)]), "no row in common")
    shared_none = write_eval(tmp_path / "shared-none", [("dev", "blick", 100, {"echo": "x"})])
    one_line_error(runner.invoke(app, ["compare", str(a), str(shared_none)]), "share no condition")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "predictions.jsonl").write_text('{"split": "dev"\n')
    one_line_error(runner.invoke(app, ["compare", str(a), str(damaged)]), "line 1 is not JSON")
    (damaged / "predictions.jsonl").write_text('{"split": "dev"}\n')
    one_line_error(runner.invoke(app, ["compare", str(a), str(damaged)]), "not a `gist eval` record")
    old = tmp_path / "old"
    old.mkdir()
    (old / "predictions.jsonl").write_text((a / "predictions.jsonl").read_text().replace('"instruction_only_tokens"',
                                                                                          '"x"'))
    with pytest.raises(GistError, match="evaluate again"):
        compare_evaluations(old, b, by_length=True)
