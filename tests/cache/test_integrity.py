"""Caches that cannot lie (issue 16, item 1): the sealed header, its schema, finite values, one open file per read,
run fingerprints over every file that changes what a run computes, and `gist cache verify`."""

import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cache import (SEAL, GistCache, load_cache, metadata_sha256, read_cache_metadata, save_cache,
                             tensor_sha256)
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import load_run
from gistcache.run import run_fingerprint
from gistcache.store import CacheStore, compress_cached
from test_fuzz import pack, reseal, split

runner = CliRunner()
PROMPT = "Reverse the word you are given"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def saved(gm, tmp_path):
    cache = compress(gm, PROMPT)
    return cache, save_cache(cache, tmp_path / "c.safetensors")


def edited(path, out, changes: dict, *, sealed: bool, body=None):
    """`path` with header fields changed (any JSON values), the hashes recomputed when `sealed`; written to `out`."""
    header, original_body = split(path.read_bytes())
    body = original_body if body is None else body
    header["__metadata__"].update(changes)
    out.write_bytes(pack(reseal(header, body) if sealed else header, body))
    return out


# --- the seal ------------------------------------------------------------------------------------------

def test_a_hand_edited_field_is_refused(saved, tmp_path):
    """The issue's edits: num_prompt_tokens, or key_start and input_position both raised by 500, without resealing,
    are refused by the seal; resealed, the positions are out of bounds."""
    cache, path = saved
    bad = edited(path, tmp_path / "p.safetensors", {"num_prompt_tokens": str(cache.num_prompt_tokens + 7)},
                 sealed=False)
    with pytest.raises(GistError, match=r"header does not match its seal \(sha256\)"):
        load_cache(bad)
    moved = {"key_start": str(cache.key_start + 500), "input_position": str(cache.offset + 500)}
    for sealed in (False, True):  # the bounds are checked first, then the seal
        with pytest.raises(GistError, match="has key_start '500': expected a whole number from 0 to"):
            load_cache(edited(path, tmp_path / "m.safetensors", moved, sealed=sealed))
    with pytest.raises(GistError, match="seal"):
        load_cache(edited(path, tmp_path / "t.safetensors", {"template": "plain"}, sealed=False))


@pytest.mark.parametrize("value", [3, True, None, "null", "3", "[1, 2, 2, 8]", "[[[1, 2, 2, 8]]]",
                                   "[[1, 2, 2, 8], [1, 2, 2]]", "[[1, 2, 2, 8], [1, 2, 2, 8.0]]", "[" * 100_000])
def test_key_shapes_of_any_type_is_refused_naming_it(saved, tmp_path, value):
    """A key_shapes of the wrong type or depth (resealed or not) is one GistError naming the field, never a TypeError."""
    _, path = saved
    for sealed in (False, True):
        with pytest.raises(GistError, match="key_shapes") as refused:
            load_cache(edited(path, tmp_path / "s.safetensors", {"key_shapes": value}, sealed=sealed))
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("field,value", [("num_layers", "1000000"), ("num_layers", "10" * 40), ("num_gist_tokens", "2.0"),
                                         ("num_gist_tokens", "+2"), ("num_prompt_tokens", " 9"), ("num_layers", "1e6"),
                                         ("dtype", "int8"), ("template", "auto"), ("positions", "sideways"),
                                         ("prompt_sha256", "x"), ("created", "y" * 65), ("prefix_start", "-0")])
def test_fields_out_of_type_or_bounds_are_refused_at_once(saved, tmp_path, field, value):
    """Resealed by a forger, a field out of type or bounds is still refused, naming it, in well under a second
    (num_layers 1,000,000 is bounded by the tensors in the file, before anything is allocated)."""
    _, path = saved
    started = time.perf_counter()
    with pytest.raises(GistError, match=field):
        load_cache(edited(path, tmp_path / "f.safetensors", {field: value}, sealed=True))
    assert time.perf_counter() - started < 1.0


