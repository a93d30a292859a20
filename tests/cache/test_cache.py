"""Gist caches: compress, save/load bit for bit, refusals naming the field, and the content-keyed store."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tiny import make_gist_model
from gistcache._io import sha256_text
from gistcache.cache import FORMAT_VERSION, GistCache, load_cache, read_cache_metadata, save_cache
from gistcache.cache.identity import check_cache, model_identity
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import GistModel
from gistcache.prompts import encode_instruction
from gistcache.store import CacheStore, cache_key, compress_cached, default_store_dir, key_of
from tiny import INSTRUCTIONS



def assert_same_cache(a: GistCache, b: GistCache):
    assert a.num_layers == b.num_layers
    for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]):
        assert x.dtype == y.dtype and torch.equal(x, y)
    for name in ("num_gist_tokens", "num_prompt_tokens", "prompt_sha256", "template", "base_fingerprint",
                 "run_fingerprint", "prompt_preview", "created", "offset"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.metadata() == b.metadata()


# --- compress --------------------------------------------------------------------------------------

def test_compress_keeps_only_gist_positions(arch):
    """Each layer keeps (1, kv_heads, N, head_dim); position-free, the input continues at N (paper mask)."""
    model = make_gist_model(arch, 5)
    cache = compress(model, INSTRUCTIONS[0])
    n_prompt = len(encode_instruction(model.tokenizer, INSTRUCTIONS[0], "auto"))
    assert cache.num_layers == 2 and cache.num_gist_tokens == 5
    assert all(tuple(k.shape) == (1, 2, 5, 8) for k in cache.keys + cache.values)
    assert cache.num_prompt_tokens == n_prompt and cache.key_start == 0 and cache.offset == 5
    assert cache.context_used == 5 and cache.input_ids().tolist() == [[0] * 5]
    assert cache.prompt_sha256 == sha256_text(INSTRUCTIONS[0]) and cache.template == "chat"
    assert cache.full_prompt_kv_bytes == (n_prompt + 5) * 2 * 2 * 2 * 8 * 4


def test_batched_compress_equals_one_by_one(arch):
    """Left-padded batches give the same gist KV as compressing each prompt alone (fp32, 1e-5)."""
    model = make_gist_model(arch, 2)
    batched = compress(model, INSTRUCTIONS, batch_size=3)
    for text, cache in zip(INSTRUCTIONS, batched):
        alone = compress(model, text)
        assert alone.offset == cache.offset
        for x, y in zip(alone.keys + alone.values, cache.keys + cache.values):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_compress_refuses_empty_and_overlong(gm):
    """An empty instruction, a bad batch size and a prompt past the context are refused."""
    with pytest.raises(GistError, match="instruction 1: the instruction is empty"):
        compress(gm, ["ok", "  "])
    with pytest.raises(GistError, match="--batch-size"):
        compress(gm, ["ok"], batch_size=0)
    with pytest.raises(GistError, match="over the model's context of 512"):
        compress(gm, "x" * 600)


# --- save / load -----------------------------------------------------------------------------------

def test_save_load_bit_identical(gm, tmp_path):
    """Every tensor (torch.equal) and every metadata field survive save -> load."""
    cache = compress(gm, INSTRUCTIONS[1])
    path = save_cache(cache, tmp_path / "sub" / "c.safetensors")
    assert_same_cache(cache, load_cache(path, gm))
    meta = read_cache_metadata(path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format_version"] == str(FORMAT_VERSION) and meta["input_position"] == str(cache.offset)
    assert json.loads(meta["key_shapes"]) == [[1, 2, 2, 8]] * 2
    assert not list(tmp_path.glob("sub/.*tmp*"))  # the temp file was renamed away


def test_bfloat16_roundtrip(tmp_path):
    """A bfloat16 cache is saved and loaded bit for bit (the SHA-256 reads raw bytes)."""
    model = make_gist_model("llama", 1)
    model.model.to(torch.bfloat16)
    cache = compress(model, "Say hi")
    assert cache.dtype == torch.bfloat16
    assert_same_cache(cache, load_cache(save_cache(cache, tmp_path / "b.safetensors"), model))


# --- refusals --------------------------------------------------------------------------------------

@pytest.fixture
def saved(gm, tmp_path):
    cache = compress(gm, INSTRUCTIONS[0])
    return cache, save_cache(cache, tmp_path / "c.safetensors")


def test_refuses_other_base_model(saved):
    """A cache made with other base weights names base_fingerprint."""
    _, path = saved
    with pytest.raises(GistError, match="another base model .*base_fingerprint"):
        load_cache(path, make_gist_model("llama", 2, seed=1))


def test_refuses_other_run(gm, saved):
    """Same base weights, another trained gist embedding: run_fingerprint is named."""
    _, path = saved
    other = GistModel(gm.model, gm.tokenizer, 2, gist_embedding=gm.gist_embedding.detach() + 1)
    with pytest.raises(GistError, match="another run .*run_fingerprint"):
        load_cache(path, other)


def test_refuses_truncated_file(saved, tmp_path):
    """A file cut short is refused by safetensors, as one GistError."""
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) - 10, 20, 4):
        short = tmp_path / f"short{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(GistError, match="not a readable safetensors file"):
            load_cache(short)


def test_refuses_altered_tensor_bytes(saved, tmp_path):
    """One changed byte in the tensor data fails the tensor_sha256 check."""
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "altered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(GistError, match="tensor_sha256"):
        load_cache(bad)


def test_refuses_non_safetensors_and_foreign_safetensors(tmp_path):
    """A text file, a pickle-looking file and a safetensors file without our metadata are refused."""
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a cache\n")
    with pytest.raises(GistError, match="not a readable safetensors file"):
        load_cache(text)
    pickle_like = tmp_path / "c.pt"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(GistError, match="not a readable safetensors file"):
        load_cache(pickle_like)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(GistError, match="not a gist cache"):
        load_cache(foreign)
    with pytest.raises(GistError, match="does not exist"):
        load_cache(tmp_path / "missing.safetensors")


def test_refuses_unknown_format_version(saved, tmp_path):
    """format_version 99 is refused, naming the field."""
    cache, _ = saved
    meta = cache.metadata()
    meta["format_version"] = "99"
    path = tmp_path / "v99.safetensors"
    save_file(cache.tensors(), str(path), metadata=meta)
    with pytest.raises(GistError, match="unknown format_version '99'"):
        load_cache(path)


def _resaved(cache, tmp_path, name, **changes):
    fields = dict(keys=cache.keys, values=cache.values, num_gist_tokens=cache.num_gist_tokens,
                  num_prompt_tokens=cache.num_prompt_tokens, prompt_sha256=cache.prompt_sha256,
                  template=cache.template, base_fingerprint=cache.base_fingerprint,
                  run_fingerprint=cache.run_fingerprint)
    fields.update(changes)
    return save_cache(GistCache(**fields), tmp_path / name)


def test_refuses_layers_shape_dtype_that_do_not_fit(gm, saved, tmp_path):
    """A well-formed file whose layer count, shape or dtype does not fit the model names the field."""
    cache, _ = saved
    path = _resaved(cache, tmp_path, "layers.safetensors", keys=cache.keys[:1], values=cache.values[:1])
    with pytest.raises(GistError, match="num_layers 1, the model has 2"):
        load_cache(path, gm)
    path = _resaved(cache, tmp_path, "shape.safetensors", keys=[k[:, :1] for k in cache.keys],
                    values=[v[:, :1] for v in cache.values])
    with pytest.raises(GistError, match=r"layer 0 keys shape \(1, 1, 2, 8\) does not fit .*kv_heads=2"):
        load_cache(path, gm)
    path = _resaved(cache, tmp_path, "dtype.safetensors", keys=[k.double() for k in cache.keys],
                    values=[v.double() for v in cache.values])
    with pytest.raises(GistError, match="dtype float64, the model runs in float32"):
        load_cache(path, gm)
    three = GistModel(gm.model, gm.tokenizer, 3, gist_embedding=gm.gist_embedding.detach())
    three.run_fingerprint = cache.run_fingerprint  # run weights alike, config differs (N is not in the weights)
    with pytest.raises(GistError, match="num_gist_tokens 2, this run uses 3"):
        check_cache(three, cache)


def test_altered_metadata_is_refused(saved, tmp_path):
    """Metadata that contradicts itself (input position, shapes) is refused before use."""
    cache, _ = saved
    meta = cache.metadata()
    meta["input_position"] = str(cache.offset + 3)
    path = tmp_path / "pos.safetensors"
    save_file(cache.tensors(), str(path), metadata=meta)
    with pytest.raises(GistError, match="input_position"):
        load_cache(path)


# --- store -----------------------------------------------------------------------------------------

def test_cache_key_is_canonical_sha256():
    """The key is a SHA-256 over sorted-key JSON of the six fields; each field changes it, the dtype included."""
    args = ("b" * 64, "r" * 64, "chat", 2, "p" * 64, "float32")
    key = cache_key(*args)
    assert len(key) == 64 and key == cache_key(*args)
    import hashlib
    canonical = json.dumps({"base_fingerprint": args[0], "dtype": "float32", "num_gist_tokens": 2,
                            "prompt_sha256": args[4], "run_fingerprint": args[1], "template": "chat"},
                           separators=(",", ":"))
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    for i, changed in enumerate(("x" * 64, "y" * 64, "plain", 3, "q" * 64, "bfloat16")):
        assert cache_key(*args[:i], changed, *args[i + 1:]) != key


def test_store_hit_on_second_compress(gm, tmp_path):
    """The first compress stores each prompt; the second is a lookup, with identical tensors."""
    store = CacheStore(tmp_path / "store")
    first = compress_cached(gm, INSTRUCTIONS[:2], store)
    assert [r.hit for r in first] == [False, False]
    assert all(r.path.is_file() and r.key == key_of(r.cache) for r in first)
    second = compress_cached(gm, [INSTRUCTIONS[1], INSTRUCTIONS[0], INSTRUCTIONS[2]], store)
    assert [r.hit for r in second] == [True, True, False]
    assert_same_cache(first[1].cache, second[0].cache)
    identity = model_identity(gm)
    assert second[2].key == cache_key(identity.base_fingerprint, identity.run_fingerprint, "chat", 2,
                                      sha256_text(INSTRUCTIONS[2]), "float32")


def test_store_damaged_entry_is_a_miss(gm, tmp_path):
    """A damaged stored file is recompressed and replaced rather than used."""
    store = CacheStore(tmp_path)
    (res,) = compress_cached(gm, ["Say hi"], store)
    res.path.write_bytes(res.path.read_bytes()[:50])
    (again,) = compress_cached(gm, ["Say hi"], store)
    assert not again.hit and load_cache(again.path, gm).offset == res.cache.offset


def test_store_keeps_an_entry_per_dtype(tmp_path):
    """The key holds the dtype: a float32 and a bfloat16 user of one store keep an entry each, and both hit."""
    model = make_gist_model("llama", 1)
    model.base_fingerprint, model.run_fingerprint = "b" * 64, "r" * 64  # as load_run sets them
    store = CacheStore(tmp_path)
    (first,) = compress_cached(model, ["Say hi"], store)
    model.model.to(torch.bfloat16)
    (second,) = compress_cached(model, ["Say hi"], store)
    assert not second.hit and second.key != first.key and second.cache.dtype == torch.bfloat16
    assert load_cache(second.path, model).dtype == torch.bfloat16
    assert compress_cached(model, ["Say hi"], store)[0].hit
    model.model.to(torch.float32)
    (again,) = compress_cached(model, ["Say hi"], store)
    assert again.hit and again.key == first.key and load_cache(first.path).dtype == torch.float32


def test_prune_removes_least_recently_used(gm, tmp_path):
    """Prune deletes oldest-used first until under the limit; a lookup refreshes an entry's use."""
    store = CacheStore(tmp_path)
    results = compress_cached(gm, INSTRUCTIONS, store)
    for age, res in zip((300, 200, 100), results):  # 0 oldest, 2 newest
        when = os.path.getmtime(res.path) - age
        os.utime(res.path, (when, when))  # the entry's last use, which prune orders by
    assert store.get(results[0].key) is not None  # a hit makes 0 the most recent
    sizes = {r.key: r.path.stat().st_size for r in results}
    removed = store.prune(sizes[results[0].key] + sizes[results[2].key])
    assert [e.key for e in removed] == [results[1].key]
    removed = store.prune(sizes[results[0].key])
    assert [e.key for e in removed] == [results[2].key]
    assert [e.key for e in store.entries()] == [results[0].key]
    assert store.prune(0)[0].key == results[0].key and store.entries() == []
    with pytest.raises(GistError, match="--max-bytes"):
        store.prune(-1)


