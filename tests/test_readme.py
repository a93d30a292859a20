"""The README's Python examples run as a newcomer runs them: the stock-transformers snippet answers what `gist
generate` does, on a tiny run, on runs of both decoders (`--decoder base` and tuned) and on the shipped run."""

import pytest
import torch
from transformers import LlamaForCausalLM

import tiny
from gistcache.inference.generation import GREEDY, generate, generate_ids
from gistcache.model import cache_kwarg

README = tiny.ROOT / "README.md"
INSTRUCTIONS = ["Reverse the word you are given", "Add one to the number", "Name the capital of the country",
                "Uppercase every letter"]
INPUTS = ["stone", "41", "France", "abc"]
# the name stock `generate` takes the KV cache under in the installed transformers
STOCK_CACHE_ARGUMENT = cache_kwarg(LlamaForCausalLM)


def readme_snippet() -> str:
    """The README's stock-transformers snippet (the Python block that calls `to_dynamic_cache`)."""
    blocks = [b.split("\n", 1)[1] for b in README.read_text().split("```python")[1:]]
    (snippet,) = [b.split("```")[0] for b in blocks if "to_dynamic_cache" in b]
    if STOCK_CACHE_ARGUMENT == "past_key_values":  # as the snippet's comment says for transformers before 5.24
        assert snippet.count("cache=cache.to_dynamic_cache") == 1
        snippet = snippet.replace("cache=cache.to_dynamic_cache", "past_key_values=cache.to_dynamic_cache")
    return snippet


def run_snippet(run, instruction: str, text: str) -> dict:
    """The snippet's namespace after it ran on `run` (None: the shipped run) for one instruction and input."""
    code = readme_snippet()
    for old, new in (('"runs/r1"', repr(None if run is None else str(run))),
                     ('"Rewrite the text in the passive voice."', repr(instruction)),
                     ('"The cat ate the fish."', repr(text))):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - our own README
    return namespace


def test_readme_snippet_continues_the_cache_with_stock_generate(make_tiny_run):
    """The README's stock-transformers snippet runs on a tiny run and answers what `generate` (gist generate) does."""
    snippet = readme_snippet()
    run = make_tiny_run(**tiny.NUDGED)
    namespace: dict = {}
    exec(snippet.replace('"runs/r1"', repr(str(run))), namespace)  # noqa: S102 - our own README
    model, cache = namespace["model"], namespace["cache"]
    assert cache.key_start == model.num_prefix_tokens == 6
    assert namespace["answer"] and namespace["answer"] == generate(model, cache, "The cat ate the fish.",
                                                                   max_new_tokens=32, **GREEDY)[0]


@pytest.mark.parametrize("decoder", ["base", "tuned"])
def test_readme_snippet_answers_what_generate_does_for_both_decoders(lora_runs, decoder):
    """The snippet (stock `generate` inside `model.cache_reader()`) gives `gist generate`'s greedy tokens on a
    --decoder base run and on a tuned run; on the base run the model with its adapter on answers otherwise."""
    differs = 0
    for instruction, text in zip(INSTRUCTIONS, INPUTS):
        ns = run_snippet(lora_runs[decoder], instruction, text)
        model, cache, ids = ns["model"], ns["cache"], ns["ids"]
        new = ns["out"][0, cache.offset + ids.shape[1]:].tolist()
        eos = model.tokenizer.eos_token_id
        new = new[:new.index(eos) + 1] if eos in new else new
        assert new == generate_ids(model, cache, text, max_new_tokens=32, **GREEDY)[0]
        assert ns["answer"] == generate(model, cache, text, max_new_tokens=32, **GREEDY)[0]
        with torch.no_grad():  # teeth: the adapter left on (the snippet before issue 25)
            past = {STOCK_CACHE_ARGUMENT: cache.to_dynamic_cache(model)}
            adapter_on = model.model.generate(input_ids=torch.cat([cache.input_ids(), ids], dim=1), **past,
                                              max_new_tokens=32, eos_token_id=eos, **GREEDY)
        differs += not torch.equal(adapter_on, ns["out"])
    assert model.decoder == decoder
    assert (differs > 0) == (decoder == "base"), differs


@pytest.mark.slow
def test_readme_snippet_on_the_shipped_run():
    """On the shipped run (--decoder base, the real default model): the snippet answers what `gist generate`
    does, for the README's demo instruction too."""
    demo = "Name the capital city of the given country."
    for instruction, text in ((demo, "France"), (demo, "Japan"), ("Rewrite the text in the passive voice.",
                                                                   "The cat ate the fish.")):
        ns = run_snippet(None, instruction, text)
        assert ns["model"].decoder == "base"
        assert ns["answer"] == generate(ns["model"], ns["cache"], text, max_new_tokens=32, **GREEDY)[0]
