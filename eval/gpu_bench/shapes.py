"""The constants of the GPU run (eval/gpu_bench/): model shapes, dtypes, exit codes, and the synthetic prompts
(a model config of the chosen shape, an instruction of exactly N byte tokens)."""

from __future__ import annotations

import random

import torch

from gistcache.errors import GistError
from gistcache.model.byte_tokenizer import VOCAB_SIZE

PREFIX = "gpu_bench:"
FAILED, USAGE = 1, 2
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=8192, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=3, pad_token_id=1)
# model shapes: "8b" is Llama-3-8B (Qwen2-7B for --arch qwen2), "1b" Llama-3.2-1B; vocabularies as the real ones
SHAPES = {
    "tiny": {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
             "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2)},
    "1b": {"llama": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
           "qwen2": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0)},
    "8b": {"llama": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
           "qwen2": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0)},
}
WORDS = (
    "river stone garden lantern copper window autumn signal harbor meadow pencil orbit violet thunder marble "
    "canvas ladder forest silver engine pocket bridge candle winter planet shadow velvet anchor basket crystal "
    "falcon mirror tunnel summer feather island puzzle rocket saddle timber valley whistle yellow zipper"
).split()
MODES = ("full", "cached", "gist")


def model_config(shape: str, arch: str):
    from transformers import LlamaConfig, Qwen2Config  # deferred: transformers takes seconds to import

    return {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**{**COMMON, **SHAPES[shape][arch]})


def synth_instruction(tokenizer, n_tokens: int, seed: int) -> str:
    """Words from WORDS, cut to exactly `n_tokens` tokens of the byte tokenizer (no space at either end)."""
    rng = random.Random(seed)
    text = ""
    while len(text) < n_tokens + 1:
        text += rng.choice(WORDS) + " "
    text = text[:n_tokens]
    if text[-1] == " ":
        text = text[:-1] + "s"
    if len(tokenizer(text, add_special_tokens=False).input_ids) != n_tokens:
        raise GistError(f"the synthetic instruction is not {n_tokens} tokens long: the tokenizer is not byte-level")
    return text
