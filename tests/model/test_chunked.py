"""Gist tokens at a ratio (`gist_every` K, masks.py): N gist tokens after every chunk of K instruction tokens.

Four layers as for the one-chunk mask: the literal mask and layout, the builder against the rule spelled out,
the cache path against the training forward (Llama, Mistral, Qwen2; K dividing the instruction and not; a
batch of prompts of different lengths, hence different M), and teeth. Then the cache file and the refusals.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny
from gistcache.cache import GistCache, load_cache, read_cache_metadata, save_cache
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import build_batch, generate_ids, generate_masked_ids
from gistcache.masks import count_gist_slots, insert_gist_tokens, make_gist_mask
from gistcache.model import GistModel, cache_kwarg
from gistcache.prompts import encode_input, encode_instruction

G = 99
# instructions of 3 different lengths, in bytes = tokens of the tiny tokenizer
INSTRUCTIONS = ["Reverse the word you are given, letter by letter.", "Add one to it.",
                "Uppercase every letter of the input and keep the spaces where they are."]
INPUTS = ["stone", "41", "abc de fgh ijk"]


def make_chunked_model(arch="llama", num_gist=1, gist_every=8, mask="prefix", attn_implementation="sdpa",
                       raw_tail=0):
    gm = GistModel(tiny.make_model(arch, attn_implementation=attn_implementation), tiny.make_tokenizer(), num_gist,
                   mask=mask, gist_every=gist_every, raw_tail=raw_tail)
    torch.manual_seed(100)
    with torch.no_grad():
        gm.gist_embedding.add_(torch.randn_like(gm.gist_embedding))
    return gm.eval()


# --- 1. literal ---------------------------------------------------------------------------------------

def test_literal_chunked_mask():
    """`s a b G c G d e` with prefix `s`, K = 2, N = 1: the matrix drawn in masks.py."""
    s, a, b, c, d, e = 10, 11, 12, 13, 14, 15
    ids = torch.tensor([[s, a, b, G, c, G, d, e]])
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0, 1, 1, 0],
        [1, 0, 0, 1, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(make_gist_mask(ids, None, G, "gist", num_prefix_tokens=1, chunked=True)[0], want)
    neg = make_gist_mask(ids, None, G, "neg_control", num_prefix_tokens=1, chunked=True)[0]
    assert neg[6].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]  # neither the chunks nor their gists


def test_literal_layout_and_slot_count():
    """N gist ids after each chunk of K tokens past the prefix; M = N * ceil(P / K), N for one chunk."""
    assert insert_gist_tokens([7, 1, 2, 3, 4, 5], G, 1, 2, 1) == [7, 1, 2, G, 3, 4, G, 5, G]
    assert insert_gist_tokens([7, 1, 2, 3, 4], G, 2, 2, 1) == [7, 1, 2, G, G, 3, 4, G, G]
    assert insert_gist_tokens([7, 1, 2, 3], G, 2, 0, 1) == [7, 1, 2, 3, G, G]  # one chunk: as before
    assert [count_gist_slots(p, 1, 2, 1) for p in (2, 3, 5, 6)] == [1, 1, 2, 3]
    assert count_gist_slots(6, 3, 0, 1) == 3
    assert count_gist_slots(2049, 2, 64, 24) == 2 * 32


def test_broken_gist_runs_are_refused_only_for_one_chunk():
    """Gist tokens in several runs are a chunked prompt; for a one-chunk mask they are a broken row, named."""
    ids = torch.tensor([[10, 11, G, 12, G, 13]])
    with pytest.raises(GistError, match="row 0 .*not contiguous"):
        make_gist_mask(ids, None, G, "gist")
    assert make_gist_mask(ids, None, G, "gist", chunked=True).shape == (1, 6, 6)


# --- 2. reference -------------------------------------------------------------------------------------

def reference_mask(ids, attn, prefix):
    """The rule of masks.py, spelled out in loops."""
    B, T = ids.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        gists = [t for t in range(T) if ids[b, t] == G]
        first_real = next(t for t in range(T) if attn[b, t])
        for q in range(T):
            for k in range(q + 1):
                if not attn[b, q]:
                    out[b, q, k] = k == q
                elif not attn[b, k]:
                    continue
                elif q > gists[-1]:
                    out[b, q, k] = k > gists[-1] or k in gists or k < first_real + prefix
                else:
                    out[b, q, k] = True
    return out


def draw_chunked_batch(data, batch, prefix):
    """(ids, attention mask), each (B, T): random chunked prompts (ratio 1-4, 1-2 gists per chunk) with 0-3 tokens
    after them, left-padded by 0-3 beyond the longest, drawn with hypothesis."""
    rows, masks = [], []
    for _ in range(batch):
        prompt = data.draw(st.lists(st.integers(10, 50), min_size=prefix + 1, max_size=prefix + 9))
        k, n = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 2))
        after = data.draw(st.lists(st.integers(10, 50), min_size=0, max_size=3))
        real = insert_gist_tokens(prompt, G, n, k, prefix) + after
        pad = data.draw(st.integers(0, 3))
        rows.append([0] * pad + real)
        masks.append([0] * pad + [1] * len(real))
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (T - len(m)) + m for m in masks])
    return ids, attn


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 3), prefix=st.integers(0, 2))
def test_chunked_mask_matches_reference(data, batch, prefix):
    """Random prompts, ratios, gist counts, suffixes and left padding: the builder equals the loops."""
    ids, attn = draw_chunked_batch(data, batch, prefix)
    assert torch.equal(make_gist_mask(ids, attn, G, "gist", prefix, chunked=True), reference_mask(ids, attn, prefix))


# --- 3. the cache path equals the training forward ------------------------------------------------------

def masked_logits(model, instruction, text):
    """Logits over the input tokens from the run's own forward of the chunked prompt + input (what training runs)."""
    tok = model.tokenizer
    after = encode_input(tok, text, model.template)
    ids = torch.tensor([model.insert_gist(encode_instruction(tok, instruction, model.template)) + after])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids)).logits[0, -len(after):]


