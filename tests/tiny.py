"""Tiny offline models and a byte-level tokenizer for tests: no network, built from configs."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

from gistcache.byte_tokenizer import CHAT_TEMPLATE, SPECIALS, VOCAB_SIZE, byte_tokenizer  # noqa: F401

ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is one token, plus the chat specials (and <GIST>)."""
    return byte_tokenizer(chat)


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
