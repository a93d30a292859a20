"""Chunk-local attention (`chunk_attention` "local", masks.py): each chunk reads the earlier ones through their gists.

The literal mask and the builder against the rule spelled out; the cache path against the training forward
(Llama, Mistral, Qwen2; a batch of prompts of different lengths); a streaming reference that compresses chunk by
chunk, keeping only the prefix and the gists (what the structure allows an engine to do), equal to the one pass;
teeth; the run config, the cache identity and the refusals.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import generate_ids, generate_masked_ids
from gistcache.masks import chunk_local_mask, insert_gist_tokens
from gistcache.model import cache_kwarg, cache_layers, returned_cache
from gistcache.model.rotary import model_inv_freq, turn_keys
from gistcache.prompts import encode_instruction
from test_chunked import (G, INPUTS, INSTRUCTIONS, cache_logits, draw_chunked_batch, make_chunked_model,
                          masked_logits)


def make_local_model(arch="llama", num_gist=1, gist_every=8, mask="prefix", raw_tail=0):
    model = make_chunked_model(arch, num_gist, gist_every, mask=mask, raw_tail=raw_tail)
    model.chunk_attention = "local"
    return model


# --- 1. literal -----------------------------------------------------------------------------------------

def test_literal_chunk_local_mask():
    """`s a b G c G d e` with prefix `s`, K = 2, N = 1: the matrix drawn in masks.py."""
    s, a, b, c, d, e = 10, 11, 12, 13, 14, 15
    ids = torch.tensor([[s, a, b, G, c, G, d, e]])
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0, 1, 1, 0],
        [1, 0, 0, 1, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(chunk_local_mask(ids, None, G, num_prefix_tokens=1)[0], want)


def reference_local_mask(ids, attn, prefix):
    """The chunk-local rule, spelled out in loops: a chunk ends with its run of gist tokens."""
    B, T = ids.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        chunk, chunks = 0, []
        for t in range(T):
            chunks.append(chunk)
            if ids[b, t] == G and (t + 1 == T or ids[b, t + 1] != G):
                chunk += 1
        first_real = next(t for t in range(T) if attn[b, t])
        for q in range(T):
            for k in range(q + 1):
                if not attn[b, q]:
                    out[b, q, k] = k == q
                elif attn[b, k]:
                    out[b, q, k] = chunks[k] == chunks[q] or ids[b, k] == G or k < first_real + prefix
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), prefix=st.integers(0, 2))
def test_chunk_local_mask_matches_reference(data, batch, prefix):
    """Random prompts, ratios, gist counts, suffixes and left padding: the builder equals the loops."""
    ids, attn = draw_chunked_batch(data, batch, prefix)
    assert torch.equal(chunk_local_mask(ids, attn, G, prefix), reference_local_mask(ids, attn, prefix))


# --- 2. the cache path equals the training forward -------------------------------------------------------

@pytest.mark.parametrize("gist_every,num_gist", [(8, 1), (7, 2)])
def test_local_cache_equals_training_forward(arch, gist_every, num_gist):
    """3 prompts of different lengths compressed in one batch (left-padded) and read back give the training
    forward's logits; one prompt alone (no padding, where a causal run takes the stock causal forward) too."""
    model = make_local_model(arch, num_gist, gist_every)
    got = cache_logits(model, compress(model, INSTRUCTIONS), INPUTS)
    alone = cache_logits(model, [compress(model, INSTRUCTIONS[2])], INPUTS[2:])
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)
    torch.testing.assert_close(alone[0], got[2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("raw_tail", [0, 5])
def test_local_generation_equals_masked_definition(raw_tail):
    """compress -> generate equals greedy decoding of the training forward, with and without a raw tail."""
    model = make_local_model("llama", 1, 6, raw_tail=raw_tail)
    reference = generate_masked_ids(model, INSTRUCTIONS, INPUTS, max_new_tokens=8)
    assert generate_ids(model, compress(model, INSTRUCTIONS), INPUTS, max_new_tokens=8) == reference


def streamed_gist_kv(model, instruction):
    """The gist keys/values computed chunk by chunk: each chunk (its tokens and its gists, at their own positions)
    reads a cache that holds only the fixed prefix and the earlier chunks' gists; the gist keys then turned to
    F..F+M-1 as compress does. Memory stays at F + M + K positions whatever the prompt's length."""
    from transformers import DynamicCache

    ids = model.insert_gist(encode_instruction(model.tokenizer, instruction, model.template))
    F, G = model.num_prefix_tokens, model.gist_token_id
    pieces, lo = ([(0, F)] if F else []), F  # the prefix, then each chunk up to the end of its gist run
    while lo < len(ids):
        hi = ids.index(G, lo)
        while hi < len(ids) and ids[hi] == G:
            hi += 1
        pieces.append((lo, hi))
        lo = hi
    kept, gist_positions = None, []  # per layer (keys, values) of the prefix and the gists so far
    for lo, hi in pieces:
        cache = DynamicCache(ddp_cache_data=kept, config=model.config) if kept else DynamicCache(config=model.config)
        with torch.no_grad():
            out = model.model(inputs_embeds=model.embed(torch.tensor([ids[lo:hi]])),
                              position_ids=torch.arange(lo, hi).view(1, -1), use_cache=True,
                              **{cache_kwarg(model.stock_model): cache})
        before = 0 if kept is None else kept[0][0].shape[2]
        new = [j for j in range(lo, hi) if ids[j] == G] if lo >= F else list(range(lo, hi))
        cols = list(range(before)) + [before + j - lo for j in new]
        kept = [(k[:, :, cols], v[:, :, cols]) for k, v in cache_layers(returned_cache(out))]
        gist_positions += [j for j in new if ids[j] == G]
    M = len(gist_positions)
    inv_freq = model_inv_freq(model.stock_model)
    moved = torch.arange(F, F + M).view(1, M)
    return [(turn_keys(k[:, :, -M:], inv_freq, torch.tensor([gist_positions]), inv_freq, moved), v[:, :, -M:])
            for k, v in kept]


@pytest.mark.parametrize("mask", ["prefix", "paper"])
def test_streaming_chunk_by_chunk_equals_one_pass(arch, mask):
    """What the structure buys at inference: a prompt compressed chunk by chunk, holding only the prefix and the
    gists between chunks, gives the one-pass cache's keys and values; for a causal run it does not (teeth)."""
    model = make_local_model(arch, 1, 8, mask=mask)
    cache = compress(model, INSTRUCTIONS[2])
    streamed = streamed_gist_kv(model, INSTRUCTIONS[2])
    assert cache.num_gist_tokens == streamed[0][0].shape[2] > 2
    for k, v, (sk, sv) in zip(cache.keys, cache.values, streamed):
        torch.testing.assert_close(k, sk, atol=1e-4, rtol=0)
        torch.testing.assert_close(v, sv, atol=1e-4, rtol=0)
    model.chunk_attention = "causal"
    causal = compress(model, INSTRUCTIONS[2])
    assert max((v - sv).abs().max().item() for v, (_, sv) in zip(causal.values, streamed)) > 1e-3


# --- 3. teeth -------------------------------------------------------------------------------------------

def test_local_hides_earlier_chunks_but_their_gists(arch):
    """The same weights read with causal chunks give other logits. Under the local mask, changing a token of the
    first chunk changes what the first gist and the second chunk compute, the second chunk only through the first
    gist: with that gist's key column blocked as well, the second chunk's logits stay the same."""
    from gistcache.masks import to_additive_mask

    local, causal = make_local_model(arch, 1, 8), make_chunked_model(arch, 1, 8)
    instruction, text = INSTRUCTIONS[2], INPUTS[2]
    assert (masked_logits(local, instruction, text) - masked_logits(causal, instruction, text)).abs().max() > 1e-5
    ids = local.insert_gist(encode_instruction(local.tokenizer, instruction, local.template))
    F, G = local.num_prefix_tokens, local.gist_token_id
    first_gist = ids.index(G, F)
    second_gist = ids.index(G, first_gist + 1)
    changed = list(ids)
    changed[F] += 1  # the first instruction token

    def logits(seq, block_first_gist=False):
        """Logits at every position of one pass under the local mask (each reads what every layer read)."""
        x = torch.tensor([seq])
        mask = chunk_local_mask(x, torch.ones_like(x), G, F)
        if block_first_gist:
            mask[:, first_gist + 1:, first_gist] = False
        with torch.no_grad():
            return local.model(inputs_embeds=local.embed(x),
                               attention_mask=to_additive_mask(mask, torch.float32)).logits[0]

    a, b = logits(ids), logits(changed)
    # one deterministic computation on the same shapes: any difference at all is the change arriving
    assert not torch.equal(a[first_gist], b[first_gist])  # the first gist carries the change
    assert not torch.equal(a[first_gist + 1:second_gist], b[first_gist + 1:second_gist])  # through it
    a, b = logits(ids, True), logits(changed, True)
    assert torch.equal(a[first_gist + 1:second_gist], b[first_gist + 1:second_gist])  # nothing else of chunk one
    assert torch.equal(a[:F], b[:F])  # the prefix reads nothing after it


# --- 4. config, identity, refusals -------------------------------------------------------------------------

def test_run_config_and_cache_identity_record_the_structure():
    """GistConfig records chunk_attention ("causal" for every run before it); an in-memory model's fingerprint
    differs between the two structures, so a cache of one is not read by the other."""
    from gistcache.cache.identity import model_identity

    assert GistConfig().chunk_attention == "causal"
    assert GistConfig.from_dict({"gist_every": 8, "chunk_attention": "local"}).chunk_attention == "local"
    assert GistConfig.from_dict({"gist_every": 8}).chunk_attention == "causal"  # a run written before
    model = make_chunked_model("llama", 1, 8)
    causal_id = model_identity(model).run_fingerprint
    model.chunk_attention = "local"
    assert model_identity(model).run_fingerprint != causal_id


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_attention="local"), "needs --gist-every"),
    (dict(gist_every=8, chunk_attention="beacon"), "unknown --chunk-attention"),
])
def test_refusals(kwargs, match):
    with pytest.raises(GistError, match=match):
        GistConfig(**kwargs)
