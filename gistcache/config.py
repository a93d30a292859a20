"""Configuration shared by training, caching and evaluation: what a gist run *is*, and the values
several verbs accept.

`GistConfig` names the base model, how many gist tokens stand for a prompt, the attention
condition the run was trained under, the prompt template and how the base model was tuned.
It is saved in a run folder's `config.json` under the key "gist" and read back by every later
step. Checks live in `__post_init__`, so a Python caller gets the same refusal as the CLI.

`DTYPES` is the one table of compute dtypes (`--dtype`, and the dtype a cache file records).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from gistcache.errors import GistError
from gistcache.masks import (check_chunk_attention, check_condition, check_gist_every, check_mask, check_positions,
                             check_raw_tail)

DEFAULT_MODEL = "smollm2-135m"
TEMPLATES = ("auto", "chat", "plain")
TUNE_MODES = ("gist", "lora", "full")
DECODERS = ("tuned", "base")
GIST_TOKEN = "<GIST>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (a key of DTYPES); refuse any other name."""
    if name not in DTYPES:
        raise GistError(f"--dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_decoder(decoder: str) -> str:
    """Who reads the caches (`GistConfig.decoder`); refuse any other name."""
    if decoder not in DECODERS:
        raise GistError(f"unknown --decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    return decoder


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GistError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    return batch_size


@dataclass
class GistConfig:
    model: str = DEFAULT_MODEL
    num_gist_tokens: int = 1  # N: gist tokens after each chunk of the instruction (after all of it when gist_every is 0)
    # K: the instruction is cut into chunks of K tokens, N gist tokens after each (masks.py), so the cache grows
    # with the prompt: M = N * ceil(P / K) slots; 0 = one chunk, M = N whatever the length
    gist_every: int = 0
    # W: the last min(W, P - K) instruction tokens stay raw after the last gist, and the cache keeps their
    # keys/values too (masks.py); 0 = every instruction token is compressed
    raw_tail: int = 0
    # "causal": each chunk's tokens read every earlier chunk; "local": only the earlier chunks' gists (masks.py)
    chunk_attention: str = "causal"
    condition: str = "gist"
    mask: str = "prefix"  # "paper": tokens after the gist see nothing before it; "prefix": they also see the template's fixed prefix
    # prefix mask: "compact" = the input continues right after prefix + gist (a cache is a plain F+N prefix);
    # "original" = the full prompt's positions (a cache uses P+N positions of the context); see masks.py
    positions: str = "compact"
    template: str = "auto"
    tune: str = "lora"
    # who reads the cache: "tuned" = the trained model; "base" = the untouched base model (the LoRA adapter
    # works only where the gist is written: prefix, instruction and gist), so any engine serving the stock
    # weights reads the caches; needs --tune lora and the prefix mask in the compact positions
    decoder: str = "tuned"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # [shortest, longest] prompt the run was trained on, in tokens (fixed prefix included, gist tokens not);
    # `gist compress` warns past the longest. None: not recorded (runs trained before it was)
    trained_prompt_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_gist_tokens, int) or self.num_gist_tokens < 1:
            raise GistError(f"--num-gist must be a whole number >= 1, got {self.num_gist_tokens!r}")
        check_gist_every(self.gist_every)
        check_raw_tail(self.raw_tail, self.gist_every)
        check_chunk_attention(self.chunk_attention, self.gist_every)
        check_condition(self.condition)
        check_mask(self.mask)
        check_positions(self.positions)
        if self.mask == "paper":
            self.positions = "compact"  # no prefix: both layouts are the same
        if self.template not in TEMPLATES:
            raise GistError(f"unknown template {self.template!r}: use one of {', '.join(TEMPLATES)}")
        if self.tune not in TUNE_MODES:
            raise GistError(f"unknown --tune {self.tune!r}: use one of {', '.join(TUNE_MODES)}")
        check_decoder(self.decoder)
        if self.decoder == "base" and (self.tune != "lora" or self.condition != "gist" or self.mask != "prefix"
                                       or self.positions != "compact"):
            raise GistError("--decoder base needs --tune lora, --condition gist, --mask prefix and --positions compact: "
                            "the adapter is switched off for the tokens after the gist, which only the compact "
                            "two-pass forward separates")
        if self.gist_every and self.mask == "prefix" and self.positions != "compact":
            raise GistError("--gist-every needs --positions compact: the gist slots of all chunks become one plain "
                            "prefix F..F+M-1, which only the compact positions compute")
        if self.trained_prompt_tokens is not None and not (
                isinstance(self.trained_prompt_tokens, list) and len(self.trained_prompt_tokens) == 2
                and all(isinstance(n, int) and n >= 0 for n in self.trained_prompt_tokens)):
            raise GistError(f"trained_prompt_tokens must be [shortest, longest], got {self.trained_prompt_tokens!r}")
        if self.lora_r < 1:
            raise GistError(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.lora_alpha < 1:
            raise GistError(f"--lora-alpha must be >= 1, got {self.lora_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GistConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise GistError(f"config has unknown gist fields {sorted(unknown)}: was it written by a newer gistcache?")
        # runs written before the mask variants existed were trained with the paper's mask, and
        # prefix-mask runs written before the position layouts existed in the original positions
        return cls(**{"mask": "paper", "positions": "original", **data})
