"""`gist export` (issue 14): a run as a Hugging Face folder, and the request layout a server builds from it.

Everything here runs without vLLM: the exported folder loads in AutoModelForCausalLM with the run's
merged weights, and a stock transformers model continuing the slots of `served_kv` from the ids of
`request_ids` (the connector's layout) gives `gist generate`'s tokens.
"""

import json

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cache import save_cache, stack_layers
from gistcache.cli import export_cmd
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate_ids
from gistcache.model import GistModel, cache_kwarg
from gistcache.serving.export import (EXPORT_FILE, GIST_DIR, PREFIX_FILE, check_served_cache, export_run, load_exported,
                                      read_export, read_prefix_kv, request_ids, served_kv)

PROMPTS = ["Reverse the word", "Uppercase every letter of the text"]
INPUTS = ["stone", "abc de"]
runner = CliRunner()


@pytest.fixture(scope="module", params=["compact", "original", "chunked"])
def lora_run(request, make_tiny_run, tmp_path_factory):
    """A LoRA prefix-mask run in each position layout ("original": the prefix keys move to prefix_start = F - P;
    "chunked": compact, with gist tokens after every 4 instruction tokens, so each prompt has its own M): a folder
    of its own, its config edited."""
    run = make_tiny_run(path=tmp_path_factory.mktemp("export") / "run", tune="lora", **tiny.NUDGED)
    config = json.loads((run / "config.json").read_text())
    config["gist"]["positions"] = "compact" if request.param == "chunked" else request.param
    config["gist"]["gist_every"] = 4 if request.param == "chunked" else 0
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-out") / "hf"
    export_run(lora_run, out)
    return out


def test_export_is_a_hf_folder_with_the_merged_weights(lora_run, exported):
    """AutoModelForCausalLM on the folder gives the run's merged model's logits (float32, exact), and the folder
    records what it serves."""
    run_model = GistModel.from_pretrained(lora_run)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run_model.model(ids).logits, atol=0, rtol=0)
    info = read_export(exported)
    assert info.identity.run_fingerprint == run_model.run_fingerprint
    assert (info.num_prefix_tokens, info.num_gist_tokens) == (run_model.num_prefix_tokens, 2)
    assert info.num_prefix_tokens > 0 and (exported / GIST_DIR / PREFIX_FILE).is_file()
    assert (exported / "tokenizer.json").is_file() and (exported / GIST_DIR / "gist_embedding.safetensors").is_file()
    assert [p.name for p in exported.glob("*.safetensors")] == ["model.safetensors"]  # engines load every top file


def test_exported_model_compresses_the_runs_caches(lora_run, exported):
    """load_exported(DIR) is the run: its caches equal the run's and fit it."""
    run_model, served = GistModel.from_pretrained(lora_run), load_exported(exported)
    ours, theirs = compress(run_model, PROMPTS), compress(served, PROMPTS)
    for a, b in zip(ours, theirs):
        assert (a.run_fingerprint, a.base_fingerprint) == (b.run_fingerprint, b.base_fingerprint)
        for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert generate_ids(run_model, theirs, INPUTS, max_new_tokens=6) == generate_ids(run_model, ours, INPUTS,
                                                                                      max_new_tokens=6)


def test_served_slots_are_stack_layers(lora_run, exported):
    """The connector's slots (exported prefix turned to prefix_start, then the gist) equal stack_layers'."""
    model = GistModel.from_pretrained(lora_run)
    info = read_export(exported)
    prefix, inv_freq = read_prefix_kv(exported, info)
    for cache in compress(model, PROMPTS):
        check_served_cache(info, cache)
        assert (cache.prefix_start < 0) == (model.positions == "original")
        for (k, v), (sk, sv) in zip(served_kv(cache, prefix, inv_freq), stack_layers(model, [cache], "cpu")):
            assert k.shape == (1, info.kv_heads, cache.offset, info.head_dim)  # F + M slots (M = N for one chunk)
            assert cache.offset == info.num_cached or model.gist_every
            torch.testing.assert_close(k, sk, atol=1e-6, rtol=0)
            torch.testing.assert_close(v, sv, atol=1e-6, rtol=0)


