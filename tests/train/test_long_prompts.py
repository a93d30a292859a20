"""Training and compressing long prompts: token-budget batches, the trained range a run records, the warning past it."""

import json

import pytest
import torch

from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import untrained_length_warning
from gistcache.train.config import TrainConfig
from gistcache.train.data import TokenBudgetBatches


def test_token_budget_batches_cover_every_row_once_under_the_budget():
    """Every row once per epoch; each batch at most batch_size rows and batch_tokens padded tokens (a row longer
    than the budget alone); the same (seed, epoch) gives the same batches, another epoch others."""
    lengths = [(i * 37) % 900 + 20 for i in range(300)]
    batches = TokenBudgetBatches(lengths, batch_size=8, batch_tokens=2000, seed=3)
    first = list(batches)
    assert sorted(i for b in first for i in b) == list(range(300))
    for b in first:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 2000
    assert len(batches) == len(first) and list(batches) == first
    batches.sampler.set_epoch(1)
    assert list(batches) != first
    long_row = TokenBudgetBatches([10, 5000, 12], batch_size=4, batch_tokens=100, seed=0)
    assert sorted(map(len, long_row)) == [1, 2]


def test_batch_tokens_and_gist_every_refusals(tmp_path):
    """--batch-tokens below 0 and --gist-every longer than --max-length: one line each."""
    with pytest.raises(GistError, match="--batch-tokens must be >= 0"):
        TrainConfig(out=str(tmp_path / "r"), batch_tokens=-1)
    with pytest.raises(GistError, match="--gist-every 600 is longer than --max-length 512"):
        TrainConfig(out=str(tmp_path / "r"), gist_every=600, max_length=512)
    with pytest.raises(GistError, match="--gist-every must be a whole number"):
        TrainConfig(out=str(tmp_path / "r"), gist_every=-4)


class _Run:
    def __init__(self, trained):
        self.gist_config = GistConfig(trained_prompt_tokens=trained)


def test_warning_past_the_trained_range_names_it():
    """A prompt longer than any trained on gets one line naming the range; within it, or unrecorded, none."""
    run = _Run([40, 320])
    assert untrained_length_warning(run, [100, 320]) is None
    line = untrained_length_warning(run, [500])
    assert "\n" not in line and "500 tokens" in line and "40-320 tokens" in line
    assert "1 of 2 prompts" in untrained_length_warning(run, [500, 30])
    assert untrained_length_warning(_Run(None), [5000]) is None
    with pytest.raises(GistError, match="trained_prompt_tokens"):
        GistConfig(trained_prompt_tokens=[1])
    assert json.loads(json.dumps(GistConfig(trained_prompt_tokens=[1, 2]).to_dict()))["trained_prompt_tokens"] == [1, 2]


@pytest.fixture(scope="module")
def chunked_run(tmp_path_factory, tiny_model_dir):
    """A tiny --decoder base run with gist tokens every 8 instruction tokens, trained a few steps through the CLI
    on the built-in set in token-budget batches (trained: not make_tiny_run's)."""
    from typer.testing import CliRunner

    from gistcache.cli.main import app

    out = tmp_path_factory.mktemp("chunked") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--model", str(tiny_model_dir), "--preset", "smoke",
                                      "--max-steps", "3", "--max-examples", "24", "--eval-examples", "4",
                                      "--gist-every", "8", "--decoder", "base", "--batch-tokens", "400",
                                      "--lora-r", "4", "--lora-alpha", "8"])
    assert result.exit_code == 0, result.output
    return out


