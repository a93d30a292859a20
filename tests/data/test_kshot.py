"""The k-shot builder (gistcache.data.kshot) and `gist data kshot`: shots of the same task, never the row itself,
within the token budget, seeded; every bad input one line and exit code 2 with nothing written."""

from __future__ import annotations

import collections
import json

import pytest
from typer.testing import CliRunner

import tiny
from gistcache.cli import data_cmd
from gistcache.cli.main import app
from gistcache.data.heldout_tasks import LONG_DEV_TASKS, LONG_TUNE_TASKS, draw_long_dev_tasks, draw_long_tune_tasks
from gistcache.data.kshot import build_kshot, format_kshot, resolve_task_list
from gistcache.errors import GistError

from clitools import one_line_error
from tiny import make_tokenizer

SUPERNI = tiny.ROOT.parent / "shared" / "data" / "superni" / "superni_train.json"
runner = CliRunner()


def make_rows(tasks: int = 3, per: int = 6) -> list[dict]:
    return [{"instruction": f"Do task {t} to the input.", "input": f"in-{t}-{i}", "output": f"out-{t}-{i}",
             "source": f"task{t}"} for t in range(tasks) for i in range(per)]


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def shots_of(row: dict) -> list[tuple[str, str]]:
    """(input, output) pairs written in a k-shot instruction."""
    blocks = row["instruction"].split("\n\nExamples:\n\n")[1].split("\n\n") if row["num_shots"] else []
    pairs = []
    for block in blocks:
        inp, out = block.split("\n")
        pairs.append((inp.removeprefix("Input: "), out.removeprefix("Output: ")))
    return pairs


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()  # byte-level: one token per byte


def test_format_is_readable():
    """The instruction, then 'Examples:' and each shot as Input/Output; no header without shots."""
    assert format_kshot("Add one.", []) == "Add one."
    assert format_kshot(" Add one. ", [{"input": "1", "output": "2"}, {"input": "5", "output": "6"}]) == (
        "Add one.\n\nExamples:\n\nInput: 1\nOutput: 2\n\nInput: 5\nOutput: 6")


def test_shots_from_same_task_never_the_row(tok):
    """Every shot is another row of the row's own task; the row keeps its input and output."""
    rows = make_rows()
    built = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, seed=0)
    assert len(built) == len(rows)
    for out in built:
        task = out["source"]
        assert out["input"].startswith(f"in-{task[4:]}-")
        assert out["output"] == out["input"].replace("in-", "out-")
        assert out["instruction"].startswith(f"Do task {task[4:]} to the input.")
        pairs = shots_of(out)
        assert len(pairs) == out["num_shots"]
        for inp, answer in pairs:
            assert inp.startswith(f"in-{task[4:]}-") and answer == inp.replace("in-", "out-")
            assert inp != out["input"]
        assert len(set(pairs)) == len(pairs)


def test_shots_skip_rows_with_the_same_input(tok):
    """A duplicate of the row's input (with its answer) is never shown as a shot."""
    rows = make_rows(1, 4) + [{"instruction": "Do task 0 to the input.", "input": "in-0-0", "output": "out-0-0",
                               "source": "task0"}]
    for out in build_kshot(rows, tokenizer=tok, max_prompt_tokens=1000, seed=1, min_shots=3):
        assert all(inp != out["input"] for inp, _ in shots_of(out))


def test_shots_share_the_rows_instruction(tok):
    """A 'source' spanning two instructions (an Alpaca+ split) never shows one instruction's rows as the other's shots."""
    rows = make_rows(1, 4) + [{**r, "instruction": "Another instruction.", "input": r["input"] + "x"}
                              for r in make_rows(1, 4)]
    for out in build_kshot(rows, tokenizer=tok, max_prompt_tokens=1000, seed=2, min_shots=2):
        own = "Another" if out["instruction"].startswith("Another") else "Do task"
        mine = {(r["input"], r["output"]) for r in rows if r["instruction"].startswith(own)}
        assert set(shots_of(out)) <= mine


