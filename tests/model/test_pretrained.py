"""The run life cycle (issue 13): from_pretrained / save_pretrained, dtype-native fingerprints, refusals, CLI decoding."""

import json
from unittest import mock

import pytest
import torch
from transformers import GenerationConfig
from typer.testing import CliRunner

import gistcache
import tiny
from clitools import one_line_error
from gistcache import run as run_module
from gistcache.cli.main import app
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate_ids
from gistcache.model import GistModel, fingerprint_model, load_base_model, load_run, load_tokenizer
from gistcache.run import run_fingerprint

runner = CliRunner()
PROMPT = "Reverse the word you are given"


class Loads:
    """Records the dtype of every base model load that goes through gistcache.model.load."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, spec, **kwargs):
        self.dtypes.append(kwargs.get("dtype"))
        return load_base_model(spec, **kwargs)


def test_from_pretrained_knows_its_run(make_tiny_run):
    """gist_config, run_dir and run_fingerprint are fields; load_run (also gistcache.load_run) is the same load."""
    run = make_tiny_run(**tiny.NUDGED)
    model = GistModel.from_pretrained(run)
    assert model.gist_config == GistConfig.from_dict(run_module.read_run_config(run)["gist"])
    assert model.run_dir == run and model.run_fingerprint == run_fingerprint(run)
    assert model.base_fingerprint == run_module.read_run_config(run)["base_fingerprint"]
    assert gistcache.load_run is load_run and "GistModel" in gistcache.__all__
    again = load_run(run)
    assert torch.equal(again.gist_embedding, model.gist_embedding) and again.run_fingerprint == model.run_fingerprint
    with pytest.raises(GistError, match="--device 'bogus' is not a device"):
        load_run(run, device="bogus")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_once_in_its_dtype(make_tiny_run, dtype):
    """A run that records its dtype fingerprints loads its base once, in that dtype (no float32 copy); an older
    run without them is checked once against float32; float32 loads once either way."""
    new, old = make_tiny_run(**tiny.NUDGED), make_tiny_run(**{**tiny.NUDGED, "dtype_prints": False})
    for run, expected in ((new, [dtype]), (old, [dtype, torch.float32]), (new, [torch.float32])):
        loads = Loads()
        with mock.patch("gistcache.model.load.load_base_model", loads):  # where from_pretrained loads the base
            model = GistModel.from_pretrained(run, dtype=expected[0])
        assert loads.dtypes == expected and model.model.dtype == expected[0]
        assert model.base_fingerprint == run_module.read_run_config(run)["base_fingerprint"]


def test_fingerprint_in_the_weights_own_dtype(tiny_model_dir, tmp_path):
    """Float32 weights keep today's value; cast weights equal `as_dtype`; a bfloat16 checkpoint has one value in both dtypes."""
    base = load_base_model(str(tiny_model_dir))
    fp32 = fingerprint_model(base)
    assert fingerprint_model(base.to(torch.bfloat16)) == fingerprint_model(load_base_model(str(tiny_model_dir)),
                                                                           as_dtype=torch.bfloat16) != fp32
    stored = tmp_path / "bf16"
    load_base_model(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(stored)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(stored)
    assert fingerprint_model(load_base_model(str(stored))) == fingerprint_model(
        load_base_model(str(stored), dtype=torch.bfloat16))


def test_bad_runs_are_refused_in_one_line(make_tiny_run, tmp_path):
    """Not a run, a missing base model, other base weights: a GistError in Python, one line and exit 2 at the CLI,
    nothing written."""
    missing = make_tiny_run(path=tmp_path / "missing", model=str(tmp_path / "no-such-model"), **tiny.NUDGED)
    other = make_tiny_run(path=tmp_path / "other", **tiny.NUDGED)
    other_base = tiny.save_model_folder(tmp_path / "model-b", "llama", seed=1)
    config = run_module.read_run_config(other)
    config["gist"]["model"] = str(other_base)
    (other / "config.json").write_text(__import__("json").dumps(config))
    cases = [(tmp_path, "is not a gist run"), (missing, "cannot load model"),
             (other, "is not the one run")]
    for run, message in cases:
        with pytest.raises(GistError, match=message):
            GistModel.from_pretrained(run)
        store = tmp_path / f"store-{run.name}"
        one_line_error(runner.invoke(app, ["compress", PROMPT, "--run", str(run), "--store", str(store)]), message)
        assert not store.exists()


def test_save_pretrained_round_trip(make_tiny_run, tmp_path):
    """A LoRA run loaded with merge=False saves a run that loads to the same model; a merged one is refused."""
    run = make_tiny_run(path=tmp_path / "lora", tune="lora", **tiny.NUDGED)
    (run / "README.md").write_text("# card\n")
    unmerged = GistModel.from_pretrained(run, merge=False)
    out = unmerged.save_pretrained(tmp_path / "copy")
    assert (out / "README.md").read_text() == "# card\n"
    assert run_module.read_run_config(out)["base_fingerprints"] == run_module.read_run_config(run)["base_fingerprints"]
    first, second = GistModel.from_pretrained(run), GistModel.from_pretrained(out)
    assert first.run_fingerprint == second.run_fingerprint
    cache = compress(first, PROMPT)
    assert generate_ids(first, cache, "stone", max_new_tokens=6) == generate_ids(second, cache, "stone", max_new_tokens=6)
    with pytest.raises(GistError, match="merged into its weights .*merge=False"):
        first.save_pretrained(tmp_path / "merged")
    with pytest.raises(GistError, match="is the run this model was loaded from"):
        unmerged.save_pretrained(run)
    with pytest.raises(GistError, match="needs a model that knows its run"):
        GistModel(first.model, first.tokenizer, 2).save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "bare").exists()


