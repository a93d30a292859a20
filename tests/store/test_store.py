"""The store owns its files (issue 16, item 2): a marker, rm/prune only there and only on their own names, never
through a link; a lookup serves only the cache its key names; the prompt kept beside each entry."""

import json
import os

import pytest
from typer.testing import CliRunner

from clitools import one_line_error
from gistcache._io import sha256_text
from gistcache.cache import GistCache, load_cache, save_cache
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.store import MARKER, CacheStore, compress_cached, key_of

runner = CliRunner()
PROMPTS = ["Reverse the word", "Add one to the number you are given", "Uppercase every letter"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def test_a_new_store_is_marked_and_keeps_its_prompts(gm, tmp_path):
    """Creating a store writes the marker; each entry keeps its instruction beside it, checked by its SHA-256."""
    store = CacheStore(tmp_path / "store")
    (res,) = compress_cached(gm, PROMPTS[0], store)
    assert store.is_marked() and json.loads((store.root / MARKER).read_text())["format"] == "gistcache-store"
    assert store.prompt_path(res.key).read_text() == PROMPTS[0] and store.prompt_for(res.cache) == PROMPTS[0]
    store.prompt_path(res.key).write_text("something else")  # a prompt that is not the cache's is not trusted
    assert store.prompt_for(res.cache) is None


def test_rm_and_prune_refuse_a_folder_that_is_not_a_store(tmp_path, make_tiny_run):
    """`gist cache rm a --store RUN` and `prune` on a run folder delete nothing (the adapter survives)."""
    run = make_tiny_run(path=tmp_path / "run")
    (run / "adapter_model.safetensors").write_bytes(b"the adapter")
    before = files(run)
    one_line_error(invoke("cache", "rm", "a", "--store", run), "not marked as a gist cache store")
    one_line_error(invoke("cache", "prune", "--max-bytes", "0", "--store", run), "gist cache adopt --store")
    one_line_error(invoke("cache", "adopt", "--store", run), "holds other files")
    one_line_error(invoke("compress", "Sort it", "--run", run, "--store", run), "is not a gist cache store")
    assert files(run) == before and not (run / MARKER).exists()


def test_rm_touches_only_its_own_names_even_in_a_store(gm, tmp_path):
    """Inside a marked store, a file not named `<key>.safetensors` is invisible to rm, ls and prune."""
    store = CacheStore(tmp_path / "store")
    (res,) = compress_cached(gm, PROMPTS[0], store)
    mine = store.root / "adapter_model.safetensors"
    mine.write_bytes(res.path.read_bytes())  # a valid cache under a name that is not a key
    with pytest.raises(GistError, match="no cache in"):
        store.remove(["a"] if not res.key.startswith("a") else ["b"])
    assert [e.key for e in store.entries()] == [res.key]
    assert store.prune(0)[0].key == res.key and mine.is_file() and not res.path.exists()
    assert not store.prompt_path(res.key).exists()  # the prompt went with its cache


def test_links_are_never_followed(gm, tmp_path):
    """A link named like an entry, to a file outside the store, is neither read, listed, pruned nor removed."""
    store = CacheStore(tmp_path / "store")
    (res,) = compress_cached(gm, PROMPTS[0], store)
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(res.path.read_bytes())
    other = compress(gm, PROMPTS[1])
    link = store.path_for(key_of(other))
    os.symlink(outside, link)
    assert [e.key for e in store.entries(unreadable=True)] == [res.key]
    assert store.get(key_of(other)) is None  # a link is not an entry: a miss, and it stays
    store.prune(0)
    with pytest.raises(GistError, match="no cache in"):
        store.remove([key_of(other)[:12]])
    assert outside.is_file() and link.is_symlink() and not res.path.exists()
    linked_dir = tmp_path / "elsewhere"
    linked_dir.mkdir()
    (linked_dir / "keep.txt").write_text("keep")
    os.symlink(linked_dir, store.root / "exports-link")
    store.prune(0)
    assert (linked_dir / "keep.txt").read_text() == "keep"


def test_a_hit_is_the_cache_its_key_names(gm, tmp_path):
    """An entry holding another prompt's cache (copied under the wrong key) is a miss and is removed; the prompt is
    compressed again and the right cache served."""
    store = CacheStore(tmp_path / "store")
    right, wrong = compress_cached(gm, PROMPTS[:2], store)
    right.path.write_bytes(wrong.path.read_bytes())  # the wrong prompt's cache under the right key
    assert store.get(right.key) is None and not right.path.exists()
    (again,) = compress_cached(gm, PROMPTS[0], store)
    assert not again.hit and again.cache.prompt_sha256 == sha256_text(PROMPTS[0])
    assert load_cache(again.path).prompt_sha256 == sha256_text(PROMPTS[0])
    (third,) = compress_cached(gm, PROMPTS[0], store)
    assert third.hit


def test_a_hit_checks_mask_and_positions(gm, tmp_path):
    """An entry whose key fields match but whose mask is not the model's is a miss, removed and replaced."""
    store = CacheStore(tmp_path / "store")
    (res,) = compress_cached(gm, PROMPTS[0], store)
    other_mask = GistCache(**{**vars(res.cache), "mask": "prefix"})  # same key fields, another mask
    save_cache(other_mask, res.path)
    assert key_of(other_mask) == res.key
    (again,) = compress_cached(gm, PROMPTS[0], store)
    assert not again.hit and load_cache(again.path).mask == "paper"


def test_damaged_entries_are_removed_on_lookup_and_reached_by_prune(gm, tmp_path):
    """A damaged entry is a miss and is removed; one never looked up is still pruned (ls does not show it)."""
    store = CacheStore(tmp_path / "store")
    first, second = compress_cached(gm, PROMPTS[:2], store)
    first.path.write_bytes(first.path.read_bytes()[:-5])
    assert store.get(first.key) is None and not first.path.exists()
    second.path.write_bytes(b"garbage")
    assert store.entries() == [] and [e.key for e in store.entries(unreadable=True)] == [second.key]
    assert [e.key for e in store.prune(0)] == [second.key] and not second.path.exists()
    assert not list(store.root.glob("*.prompt.txt"))  # prompts go with their cache, orphans with prune


def test_an_old_store_is_listed_then_adopted(gm, tmp_path):
    """A store from before the marker: ls lists it, rm/prune name `gist cache adopt`, adopt marks it; a put marks a
    folder that holds only store files by itself."""
    root = tmp_path / "old"
    store = CacheStore(root)
    results = compress_cached(gm, PROMPTS[:2], store)
    (root / MARKER).unlink()
    listed = json.loads(invoke("cache", "ls", "--store", root, "--json").stdout)
    assert sorted(e["key"] for e in listed) == sorted(r.key for r in results)
    one_line_error(invoke("cache", "prune", "--max-bytes", "0", "--store", root), "gist cache adopt --store")
    result = invoke("cache", "adopt", "--store", root)
    assert result.exit_code == 0 and "adopted" in result.stdout and store.is_marked()
    assert "already" in invoke("cache", "adopt", "--store", root).stdout
    assert invoke("cache", "rm", results[0].key[:10], "--store", root).exit_code == 0
    (root / MARKER).unlink()
    compress_cached(gm, PROMPTS[2], store)  # a put marks a folder holding only entries
    assert store.is_marked()
    one_line_error(invoke("cache", "adopt", "--store", tmp_path / "none"), "does not exist")


def test_keys_are_checked_before_any_path_is_made(tmp_path):
    """A key that is not 64 hex digits never becomes a path (no `../`)."""
    store = CacheStore(tmp_path)
    for bad in ("../x", "a" * 63, "A" * 64, "g" * 64):
        with pytest.raises(GistError, match="is not a cache key"):
            store.path_for(bad)


def test_a_bad_entry_that_cannot_be_removed_is_a_miss(gm, tmp_path, monkeypatch):
    """A damaged entry in a store whose files cannot be removed is a miss all the same, not an error."""
    store = CacheStore(tmp_path / "store")
    (res,) = compress_cached(gm, PROMPTS[0], store)
    res.path.write_bytes(res.path.read_bytes()[:-5])

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", refuse)
    assert store.get(res.key) is None and res.path.exists()


def test_an_entry_keyed_before_the_dtype_is_moved_and_served(gm, tmp_path):
    """A store written before the key held the dtype: its entry (and prompt) moves under the key that names the
    dtype on the first lookup and is a hit; `gist cache ls` lists it before; an unreadable one is a miss."""
    from gistcache.cache.identity import model_identity
    from gistcache.store import Wanted, legacy_key

    store = CacheStore(tmp_path / "store")
    (made,) = compress_cached(gm, [PROMPTS[0]], CacheStore(tmp_path / "fresh"))
    old = legacy_key(made.cache.base_fingerprint, made.cache.run_fingerprint, made.cache.template,
                     made.cache.num_gist_tokens, made.cache.prompt_sha256)
    assert old != made.key
    store.claim()
    save_cache(made.cache, store.path_for(old))
    store.prompt_path(old).write_text(PROMPTS[0], encoding="utf-8")
    assert [e.key for e in store.entries()] == [old]
    assert store.prompt_for(made.cache) == PROMPTS[0]
    (found,) = compress_cached(gm, [PROMPTS[0]], store)
    assert found.hit and found.key == made.key and not store.path_for(old).exists()
    assert store.prompt_path(made.key).read_text(encoding="utf-8") == PROMPTS[0]
    want = Wanted.of(model_identity(gm), gm.num_gist_tokens, sha256_text(PROMPTS[1]), "float32")
    store.path_for(want.legacy_key).write_bytes(b"not a cache")
    assert store.get(want.key, wanted=want) is None and not store.path_for(want.legacy_key).exists()