def cache_logits(model, caches, inputs, keep_last=None):
    """Logits over each row's input tokens from the left-padded batch `generate` builds; `keep_last` (teeth)
    keeps only the last slots of each cache, as a reader of one chunk would."""
    batch = build_batch(model, caches, inputs)
    mask, S = batch.attention_mask, batch.num_cached
    if keep_last is not None:
        F = model.num_prefix_tokens
        for layer in batch.cache.layers:
            layer.keys = torch.cat([layer.keys[:, :, :F], layer.keys[:, :, S - keep_last:]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :F], layer.values[:, :, S - keep_last:]], dim=2)
        mask = torch.cat([mask[:, :F], mask[:, S - keep_last:]], dim=1)
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids[:, S:], attention_mask=mask,
                          position_ids=batch.position_ids[:, S:], use_cache=True,
                          **{cache_kwarg(model.model): batch.cache})
    lengths = [len(encode_input(model.tokenizer, t, model.template)) for t in inputs]
    return [out.logits[b, -n:] for b, n in enumerate(lengths)]


@pytest.mark.parametrize("gist_every,num_gist", [(8, 1), (7, 2), (4, 1)])
@pytest.mark.parametrize("mask", ["prefix", "paper"])
def test_chunked_cache_equals_training_forward(arch, gist_every, num_gist, mask):
    """3 prompts of different lengths (different M) compressed in one batch and read back in one left-padded batch
    give the training forward's logits (1e-4, fp32), K dividing the instruction or not, with and without prefix."""
    model = make_chunked_model(arch, num_gist, gist_every, mask=mask)
    caches = compress(model, INSTRUCTIONS)
    F = model.num_prefix_tokens
    slots = [c.num_gist_tokens for c in caches]
    assert slots == [count_gist_slots(c.num_prompt_tokens, num_gist, gist_every, F) for c in caches]
    assert len(set(slots)) == 3 and min(slots) > num_gist  # three different M, every one more than one chunk
    got = cache_logits(model, caches, INPUTS)
    for b, (instruction, text) in enumerate(zip(INSTRUCTIONS, INPUTS)):
        torch.testing.assert_close(got[b], masked_logits(model, instruction, text), atol=1e-4, rtol=0)


def test_chunk_boundaries_that_divide_and_do_not():
    """The instruction lengths of the test prompts include one that K divides and ones it does not."""
    model = make_chunked_model("llama", 2, 7)  # K = 7 of the parametrized cases above
    lengths = [c.num_prompt_tokens - model.num_prefix_tokens for c in compress(model, INSTRUCTIONS)]
    assert {n % 7 == 0 for n in lengths} == {True, False}, lengths


def test_batched_training_forward_equals_each_row_alone(arch):
    """The two-pass forward over 3 left-padded chunked rows (different M) gives each row's own logits."""
    model = make_chunked_model(arch, 2, 5)
    tok = model.tokenizer
    rows = [model.insert_gist(encode_instruction(tok, i, model.template)) + encode_input(tok, t, model.template)
            for i, t in zip(INSTRUCTIONS, INPUTS)]
    T = max(map(len, rows))
    ids = torch.tensor([[1] * (T - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        full = model(ids, attn).logits
        for b, r in enumerate(rows):
            alone = model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).logits[0]
            torch.testing.assert_close(full[b, -len(r):], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("raw_tail", [0, 5])
def test_chunked_generation_equals_masked_definition(arch, raw_tail, tmp_path):
    """compress -> save -> load -> generate (one batch) equals greedy decoding of the training forward, with and
    without a raw tail (test_raw_tail.py)."""
    model = make_chunked_model(arch, 1, 6, raw_tail=raw_tail)
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, INSTRUCTIONS))]
    reference = generate_masked_ids(model, INSTRUCTIONS, INPUTS, max_new_tokens=8)
    assert generate_ids(model, caches, INPUTS, max_new_tokens=8) == reference


