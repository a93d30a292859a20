"""Position-free gist caches (issue 13): moved keys, a stock DynamicCache, refused rotary scaling, model-first decoding."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tiny
from gistcache.cache import GistCache
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate, generate_ids, generate_masked_ids
from gistcache.model import GistModel, cache_kwarg
from gistcache.model.rotary import config_inv_freq, model_inv_freq, move_keys
from gistcache.prompts import encode_input
from tiny import INPUTS, INSTRUCTIONS, make_prefix_model, masked_logits

NEW = 10
ROPES = {  # shift-invariant rotary scalings, as a Llama config names them
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0},
}


def stock_logits(model, cache: GistCache, text: str, dynamic_cache=None) -> torch.Tensor:
    """Logits over the input tokens from the stock model over `cache.to_dynamic_cache(model)`: no position ids, no mask."""
    ids = torch.tensor([encode_input(model.tokenizer, text, model.template)])
    past = dynamic_cache if dynamic_cache is not None else cache.to_dynamic_cache(model)
    with torch.no_grad():
        return model.model(input_ids=ids, **{cache_kwarg(model.model): past}).logits[0]


def moved(cache: GistCache, inv_freq: torch.Tensor, by: int) -> GistCache:
    """The same cache with every gist key turned `by` positions further (a wrong shift when by != 0)."""
    keys = [move_keys(k, inv_freq, cache.key_start, inv_freq, cache.key_start + by) for k in cache.keys]
    return GistCache(**{**vars(cache), "keys": keys})


# --- moving keys -----------------------------------------------------------------------------------

def test_moved_keys_equal_the_rotary_at_the_new_positions(arch):
    """A raw key turned by the model's rotary at p..p+N-1, then moved to q.., equals the model's rotary at q.. (1e-5)."""
    model = tiny.make_model(arch)
    raw = torch.randn(1, 2, 4, 8)  # (B, kv_heads, N, head_dim)

    def at(start):
        cos, sin = model.model.rotary_emb(raw, torch.arange(start, start + 4).view(1, 4))
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    inv_freq = model_inv_freq(model)
    torch.testing.assert_close(move_keys(at(300), inv_freq, 300, inv_freq, 7), at(7), atol=1e-5, rtol=0)
    assert (move_keys(at(300), inv_freq, 300, inv_freq, 8) - at(7)).abs().max() > 1e-2  # teeth: one position off


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_config_frequencies_are_the_model_frequencies(rope):
    """The frequencies read from a config (the upgrade's) equal the rotary module's buffer, bit for bit."""
    model = tiny.make_model("llama", rope_parameters=ROPES[rope]) if ROPES[rope] else tiny.make_model("llama")
    assert torch.equal(config_inv_freq(model.config), model_inv_freq(model))


# --- the cache is a plain prefix --------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["paper", "prefix", "prefix-original"])
def test_stock_forward_over_the_cache_equals_masked_forward(arch, mask):
    """The stock model over to_dynamic_cache(model), with no position ids, gives the masked forward's logits (1e-4)."""
    model = make_prefix_model(arch, 2, mask=mask)
    for instruction, text, cache in zip(INSTRUCTIONS, INPUTS, compress(model, INSTRUCTIONS)):
        assert cache.offset == model.num_prefix_tokens + 2
        torch.testing.assert_close(stock_logits(model, cache, text), masked_logits(model, instruction, text),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask", ["paper", "prefix", "prefix-original"])
def test_a_wrongly_moved_cache_fails(arch, mask):
    """Teeth: gist keys 1 or 3 positions off or left at the prompt's P, or (prefix mask) the prefix left at 0..F-1,
    fail the 1e-4 comparison (the right cache is within 1e-6; a tiny random model reads positions weakly)."""
    model = make_prefix_model(arch, 2, mask=mask)
    inv_freq = model_inv_freq(model.model)
    for instruction, text, cache in zip(INSTRUCTIONS, INPUTS, compress(model, INSTRUCTIONS)):
        want = masked_logits(model, instruction, text)
        assert (stock_logits(model, cache, text) - want).abs().max() < 1e-6
        for by in (1, -3, cache.num_prompt_tokens - cache.key_start):
            assert (stock_logits(model, moved(cache, inv_freq, by), text) - want).abs().max() > 1e-4, by
        if mask != "paper":  # the prefix keys at the other layout's positions: 0..F-1 <-> F-P..
            other = "compact" if cache.positions == "original" else "original"
            model.positions, wrong = other, GistCache(**{**vars(cache), "positions": other})
            assert wrong.prefix_start != cache.prefix_start
            past = wrong.to_dynamic_cache(model)
            model.positions = cache.positions
            assert (stock_logits(model, cache, text, past) - want).abs().max() > 1e-4


@pytest.mark.parametrize("rope", ["linear", "llama3", "yarn"])
def test_scaled_rotary_caches_equal_masked_forward(rope):
    """Shift-invariant rotary scalings keep the equivalence: stock logits over the cache = masked forward (1e-4)."""
    model = GistModel(tiny.make_model("llama", rope_parameters=ROPES[rope]), tiny.make_tokenizer(), 2,
                      mask="prefix").eval()
    for instruction, text, cache in zip(INSTRUCTIONS, INPUTS, compress(model, INSTRUCTIONS)):
        torch.testing.assert_close(stock_logits(model, cache, text), masked_logits(model, instruction, text),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 256, "rope_theta": 10000.0},
])
def test_rotary_that_is_not_shift_invariant_is_refused(rope):
    """dynamic (NTK) and longrope are refused in one line before anything runs, at compress and from a config."""
    model = GistModel(tiny.make_model("llama", rope_parameters=rope), tiny.make_tokenizer(), 2).eval()
    message = f"uses '{rope['rope_type']}' rotary scaling, whose frequencies change with the sequence length"
    with pytest.raises(GistError, match=message):
        compress(model, INSTRUCTIONS[0])
    with pytest.raises(GistError, match=message):
        config_inv_freq(model.config)


