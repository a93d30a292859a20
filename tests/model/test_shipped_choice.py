"""With no run named, an instruction goes to the shipped run for its length and a cache to the shipped run that
made it (gistcache/model/shipped.py)."""

from gistcache.model.shipped import (LONG_PROMPT_TOKENS, instruction_length, route_instructions, shipped_run_for,
                                     shipped_run_of)
from gistcache.run import DEFAULT_RUN, LONG_RUN, PRETRAINED_DIR, is_run_dir, run_fingerprint
from tiny import make_tokenizer


def test_the_length_bound_is_the_first_eval_bucket():
    from gistcache.eval.length import BUCKETS

    assert LONG_PROMPT_TOKENS == BUCKETS[0][2] == 128
    assert shipped_run_for(0) == shipped_run_for(128) == DEFAULT_RUN
    assert shipped_run_for(129) == shipped_run_for(5000) == LONG_RUN


def test_route_instructions_counts_the_instruction_alone_and_keeps_each_index():
    tokenizer = make_tokenizer()
    short, long = "Name the capital.", " ".join(["word"] * 300)
    assert instruction_length(tokenizer, short) <= LONG_PROMPT_TOKENS < instruction_length(tokenizer, long)
    assert instruction_length(tokenizer, "  " + short + "\n") == instruction_length(tokenizer, short)
    groups = route_instructions([long, short, short, long, short], tokenizer)
    assert groups == {LONG_RUN: [0, 3], DEFAULT_RUN: [1, 2, 4]}
    assert list(groups) == [LONG_RUN, DEFAULT_RUN]  # runs in the order first needed
    assert route_instructions([short], tokenizer) == {DEFAULT_RUN: [0]}


def test_both_runs_ship_and_a_cache_fingerprint_names_its_run():
    assert is_run_dir(PRETRAINED_DIR / DEFAULT_RUN) and is_run_dir(PRETRAINED_DIR / LONG_RUN)
    for name in (DEFAULT_RUN, LONG_RUN, "smollm2-135m-gist1"):
        assert shipped_run_of(run_fingerprint(PRETRAINED_DIR / name)) == name
    assert shipped_run_of("0" * 64) is None
