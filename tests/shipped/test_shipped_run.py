"""The gist runs shipped in the package for the default model: their files, the default's fit, recipe and\nanswers, short and long."""

import json

import pytest
from typer.testing import CliRunner

from gistcache.cache import load_cache, save_cache
from gistcache.cli.main import app
from gistcache.inference.compression import compress
from gistcache.inference.generation import generate, generate_masked
from gistcache.model import load_run
from gistcache.run import DEFAULT_RUN, LONG_RUN, PRETRAINED_DIR, run_fingerprint

pytestmark = pytest.mark.slow
SHIPPED = PRETRAINED_DIR / DEFAULT_RUN
DEMO = "Name the capital city of the given country. Answer with the city name only."
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return load_run()  # no folder named: the shipped run


SHIPPED_RUNS = sorted(p for p in PRETRAINED_DIR.iterdir() if p.is_dir())
# the 30 countries of the demo check (docs/results.md "The shipped run"); an answer counts when it names the capital
CAPITALS = {"France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid",
            "Portugal": "Lisbon", "Greece": "Athens", "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing",
            "India": "Delhi", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Bras", "Argentina": "Buenos Aires",
            "Australia": "Canberra", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
            "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Turkey": "Ankara", "Thailand": "Bangkok",
            "South Korea": "Seoul", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Denmark": "Copenhagen"}


@pytest.mark.parametrize("run", SHIPPED_RUNS, ids=lambda p: p.name)
def test_shipped_files_are_small_and_complete(run):
    """Each shipped run is LoRA or gist-only (never full weights), at most 20 MB, with a card naming its command."""
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "gist_embedding.safetensors", "tokenizer", "README.md", "metrics.json"} <= names
    assert "model.safetensors" not in names
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    gist = json.loads((run / "config.json").read_text())["gist"]
    assert gist["tune"] in ("lora", "gist") and gist["model"] == "smollm2-135m"
    card = (run / "README.md").read_text()
    assert "gist train" in card and "--decoder base" in card and "retention" in card


def test_default_run_grows_with_the_prompt_and_the_earlier_one_still_ships():
    """The default run puts a gist token after every 64 instruction tokens and records the prompt lengths it
    trained on; the earlier one-gist run ships beside it and `--run smollm2-135m-gist1` names it."""
    from gistcache.run import read_run_config, resolve_run_dir

    gist = read_run_config(None)["gist"]
    assert gist["gist_every"] == 64 and gist["num_gist_tokens"] == 1
    assert gist["trained_prompt_tokens"][1] >= 1024
    assert resolve_run_dir("smollm2-135m-gist1") == PRETRAINED_DIR / "smollm2-135m-gist1"
    assert not read_run_config("smollm2-135m-gist1")["gist"].get("gist_every")


def test_shipped_run_is_the_shipped_preset():
    """The default run's recipe is `--preset shipped`, field for field, so the preset the README leads with is
    the recipe whose fidelity the card measures. Fields added after the run was trained (raw_tail, chunk_attention)
    are not in its config, and the preset leaves them at their defaults: what the run did."""
    from dataclasses import fields

    from gistcache.train.config import TrainConfig

    where = {"out", "data", "eval_data", "exclude_data", "preset", "save_every", "resume", "overwrite"}
    recorded = json.loads((SHIPPED / "config.json").read_text())["train"]
    preset = TrainConfig(out="RUN", preset="shipped").to_dict()
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert set(recorded) <= set(preset) and set(preset) - set(recorded) == {"raw_tail", "chunk_attention"}
    recorded = {**{k: defaults[k] for k in set(preset) - set(recorded)}, **recorded}
    assert {k: v for k, v in recorded.items() if k not in where} == {k: v for k, v in preset.items() if k not in where}


def test_shipped_run_fits_the_installed_base_model(model):
    """load_run refuses a base model with another fingerprint; here it loads, with the run's identity."""
    config = json.loads((SHIPPED / "config.json").read_text())
    assert model.base_fingerprint == config["base_fingerprint"]
    assert model.run_fingerprint == run_fingerprint(SHIPPED)
    assert model.mask == config["gist"]["mask"]


def test_demo_cache_file_equals_the_masked_definition(model, tmp_path):
    """The demo's instruction, compressed to one gist token, saved and loaded, decodes exactly what the run's
    masked forward decodes; over the 30 countries of the demo check the cache names at least 10 capitals (the
    base model reading the full prompt names 16, the shipped run 12, the earlier one-gist run 15: a broken run
    names none)."""
    cache = load_cache(save_cache(compress(model, DEMO), tmp_path / "demo.safetensors"), model)
    assert cache.num_gist_tokens == 1 and cache.num_prompt_tokens > 20
    countries = list(CAPITALS)
    answers = generate(model, cache, countries[:3], max_new_tokens=12)
    assert answers == generate_masked(model, [DEMO] * 3, countries[:3], max_new_tokens=12)
    answers = generate(model, cache, countries, max_new_tokens=16)
    named = [c for c, a in zip(countries, answers) if CAPITALS[c].lower() in a.lower()]
    assert len(named) >= 10, list(zip(countries, answers))


