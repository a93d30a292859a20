"""The gist run shipped in the package for the default model: its files, its fit, and the demo's answers."""

import json

import pytest
from typer.testing import CliRunner

from gistcache.cache import load_cache, save_cache
from gistcache.compression import compress
from gistcache.cli.main import app
from gistcache.generation import generate, generate_masked
from gistcache.run import DEFAULT_RUN, PRETRAINED_DIR, load_run, run_fingerprint

pytestmark = pytest.mark.slow
SHIPPED = PRETRAINED_DIR / DEFAULT_RUN
DEMO = "Name the capital city of the given country. Answer with the city name only."
runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return load_run()  # no folder named: the shipped run


def test_shipped_files_are_small_and_complete():
    """The run is LoRA or gist-only (never full weights), at most 20 MB, with a card naming its command."""
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "gist_embedding.safetensors", "tokenizer", "README.md", "metrics.json"} <= names
    assert "model.safetensors" not in names
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    gist = json.loads((SHIPPED / "config.json").read_text())["gist"]
    assert gist["tune"] in ("lora", "gist") and gist["model"] == "smollm2-135m"
    card = (SHIPPED / "README.md").read_text()
    assert "gist train" in card and "--decoder base" in card and "retention" in card


def test_shipped_run_is_the_shipped_preset():
    """The shipped run's recipe is `--preset shipped`, field for field (the run spelled it out in flags before
    the preset existed), so the preset the README leads with is the recipe whose fidelity the card measures."""
    from gistcache.train.config import TrainConfig

    where = {"out", "data", "eval_data", "exclude_data", "preset", "save_every", "resume", "overwrite"}
    recorded = json.loads((SHIPPED / "config.json").read_text())["train"]
    # fields added after the run was trained (gist_every, batch_tokens, init_from) read as their defaults
    shipped = {**TrainConfig(out="RUN").to_dict(), **recorded}
    preset = TrainConfig(out="RUN", preset="shipped").to_dict()
    assert set(TrainConfig(out="RUN").to_dict()) - set(recorded) <= {"gist_every", "batch_tokens", "init_from"}
    assert {k: v for k, v in shipped.items() if k not in where} == {k: v for k, v in preset.items() if k not in where}


def test_shipped_run_fits_the_installed_base_model(model):
    """load_run refuses a base model with another fingerprint; here it loads, with the run's identity."""
    config = json.loads((SHIPPED / "config.json").read_text())
    assert model.base_fingerprint == config["base_fingerprint"]
    assert model.run_fingerprint == run_fingerprint(SHIPPED)
    assert model.mask == config["gist"]["mask"]


def test_demo_cache_file_equals_the_masked_definition(model, tmp_path):
    """The demo's instruction, compressed to one gist token, saved and loaded, decodes exactly what the
    run's masked forward decodes, and names each country's capital as the full prompt does (`make demo`)."""
    cache = load_cache(save_cache(compress(model, DEMO), tmp_path / "demo.safetensors"), model)
    assert cache.num_gist_tokens == 1 and cache.num_prompt_tokens > 20
    answers = generate(model, cache, ["France", "Italy", "Japan"], max_new_tokens=12)
    assert answers == generate_masked(model, [DEMO] * 3, ["France", "Italy", "Japan"], max_new_tokens=12)
    for answer, capital in zip(answers, ["Paris", "Rome", "Tokyo"]):
        assert capital in answer, answers


def test_cli_uses_the_shipped_run_by_default(tmp_path):
    """`gist compress "<prompt>"` with no --run compresses with the shipped run."""
    out = tmp_path / "c.safetensors"
    result = runner.invoke(app, ["compress", DEMO, "--out", str(out), "--store", str(tmp_path / "store"), "--json"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and json.loads(result.output[result.output.index("{"):])["gist_tokens"] == 1
