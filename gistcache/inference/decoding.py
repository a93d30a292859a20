"""The pieces every way of generating shares: the decoding settings (`GenerateConfig`), pairing caches or
instructions with inputs, the gist token that is never generated, rows cut at EOS, greedy decoding written out,
and the context check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gistcache.errors import GistError
from gistcache.model import GistModel


@dataclass
class GenerateConfig:
    """Decoding settings shared by the library and `gist generate` (checked here for both).

    None leaves a setting to the model's `generation_config`.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GistError(f"--max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GistError(f"min_new_tokens {self.min_new_tokens} must be between 0 and --max-new-tokens "
                            f"{self.max_new_tokens}")
        if self.temperature is not None and not self.temperature > 0:
            raise GistError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GistError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise GistError(f"--top-k must be a whole number >= 0 (0 turns it off), got {self.top_k!r}")


def _pair(caches, inputs, what: str) -> tuple[list, list[str]]:
    """Broadcast one cache/prompt over many inputs (or one input over many caches); else zip equal lists."""
    caches = [caches] if not isinstance(caches, (list, tuple)) else list(caches)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not caches or not inputs:
        raise GistError(f"nothing to generate: give at least one {what} and one input")
    if len(caches) == 1:
        caches = caches * len(inputs)
    elif len(inputs) == 1:
        inputs = inputs * len(caches)
    if len(caches) != len(inputs):
        raise GistError(f"{len(caches)} {what}s and {len(inputs)} inputs: give one {what} for all inputs or one "
                        f"per input")
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise GistError(f"input {i} is {type(text).__name__}, not text")
    return caches, inputs


def suppressed_token_ids(model: GistModel) -> list[int]:
    """Token ids that must never be generated: the gist token, if the output head can produce it."""
    head = model.model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    return [model.gist_token_id] if model.gist_token_id < vocab else []


def _until_eos(model: GistModel, rows: list[list[int]], *, keep_eos: bool = True) -> list[list[int]]:
    """Cut each row at its first EOS (kept unless `keep_eos=False`), dropping the padding that follows."""
    eos = model.tokenizer.eos_token_id
    return [ids[:ids.index(eos) + keep_eos] if eos in ids else ids for ids in rows]


def _decode(model: GistModel, rows: list[list[int]]) -> list[str]:
    """The text of each row of new token ids, up to its first EOS."""
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in _until_eos(model, rows, keep_eos=False)]


def greedy_tokens(model: GistModel, next_logits: Callable[[list[int]], torch.Tensor], max_new_tokens: int) -> list[int]:
    """Greedy decoding written out: `next_logits(new)` gives the (V,) logits that follow the tokens generated
    so far (`new`; [] first, always called once). Stops after EOS (kept) or `max_new_tokens`; the gist token
    is never chosen."""
    suppressed = suppressed_token_ids(model)
    new: list[int] = []
    logits = next_logits(new)
    while len(new) < max_new_tokens:
        logits = logits.float()  # (V,)
        logits[suppressed] = float("-inf")
        new.append(int(logits.argmax()))
        if new[-1] == model.tokenizer.eos_token_id or len(new) == max_new_tokens:
            break
        logits = next_logits(new)
    return new


def check_context(model: GistModel, offsets: list[int], input_ids: list[list[int]], max_new_tokens: int,
                  what: str = "input") -> None:
    """Refuse a row whose first position + tokens + new tokens exceed the model's context, naming it."""
    limit = model.max_context()
    for i, (off, ids) in enumerate(zip(offsets, input_ids)):
        need = off + len(ids) + max_new_tokens
        if need > limit:
            raise GistError(f"{what} {i} needs {need} positions (from position {off}: {len(ids)} tokens + "
                            f"{max_new_tokens} new tokens), over the model's context of {limit}: shorten it "
                            f"or lower --max-new-tokens")
