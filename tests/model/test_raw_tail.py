"""A raw tail (`raw_tail` W, masks.py): the instruction's last min(W, P - K) tokens stay raw after the last gist.

The same layers as for the chunked mask (test_chunked.py): the literal mask and layout, the cache path against
the training forward (Llama, Mistral, Qwen2; rows with and without a tail in one batch), teeth, then the cache
file and the refusals; generation from files against the masked definition is test_chunked.py's, with a tail.
"""

import pytest
import torch
from test_chunked import INPUTS, INSTRUCTIONS, cache_logits, make_chunked_model, masked_logits

from gistcache.cache import load_cache, read_cache_metadata, save_cache
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.masks import count_gist_slots, insert_gist_tokens, make_gist_mask, raw_tail_length
from gistcache.model import GistModel

G = 99


def make_tail_model(arch="llama", gist_every=8, raw_tail=4, mask="prefix"):
    return make_chunked_model(arch, 1, gist_every, mask=mask, raw_tail=raw_tail)


def test_literal_raw_tail_mask():
    """`s a b G c d e` with prefix `s`, K = 2, W = 1 (tail `c`): the matrix drawn in masks.py."""
    s, a, b, c, d, e = 10, 11, 12, 13, 14, 15
    ids = torch.tensor([insert_gist_tokens([s, a, b, c], G, 1, 2, 1, raw_tail=1) + [d, e]])
    assert ids[0].tolist() == [s, a, b, G, c, d, e]
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 1, 0],
        [1, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(make_gist_mask(ids, None, G, "gist", num_prefix_tokens=1, chunked=True)[0], want)


def test_literal_layout_and_slot_count():
    """t = min(W, P - K) tokens follow the last gist; the chunks cover the rest; the cache holds M + t slots."""
    assert insert_gist_tokens([7, 1, 2, 3, 4, 5], G, 1, 2, 1, raw_tail=1) == [7, 1, 2, G, 3, 4, G, 5]
    assert insert_gist_tokens([7, 1, 2, 3, 4, 5], G, 1, 2, 1, raw_tail=9) == [7, 1, 2, G, 3, 4, 5]  # t = P - K
    assert insert_gist_tokens([7, 1, 2], G, 1, 2, 1, raw_tail=4) == [7, 1, 2, G]  # P <= K: no tail
    assert [raw_tail_length(p, 64, 24) for p in (10, 64, 70, 88, 1000)] == [0, 0, 6, 24, 24]
    assert raw_tail_length(1000, 64, 0) == 0 and raw_tail_length(1000, 0, 24) == 0
    assert [count_gist_slots(p, 1, 2, 1, raw_tail=1) for p in (2, 3, 4, 6)] == [1, 1, 2, 3]
    assert count_gist_slots(24 + 1000, 1, 64, 24, raw_tail=24) == -(-976 // 64) + 24
    assert count_gist_slots(24 + 1000, 1, 64, 24) == -(-1000 // 64)  # as before without a tail


@pytest.mark.parametrize("gist_every,raw_tail", [(8, 4), (16, 6)])
@pytest.mark.parametrize("mask", ["prefix", "paper"])
def test_raw_tail_cache_equals_training_forward(arch, gist_every, raw_tail, mask):
    """3 prompts compressed in one batch (K = 16 with the prefix mask: one of them too short for a tail) and read
    back in one left-padded batch give the training forward's logits (1e-4, fp32)."""
    model = make_tail_model(arch, gist_every, raw_tail, mask=mask)
    caches = compress(model, INSTRUCTIONS)
    F = model.num_prefix_tokens
    tails = [raw_tail_length(c.num_prompt_tokens - F, gist_every, raw_tail) for c in caches]
    assert [c.num_gist_tokens for c in caches] == [count_gist_slots(c.num_prompt_tokens, 1, gist_every, F, raw_tail)
                                                   for c in caches]
    assert max(tails) == raw_tail and (min(tails) == 0) == (gist_every == 16 and mask == "prefix"), tails
    got = cache_logits(model, caches, INPUTS)
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)


def test_raw_tail_has_teeth(arch):
    """Teeth: without the tail's slots the logits differ; the tail's last token reaches the input directly (a
    change there changes the logits, the gist slots unchanged); and the tail is not also compressed: the same
    prompt compressed by a run without a tail holds other gist slots."""
    model = make_tail_model(arch, 8, 4)
    caches = compress(model, INSTRUCTIONS)
    gist_only = cache_logits(model, caches, INPUTS, keep_last=0)
    diffs = [(gist_only[b] - masked_logits(model, i, t)).abs().max().item()
             for b, (i, t) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    assert min(diffs) > 1e-3, diffs
    changed = INSTRUCTIONS[0][:-1] + "!"
    a, b = compress(model, [INSTRUCTIONS[0], changed])
    M = a.num_gist_tokens - 4
    assert all(torch.equal(x[:, :, :M], y[:, :, :M]) for x, y in zip(a.keys, b.keys))  # the chunks did not see it
    assert any(not torch.equal(x[:, :, M:], y[:, :, M:]) for x, y in zip(a.keys, b.keys))
    plain = GistModel(model.model, model.tokenizer, 1, mask="prefix", gist_every=8,
                      gist_embedding=model.gist_embedding.data)
    assert plain.insert_gist(list(range(10, 90))) != model.insert_gist(list(range(10, 90)))


def test_cache_file_records_the_tail_and_other_runs_refuse_it(tmp_path):
    """A tail cache file records raw_tail W beside K and N (and M + t slots); a run without a tail, or with
    another W, refuses it naming both; a run without a tail writes no raw_tail field."""
    model = make_tail_model("llama", 8, 4)
    path = save_cache(compress(model, INSTRUCTIONS[2]), tmp_path / "c.safetensors")
    meta = read_cache_metadata(path)
    P = int(meta["num_prompt_tokens"]) - model.num_prefix_tokens
    assert (meta["gist_every"], meta["raw_tail"]) == ("8", "4")
    assert int(meta["num_gist_tokens"]) == -(-(P - 4) // 8) + 4
    plain = GistModel(model.model, model.tokenizer, 1, mask="prefix", gist_every=8,
                      gist_embedding=model.gist_embedding.data)
    with pytest.raises(GistError, match="a raw tail of up to 4 tokens, this run keeps no raw tail"):
        load_cache(path, plain)
    other = GistModel(model.model, model.tokenizer, 1, mask="prefix", gist_every=8, raw_tail=5,
                      gist_embedding=model.gist_embedding.data)
    with pytest.raises(GistError, match="up to 4 tokens, this run keeps a raw tail of up to 5"):
        load_cache(path, other)
    meta0 = read_cache_metadata(save_cache(compress(plain, INSTRUCTIONS[2]), tmp_path / "plain.safetensors"))
    assert "raw_tail" not in meta0


def test_raw_tail_refusals():
    """--raw-tail below 0, or without --gist-every: one line each."""
    with pytest.raises(GistError, match="--raw-tail must be a whole number"):
        GistConfig(gist_every=8, raw_tail=-1)
    with pytest.raises(GistError, match="--raw-tail needs --gist-every"):
        GistConfig(raw_tail=8)
    with pytest.raises(GistError, match="--raw-tail needs --gist-every"):
        make_tail_model(gist_every=0, raw_tail=4)