def test_k_within_bounds_and_prompt_fits(tok):
    """k lies in [min_shots, max_shots]; the instruction has at most max_prompt_tokens tokens, counted right."""
    rows = make_rows(4, 8)
    for budget in (80, 150, 1000):
        built = build_kshot(rows, tokenizer=tok, max_prompt_tokens=budget, seed=3, min_shots=1, max_shots=5)
        assert built
        for out in built:
            assert 1 <= out["num_shots"] <= 5
            assert out["instruction_tokens"] == count(tok, out["instruction"]) <= budget
    # a budget that fits only the bare instruction gives k = 0 everywhere
    bare = count(tok, rows[0]["instruction"])
    assert {o["num_shots"] for o in build_kshot(rows, tokenizer=tok, max_prompt_tokens=bare, seed=0)} == {0}


def test_k_is_spread_over_what_fits(tok):
    """k is drawn over 0..what fits, not always the most: several counts appear, including 0 and the maximum."""
    rows = make_rows(2, 12)
    counts = collections.Counter(o["num_shots"] for seed in range(5)
                                 for o in build_kshot(rows, tokenizer=tok, max_prompt_tokens=10_000, seed=seed))
    assert 0 in counts and 11 in counts and len(counts) >= 8


def test_min_prompt_tokens_leaves_out_short_rows(tok):
    """With min_prompt_tokens every row reaches it; a row that cannot is left out."""
    rows = make_rows(2, 6) + [{"instruction": "Short.", "input": "x", "output": "y", "source": "lonely"}]
    built = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, min_prompt_tokens=80, seed=0)
    assert all(80 <= o["instruction_tokens"] <= 400 for o in built)
    assert "lonely" not in {o["source"] for o in built}


def test_deterministic_by_seed(tok):
    """The same seed gives the same rows; another seed other shots."""
    rows = make_rows()
    a = build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=7)
    assert a == build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=7)
    assert a != build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=8)


def test_recall_rows_answer_one_of_their_own_shots(tok):
    """--recall R: about R of the rows with shots answer one of their own shots word for word (marked recall);
    every other row, shots included, is the row R = 0 builds."""
    rows = make_rows(4, 12)
    plain = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, seed=3, min_shots=1)
    mixed = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, seed=3, min_shots=1, recall=0.5)
    assert len(plain) == len(mixed) == 48
    recalled = [(p, m) for p, m in zip(plain, mixed) if m.get("recall")]
    assert 12 <= len(recalled) <= 36  # a draw of 48 at 0.5
    for p, m in zip(plain, mixed):
        if not m.get("recall"):
            assert m == p
    for p, m in recalled:
        assert m["instruction"] == p["instruction"] and m["num_shots"] == p["num_shots"]
        assert (m["input"], m["output"]) in shots_of(p) and m["input"] != p["input"]
    everyone = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, seed=3, min_shots=1, recall=1.0)
    assert all(m.get("recall") for m in everyone)
    zero_shot = build_kshot(rows, tokenizer=tok, max_prompt_tokens=400, seed=3, max_shots=0, recall=1.0)
    assert not any(m.get("recall") for m in zero_shot)  # no shot to answer


def test_include_exclude_and_per_task(tok, tmp_path):
    """--tasks keeps only those tasks, --exclude-tasks (names, comma list or a file) drops them, per_task caps rows."""
    rows = make_rows(4, 6)
    kept = build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=0, exclude_tasks=["task1", "task2"])
    assert {o["source"] for o in kept} == {"task0", "task3"}
    names = tmp_path / "tasks.txt"
    names.write_text("task0\n# a comment line\ntask3  # and a trailing one\n")
    assert {o["source"] for o in build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=0,
                                             exclude_tasks=str(names))} == {"task1", "task2"}
    only = build_kshot(rows, tokenizer=tok, max_prompt_tokens=300, seed=0, include_tasks="task2,task3", per_task=2)
    assert collections.Counter(o["source"] for o in only) == {"task2": 2, "task3": 2}