def test_long_prompt_cache_grows_and_equals_the_masked_definition(model):
    """A prompt of several hundred tokens compresses, with the default run, to one gist slot per 64 instruction
    tokens, and the cache decodes what the masked forward decodes."""
    rule = ("Rewrite the given word by the rule shown in the examples: reverse its letters and put a dash "
            "between them.\n")
    shots = "".join(f"Example {i}: {w} -> {'-'.join(reversed(w))}\n"
                    for i, w in enumerate(["table", "river", "stone", "candle", "garden", "planet", "silver", "window",
                                           "market", "forest", "bridge", "castle", "engine", "flower", "guitar",
                                           "harbor", "island", "jacket", "kitten", "ladder"] * 2))
    prompt = rule + shots
    cache = compress(model, prompt)
    instruction_tokens = cache.num_prompt_tokens - cache.key_start
    assert instruction_tokens > 256
    assert cache.num_gist_tokens == -(-instruction_tokens // 64)
    inputs = ["yellow", "orange"]
    assert generate(model, cache, inputs, max_new_tokens=10) == generate_masked(model, [prompt] * 2, inputs,
                                                                               max_new_tokens=10)


def test_cli_uses_the_shipped_run_by_default(tmp_path):
    """`gist compress "<prompt>"` with no --run compresses with the shipped run."""
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["compress", DEMO, "--out", str(out), "--store", str(tmp_path / "store"), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output[result.output.index("{"):])
    assert out.is_file() and row["gist_tokens"] == 1 and row["run"] == DEFAULT_RUN


def test_long_run_is_the_shipped_preset_on_data_without_the_tuning_tasks():
    """The long-prompt run is `--preset shipped`, field for field, on make ship-run's five files (built with the
    LONG_TUNE tasks also left out, `make ship-long-run`), with the default run's ratio."""
    where = {"out", "data", "eval_data", "exclude_data", "preset", "save_every", "resume", "overwrite"}
    config = json.loads((PRETRAINED_DIR / LONG_RUN / "config.json").read_text())
    default = json.loads((SHIPPED / "config.json").read_text())
    from gistcache.train.config import TrainConfig

    preset = TrainConfig(out="RUN", preset="shipped").to_dict()
    assert {k: v for k, v in config["train"].items() if k not in where} == {
        k: v for k, v in preset.items() if k not in where}
    names = [p.rsplit("/", 1)[-1] for p in config["train"]["data"]]
    assert names == [p.rsplit("/", 1)[-1] for p in default["train"]["data"]]
    assert config["gist"]["gist_every"] == default["gist"]["gist_every"] == 64
    assert config["gist"]["num_gist_tokens"] == 1 and config["gist"]["decoder"] == "base"
    assert config["gist"]["trained_prompt_tokens"][1] >= 1024
    assert config["base_fingerprint"] == default["base_fingerprint"]


def test_cli_compresses_a_long_prompt_with_the_long_run_and_its_cache_finds_it_again(tmp_path):
    """With no --run, `gist compress` of an instruction of more than 128 tokens uses the long-prompt run (one gist
    slot per 64 tokens); `gist generate --cache` with no --run reads that file with the run that made it, and
    `gist generate --prompt` with no --run takes the same run for the same instruction."""
    prompt = "Sort the letters of the given word alphabetically.\n" + "".join(
        f"Example {i}: {w} -> {''.join(sorted(w))}\n" for i, w in enumerate(
            ["table", "river", "stone", "candle", "garden", "planet", "silver", "window", "market", "forest",
             "bridge", "castle", "engine", "flower", "guitar", "harbor", "island", "jacket"]))
    out, store = tmp_path / "long.safetensors", str(tmp_path / "store")
    result = runner.invoke(app, ["compress", prompt, "--out", str(out), "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output[result.output.index("{"):])
    assert row["run"] == LONG_RUN
    long = load_run(LONG_RUN)
    cache = load_cache(out, long)  # refuses a cache of another run
    instruction_tokens = cache.num_prompt_tokens - cache.key_start
    assert instruction_tokens > 128 and row["gist_tokens"] == -(-instruction_tokens // 64)
    result = runner.invoke(app, ["generate", "--cache", str(out), "--input", "yellow", "--max-new-tokens", "8",
                                 "--json", "--store", store])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output[result.output.index("["):])[0]["output"]
    assert answer == generate(long, cache, ["yellow"], max_new_tokens=8)[0]
    result = runner.invoke(app, ["generate", "--prompt", prompt, "--input", "yellow", "--max-new-tokens", "8",
                                 "--json", "--store", store])  # the prompt itself: the long run again, a store hit
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("["):])[0]["output"] == answer