def test_flash_attention_is_refused_for_the_gist_mask(tiny_model_dir):
    """Attention that ignores a 4D mask is refused for training loads and for every masked forward."""
    with pytest.raises(GistError, match="'flash_attention_2' ignores the 4D gist mask"):
        load_base_model(str(tiny_model_dir), attn_implementation="flash_attention_2", for_training=True)
    model = GistModel(load_base_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), 1)
    model.model.config._attn_implementation = "flash_attention_2"
    ids = torch.tensor([[5, 6, model.gist_token_id, 7]])
    with pytest.raises(GistError, match="ignores the 4D gist mask"):
        model(ids, torch.ones_like(ids))


def test_cli_decodes_greedily_whatever_the_model_suggests(tmp_path):
    """`gist generate` decodes greedily even where the base model's generation_config asks otherwise: on a base whose
    generation_config forbids any repeated token, its answer is the greedy one, which repeats tokens."""
    base = tiny.save_model_folder(tmp_path / "base", "llama")
    GenerationConfig(no_repeat_ngram_size=1, bos_token_id=0, eos_token_id=3, pad_token_id=1).save_pretrained(base)
    run = tmp_path / "run"
    tiny.save_run_folder(base, run, tune="lora", **tiny.NUDGED)
    model = GistModel.from_pretrained(run)
    assert model.model.generation_config.no_repeat_ngram_size == 1
    cache = compress(model, PROMPT)
    greedy = generate_ids(model, cache, "stone", max_new_tokens=128, **GREEDY)[0]
    suggested = generate_ids(model, cache, "stone", max_new_tokens=128)[0]
    assert len(set(greedy)) < len(greedy) and len(set(suggested)) == len(suggested)
    answer = model.tokenizer.decode(greedy, skip_special_tokens=True)
    assert answer != model.tokenizer.decode(suggested, skip_special_tokens=True)
    result = runner.invoke(app, ["generate", "--run", str(run), "--prompt", PROMPT, "--input", "stone",
                                 "--store", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"input": "stone", "output": answer}]
