"""One message is one line, at any terminal width (issue 25): on a 40-column terminal the CLI's messages and
errors, paths included, are never wrapped, and a refusal is the only line a verb prints."""

import pytest
from typer.testing import CliRunner

from clitools import one_line_error
from gistcache.cli import common
from gistcache.cli.main import app

runner = CliRunner()
DEEP = "a-folder-with-a-rather-long-name/and-another-one-below-it"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def narrow(monkeypatch):
    """A 40-column terminal, for both of the CLI's consoles."""
    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "width", 40)


@pytest.fixture(scope="module")
def run(make_tiny_run):
    """An untrained run of one gist token on the tiny Llama (`tiny_model_dir`)."""
    return make_tiny_run(1)


def test_messages_with_long_paths_are_one_line(narrow, run, tmp_path):
    """`gist cache adopt` and `gist compress --out` name a long path in one line each."""
    store = tmp_path / DEEP / "store"
    store.mkdir(parents=True)
    result = invoke("cache", "adopt", "--store", store)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [f"adopted {store}: rm and prune now act on it"]
    out = tmp_path / DEEP / "prompt.safetensors"
    result = invoke("compress", "Reverse the word you are given", "--run", run, "--out", out,
                    "--store", store)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"file: {out}" in lines and f"store: {store}" in lines, result.output


def test_refusals_are_the_only_line(narrow, run, tiny_model_dir, tmp_path):
    """A refusal at 40 columns is one `error:` line and nothing else: a long path, and a bench length past the
    model's context (refused before the model loads, so no progress line comes first)."""
    missing = tmp_path / DEEP / "missing.safetensors"
    line = one_line_error(invoke("generate", "--run", run, "--cache", missing, "--input", "x"))
    assert str(missing) in line
    line = one_line_error(invoke("bench", "cache", "--lengths", 1000, "--model", tiny_model_dir))
    assert "--lengths 1000" in line and "exceed the model's context of 512" in line


@pytest.mark.parametrize("columns", [40, 200])
def test_compress_file_numbers_are_never_cut(columns, monkeypatch, run, tmp_path):
    """`gist compress --file` shows its numbers whole at any width: the table where it fits, else one line a
    prompt (the terminal wraps it whole)."""
    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "width", columns)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Reverse the word you are given"}\n'
                       '{"instruction": "Repeat the word you are given twice, with a dash"}\n')
    result = invoke("compress", "--file", prompts, "--run", run, "--out", tmp_path / "caches",
                    "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    if columns == 40:
        rows = [line for line in lines if line.startswith(("0: new", "1: new"))]
        assert len(rows) == 2 and all("tokens," in r and "full KV (" in r for r in rows), result.output
    else:
        assert any("┃ tokens" in line or "tokens ┃" in line for line in lines), result.output
    numbers = [line for line in lines if "->" in line]
    assert len(numbers) == 2 and not any("…" in line.split("->", 1)[1] for line in numbers), result.output
