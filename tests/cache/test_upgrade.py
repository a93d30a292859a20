"""Cache format version 2: its metadata, version 1 files refused with the fix, `gist cache upgrade` in place."""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cache import load_cache, read_cache_metadata, save_cache
from gistcache.cache.upgrade import upgrade_caches
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import generate_ids, generate_masked_ids
from gistcache.model import load_run

runner = CliRunner()
PROMPT = "Reverse the word you are given"


@pytest.fixture(scope="module")
def runs(make_tiny_run):
    """Runs on one tiny Llama: `prefix` and `paper` (mask variants), `other` (another gist embedding)."""
    return {"prefix": make_tiny_run(2, shift=1.0, mask="prefix"), "paper": make_tiny_run(2, shift=1.0, mask="paper"),
            "other": make_tiny_run(2, shift=-1.0, mask="prefix")}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_2_metadata_says_where_the_keys_start(runs, tmp_path):
    """format_version 2, position_free, key_start (the run's fixed prefix), positions and prefix_start (0 in the
    compact positions of a new run)."""
    model = load_run(runs["prefix"])
    cache = compress(model, PROMPT)
    meta = read_cache_metadata(save_cache(cache, tmp_path / "c.safetensors"))
    P, F = cache.num_prompt_tokens, model.num_prefix_tokens
    assert F == 6 and meta["format_version"] == "2" and meta["position_free"] == "true"
    assert (meta["key_start"], meta["prefix_start"], meta["input_position"], meta["positions"]) == (
        str(F), "0", str(F + 2), "compact")
    meta["prefix_start"] = str(F - P)
    save_file(cache.tensors(), str(tmp_path / "altered.safetensors"), metadata=meta)
    with pytest.raises(GistError, match=f"prefix_start {F - P}, which does not fit key_start 6"):
        load_cache(tmp_path / "altered.safetensors")


def test_version_1_is_refused_with_the_fix(runs, tmp_path):
    """A version 1 file is refused in one line that names `gist cache upgrade`, in Python and at the CLI (exit 2)."""
    model = load_run(runs["prefix"])
    path = tiny.write_version_1(compress(model, PROMPT), model, tmp_path / "v1.safetensors")
    with pytest.raises(GistError, match="is a version 1 gist cache .*gist cache upgrade .*v1.safetensors --run RUN"):
        load_cache(path)
    result = invoke("generate", "--run", runs["prefix"], "--cache", path, "--input", "stone")
    one_line_error(result, "gist cache upgrade")


@pytest.mark.parametrize("mask", ["prefix", "paper"])
def test_upgrade_moves_the_keys_in_place(runs, tmp_path, mask):
    """`gist cache upgrade` rewrites a version 1 file as the cache compress makes now (1e-5), which generates
    the masked definition's tokens; a second upgrade leaves the file as it is."""
    model = load_run(runs[mask])
    fresh = compress(model, PROMPT)
    path = tiny.write_version_1(fresh, model, tmp_path / "c.safetensors")
    result = invoke("cache", "upgrade", path, "--run", runs[mask])
    assert result.exit_code == 0, result.output
    assert f"keys moved from position {fresh.num_prompt_tokens} to {model.num_prefix_tokens}" in result.stdout
    upgraded = load_cache(path, model)
    assert upgraded.key_start == fresh.key_start and upgraded.created == fresh.created
    for x, y in zip(upgraded.keys, fresh.keys):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip(upgraded.values, fresh.values))
    assert generate_ids(model, upgraded, "stone", max_new_tokens=8) == generate_masked_ids(
        model, PROMPT, "stone", max_new_tokens=8)
    before = path.read_bytes()
    again = json.loads(invoke("cache", "upgrade", path, "--run", runs[mask], "--json").stdout)
    assert again == [{"path": str(path), "upgraded": False, "moved_from": model.num_prefix_tokens,
                      "moved_to": model.num_prefix_tokens}]
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_upgrade_refuses_before_writing_anything(runs, tmp_path):
    """A file of another run among the files, or a folder that is not a run: one line, exit 2, no file changed."""
    model, other = load_run(runs["prefix"]), load_run(runs["other"])
    mine = tiny.write_version_1(compress(model, PROMPT), model, tmp_path / "mine.safetensors")
    theirs = tiny.write_version_1(compress(other, PROMPT), other, tmp_path / "theirs.safetensors")
    before = mine.read_bytes()
    one_line_error(invoke("cache", "upgrade", mine, theirs, "--run", runs["prefix"]),
                   "theirs.safetensors was made with another run (run_fingerprint")
    one_line_error(invoke("cache", "upgrade", mine, "--run", tmp_path), "is not a gist run")
    assert mine.read_bytes() == before
    with pytest.raises(GistError, match="give at least one cache file"):
        upgrade_caches([], runs["prefix"])


def test_store_lists_a_version_1_entry_and_replaces_it_on_lookup(runs, tmp_path):
    """An old store entry still shows in `gist cache ls` (so prune and rm reach it); a compress replaces it."""
    from gistcache.store import CacheStore, compress_cached

    model = load_run(runs["prefix"])
    store = CacheStore(tmp_path / "store")
    (first,) = compress_cached(model, [PROMPT], store)
    tiny.write_version_1(first.cache, model, first.path)
    assert [e.key for e in store.entries()] == [first.key]
    (again,) = compress_cached(model, [PROMPT], store)
    assert not again.hit and read_cache_metadata(again.path)["format_version"] == "2"