@pytest.mark.parametrize("kwargs, text", [
    (dict(max_prompt_tokens=0), "--max-prompt-tokens 0"),
    (dict(max_prompt_tokens=-5), "--max-prompt-tokens -5"),
    (dict(max_prompt_tokens=100, min_shots=3, max_shots=2), "--max-shots 2"),
    (dict(max_prompt_tokens=100, per_task=0), "--per-task 0"),
    (dict(max_prompt_tokens=100, include_tasks=["task9"]), "task9"),
    (dict(max_prompt_tokens=100, exclude_tasks="task0,nosuch"), "nosuch"),
    (dict(max_prompt_tokens=100, exclude_tasks=["task0", "task1", "task2"]), "no task is left"),
    (dict(max_prompt_tokens=3), "no row fits"),
    (dict(max_prompt_tokens=100, recall=1.5), "--recall 1.5"),
    (dict(max_prompt_tokens=100, recall=-0.1), "--recall -0.1"),
    (dict(max_prompt_tokens=100, recall=float("nan")), "--recall nan"),
])
def test_bad_arguments_refused(tok, kwargs, text):
    """A bad budget, shot range or task list is one GistError naming it."""
    with pytest.raises(GistError, match=text.replace("-", r"\-")):
        build_kshot(make_rows(), tokenizer=tok, seed=0, **kwargs)


def test_rows_without_task_refused(tok):
    """A row with no 'source' (the task) is refused, naming the row."""
    rows = make_rows()
    rows[4] = {k: v for k, v in rows[4].items() if k != "source"}
    with pytest.raises(GistError, match="row 4: no task field 'source'"):
        build_kshot(rows, tokenizer=tok, max_prompt_tokens=100, seed=0)


def test_long_dev_tasks_fixed_list():
    """LONG_DEV_TASKS: 24 distinct names, the seeded draw from superni_train.json (checked when the file is here)."""
    assert len(LONG_DEV_TASKS) == len(set(LONG_DEV_TASKS)) >= 20
    if not SUPERNI.is_file():
        pytest.skip(f"{SUPERNI} is not here")
    counts = collections.Counter(r["source"] for r in json.loads(SUPERNI.read_text()))
    assert tuple(draw_long_dev_tasks(counts)) == LONG_DEV_TASKS


def test_long_tune_tasks_fixed_list_apart_from_long_dev():
    """LONG_TUNE_TASKS: 20 distinct names, none of LONG_DEV, the seeded draw (checked when the file is here); a
    list may name both sets among other names."""
    assert len(LONG_TUNE_TASKS) == len(set(LONG_TUNE_TASKS)) == 20
    assert not set(LONG_TUNE_TASKS) & set(LONG_DEV_TASKS)
    known = [*LONG_DEV_TASKS, *LONG_TUNE_TASKS, "task_other"]
    assert resolve_task_list("LONG_DEV,LONG_TUNE,task_other", known, "--tasks") == set(known)
    if not SUPERNI.is_file():
        pytest.skip(f"{SUPERNI} is not here")
    counts = collections.Counter(r["source"] for r in json.loads(SUPERNI.read_text()))
    assert tuple(draw_long_tune_tasks(counts)) == LONG_TUNE_TASKS


# --- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path, monkeypatch, tok):
    monkeypatch.setattr(data_cmd, "load_tokenizer", lambda spec: tok)  # no model loads
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(make_rows()))
    return tmp_path, data


