"""The compact positions of the prefix mask (gistcache/model/compact.py): batched two-pass forward, gradients, the
run's record of its layout, and refusals."""

import json

import pytest
import torch
from typer.testing import CliRunner

from gistcache.cache import load_cache, save_cache
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import load_run
from gistcache.prompts import encode_input, encode_instruction
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train
from tiny import INPUTS, INSTRUCTIONS, make_prefix_model


def rows(model, answers=("ok", "forty-two", "ABC")):
    """Encoded prompt + gist + input + answer ids per row (different lengths everywhere)."""
    tok, N = model.tokenizer, model.num_gist_tokens
    out = []
    for instruction, text, answer in zip(INSTRUCTIONS, INPUTS, answers):
        ids = (encode_instruction(tok, instruction, model.template) + [model.gist_token_id] * N
               + encode_input(tok, text, model.template) + tok.encode(answer, add_special_tokens=False))
        out.append(ids)
    return out


def left_padded(ids_rows, pad=0):
    T = max(map(len, ids_rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in ids_rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in ids_rows])
    return ids, mask


@pytest.mark.parametrize("num_gist", [1, 3])
def test_batched_forward_equals_each_row_alone(arch, num_gist):
    """3 left-padded rows of different lengths give each row's own logits, in every real column, whether all
    logits are asked for or only the last K (K inside and past the columns after the gist)."""
    model = make_prefix_model(arch, num_gist)
    ids_rows = rows(model)
    ids, mask = left_padded(ids_rows)
    with torch.no_grad():
        full = model(ids, mask).logits  # (B, T, V)
        alone = [model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).logits[0] for r in ids_rows]
        for K in (3, ids.shape[1] - 2):
            kept = model(ids, mask, logits_to_keep=K).logits
            torch.testing.assert_close(kept, full[:, -K:], atol=1e-5, rtol=0)
    for b, r in enumerate(ids_rows):
        torch.testing.assert_close(full[b, -len(r):], alone[b], atol=1e-4, rtol=0)


def test_tokens_after_the_gist_differ_from_the_original_positions(arch):
    """Teeth: the same weights in the original positions (one masked forward) give other logits after the gist,
    and the same ones up to it (where the two layouts agree)."""
    model = make_prefix_model(arch, 2)
    r = rows(model)[0]
    ids = torch.tensor([r])
    end = r.index(model.gist_token_id) + 2
    with torch.no_grad():
        compact = model(ids, torch.ones_like(ids)).logits[0]
        model.positions = "original"
        original = model(ids, torch.ones_like(ids)).logits[0]
    torch.testing.assert_close(compact[:end], original[:end], atol=1e-5, rtol=0)
    assert (compact[end:] - original[end:]).abs().max() > 1e-4  # the cache path agrees within 1e-6


def test_gradients_reach_the_gist_through_the_kept_keys():
    """The gist embedding reaches the answer only through pass 1's kept keys/values: its gradient is nonzero,
    and the loss on the labels equals the forward's own cross-entropy."""
    model = make_prefix_model("llama", 2).train()
    ids, mask = left_padded(rows(model))
    labels = ids.masked_fill((mask == 0) | (ids == model.gist_token_id), -100)
    out = model(ids, mask, labels=labels)
    out.loss.backward()
    assert model.gist_embedding.grad is not None and model.gist_embedding.grad.abs().sum() > 0
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted)


def test_attention_maps_are_refused():
    model = make_prefix_model("llama", 2)
    ids = torch.tensor([rows(model)[0]])
    with pytest.raises(GistError, match="two passes"):
        model(ids, torch.ones_like(ids), output_attentions=True)


def test_config_records_the_positions():
    """New runs default to compact; a prefix-mask run from before the layouts existed reads as original; the
    paper's mask has no prefix, so it is always compact; an unknown layout is refused."""
    assert GistConfig().positions == "compact"
    assert GistConfig.from_dict({"mask": "prefix"}).positions == "original"
    assert GistConfig.from_dict({}).positions == "compact"  # paper mask
    assert GistConfig(mask="paper", positions="original").positions == "compact"
    with pytest.raises(GistError, match="unknown --positions 'sideways'"):
        GistConfig(positions="sideways")


@pytest.fixture(scope="module")
def compact_and_original_runs(tmp_path_factory, tiny_model_dir):
    """Two tiny LoRA runs, trained a few steps in each layout from the same seed (trained: not make_tiny_run's)."""
    base = tmp_path_factory.mktemp("positions")
    out = {}
    for positions in ("compact", "original"):
        config = TrainConfig(out=str(base / positions), model=str(tiny_model_dir), preset="smoke", max_steps=3,
                             num_gist_tokens=1, positions=positions, max_examples=16, eval_examples=4,
                             batch_size=4, lr=1e-2)
        metrics = train(config, show_progress=False)
        assert metrics["positions"] == positions
        out[positions] = base / positions
    return out


def test_a_run_keeps_its_layout_and_its_caches_say_it(compact_and_original_runs, tmp_path):
    """config.json records the positions; a compact run's cache is a plain prefix (prefix_start 0, context F+N);
    a cache of the other layout is refused by name."""
    runs = compact_and_original_runs
    for positions in ("compact", "original"):
        saved = json.loads((runs[positions] / "config.json").read_text())["gist"]
        assert saved["positions"] == positions
    compact, original = load_run(runs["compact"]), load_run(runs["original"])
    assert (compact.positions, original.positions) == ("compact", "original")
    cache = load_cache(save_cache(compress(compact, INSTRUCTIONS[1]), tmp_path / "c.safetensors"), compact)
    F = compact.num_prefix_tokens
    assert F > 0 and (cache.positions, cache.prefix_start, cache.context_used) == ("compact", 0, F + 1)
    with pytest.raises(GistError, match="trained in the 'compact' positions, this run was trained in the 'original'"):
        load_cache(tmp_path / "c.safetensors", original)


def test_cli_refuses_an_unknown_layout(tmp_path):
    from gistcache.cli.main import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--positions", "sideways"])
    assert result.exit_code == 2 and "unknown --positions 'sideways'" in result.output
    assert not (tmp_path / "r").exists()