def test_chunked_run_records_its_ratio_and_range_and_generates(chunked_run, tmp_path):
    """The run's config names K and the trained range; a saved cache of a long prompt has M = N * ceil(P / K) slots
    and greedy generation from it equals the run's masked definition (the base decoder reading it)."""
    from gistcache.cache import load_cache, save_cache
    from gistcache.inference.compression import compress
    from gistcache.inference.generation import generate_ids, generate_masked_ids
    from gistcache.model import load_run

    config = json.loads((chunked_run / "config.json").read_text())["gist"]
    assert config["gist_every"] == 8 and config["decoder"] == "base"
    low, high = config["trained_prompt_tokens"]
    assert 0 < low <= high
    model = load_run(str(chunked_run))
    instructions = ["Reverse the letters of the word you are given, then say it twice.", "Add one."]
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, instructions))]
    F = model.num_prefix_tokens
    assert [c.num_gist_tokens for c in caches] == [-(-(c.num_prompt_tokens - F) // 8) for c in caches]
    inputs = ["stone", "41"]
    assert generate_ids(model, caches, inputs, max_new_tokens=6) == generate_masked_ids(model, instructions, inputs,
                                                                                          max_new_tokens=6)


def test_compress_warns_past_the_trained_range(chunked_run, tmp_path):
    """`gist compress` of a prompt longer than the run was trained on prints one warning line and still writes."""
    from typer.testing import CliRunner

    from gistcache.cli.main import app

    config = json.loads((chunked_run / "config.json").read_text())["gist"]
    longest = config["trained_prompt_tokens"][1]
    out = tmp_path / "long.safetensors"
    result = CliRunner().invoke(app, ["compress", "x" * (longest + 10), "--run", str(chunked_run),
                                      "--out", str(out), "--store", str(tmp_path / "store"), "--json"])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and f"-{longest} tokens" in warned[0]


def test_init_from_a_run_takes_its_gist_and_adapter_and_refuses_another_shape(chunked_run, tmp_path):
    """--init-from: the new model starts with the run's gist embedding and LoRA weights; another LoRA rank is refused
    by name."""
    import torch
    from safetensors.torch import load_file

    from gistcache.model import GistModel, fingerprint_model, load_base_model, load_tokenizer
    from gistcache.train.tuning import init_from_run, wrap_for_tuning

    config = json.loads((chunked_run / "config.json").read_text())
    model_dir = config["gist"]["model"]

    def fresh(lora_r):
        cfg = TrainConfig(out=str(tmp_path / f"r{lora_r}"), model=model_dir, lora_r=lora_r, lora_alpha=8,
                          gist_every=8, decoder="base")
        base = load_base_model(model_dir)
        fp = fingerprint_model(base)  # before the adapter goes in, as training takes it
        gm = GistModel(wrap_for_tuning(base, cfg), load_tokenizer(model_dir), 1, mask="prefix", decoder="base",
                       gist_every=8)
        return gm, cfg, fp

    gm, cfg, fp = fresh(4)
    init_from_run(gm, str(chunked_run), cfg, fp)
    assert torch.equal(gm.gist_embedding.data, load_file(chunked_run / "gist_embedding.safetensors")["gist_embedding"])
    saved = load_file(chunked_run / "adapter_model.safetensors")
    state = {k: v for k, v in gm.model.state_dict().items() if "lora_B" in k}
    assert state and any(v.abs().sum() > 0 for v in state.values())  # a fresh adapter's B is all zeros
    assert sum(v.numel() for k, v in saved.items() if "lora_B" in k) == sum(v.numel() for v in state.values())
    gm8, cfg8, fp8 = fresh(8)
    with pytest.raises(GistError, match="that run has lora_r 4, this one 8"):
        init_from_run(gm8, str(chunked_run), cfg8, fp8)


def test_raw_tail_run_trains_records_its_tail_and_generates(tiny_model_dir, tmp_path):
    """`gist train --gist-every 8 --raw-tail 6` through the CLI: config and card name the tail; a saved cache holds
    M + t slots and greedy generation from it equals the run's masked definition (the base decoder reading it)."""
    from typer.testing import CliRunner

    from gistcache.cache import load_cache, save_cache
    from gistcache.cli.main import app
    from gistcache.inference.compression import compress
    from gistcache.inference.generation import generate_ids, generate_masked_ids
    from gistcache.masks import raw_tail_length
    from gistcache.model import load_run

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--model", str(tiny_model_dir), "--preset", "smoke",
                                      "--max-steps", "2", "--max-examples", "16", "--eval-examples", "4",
                                      "--gist-every", "8", "--raw-tail", "6", "--decoder", "base",
                                      "--lora-r", "4", "--lora-alpha", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["gist"]["raw_tail"] == 6
    assert "the last min(6, P - 8) tokens kept raw" in (out / "README.md").read_text()
    model = load_run(str(out))
    instructions = ["Reverse the letters of the word you are given, then say it twice.", "Add one."]
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model)
              for i, c in enumerate(compress(model, instructions))]
    F = model.num_prefix_tokens
    tails = [raw_tail_length(c.num_prompt_tokens - F, 8, 6) for c in caches]
    assert tails[0] == 6
    assert [c.num_gist_tokens for c in caches] == [-(-(c.num_prompt_tokens - F - t) // 8) + t
                                                   for c, t in zip(caches, tails)]
    inputs = ["stone", "41"]
    assert generate_ids(model, caches, inputs, max_new_tokens=6) == generate_masked_ids(model, instructions, inputs,
                                                                                          max_new_tokens=6)


@pytest.mark.parametrize("flags,message", [
    (["--raw-tail", "6"], "--raw-tail needs --gist-every"),
    (["--gist-every", "8", "--raw-tail", "-1"], "--raw-tail must be a whole"),
    (["--chunk-attention", "local"], "--chunk-attention local needs --gist-every"),
    (["--gist-every", "8", "--chunk-attention", "beacon"], "unknown --chunk-attention 'beacon'"),
])
def test_chunk_flag_refusals_in_the_cli(tmp_path, flags, message):
    """--raw-tail or --chunk-attention local without --gist-every, a raw tail below 0, an unknown chunk structure:
    one line, exit code 2, no run folder."""
    from typer.testing import CliRunner

    from gistcache.cli.main import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--preset", "smoke", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_chunk_local_run_trains_records_its_structure_and_generates(tiny_model_dir, tmp_path):
    """`gist train --gist-every 8 --chunk-attention local` through the CLI: config and card name the structure; the
    loaded run compresses under it (the cache differs from the same weights read causally) and greedy generation
    from a saved cache equals the run's masked definition."""
    from typer.testing import CliRunner

    from gistcache.cache import load_cache, save_cache
    from gistcache.cli.main import app
    from gistcache.inference.compression import compress
    from gistcache.inference.generation import generate_ids, generate_masked_ids
    from gistcache.model import load_run

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--model", str(tiny_model_dir), "--preset", "smoke",
                                      "--max-steps", "2", "--max-examples", "16", "--eval-examples", "4",
                                      "--gist-every", "8", "--chunk-attention", "local", "--decoder", "base",
                                      "--lora-r", "4", "--lora-alpha", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["gist"]["chunk_attention"] == "local"
    assert "each chunk reads the earlier ones through their gists only)" in (out / "README.md").read_text()
    model = load_run(str(out))
    assert model.chunk_attention == "local"
    instructions = ["Reverse the letters of the word you are given, then say it twice.", "Add one."]
    local = compress(model, instructions)
    model.chunk_attention = "causal"
    causal = compress(model, instructions[0])
    model.chunk_attention = "local"
    assert not torch.equal(local[0].values[-1], causal.values[-1])  # two chunks: the second gist reads differently
    caches = [load_cache(save_cache(c, tmp_path / f"{i}.safetensors"), model) for i, c in enumerate(local)]
    inputs = ["stone", "41"]
    assert generate_ids(model, caches, inputs, max_new_tokens=6) == generate_masked_ids(model, instructions, inputs,
                                                                                          max_new_tokens=6)