def test_unknown_missing_and_non_text_fields(saved, tmp_path):
    """An unknown field, a missing one, and a value that is not text (safetensors metadata is text) are refused."""
    _, path = saved
    with pytest.raises(GistError, match="unknown metadata field 'note'"):
        load_cache(edited(path, tmp_path / "u.safetensors", {"note": "hi"}, sealed=True))
    header, body = split(path.read_bytes())
    del header["__metadata__"]["mask"]
    (tmp_path / "m.safetensors").write_bytes(pack(reseal(header, body), body))
    with pytest.raises(GistError, match="lacks metadata field 'mask'"):
        load_cache(tmp_path / "m.safetensors")
    with pytest.raises(GistError, match="metadata field 'num_layers' holding a number, not text"):
        load_cache(edited(path, tmp_path / "n.safetensors", {"num_layers": 2}, sealed=True))


# --- values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_even_resealed(saved, tmp_path, fill):
    """NaN or inf among the values, with both hashes recomputed, is refused; save_cache never writes them."""
    cache, path = saved
    header, body = split(path.read_bytes())
    a, b = header["layers.1.values"]["data_offsets"]
    poisoned = cache.values[1].clone()
    poisoned.view(-1)[3] = fill
    body = body[:a] + poisoned.numpy().tobytes() + body[b:]
    with pytest.raises(GistError, match="layer 1 values hold 1 non-finite value"):
        load_cache(edited(path, tmp_path / "nan.safetensors", {}, sealed=True, body=body))
    with pytest.raises(GistError, match="tensor_sha256"):  # not resealed: the tensor hash
        load_cache(edited(path, tmp_path / "raw.safetensors", {}, sealed=False, body=body))
    bad = GistCache(**{**vars(cache), "values": [cache.values[0], poisoned]})
    with pytest.raises(GistError, match="non-finite"):
        save_cache(bad, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_finite_swaps_resealed_load(saved, tmp_path):
    """What a hash cannot catch: zeros, resealed, load (the module says so; `gist cache verify --run` catches it)."""
    cache, path = saved
    header, body = split(path.read_bytes())
    forged = load_cache(edited(path, tmp_path / "z.safetensors", {}, sealed=True, body=bytes(len(body))))
    assert all(not t.any() for t in forged.keys)


# --- older files, reads racing writes, folders ------------------------------------------------------------

def test_version_2_without_a_seal_is_refused_with_the_fix(gm, saved, tmp_path):
    """A version 2 file from before the seal: listed by read_cache_metadata, refused by load_cache with the command
    that makes it again; as a store entry it is recompressed on lookup."""
    cache, _ = saved
    meta = {k: v for k, v in cache.metadata().items() if k not in (SEAL, "positions", "gistcache_version")}
    old = tmp_path / "old.safetensors"
    save_file(cache.tensors(), str(old), metadata=meta)
    assert read_cache_metadata(old)["prompt_sha256"] == cache.prompt_sha256
    with pytest.raises(GistError, match=r"older gistcache whose header has no seal .*gist compress"):
        load_cache(old)
    store = CacheStore(tmp_path / "store")
    (first,) = compress_cached(gm, PROMPT, store)
    save_file(cache.tensors(), str(first.path), metadata=meta)
    (again,) = compress_cached(gm, PROMPT, store)
    assert not again.hit and SEAL in read_cache_metadata(again.path)


def test_a_reader_racing_a_writer_reads_one_version(gm, tmp_path):
    """A writer replacing one file (atomically) with two prompts' caches over and over: every read succeeds and is
    one of the two (header and tensors come from one open file)."""
    caches = compress(gm, [PROMPT, "Add one to the number"])
    sources = [save_cache(c, tmp_path / f"src{i}.safetensors") for i, c in enumerate(caches)]
    target = tmp_path / "shared.safetensors"
    shutil.copy(sources[0], target)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            tmp = tmp_path / ".shared.tmp"
            shutil.copy(sources[i % 2], tmp)
            os.replace(tmp, target)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        for _ in range(400):
            loaded = load_cache(target)
            assert any(torch.equal(loaded.keys[0], c.keys[0]) and loaded.prompt_sha256 == c.prompt_sha256
                       for c in caches)
            seen.add(loaded.prompt_sha256)
    finally:
        stop.set()
        thread.join()
    assert len(seen) == 2


def test_generate_from_a_folder_says_it_is_a_folder(tmp_path):
    folder = tmp_path / "c.safetensors"
    folder.mkdir()
    with pytest.raises(GistError, match="c.safetensors is a folder"):
        load_cache(folder)


# --- run fingerprints --------------------------------------------------------------------------------------

def test_run_fingerprint_covers_every_file_that_changes_the_run(make_tiny_run, tmp_path):
    """The adapter config (r and alpha edited in both files), the chat template, the tokenizer's files and the
    weights change it; where the adapter says the base model was, its saved mode or a reformatting do not."""
    run = make_tiny_run(path=tmp_path / "lora", tune="lora", **tiny.NUDGED)
    first = run_fingerprint(run)

    def rewrite(name, fn):
        path = run / name
        original = path.read_bytes()
        path.write_bytes(fn(original))
        try:
            return run_fingerprint(run)
        finally:
            path.write_bytes(original)

    def json_edit(fn):
        return lambda raw: json.dumps(fn(json.loads(raw))).encode()

    changed = {
        "chat template": rewrite("tokenizer/chat_template.jinja", lambda b: b.replace(b"assistant", b"helper")),
        "tokenizer config": rewrite("tokenizer/tokenizer_config.json", lambda b: b.replace(b"}", b', "x": 1}', 1)),
        "vocabulary": rewrite("tokenizer/tokenizer.json", lambda b: b + b" "),
        "adapter weights": rewrite("adapter_model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
        "adapter target": rewrite("adapter_config.json", json_edit(lambda d: {**d, "use_rslora": True})),
    }
    assert all(fp != first for fp in changed.values()), changed
    config = json.loads((run / "config.json").read_text())
    both = {**config, "gist": {**config["gist"], "lora_alpha": 16}}
    (run / "config.json").write_text(json.dumps(both))
    assert rewrite("adapter_config.json", json_edit(lambda d: {**d, "lora_alpha": 16})) != first
    (run / "config.json").write_text(json.dumps(config))
    same = {
        "base path": rewrite("adapter_config.json", json_edit(lambda d: {**d, "base_model_name_or_path": "/x/y"})),
        "inference mode": rewrite("adapter_config.json", json_edit(lambda d: {**d, "inference_mode": True})),
        "reformatted": rewrite("adapter_config.json", lambda b: json.dumps(json.loads(b), indent=7).encode()),
    }
    assert all(fp == first for fp in same.values()), same


def test_old_caches_are_refused_after_the_adapter_changes(make_tiny_run, tmp_path):
    """The issue's case: lora_alpha raised in the adapter (and config.json, so they agree): the caches made before
    are refused as another run's; raised in the adapter alone, the run is refused in one line naming both."""
    run = make_tiny_run(path=tmp_path / "lora", tune="lora", **tiny.NUDGED)
    cache = save_cache(compress(load_run(run), PROMPT), tmp_path / "c.safetensors")
    adapter = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**adapter, "lora_alpha": 16}))
    with pytest.raises(GistError, match=r"adapter_config.json has lora_alpha 16 but .*config.json has lora_alpha 8"):
        load_run(run)
    store = tmp_path / "store"
    one_line_error(invoke("compress", PROMPT, "--run", run, "--store", store), "lora_alpha 16")
    assert not store.exists()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "gist": {**config["gist"], "lora_alpha": 16}}))
    with pytest.raises(GistError, match="another run"):
        load_cache(cache, load_run(run))


