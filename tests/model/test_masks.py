"""The gist mask: literal matrices, a reference definition, equivalence with a gist-only KV cache, teeth."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import tiny
from gistcache.errors import GistError
from gistcache.masks import (find_gist_spans, gist_attention_mask, make_gist_mask, make_position_ids,
                             to_additive_mask)
from gistcache.model import GistModel, cache_kwarg

G = 9  # gist token id in the literal tests


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row] for row in text.split()], dtype=torch.bool)


def test_literal_gist_mask():
    """For `a b c G G d e` the gist mask is exactly the matrix drawn in masks.py."""
    ids = torch.tensor([[1, 2, 3, G, G, 4, 5]])
    expected = rows("1000000 1100000 1110000 1111000 1111100 0001110 0001111")
    assert torch.equal(make_gist_mask(ids, None, G, "gist")[0], expected)


def test_literal_controls():
    """pos_control is plain causal; neg_control hides the prompt and the gist from what follows."""
    ids = torch.tensor([[1, 2, 3, G, G, 4, 5]])
    assert torch.equal(make_gist_mask(ids, None, G, "pos_control")[0], torch.ones(7, 7, dtype=torch.bool).tril())
    expected = rows("1000000 1100000 1110000 1111000 1111100 0000010 0000011")
    assert torch.equal(make_gist_mask(ids, None, G, "neg_control")[0], expected)


def test_literal_left_padding():
    """Padding keys are hidden from everyone; a padding query sees only itself."""
    ids = torch.tensor([[0, 0, 1, G, 4]])
    attn = torch.tensor([[0, 0, 1, 1, 1]])
    expected = rows("10000 01000 00100 00110 00011")
    assert torch.equal(make_gist_mask(ids, attn, G, "gist")[0], expected)


def test_additive_mask_values():
    """Allowed is 0, hidden is the dtype's most negative finite value, shape (B, 1, T, T)."""
    mask = make_gist_mask(torch.tensor([[1, G, 2]]), None, G)
    add = to_additive_mask(mask, torch.float32)
    assert add.shape == (1, 1, 3, 3)
    assert add[0, 0, 2, 0] == torch.finfo(torch.float32).min
    assert add[0, 0, 2, 1] == 0 and add[0, 0, 2, 2] == 0


def test_missing_and_broken_gist_named():
    """A row with no gist or with two separate gist runs is refused, naming the row."""
    with pytest.raises(GistError, match="row 1 has no gist"):
        find_gist_spans(torch.tensor([[1, G, 2], [1, 2, 3]]), G)
    with pytest.raises(GistError, match="row 0 .* not contiguous"):
        find_gist_spans(torch.tensor([[G, 2, G]]), G)


def test_position_ids_continue_after_padding():
    """Left padding does not shift positions; an offset continues them."""
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert make_position_ids(attn).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert make_position_ids(attn, torch.tensor([5, 7])).tolist() == [[5, 5, 5, 6], [7, 8, 9, 10]]


def reference_mask(ids, attn, gist_id, condition, num_prefix=0):
    """The rule spelled out with loops, for comparison: causal, padding hidden, and after the gist the prompt
    (gist) or the prompt and the gist (neg_control) hidden, except the row's first `num_prefix` real tokens."""
    B, T = ids.shape
    out = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        where = [t for t in range(T) if ids[b, t] == gist_id]
        start, end = where[0], where[-1] + 1
        first = next(t for t in range(T) if attn[b, t])
        hidden_until = {"gist": start, "neg_control": end}.get(condition, 0)
        for q in range(T):
            for k in range(T):
                if not attn[b, q]:
                    out[b, q, k] = q == k
                    continue
                ok = k <= q and bool(attn[b, k])
                if q >= end and first + num_prefix <= k < hidden_until:
                    ok = False
                out[b, q, k] = ok
    return out


def random_rows(data, batch, *, longest=4, prefix=()):
    """`batch` rows of 12 ids (B, T) and their mask: left padding, `prefix`, a prompt of 0..`longest` tokens,
    1 to 3 gist tokens, 0..`longest` tokens after."""
    rows_ids, rows_attn = [], []
    for _ in range(batch):
        n_prompt = data.draw(st.integers(0, longest))
        n_gist = data.draw(st.integers(1, 3))
        n_after = data.draw(st.integers(0, longest))
        real = [*prefix, *[1] * n_prompt, *[G] * n_gist, *[2] * n_after]
        rows_ids.append([0] * (12 - len(real)) + real)
        rows_attn.append([0] * (12 - len(real)) + [1] * len(real))
    return torch.tensor(rows_ids), torch.tensor(rows_attn)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    condition=st.sampled_from(["gist", "pos_control", "neg_control"]),
)
def test_mask_matches_reference(data, batch, condition):
    """On random rows (random prompt, gist count, suffix and left padding) the builder equals the loops."""
    ids, attn = random_rows(data, batch)
    assert torch.equal(make_gist_mask(ids, attn, G, condition), reference_mask(ids, attn, G, condition))


# --- equivalence with a cache that holds only the gist tokens' keys/values -------------------------