# --- 4. teeth -----------------------------------------------------------------------------------------

def test_chunked_equivalence_has_teeth(arch):
    """Teeth: keeping only the last chunk's gist slots (what a one-chunk reader keeps) gives other logits, and
    the first chunk reaches the input: changing its first token changes the logits after the gist."""
    model = make_chunked_model(arch, 1, 8)
    caches = compress(model, INSTRUCTIONS)
    last_only = cache_logits(model, caches, INPUTS, keep_last=1)
    diffs = [(last_only[b] - masked_logits(model, i, t)).abs().max().item()
             for b, (i, t) in enumerate(zip(INSTRUCTIONS, INPUTS))]
    assert min(diffs) > 1e-3, diffs
    changed = "X" + INSTRUCTIONS[0][1:]
    # same shapes, deterministic: any difference is the first chunk speaking through its gist slot
    assert (masked_logits(model, changed, INPUTS[0]) - masked_logits(model, INSTRUCTIONS[0], INPUTS[0])).abs().max() > 1e-6


# --- the cache file and refusals ------------------------------------------------------------------------

def test_cache_file_records_k_n_m(tmp_path):
    """A chunked cache file records gist_every (K), gist_per_chunk (N) and num_gist_tokens (M); a one-chunk file
    holds no chunk fields at all (written byte for byte as before)."""
    model = make_chunked_model("llama", 2, 8)
    cache = compress(model, INSTRUCTIONS[2])
    meta = read_cache_metadata(save_cache(cache, tmp_path / "c.safetensors"))
    P = cache.num_prompt_tokens - model.num_prefix_tokens
    assert (meta["gist_every"], meta["gist_per_chunk"], meta["num_gist_tokens"]) == ("8", "2", str(2 * -(-P // 8)))
    assert int(meta["input_position"]) == model.num_prefix_tokens + cache.num_gist_tokens
    one = GistModel(model.model, model.tokenizer, 2, mask="prefix", gist_embedding=model.gist_embedding.data)
    meta1 = read_cache_metadata(save_cache(compress(one, INSTRUCTIONS[2]), tmp_path / "one.safetensors"))
    assert "gist_every" not in meta1 and "gist_per_chunk" not in meta1


def test_cache_of_another_ratio_is_refused(tmp_path):
    """A cache of one ratio loaded by a run of another (or by a one-chunk run) is refused, naming both ratios."""
    model = make_chunked_model("llama", 1, 8)
    path = save_cache(compress(model, INSTRUCTIONS[0]), tmp_path / "c.safetensors")
    other = make_chunked_model("llama", 1, 16)
    with pytest.raises(GistError, match="every 8 instruction tokens, this run puts gist tokens after every 16"):
        load_cache(path, other)
    one = GistModel(model.model, model.tokenizer, 1, mask="prefix", gist_embedding=model.gist_embedding.data)
    with pytest.raises(GistError, match="one chunk"):
        load_cache(path, one)


def test_gist_every_refusals():
    """--gist-every below 0, a chunked run in the original positions, and a cache whose M does not fit its K."""
    with pytest.raises(GistError, match="--gist-every must be a whole number"):
        GistConfig(gist_every=-1)
    with pytest.raises(GistError, match="--gist-every needs --positions compact"):
        GistConfig(gist_every=8, positions="original")
    model = make_chunked_model("llama", 1, 8)
    cache = compress(model, INSTRUCTIONS[0])
    with pytest.raises(GistError, match="does not fit gist_per_chunk"):
        GistCache(keys=cache.keys, values=cache.values, num_gist_tokens=cache.num_gist_tokens,
                  num_prompt_tokens=cache.num_prompt_tokens + 40, prompt_sha256=cache.prompt_sha256,
                  template=cache.template, base_fingerprint=cache.base_fingerprint,
                  run_fingerprint=cache.run_fingerprint, mask=cache.mask, key_start=cache.key_start,
                  gist_every=8, gist_per_chunk=1)


def test_prompt_too_long_for_the_context_is_refused():
    """A prompt whose gist tokens and input exceed the model's context: one line naming both counts."""
    model = make_chunked_model("llama", 1, 4)
    with pytest.raises(GistError, match=r"prompt 0 has \d+ tokens \+ \d+ gist tokens, over the model's context"):
        compress(model, "x" * 500)
