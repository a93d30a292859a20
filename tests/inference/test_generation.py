"""Generation from a gist cache equals the masked full forward, token for token; sampling, EOS, refusals."""

import pytest
import torch

import tiny
from gistcache.cache import load_cache, save_cache
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import (GenerateConfig, build_batch, generate, generate_ids, generate_masked,
                                            generate_masked_ids)
from gistcache.model import GistModel, cache_kwarg
from gistcache.prompts import encode_input, encode_instruction
from tiny import INSTRUCTIONS
from tiny import make_gist_model

INPUTS = ["stone", "41", "abc de fgh ijk"]  # different lengths: left padding between gist and input
NEW = 10


@pytest.mark.parametrize("num_gist", [1, 5])
def test_cache_generation_equals_masked_forward(arch, num_gist, tmp_path):
    """Greedy tokens from saved+loaded caches equal the masked-forward reference: single rows and a batch of 3."""
    model = make_gist_model(arch, num_gist)
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, INSTRUCTIONS))]
    reference = generate_masked_ids(model, INSTRUCTIONS, INPUTS, max_new_tokens=NEW)
    assert generate_ids(model, caches, INPUTS, max_new_tokens=NEW) == reference
    for cache, text, ref in zip(caches, INPUTS, reference):
        assert generate_ids(model, cache, text, max_new_tokens=NEW) == [ref]
    eos = model.tokenizer.eos_token_id
    assert generate(model, caches, INPUTS, max_new_tokens=NEW) == [
        model.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True) for ids in reference]


def masked_logits(model, instruction, text):
    """Logits over the input tokens from one masked forward of instruction + gist + input."""
    tok, N = model.tokenizer, model.num_gist_tokens
    after = encode_input(tok, text, "auto")
    ids = torch.tensor([encode_instruction(tok, instruction, "auto") + [model.gist_token_id] * N + after])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids)).logits[0, -len(after):]


def cache_logits(model, caches, inputs, shift=0):
    """Logits over each row's real input tokens from the batch `generate` builds (positions shifted by `shift`)."""
    batch = build_batch(model, caches, inputs)
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids[:, batch.num_cached:], attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids[:, batch.num_cached:] + shift, use_cache=True,
                          **{cache_kwarg(model.model): batch.cache})
    lengths = [len(encode_input(model.tokenizer, t, "auto")) for t in inputs]
    return [out.logits[b, -n:] for b, n in enumerate(lengths)]