def batch_rows(tokenizer, num_gist):
    """3 rows of different lengths: (prompt ids, after ids) as plain token-id lists."""
    gist_id = tokenizer.convert_tokens_to_ids("<GIST>")
    texts = [("Reverse the word", "stone"), ("Add one", "41"), ("Uppercase every letter of it", "abc de")]
    out = []
    for prompt, after in texts:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(after, add_special_tokens=False).input_ids
        out.append((p, a))
    return out, gist_id


def left_pad(seqs, pad_id=1):
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs])
    attn = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, attn


def gist_only_cache_logits(gm, prompt, num_gist, after):
    """Logits over `after` given a cache holding only the gist positions' keys/values of one row."""
    gid = gm.gist_token_id
    ids = torch.tensor([prompt + [gid] * num_gist])
    out = gm.model(inputs_embeds=gm.embed(ids), use_cache=True)  # causal: gist tokens see the prompt
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    n = len(prompt)
    kv = [(layer.keys[:, :, n:, :], layer.values[:, :, n:, :]) for layer in cache.layers]
    gist_cache = DynamicCache(ddp_cache_data=kv)
    after_ids = torch.tensor([after])
    positions = torch.arange(len(after)).unsqueeze(0) + n + num_gist  # positions continue
    res = gm.model(input_ids=after_ids, position_ids=positions, use_cache=True, **{cache_kwarg(gm.model): gist_cache})
    return res.logits[0]


def masked_forward_logits(gm, rows_, num_gist, condition="gist"):
    seqs = [p + [gm.gist_token_id] * num_gist + a for p, a in rows_]
    ids, attn = left_pad(seqs)
    with torch.no_grad():
        if condition is None:  # a plain causal forward, no gist mask at all
            logits = gm.model(inputs_embeds=gm.embed(ids), attention_mask=attn,
                              position_ids=make_position_ids(attn)).logits
        else:
            logits = gm(ids, attn, condition=condition).logits
    return [logits[b, ids.shape[1] - len(a):] for b, (_, a) in enumerate(rows_)]


@pytest.mark.parametrize("num_gist", [1, 5])
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_masked_forward_equals_gist_cache(arch, tokenizer, num_gist, attn_impl):
    """Logits after the gist from one masked forward equal a forward over a gist-only KV cache (1e-4, fp32)."""
    gm = GistModel(tiny.make_model(arch, attn_implementation=attn_impl), tokenizer, num_gist)
    rows_, _ = batch_rows(tokenizer, num_gist)
    masked = masked_forward_logits(gm, rows_, num_gist)
    with torch.no_grad():
        for b, (p, a) in enumerate(rows_):
            ref = gist_only_cache_logits(gm, p, num_gist, a)
            torch.testing.assert_close(masked[b], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_causal_mask_fails_the_equivalence(arch, tokenizer, attn_impl):
    """Teeth: without the gist mask the same comparison fails, so the test can catch a leak."""
    gm = GistModel(tiny.make_model(arch, attn_implementation=attn_impl), tokenizer, 2)
    rows_, _ = batch_rows(tokenizer, 2)
    leaky = masked_forward_logits(gm, rows_, 2, condition=None)
    with torch.no_grad():
        diffs = [(leaky[b] - gist_only_cache_logits(gm, p, 2, a)).abs().max().item() for b, (p, a) in enumerate(rows_)]
    assert min(diffs) > 1e-3, diffs


def test_gist_output_depends_on_prompt(tokenizer):
    """Changing one prompt token changes the gist position's own output (the gist reads the prompt)."""
    gm = GistModel(tiny.make_model("llama"), tokenizer, 1)
    gid = gm.gist_token_id
    a = torch.tensor([[10, 11, 12, gid, 20]])
    b = a.clone()
    b[0, 1] = 13
    attn = torch.ones_like(a)
    with torch.no_grad():
        la, lb = gm(a, attn).logits, gm(b, attn).logits
    assert (la[0, 3] - lb[0, 3]).abs().max() > 1e-4


def test_neg_control_ignores_prompt_and_gist(tokenizer):
    """Under neg_control, what follows the gist is the same whatever the prompt."""
    gm = GistModel(tiny.make_model("llama"), tokenizer, 1)
    gid = gm.gist_token_id
    a = torch.tensor([[10, 11, 12, gid, 20, 21]])
    b = torch.tensor([[40, 41, 42, gid, 20, 21]])
    attn = torch.ones_like(a)
    with torch.no_grad():
        la = gm(a, attn, condition="neg_control").logits
        lb = gm(b, attn, condition="neg_control").logits
    torch.testing.assert_close(la[0, 4:], lb[0, 4:], atol=1e-5, rtol=0)
    assert (la[0, 3] - lb[0, 3]).abs().max() > 1e-4  # the gist itself still reads its prompt


def test_gist_attention_mask_dtype():
    """The mask handed to the model is float in the compute dtype, never boolean."""
    m = gist_attention_mask(torch.tensor([[1, G, 2]]), torch.ones(1, 3), G, "gist", torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.shape == (1, 1, 3, 3)
