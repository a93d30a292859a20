"""The `prefix` mask variant: literal matrices, reference rule, cache equivalence, teeth, refusals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny
from gistcache.cache import load_cache, save_cache
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import build_batch, generate_ids, generate_masked_ids
from gistcache.masks import make_gist_mask
from gistcache.model import cache_kwarg
from gistcache.prompts import encode_input, encode_instruction, fixed_prefix_ids
from test_masks import G, random_rows, reference_mask, rows
from tiny import INPUTS, INSTRUCTIONS, make_prefix_model, masked_logits

def test_literal_prefix_masks():
    """For `s a b G d e` with prefix `s`, the gist and neg_control rows are the matrices drawn in masks.py."""
    ids = torch.tensor([[7, 1, 2, G, 4, 5]])
    gist = rows("100000 110000 111000 111100 100110 100111")
    neg = rows("100000 110000 111000 111100 100010 100011")
    assert torch.equal(make_gist_mask(ids, None, G, "gist", num_prefix_tokens=1)[0], gist)
    assert torch.equal(make_gist_mask(ids, None, G, "neg_control", num_prefix_tokens=1)[0], neg)
    assert torch.equal(make_gist_mask(ids, None, G, "pos_control", num_prefix_tokens=1)[0],
                       torch.ones(6, 6, dtype=torch.bool).tril())


def test_literal_prefix_left_padding():
    """The prefix is counted from each row's first real token, not from column 0."""
    ids = torch.tensor([[0, 0, 7, 1, G, 4]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1]])
    expected = rows("100000 010000 001000 001100 001110 001011")
    assert torch.equal(make_gist_mask(ids, attn, G, "gist", num_prefix_tokens=1)[0], expected)


def test_prefix_reaching_the_gist_is_refused():
    """A prefix longer than what stands before the gist is a formatting error, named by row."""
    with pytest.raises(GistError, match="row 0: the fixed prefix of 3 tokens reaches into the gist"):
        make_gist_mask(torch.tensor([[7, 1, G, 4]]), None, G, "gist", num_prefix_tokens=3)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), condition=st.sampled_from(["gist", "neg_control"]))
def test_prefix_mask_matches_reference(data, batch, condition):
    """On random left-padded rows the builder equals the loops, for prefixes of 0 to 2 tokens."""
    num_prefix = data.draw(st.integers(0, 2))
    ids, attn = random_rows(data, batch, longest=3, prefix=[7] * num_prefix)
    assert torch.equal(make_gist_mask(ids, attn, G, condition, num_prefix_tokens=num_prefix),
                       reference_mask(ids, attn, G, condition, num_prefix))


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_every_prompt_starts_with_the_fixed_prefix(template):
    """encode_instruction starts with fixed_prefix_ids for every instruction, so one prefix KV serves all."""
    tok = tiny.make_tokenizer()
    prefix = fixed_prefix_ids(tok, template)
    assert prefix
    for text in INSTRUCTIONS:
        assert encode_instruction(tok, text, template)[:len(prefix)] == prefix


def cache_logits(model, caches, inputs, drop_prefix=False):
    """Logits over each row's input tokens from the left-padded batch `generate` builds."""
    batch = build_batch(model, caches, inputs)
    cache = batch.cache
    if drop_prefix:  # teeth: the same batch without the prefix keys/values
        F = model.num_prefix_tokens
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, F:], layer.values[:, :, F:]
    mask = batch.attention_mask[:, model.num_prefix_tokens:] if drop_prefix else batch.attention_mask
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids[:, batch.num_cached:], attention_mask=mask,
                          position_ids=batch.position_ids[:, batch.num_cached:], use_cache=True,
                          **{cache_kwarg(model.model): cache})
    lengths = [len(encode_input(model.tokenizer, t, model.template)) for t in inputs]
    return [out.logits[b, -n:] for b, n in enumerate(lengths)]


@pytest.mark.parametrize("num_gist", [1, 5])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_prefix_cache_equals_masked_forward(arch, num_gist, attn_impl):
    """3 left-padded rows over prefix KV + gist KV give the prefix-masked forward's logits (1e-4, fp32)."""
    model = make_prefix_model(arch, num_gist, attn_implementation=attn_impl)
    caches = compress(model, INSTRUCTIONS)
    got = cache_logits(model, caches, INPUTS)
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_gist", [1, 3])
def test_original_positions_cache_equals_masked_forward(arch, num_gist):
    """The original positions (prefix P+N back, one masked forward): 3 left-padded rows over the cache = it (1e-4)."""
    model = make_prefix_model(arch, num_gist, mask="prefix-original")
    caches = compress(model, INSTRUCTIONS)
    assert all(c.prefix_start == c.key_start - c.num_prompt_tokens < 0 for c in caches)
    got = cache_logits(model, caches, INPUTS)
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)


def test_prefix_equivalence_has_teeth(arch):
    """Teeth: without the prefix KV, or under the paper's mask, the same comparison fails."""
    model = make_prefix_model(arch, 2)
    caches = compress(model, INSTRUCTIONS)
    without = cache_logits(model, caches, INPUTS, drop_prefix=True)
    diffs = [(without[b] - masked_logits(model, i, t)).abs().max().item()
             for b, (i, t) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    assert min(diffs) > 1e-3, diffs
    got = cache_logits(model, caches, INPUTS)
    model.mask, prefix_ids = "paper", model.prefix_ids
    model.prefix_ids = []  # the paper's mask hides the prefix the cache path shows
    diffs = [(got[b] - masked_logits(model, i, t)).abs().max().item()
             for b, (i, t) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    model.mask, model.prefix_ids = "prefix", prefix_ids
    assert min(diffs) > 1e-3, diffs


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_prefix_generation_equals_masked_definition(arch, template, tmp_path):
    """compress -> save -> load -> generate equals greedy decoding of the prefix-masked forward, token for token."""
    model = make_prefix_model(arch, 2, template=template)
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, INSTRUCTIONS))]
    reference = generate_masked_ids(model, INSTRUCTIONS, INPUTS, max_new_tokens=8)
    assert generate_ids(model, caches, INPUTS, max_new_tokens=8) == reference


def test_cache_of_the_other_mask_is_refused(tmp_path):
    """A cache made under one mask variant is refused by a model of the other, naming both masks."""
    paper, prefix = make_prefix_model(mask="paper"), make_prefix_model(mask="prefix")
    path = save_cache(compress(paper, INSTRUCTIONS[0]), tmp_path / "p.safetensors")
    with pytest.raises(GistError, match="trained with the 'paper' mask, this run was trained with the 'prefix' mask"):
        load_cache(path, prefix)
    path = save_cache(compress(prefix, INSTRUCTIONS[0]), tmp_path / "q.safetensors")
    with pytest.raises(GistError, match="trained with the 'prefix' mask, this run was trained with the 'paper' mask"):
        generate_ids(paper, load_cache(path), "x", max_new_tokens=2)


def test_prefix_kv_is_recomputed_after_training():
    """The prefix KV kept on the model is dropped by train(), so changed weights never meet stale keys."""
    model = make_prefix_model()
    first = model.prefix_kv()[0][0].clone()
    model.train()
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.01)
    model.eval()
    assert not torch.allclose(model.prefix_kv()[0][0], first)
