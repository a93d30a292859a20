"""Tests for the built-in offline instruction-tuning tasks (gistcache/data/tasks.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import defaultdict

import pytest

import tiny
try:
    from gistcache.data.tasks import FAMILIES, make_builtin_tasks
except ImportError:  # package not installed yet: load the file by path
    _path = tiny.ROOT / "gistcache" / "data" / "tasks.py"
    _spec = importlib.util.spec_from_file_location("_gistcache_data_tasks", _path)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _mod  # dataclasses need the module registered
    _spec.loader.exec_module(_mod)
    FAMILIES, make_builtin_tasks = _mod.FAMILIES, _mod.make_builtin_tasks

TRAIN = [f for f in FAMILIES if not f.held_out]
HELD = [f for f in FAMILIES if f.held_out]
HELD_NAMES = {f.name for f in HELD}


@pytest.fixture(scope="module")
def train_rows():
    return make_builtin_tasks(60 * len(TRAIN), seed=0)


@pytest.fixture(scope="module")
def held_rows():
    return make_builtin_tasks(60 * len(HELD), seed=0, held_out=True)


def _by_family(rows):
    grouped = defaultdict(list)
    for r in rows:
        grouped[r["family"]].append(r)
    return grouped


def test_family_counts_and_names():
    names = [f.name for f in FAMILIES]
    assert len(FAMILIES) >= 30
    assert len(set(names)) == len(names)
    assert 5 <= len(HELD) <= 8
    assert all(isinstance(f.held_out, bool) for f in FAMILIES)


def test_row_count_and_field_types(train_rows, held_rows):
    assert len(train_rows) == 60 * len(TRAIN)
    assert len(held_rows) == 60 * len(HELD)
    assert make_builtin_tasks(0) == []
    assert len(make_builtin_tasks(7, seed=3)) == 7
    for r in train_rows + held_rows:
        assert set(r) == {"instruction", "input", "output", "family"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["instruction"].strip() and r["output"].strip()
        assert "{" not in r["instruction"]  # every template placeholder was filled
        assert len(r["instruction"].split()) <= 25
        assert len(r["input"]) <= 60 and len(r["output"]) <= 60


def test_most_families_take_input(train_rows):
    no_input = {fam for fam, rows in _by_family(train_rows).items() if all(r["input"] == "" for r in rows)}
    assert 1 <= len(no_input) <= 5
    assert sum(r["input"] != "" for r in train_rows) > 0.8 * len(train_rows)


def test_deterministic_and_seed_dependent():
    a = make_builtin_tasks(200, seed=7)
    assert a == make_builtin_tasks(200, seed=7)
    assert a != make_builtin_tasks(200, seed=8)
    h = make_builtin_tasks(50, seed=7, held_out=True)
    assert h == make_builtin_tasks(50, seed=7, held_out=True)
    assert h != make_builtin_tasks(50, seed=8, held_out=True)


def test_round_robin_covers_every_family():
    rows = make_builtin_tasks(len(TRAIN), seed=5)
    assert sorted(r["family"] for r in rows) == sorted(f.name for f in TRAIN)
    held = make_builtin_tasks(len(HELD), seed=5, held_out=True)
    assert sorted(r["family"] for r in held) == sorted(HELD_NAMES)


def test_held_out_split_is_clean(train_rows, held_rows):
    assert {r["family"] for r in held_rows} == HELD_NAMES
    assert not {r["family"] for r in train_rows} & HELD_NAMES
    assert {r["family"] for r in train_rows} == {f.name for f in TRAIN}


def test_instructions_are_varied(train_rows, held_rows):
    for f in FAMILIES:
        assert len(set(f.instructions)) >= 3, f.name
    for fam, rows in _by_family(train_rows + held_rows).items():
        assert len({r["instruction"] for r in rows}) >= 3, fam
    # phrasings are not shared between families
    seen = defaultdict(set)
    for f in FAMILIES:
        for t in f.instructions:
            seen[t].add(f.name)
    assert all(len(v) == 1 for v in seen.values())


def test_same_input_different_outputs_across_families(train_rows):
    outputs = defaultdict(dict)  # input -> {family: output}
    for r in train_rows:
        if r["input"]:
            outputs[r["input"]][r["family"]] = r["output"]
    conflicting = [inp for inp, fam_out in outputs.items() if len(set(fam_out.values())) >= 2]
    assert len(conflicting) >= 20
    # a concrete pair: some word appears under both reverse_word and uppercase
    shared = [i for i, fo in outputs.items() if {"reverse_word", "uppercase"} <= set(fo)]
    assert shared
    for i in shared:
        assert outputs[i]["reverse_word"] != outputs[i]["uppercase"]


def test_spot_check_answers(train_rows, held_rows):
    fams = _by_family(train_rows + held_rows)
    for r in fams["reverse_word"]:
        assert r["output"] == r["input"][::-1]
    for r in fams["uppercase"]:
        assert r["output"] == r["input"].upper()
    for r in fams["lowercase"]:
        assert r["output"] == r["input"].lower() and r["input"] != r["output"]
    for r in fams["add"]:
        a, b = map(int, r["input"].split(", "))
        assert r["output"] == str(a + b)
    for r in fams["subtract"]:
        a, b = map(int, r["input"].split(", "))
        assert r["output"] == str(a - b)
    for r in fams["sum_list"]:
        assert r["output"] == str(sum(map(int, r["input"].split(", "))))
    for r in fams["sort_numbers"]:
        nums = list(map(int, r["input"].split(", ")))
        assert r["output"] == ", ".join(map(str, sorted(nums)))
    for r in fams["celsius_to_fahrenheit"]:
        assert r["output"] == f"{int(r['input']) * 9 // 5 + 32} degrees Fahrenheit"
        assert int(r["input"]) * 9 % 5 == 0
    for r in fams["make_json"]:
        key, value = r["input"].split(": ")
        assert json.loads(r["output"]) == {key: value}
    for r in fams["is_palindrome"]:
        assert r["output"] == ("yes" if r["input"] == r["input"][::-1] else "no")
    for r in fams["min_of_list"]:
        assert r["output"] == str(min(map(int, r["input"].split(", "))))
    for r in fams["deduplicate"]:
        items = r["input"].split(", ")
        assert r["output"] == ", ".join(dict.fromkeys(items))
        assert len(r["output"].split(", ")) < len(items)
    for r in fams["first_k"]:
        k = int(next(tok for tok in r["instruction"].split() if tok.isdigit()))
        assert r["output"] == ", ".join(r["input"].split(", ")[:k])


def test_classification_labels_are_balanced(train_rows):
    fams = _by_family(train_rows)
    for fam, labels in [("sentiment", {"positive", "negative"}), ("is_prime", {"yes", "no"}),
                        ("is_palindrome", {"yes", "no"}), ("parity", {"even", "odd"}),
                        ("weekend_or_weekday", {"weekend", "weekday"})]:
        assert {r["output"] for r in fams[fam]} == labels, fam


def test_negative_count_rejected():
    with pytest.raises(ValueError):
        make_builtin_tasks(-1)


# --- the long family ---------------------------------------------------------------------------------

def _long():
    from gistcache.data.tasks import HELD_OUT_RULES, LONG_FAMILIES, RULES, make_long_tasks, _code_words

    return HELD_OUT_RULES, LONG_FAMILIES, RULES, make_long_tasks, _code_words


def _shown_pairs(instruction):
    """(input, output) pairs of the worked examples in a long-rule instruction."""
    body = instruction.split("\n\n")[1:-1]
    return [tuple(line.split(": ", 1)[1] for line in block.split("\n")) for block in body]


def test_long_family_answers_follow_the_shown_rule():
    """Each long row shows 10-99 worked examples of one rule; the answer is that rule on a word not shown."""
    held_rules, _, rules, make_long_tasks, _ = _long()
    for held_out, allowed in ((False, rules), (True, held_rules)):
        rows = make_long_tasks(40, seed=1, held_out=held_out)
        for r in rows:
            pairs = _shown_pairs(r["instruction"])
            assert 10 <= len(pairs) <= 99, len(pairs)
            words = [w for w, _ in pairs]
            assert r["input"] not in words and len(set(words)) == len(words)
            code = next(c for c in _code_candidates(pairs[0], allowed))
            rule = next(rule for rule in allowed if rule.format(word=pairs[0][0], code=code) == pairs[0][1])
            assert all(out == rule.format(word=w, code=code) for w, out in pairs)
            assert r["output"] == rule.format(word=r["input"], code=code)
            assert r["instruction"].endswith("Answer with the output only.")


def _code_candidates(pair, rules):
    """The code words that explain one worked example (word, output) under some rule."""
    import re

    word, out = pair
    for rule in rules:
        pattern = re.escape(rule).replace(re.escape("{word}"), re.escape(word))
        pattern = pattern.replace(re.escape("{code}"), "(?P<code>[a-z]+)", 1).replace(re.escape("{code}"), "(?P=code)")
        match = re.fullmatch(pattern, out)
        if match:
            yield match["code"]


def test_long_family_is_seeded_split_and_long():
    """Same seed, same rows; the held-out family uses other rule shapes; prompts span hundreds of words."""
    held_rules, families, rules, make_long_tasks, code_words = _long()
    assert make_long_tasks(5, seed=3) == make_long_tasks(5, seed=3) != make_long_tasks(5, seed=4)
    assert not set(held_rules) & set(rules)
    assert [f.held_out for f in families] == [False, True]
    assert {r["family"] for r in make_long_tasks(4, seed=0, held_out=True)} == {"long_word_rule_wrap"}
    lengths = [len(r["instruction"].split()) for r in make_long_tasks(60, seed=0)]
    assert min(lengths) < 100 and max(lengths) > 300
    assert make_long_tasks(0) == []
    with pytest.raises(ValueError):
        make_long_tasks(-1)
    import random
    assert not set(code_words(random.Random(0), 50)) & set(__import__("gistcache.data.tasks").data.tasks.WORDS)


def test_long_family_leaves_the_short_set_unchanged():
    """The long families are kept apart: FAMILIES and make_builtin_tasks do not include them."""
    _, families, _, _, _ = _long()
    assert not {f.name for f in families} & {f.name for f in FAMILIES}


def test_varied_shapes_follow_the_shown_rule_and_avoid_the_held_out_marks():
    """`shapes="varied"`: each prompt draws its own rule shape, every shown example and the answer follow it, no
    output writes a mark of the held-out rules, and the default rows are the fixed family's, unchanged."""
    from gistcache.data.tasks import HELD_OUT_MARKS

    _, _, rules, make_long_tasks, _ = _long()
    assert HELD_OUT_MARKS == set("<>/[]:")
    rows = make_long_tasks(60, seed=2, shapes="varied")
    assert {r["family"] for r in rows} == {"long_word_shape"}
    shapes = set()
    for r in rows:
        pairs = _shown_pairs(r["instruction"])
        assert 10 <= len(pairs) <= 99 and r["input"] not in [w for w, _ in pairs]
        rule = pairs[0][1].replace(pairs[0][0], "{word}")
        assert "{word}" in rule and rule != "{word}"
        assert all(out == rule.replace("{word}", w) for w, out in pairs)
        assert r["output"] == rule.replace("{word}", r["input"])
        assert not set(r["output"]) & HELD_OUT_MARKS
        shapes.add(_shape_of(pairs))
    assert len(shapes) >= 30, shapes  # many shapes, not four
    assert shapes & set(rules)  # the fixed shapes are among them
    assert make_long_tasks(5, seed=3) == make_long_tasks(5, seed=3, shapes="fixed")
    assert make_long_tasks(5, seed=3, shapes="varied") == make_long_tasks(5, seed=3, shapes="varied")
    with pytest.raises(ValueError, match="shapes"):
        make_long_tasks(2, shapes="random")
    with pytest.raises(ValueError, match="held-out"):
        make_long_tasks(2, held_out=True, shapes="varied")