def test_cache_batch_logits_match_masked_and_teeth(arch):
    """The left-padded cache batch gives the masked forward's logits (1e-4); shifted positions do not."""
    model = make_gist_model(arch, 2)
    caches = compress(model, INSTRUCTIONS)
    got = cache_logits(model, caches, INPUTS)
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)
    wrong = cache_logits(model, caches, INPUTS, shift=-caches[0].num_prompt_tokens)
    diffs = [(wrong[b] - masked_logits(model, i, t)).abs().max().item()
             for b, (i, t) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    assert min(diffs) > 1e-3, diffs


def test_gist_output_depends_on_the_instruction():
    """Different instructions give different first-step logits through the cache (the cache carries the prompt)."""
    model = make_gist_model("llama", 1)
    a, b = compress(model, INSTRUCTIONS[:2])
    la, lb = cache_logits(model, [a], ["x"])[0], cache_logits(model, [b], ["x"])[0]
    assert (la - lb).abs().max() > 1e-4


def test_same_cache_twice_same_text():
    """One cache read by two rows of a batch: greedy, each row is the masked forward's greedy answer; seeded
    sampling repeats; the global RNG is left alone."""
    model = make_gist_model("llama", 2)
    cache = compress(model, INSTRUCTIONS[0])
    reference = generate_masked_ids(model, INSTRUCTIONS[0], "word", max_new_tokens=NEW)
    assert generate_ids(model, [cache, cache], ["word", "word"], max_new_tokens=NEW) == reference * 2
    sample = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    state = torch.get_rng_state()
    first = generate_ids(model, [cache, cache], ["word", "word"], **sample)
    assert torch.equal(state, torch.get_rng_state())
    assert first == generate_ids(model, [cache, cache], ["word", "word"], **sample)
    assert generate_ids(model, cache, "word", **{**sample, "seed": 8}) != first[:1]  # the seed matters


class BumpToken:
    """A forward hook on the output head that makes `token` the argmax, from call `after` on."""

    def __init__(self, token: int, after: int = 0):
        self.token, self.after, self.calls = token, after, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls > self.after:
            output = output.clone()
            output[..., self.token] += 1e4
        return output


def test_gist_token_never_generated():
    """Where the gist id is inside the output vocabulary, it is suppressed, even when it is the argmax."""
    model = make_gist_model("llama", 1, vocab_size=tiny.vocab_size() + 4)  # head covers the gist id
    gid = model.gist_token_id
    assert gid < model.model.get_output_embeddings().weight.shape[0]
    cache = compress(model, "Say hi")
    handle = model.model.get_output_embeddings().register_forward_hook(BumpToken(gid))
    try:
        got = generate_ids(model, cache, "x", max_new_tokens=5)[0]
        ref = generate_masked_ids(model, "Say hi", "x", max_new_tokens=5)[0]
    finally:
        handle.remove()
    assert gid not in got and got == ref and len(got) == 5


def with_bump(model, token, after, fn):
    handle = model.model.get_output_embeddings().register_forward_hook(BumpToken(token, after))
    try:
        return fn()
    finally:
        handle.remove()


def test_stops_at_eos():
    """Generation ends at the first EOS (kept in the ids, dropped from the text), in both paths."""
    model = make_gist_model("qwen2", 2)
    eos = model.tokenizer.eos_token_id
    cache = compress(model, INSTRUCTIONS[0])
    # both paths call the output head once per new token: EOS becomes the 3rd token
    got = with_bump(model, eos, 2, lambda: generate_ids(model, cache, INPUTS[0], max_new_tokens=NEW)[0])
    ref = with_bump(model, eos, 2, lambda: generate_masked_ids(model, INSTRUCTIONS[0], INPUTS[0],
                                                                max_new_tokens=NEW)[0])
    assert got == ref and len(got) == 3 and got[-1] == eos
    text = with_bump(model, eos, 2, lambda: generate(model, cache, INPUTS[0], max_new_tokens=NEW)[0])
    assert text == model.tokenizer.decode(got[:-1], skip_special_tokens=True)


def test_min_new_tokens_holds_eos_off():
    """min_new_tokens = max_new_tokens generates exactly that many tokens (used by the benchmark)."""
    model = make_gist_model("llama", 1)
    cache = compress(model, "Say hi")
    eos = model.tokenizer.eos_token_id
    assert with_bump(model, eos, 0, lambda: generate_ids(model, cache, "x", max_new_tokens=6)[0]) == [eos]
    held = with_bump(model, eos, 0, lambda: generate_ids(model, cache, "x", max_new_tokens=6, min_new_tokens=6)[0])
    assert len(held) == 6 and eos not in held


def test_streamer_sees_the_generated_tokens():
    """A streamer gets the prompt once, then every new token; the text matches the return value."""
    model = make_gist_model("llama", 2)
    cache = compress(model, INSTRUCTIONS[2])

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    ids = generate_ids(model, cache, "word", max_new_tokens=NEW, streamer=streamer)[0]
    assert streamer.ended and [t for put in streamer.puts[1:] for t in put][:len(ids)] == ids
    with pytest.raises(GistError, match="streaming takes one input at a time"):
        generate(model, cache, ["a", "b"], streamer=streamer)


def test_one_cache_many_inputs_broadcast():
    """One cache with several inputs equals the per-row pairs."""
    model = make_gist_model("llama", 2)
    cache = compress(model, INSTRUCTIONS[0])
    assert generate_ids(model, cache, INPUTS, max_new_tokens=NEW) == generate_ids(
        model, [cache] * 3, INPUTS, max_new_tokens=NEW)


def test_generation_refusals():
    """Bad settings, mismatched pairs, foreign caches and context overflow: one GistError each."""
    model = make_gist_model("llama", 2)
    caches = compress(model, INSTRUCTIONS[:2])
    with pytest.raises(GistError, match="2 caches and 3 inputs"):
        generate(model, caches, INPUTS)
    for bad, text in [(dict(max_new_tokens=0), "--max-new-tokens"), (dict(temperature=0.0), "--temperature"),
                      (dict(top_p=1.5), "--top-p"), (dict(top_k=-1), "--top-k")]:
        with pytest.raises(GistError, match=text):
            GenerateConfig(**bad)
    with pytest.raises(GistError, match="not a GistCache"):
        generate(model, "Reverse the word", "x")
    other = GistModel(model.model, model.tokenizer, 2, gist_embedding=model.gist_embedding.detach() * 2)
    with pytest.raises(GistError, match="another run"):
        generate(other, caches[0], "x")
    with pytest.raises(GistError, match="input 0 needs .* over the model's context of 512: shorten it"):
        generate(model, caches[0], "y" * 480, max_new_tokens=20)
    with pytest.raises(GistError, match="input 0 needs .* new tokens"):
        generate_masked(model, INSTRUCTIONS[0], "y" * 500, max_new_tokens=20)