def test_cli_writes_alpaca_rows(cli_env):
    """`gist data kshot` writes a JSON array of Alpaca rows that the data loader reads."""
    from gistcache.data.alpaca import load_examples

    tmp_path, data = cli_env
    out = tmp_path / "sub" / "kshot.json"
    result = runner.invoke(app, ["data", "kshot", str(data), "--out", str(out), "--max-prompt-tokens", "200",
                                 "--exclude-tasks", "task1", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {r["source"] for r in rows} == {"task0", "task2"}
    assert len(load_examples(out)) == len(rows) == 12
    assert json.loads(result.output)["rows"] == 12
    assert [p.name for p in out.parent.iterdir()] == ["kshot.json"]  # no temporary file left


def test_cli_shuffle_mixes_tasks_same_rows(cli_env):
    """--shuffle S writes the same rows in an order drawn with seed S (the same each time), not grouped by task."""
    tmp_path, data = cli_env
    outs = {}
    for name, extra in (("plain", []), ("a", ["--shuffle", "0"]), ("b", ["--shuffle", "0"]), ("c", ["--shuffle", "1"])):
        outs[name] = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["data", "kshot", str(data), "--out", str(outs[name]), "--json", *extra])
        assert result.exit_code == 0, result.output
    rows = {name: json.loads(path.read_text()) for name, path in outs.items()}
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, rows["a"])) == sorted(map(key, rows["plain"])) and rows["a"] != rows["plain"]
    assert rows["a"] == rows["b"] and rows["a"] != rows["c"]
    sources = [r["source"] for r in rows["plain"]]
    assert sources == sorted(sources, key=sources.index)  # plain: grouped by task


@pytest.mark.parametrize("case, text", [
    ("no_source", "no task field 'source'"),
    ("missing", "does not exist"),
    ("budget", "--max-prompt-tokens 0"),
    ("unknown_task", "task7"),
    ("unknown_exclude", "nosuch"),
    ("recall", "--recall 2.0"),
])
def test_cli_bad_input_one_line_nothing_written(cli_env, case, text):
    """Each bad input: one line, exit code 2, no output file."""
    tmp_path, data = cli_env
    out = tmp_path / "out.json"
    args = ["data", "kshot", str(data), "--out", str(out), "--max-prompt-tokens", "100"]
    if case == "no_source":
        rows = make_rows()
        del rows[2]["source"]
        data.write_text(json.dumps(rows))
    elif case == "missing":
        args[2] = str(tmp_path / "nope.json")
    elif case == "budget":
        args[-1] = "0"
    elif case == "unknown_task":
        args += ["--tasks", "task0,task7"]
    elif case == "recall":
        args += ["--recall", "2"]
    else:
        args += ["--exclude-tasks", "nosuch"]
    one_line_error(runner.invoke(app, args), text)
    assert not out.exists()


def test_cli_long_family_file(tmp_path):
    """`gist data long` writes the generated long family as Alpaca rows; --num 0 is refused, nothing written."""
    from gistcache.data.alpaca import load_examples

    out = tmp_path / "long.json"
    result = runner.invoke(app, ["data", "long", "--out", str(out), "--num", "4", "--held-out"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert len(load_examples(out)) == 4 and {r["source"] for r in rows} == {"builtin:long_word_rule_wrap"}
    bad = tmp_path / "bad.json"
    one_line_error(runner.invoke(app, ["data", "long", "--out", str(bad), "--num", "0"]), "--num 0")
    assert not bad.exists()
    varied = tmp_path / "varied.json"
    result = runner.invoke(app, ["data", "long", "--out", str(varied), "--num", "3", "--shapes", "varied"])
    assert result.exit_code == 0, result.output
    assert {r["source"] for r in json.loads(varied.read_text())} == {"builtin:long_word_shape"}
    label = tmp_path / "label.json"
    result = runner.invoke(app, ["data", "long", "--out", str(label), "--num", "3", "--shapes", "label"])
    assert result.exit_code == 0, result.output
    assert {r["source"] for r in json.loads(label.read_text())} == {"builtin:long_word_label"}
    refusals = ((["--shapes", "random"], "--shapes 'random'"), (["--shapes", "varied", "--held-out"], "--held-out"),
                (["--shapes", "label", "--held-out"], "--held-out"))
    for args, text in refusals:
        one_line_error(runner.invoke(app, ["data", "long", "--out", str(bad), "--num", "2", *args]), text)
        assert not bad.exists()