@pytest.mark.parametrize("mask", ["paper", "prefix", "prefix-original"])
def test_stock_generate_equals_gist_generate(arch, mask):
    """The README's snippet: model.generate over input_ids() + ids and to_dynamic_cache(model), no position ids,
    gives the tokens of `generate` and of the masked definition."""
    model = make_prefix_model(arch, 2, mask=mask)
    eos = model.tokenizer.eos_token_id
    for instruction, text, cache in zip(INSTRUCTIONS, INPUTS, compress(model, INSTRUCTIONS)):
        ids = torch.tensor([encode_input(model.tokenizer, text, model.template)])
        input_ids = torch.cat([cache.input_ids(), ids], dim=1)
        with torch.no_grad():
            past = {cache_kwarg(model.model): cache.to_dynamic_cache(model)}  # `cache` from transformers 5.24
            out = model.model.generate(input_ids=input_ids, **past, max_new_tokens=NEW, do_sample=False)
        new = out[0, input_ids.shape[1]:].tolist()
        new = new[:new.index(eos) + 1] if eos in new else new
        assert new == generate_ids(model, cache, text, max_new_tokens=NEW, **GREEDY)[0]
        assert new == generate_masked_ids(model, instruction, text, max_new_tokens=NEW)[0]


def test_dynamic_cache_from_a_config():
    """A paper-mask cache builds from a bare config (sliding-window layers set up); a prefix-mask one asks for the model."""
    model = make_prefix_model("mistral", 2, mask="paper")
    model.model.config.sliding_window = 64
    cache = compress(model, INSTRUCTIONS[0])
    past = cache.to_dynamic_cache(model.config)
    assert [type(layer).__name__ for layer in past.layers] == ["DynamicSlidingWindowLayer"] * 2
    torch.testing.assert_close(stock_logits(model, cache, "stone", past), stock_logits(model, cache, "stone"),
                               atol=0, rtol=0)
    prefix = make_prefix_model("llama", 2, mask="prefix")
    with pytest.raises(GistError, match="'prefix' mask: .*pass the GistModel: cache.to_dynamic_cache\\(model\\)"):
        compress(prefix, INSTRUCTIONS[0]).to_dynamic_cache(prefix.config)
    with pytest.raises(GistError, match="another run"):  # a GistModel is checked field by field
        cache.to_dynamic_cache(GistModel(model.model, model.tokenizer, 2, gist_embedding=model.gist_embedding * 2))


def test_a_long_instruction_leaves_the_context_to_the_input():
    """Paper mask and compact prefix mask: a 330-token instruction no longer counts against the 512 positions;
    the prefix mask in the original positions: it still does."""
    instruction, text = "Reverse the word. " * 18, "y" * 300  # ~330 and ~300 tokens (bytes)
    paper = make_prefix_model("llama", 2, mask="paper")
    cache = compress(paper, instruction)
    assert cache.num_prompt_tokens > 320 and cache.context_used == 2
    assert len(generate_ids(paper, cache, text, max_new_tokens=20, min_new_tokens=20)[0]) == 20
    with pytest.raises(GistError, match="over the model's context of 512"):
        generate_masked_ids(paper, instruction, text, max_new_tokens=20)  # the definition needs P + N + L positions
    compact = make_prefix_model("llama", 2, mask="prefix")
    cache = compress(compact, instruction)
    assert cache.context_used == compact.num_prefix_tokens + 2 and cache.prefix_start == 0
    assert len(generate_ids(compact, cache, text, max_new_tokens=20, min_new_tokens=20)[0]) == 20
    original = make_prefix_model("llama", 2, mask="prefix-original")
    cache = compress(original, instruction)
    assert cache.context_used == cache.num_prompt_tokens + 2
    with pytest.raises(GistError, match="over the model's context of 512"):
        generate(original, cache, text, max_new_tokens=20)


# --- decoding starts from the model's generation_config ---------------------------------------------

def test_generate_starts_from_the_model_generation_config():
    """The model's generation_config applies unless overridden; GREEDY (the CLI's) restores the masked definition."""
    model = make_prefix_model("llama", 2, mask="paper")
    cache = compress(model, INSTRUCTIONS[0])
    reference = generate_masked_ids(model, INSTRUCTIONS[0], INPUTS[2], max_new_tokens=NEW)[0]
    assert len(set(reference)) < len(reference)  # greedy repeats a token here
    model.model.generation_config.no_repeat_ngram_size = 1
    own = generate_ids(model, cache, INPUTS[2], max_new_tokens=NEW)[0]
    assert own != reference and len(set(own)) == len(own)
    assert generate_ids(model, cache, INPUTS[2], max_new_tokens=NEW, **GREEDY)[0] == reference
    assert generate_ids(model, cache, INPUTS[2], max_new_tokens=NEW, no_repeat_ngram_size=0)[0] == reference
    given = GenerationConfig(no_repeat_ngram_size=0, eos_token_id=model.tokenizer.eos_token_id)
    assert generate_ids(model, cache, INPUTS[2], max_new_tokens=NEW, generation_config=given)[0] == reference
    with pytest.raises(GistError, match="generation settings do not fit together"):
        generate_ids(model, cache, INPUTS[2], max_new_tokens=NEW, num_return_sequences=2)
