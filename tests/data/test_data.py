"""Reading instruction files: Alpaca JSON/JSONL, Self-Instruct seed tasks, refusals naming file and line."""

import json

import pytest

from gistcache.data.alpaca import Example, drop_contaminated, heldout_split, load_examples
from gistcache.data.tasks import HELD_OUT_FAMILIES
from gistcache.errors import GistError
from gistcache.prompts import IGNORE_INDEX, encode_examples
from gistcache.train.config import TrainConfig
from gistcache.train.data import collate, prepare_examples


def write(path, text):
    path.write_text(text)
    return path


def test_alpaca_json_array(tmp_path):
    """A JSON array of Alpaca records loads with its line numbers."""
    rows = [{"instruction": "Add", "input": "1, 2", "output": "3"}, {"instruction": "Greet", "output": "hi"}]
    path = write(tmp_path / "a.json", json.dumps(rows, indent=1))
    ex = load_examples(path)
    assert [(e.instruction, e.input, e.output) for e in ex] == [("Add", "1, 2", "3"), ("Greet", "", "hi")]
    assert ex[0].source.endswith("a.json:2") and ex[1].source.endswith(":7")


def test_jsonl_and_instances(tmp_path):
    """JSON Lines, and Self-Instruct seed tasks expand to one example per instance."""
    path = write(tmp_path / "s.jsonl", "\n".join([
        json.dumps({"instruction": "Echo", "input": "x", "output": "x"}),
        json.dumps({"instruction": "Twice", "instances": [{"input": "a", "output": "aa"}, {"input": "b", "output": "bb"}]}),
    ]))
    ex = load_examples(path)
    assert [(e.instruction, e.input, e.output) for e in ex] == [("Echo", "x", "x"), ("Twice", "a", "aa"), ("Twice", "b", "bb")]


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"prompt": "x"}\n', r"s\.jsonl:2: not Alpaca-shaped"),
    ('{"instruction": "", "output": "b"}\n', r"s\.jsonl:1: field 'instruction' is empty"),
    ('{"instruction": "a", "output": 3}\n', r"s\.jsonl:1: field 'output' must be a string"),
    ('{"instruction": "a", "output": "b"}\n{oops\n', r"s\.jsonl:2: invalid JSON"),
    ('[{"instruction": "a", "output": "b"},\n 7]', r"s\.jsonl:2: expected an object"),
    ("", "the file is empty"),
])
def test_bad_files_name_file_and_line(tmp_path, content, message):
    """A record of the wrong shape is refused with the file and the line."""
    path = write(tmp_path / "s.jsonl", content)
    with pytest.raises(GistError, match=message):
        load_examples(path)


def test_contamination_filter():
    """Training rows whose instruction appears (case and spaces aside) in the evaluation rows are dropped."""
    train = [Example("Say  Hi", "", "hi", "t:1"), Example("Count", "a", "1", "t:2")]
    evaluation = [Example("say hi", "x", "y", "e:1")]
    kept, dropped = drop_contaminated(train, evaluation)
    assert dropped == 1 and [e.instruction for e in kept] == ["Count"]


def test_encode_and_collate_left_pads(tokenizer):
    """Rows are left-padded; only answers are labelled; too-long rows are dropped, not cut."""
    gid = tokenizer.convert_tokens_to_ids("<GIST>")
    ex = [Example("Reverse", "ab", "ba", "x"), Example("Uppercase the text", "abc def", "ABC DEF", "y"),
          Example("Long " * 200, "", "z", "z")]
    enc, too_long = encode_examples(tokenizer, ex, num_gist_tokens=2, gist_token_id=gid, template="auto", max_length=200)
    assert too_long == 1 and len(enc) == 2
    batch = collate(enc, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = batch["attention_mask"][0]
    assert short[0] == 0 and short[-1] == 1  # left padding
    answer = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "ba<|im_end|>"
    assert (batch["input_ids"] == gid).sum(dim=1).tolist() == [2, 2]


def test_builtin_heldout_set_has_both_splits(tmp_path):
    """The built-in held-out set is half new inputs of trained families ("seen_tasks") and half families
    never trained on ("unseen_tasks"); rows from a user's file are "eval"."""
    train_rows, eval_rows, _ = prepare_examples(TrainConfig(out=str(tmp_path / "r"), preset="test"))
    splits = [heldout_split(ex) for ex in eval_rows]
    assert len(eval_rows) == 96 and splits.count("seen_tasks") == splits.count("unseen_tasks") == 48
    assert all((ex.source.split(":")[1] in HELD_OUT_FAMILIES) == (s == "unseen_tasks") for ex, s in zip(eval_rows, splits))
    assert not {ex.source.split(":")[1] for ex in train_rows} & HELD_OUT_FAMILIES
    assert not {(ex.instruction, ex.input) for ex in train_rows} & {(ex.instruction, ex.input) for ex in eval_rows}
    path = write(tmp_path / "a.jsonl", json.dumps({"instruction": "Add", "input": "1, 2", "output": "3"}) + "\n")
    assert heldout_split(load_examples(path)[0]) == "eval"