def test_the_adapter_names_the_base_model_and_loads_anywhere(make_tiny_run, tmp_path):
    """save_run records the model as the run names it; a path recorded elsewhere is ignored on load."""
    run = make_tiny_run(path=tmp_path / "lora", tune="lora", **tiny.NUDGED)
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == json.loads((run / "config.json").read_text())["gist"]["model"]
    reference = load_run(run)
    (run / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": "/no/such/folder"}))
    moved = load_run(run)
    assert moved.run_fingerprint == reference.run_fingerprint
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(moved.model(ids).logits, reference.model(ids).logits)


# --- gist cache verify ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gist_run(make_tiny_run):
    return make_tiny_run(2, shift=1.0)


def test_verify_checks_files_fit_and_recompression(gist_run, tmp_path):
    """A store entry and a copy of it pass all three checks; a resealed forgery (zeros) passes the file checks and
    fails the recompression; a damaged file fails the first; an unknown prompt is not a failure."""
    store = tmp_path / "store"
    out = tmp_path / "copy.safetensors"
    assert invoke("compress", PROMPT, "--run", gist_run, "--store", store, "--out", out).exit_code == 0
    entry = next(store.glob("*.safetensors"))
    forged = tmp_path / "forged.safetensors"
    header, body = split(entry.read_bytes())
    forged.write_bytes(pack(reseal(header, bytes(len(body))), bytes(len(body))))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(entry.read_bytes()[:-3])
    good = json.loads(invoke("cache", "verify", entry, out, "--run", gist_run, "--store", store, "--json").stdout)
    assert [(v["file"], v["fits_run"], v["recompressed"], v["ok"]) for v in good] == [("ok", "ok", "ok", True)] * 2
    assert good[0]["max_abs_diff"] < 1e-4
    result = invoke("cache", "verify", entry, forged, damaged, "--run", gist_run, "--store", store, "--json")
    rows = json.loads(result.stdout)
    assert result.exit_code == 2 and [v["ok"] for v in rows] == [True, False, False]
    assert rows[1]["file"] == "ok" and rows[1]["fits_run"] == "ok" and "differs from the prompt" in rows[1]["recompressed"]
    assert "not a readable safetensors file" in rows[2]["file"] and rows[2]["fits_run"] is None
    unknown = json.loads(invoke("cache", "verify", out, "--run", gist_run, "--store", tmp_path / "empty",
                                "--json").stdout)
    assert unknown[0]["ok"] and unknown[0]["recompressed"].startswith("not run: the prompt is unknown")
    files_only = json.loads(invoke("cache", "verify", entry, forged, "--json").stdout)  # no --run: the files only
    assert [(v["file"], v["fits_run"], v["recompressed"]) for v in files_only] == [("ok", None, None)] * 2
    table = invoke("cache", "verify", entry, forged, "--store", store)
    assert table.exit_code == 0 and "2 of 2 files ok" in table.stdout and "gist cache verify" in table.stdout
    table = invoke("cache", "verify", forged, "--run", gist_run, "--store", store)
    assert table.exit_code == 2 and "FAILED" in table.stdout and "0 of 1 file ok" in table.stdout
    one_line_error(invoke("cache", "verify", entry, "--atol", "-1"), "--atol")


def test_tensor_sha256_is_unchanged_for_old_readers(saved):
    """tensor_sha256 keeps its definition (names, dtypes, shapes, bytes), so the seal adds to it and changes nothing."""
    cache, path = saved
    meta = read_cache_metadata(path)
    assert meta["tensor_sha256"] == tensor_sha256(cache.tensors()) and meta[SEAL] == metadata_sha256(meta)


# --- listing reads the header only -------------------------------------------------------------------------

def test_metadata_reads_the_header_only(saved, tmp_path, monkeypatch):
    """`gist cache ls` reads a few KB an entry: read_cache_metadata checks the tensors as the header declares them
    (names, shapes, dtypes, byte ranges against the file's size) without reading their bytes; load_cache still reads
    and hashes them, so a flipped tensor byte is listed and refused on load."""
    import gistcache.cache.reader as reader

    cache, path = saved
    data = path.read_bytes()
    header_bytes = 8 + int.from_bytes(data[:8], "little")
    read = []

    def counting_open(file, mode="r", *args, **kwargs):
        fh = open(file, mode, *args, **kwargs)
        real_read = fh.read

        class Counted:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

            def fileno(self):
                return fh.fileno()

            def read(self, n=-1):
                out = real_read(n)
                read.append(len(out))
                return out
        return Counted()

    monkeypatch.setattr(reader, "open", counting_open, raising=False)
    assert read_cache_metadata(path)["prompt_sha256"] == cache.prompt_sha256
    assert sum(read) == header_bytes < len(data)
    read.clear()
    load_cache(path)
    assert sum(read) == len(data)
    monkeypatch.undo()

    header, body = split(data)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(pack(header, bytes([body[0] ^ 0xFF]) + body[1:]))
    assert read_cache_metadata(flipped) == read_cache_metadata(path)
    with pytest.raises(GistError, match="tensor bytes do not match their tensor_sha256"):
        load_cache(flipped)
    odd = json.loads(json.dumps(header))
    odd[next(k for k in odd if k != "__metadata__")]["dtype"] = ["F32"]  # JSON, but no dtype: refused, no TypeError
    for name, damaged in (("truncated", data[:-1]), ("grown", data + b"\0"), ("odd", pack(odd, body))):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(damaged)
        with pytest.raises(GistError, match="not a readable safetensors file"):
            read_cache_metadata(bad)
        with pytest.raises(GistError, match="not a readable safetensors file"):
            load_cache(bad)