def test_label_shape_answers_one_made_up_word_that_holds_nothing_of_the_input():
    """`shapes="label"`: every worked example of a prompt and its answer are one made-up word, not an English word of
    the vocabulary, and the answer shares no word with the input, so an echo of the input scores 0 ROUGE-L."""
    from gistcache.data.tasks import WORDS
    from gistcache.eval.rouge import rouge_l_scores

    _, _, _, make_long_tasks, _ = _long()
    rows = make_long_tasks(40, seed=1, shapes="label")
    assert {r["family"] for r in rows} == {"long_word_label"}
    for r in rows:
        pairs = _shown_pairs(r["instruction"])
        assert 10 <= len(pairs) <= 99 and r["input"] not in [w for w, _ in pairs]
        assert {out for _, out in pairs} == {r["output"]} and r["output"] not in WORDS
    assert len({r["output"] for r in rows}) > 30  # a label of its own per prompt
    assert rouge_l_scores([r["input"] for r in rows], [r["output"] for r in rows]) == [0.0] * len(rows)
    assert make_long_tasks(5, seed=3) == make_long_tasks(5, seed=3, shapes="fixed")
    with pytest.raises(ValueError, match="held-out"):
        make_long_tasks(2, held_out=True, shapes="label")


def _shape_of(pairs):
    """The rule shape behind worked examples: the first output with its word and its code word (the letters
    the first two outputs share beyond their words) replaced by {word} and {code}."""
    import re

    (w1, o1), (w2, o2) = pairs[:2]
    code = next(c for c in re.findall("[a-z]+", o1.replace(w1, " ")) if c in o2.replace(w2, " "))
    return re.sub(rf"\b{code}\b", "{code}", o1.replace(w1, "{word}"))