def test_remove_by_unique_prefix(gm, tmp_path):
    """rm takes a unique key prefix; an unknown or ambiguous prefix deletes nothing."""
    store = CacheStore(tmp_path)
    (res,) = compress_cached(gm, INSTRUCTIONS[:1], store)
    twin = tmp_path / (res.key[:6] + "0" * 58 + ".safetensors")  # shares the first 6 characters
    twin.write_bytes(res.path.read_bytes())
    with pytest.raises(GistError, match="matches 2 caches"):
        store.remove([res.key[:6]])
    with pytest.raises(GistError, match="no cache in .* starting with 'ffff'"):
        store.remove([res.key[:7], "ffff"] if not res.key.startswith("ffff") else [res.key[:7], "eeee"])
    with pytest.raises(GistError, match="not a hex key"):
        store.remove(["zz"])
    assert res.path.is_file() and twin.is_file()
    assert store.remove([res.key[:7]]) == [res.key]
    assert not res.path.exists() and twin.is_file()


def test_default_store_dir(monkeypatch, tmp_path):
    """GISTCACHE_HOME wins, then $XDG_CACHE_HOME/gistcache, then ~/.cache/gistcache."""
    monkeypatch.setenv("GISTCACHE_HOME", str(tmp_path / "g"))
    assert default_store_dir() == tmp_path / "g"
    monkeypatch.delenv("GISTCACHE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_store_dir() == tmp_path / "x" / "gistcache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert default_store_dir() == tmp_path / "h" / ".cache" / "gistcache"