def test_request_layout_gives_gist_generate_tokens(lora_run, exported):
    """A stock model over the served slots, fed request_ids with no position ids (what the engine runs), greedy-decodes
    the tokens `gist generate` gives."""
    model = GistModel.from_pretrained(lora_run)
    info = read_export(exported)
    prefix, inv_freq = read_prefix_kv(exported, info)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    for cache in compress(model, PROMPTS):
        for text in INPUTS:
            expected = generate_ids(model, cache, text, max_new_tokens=8, **GREEDY)[0]
            ids = torch.tensor([request_ids(model.tokenizer, info.identity.template, cache, text)])
            assert ids.shape[1] > cache.offset and ids[0, :cache.offset].eq(0).all()
            past = DynamicCache(ddp_cache_data=served_kv(cache, prefix, inv_freq), config=hf.config)
            out = hf.generate(input_ids=ids, max_new_tokens=8, eos_token_id=model.tokenizer.eos_token_id,
                              suppress_tokens=[model.gist_token_id] if model.gist_token_id < 260 else None,
                              **{cache_kwarg(hf): past}, **GREEDY)
            got = out[0, ids.shape[1]:].tolist()
            eos = model.tokenizer.eos_token_id
            assert (got[:got.index(eos) + 1] if eos in got else got) == expected, (cache.prompt_preview, text)


def test_foreign_caches_and_folders_are_refused(lora_run, exported, make_tiny_run, tmp_path):
    """A cache of another run is refused by name; a folder with other files is not overwritten; a non-export is
    named."""
    other = GistModel.from_pretrained(make_tiny_run(**tiny.NUDGED))
    info = read_export(exported)
    with pytest.raises(GistError, match="cache x was made .*(another run|positions|one chunk)"):
        check_served_cache(info, compress(other, PROMPTS[0]), source="cache x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(GistError, match="not a gist export"):
        export_run(lora_run, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep"
    with pytest.raises(GistError, match="is not a gist export"):
        read_export(tmp_path)
    data = json.loads((exported / EXPORT_FILE).read_text())
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / EXPORT_FILE).write_text(json.dumps({**data, "num_layers": None, "identity": {}}))
    with pytest.raises(GistError, match="damaged"):
        read_export(tmp_path / "damaged")


def test_export_command(lora_run, tmp_path):
    """`gist export --run RUN --out DIR --json` writes the folder and prints what it serves; a bad --out is one line."""
    app = typer.Typer()
    app.command()(export_cmd.export)
    result = runner.invoke(app, ["--run", str(lora_run), "--out", str(tmp_path / "hf"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["num_gist_tokens"] == 2 and (tmp_path / "hf" / EXPORT_FILE).is_file()
    save_cache(compress(GistModel.from_pretrained(lora_run), PROMPTS[0]), tmp_path / "c.safetensors")
    one_line_error(runner.invoke(app, ["--run", str(lora_run), "--out", str(tmp_path / "c.safetensors")]), "is a file")


def test_a_store_entry_under_another_key_is_not_served(lora_run, exported, tmp_path):
    """An entry copied under another prompt's key is refused by the request resolver, not served for that key."""
    from gistcache.store import CacheStore, key_of
    from gistcache.vllm.requests import CacheResolver

    model = GistModel.from_pretrained(lora_run)
    store = CacheStore(tmp_path / "store")
    store.claim()
    first, second = compress(model, PROMPTS[0]), compress(model, PROMPTS[1])
    store.put(first)
    store.put(second)
    resolver = CacheResolver(read_export(exported), store)
    cache, key, _ = resolver(key_of(first))
    assert key == key_of(first)
    store.path_for(key_of(second)).write_bytes(store.path_for(key_of(first)).read_bytes())  # copied under the wrong key
    with pytest.raises(GistError, match="holds the cache of key .*not its own"):
        resolver(key_of(second))


def test_a_store_entry_keyed_before_the_dtype_is_served_under_its_key(lora_run, exported, tmp_path):
    """A store kept since before its keys named the dtype: the request resolver serves the entry its old key names
    (it holds that prompt's cache) under the key that names the dtype, and still refuses another prompt's file."""
    from gistcache.store import CacheStore, key_of, legacy_key_of
    from gistcache.vllm.requests import CacheResolver

    model = GistModel.from_pretrained(lora_run)
    store = CacheStore(tmp_path / "store")
    store.claim()
    first, second = compress(model, PROMPTS[0]), compress(model, PROMPTS[1])

    save_cache(first, store.path_for(legacy_key_of(first)))
    resolver = CacheResolver(read_export(exported), store)
    cache, key, _ = resolver(legacy_key_of(first))
    assert key == key_of(first) != legacy_key_of(first) and cache.prompt_sha256 == first.prompt_sha256
    save_cache(first, store.path_for(legacy_key_of(second)))  # another prompt's cache under an old key
    with pytest.raises(GistError, match="holds the cache of key .*not its own"):
        resolver(legacy_key_of(second))
