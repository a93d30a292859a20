"""Which shipped run a command uses when no run is named.

The package ships two runs of the default model with the same ratio (one gist token after every 64 instruction
tokens): `DEFAULT_RUN` for instructions of up to `LONG_PROMPT_TOKENS` tokens, and `LONG_RUN`, trained on the same
kinds of data with the held-out tuning tasks left out, for longer ones (docs/results.md, section 2: it keeps more
of long prompts and less of short ones). So with no `--run`, an instruction is compressed by the run for its
length, and a cache file is read by the run that made it (its run fingerprint names it).

`LONG_PROMPT_TOKENS` is the upper edge of the first length bucket of `gist eval` (<= 128 tokens). No reported
figure depends on where the edge falls between 101 and 180 tokens: the Alpaca+ rows evaluated (unseen, human) have
at most 101 instruction tokens by `instruction_length`, the long dev split, the tuning split and the long family
at least 181.
"""

from __future__ import annotations

from functools import lru_cache

from gistcache.run import (DEFAULT_RUN, LONG_RUN, PRETRAINED_DIR, TOKENIZER_DIR, is_run_dir, resolve_run_dir,
                           run_fingerprint)

LONG_PROMPT_TOKENS = 128


def instruction_length(tokenizer, instruction: str) -> int:
    """Tokens of the instruction alone (stripped, no template, no special tokens)."""
    return len(tokenizer(instruction.strip(), add_special_tokens=False).input_ids)


def shipped_run_for(num_instruction_tokens: int) -> str:
    """The shipped run for an instruction of this many tokens: `LONG_RUN` past `LONG_PROMPT_TOKENS`, else
    `DEFAULT_RUN`."""
    return LONG_RUN if num_instruction_tokens > LONG_PROMPT_TOKENS else DEFAULT_RUN


def route_instructions(instructions: list[str], tokenizer=None) -> dict[str, list[int]]:
    """{shipped run name: indices of the instructions it compresses}, runs in the order first needed.
    `tokenizer` counts the tokens (default: the shipped default run's, which both runs share)."""
    if tokenizer is None:
        tokenizer = shipped_tokenizer()
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(instructions):
        groups.setdefault(shipped_run_for(instruction_length(tokenizer, text)), []).append(i)
    return groups


@lru_cache(maxsize=1)
def shipped_tokenizer():
    """The default shipped run's tokenizer, loaded once (counting tokens needs no model)."""
    from gistcache.model.load import load_run_tokenizer

    return load_run_tokenizer(resolve_run_dir(None))  # a missing shipped run is named as such


def shipped_run_of(fingerprint: str) -> str | None:
    """The name of the shipped run whose run fingerprint this is (a cache's `run_fingerprint`), else None."""
    for name, known in _shipped_fingerprints().items():
        if known == fingerprint:
            return name
    return None


@lru_cache(maxsize=1)
def _shipped_fingerprints() -> dict[str, str]:
    return {path.name: run_fingerprint(path) for path in sorted(PRETRAINED_DIR.iterdir())
            if is_run_dir(path) and (path / TOKENIZER_DIR).is_dir()}
