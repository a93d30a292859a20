"""Prompt templates and their tokenization around the gist tokens.

An example is split into the text the gist tokens compress (`prompt`: the instruction and any
template text before it), the gist tokens, and the text after them (`after`: the input and the
answer cue), then the answer. The three text pieces are tokenized separately and always the same
way, so training, compression and generation see identical token ids.

`plain` is the paper's template::

    Instruction: {instruction}
    <GIST><GIST>
    Input: {input}
    Output: {output}

`chat` uses the tokenizer's own chat template with the gist tokens right after the instruction in
the user turn. `auto` picks `chat` when the tokenizer has a chat template.
"""

from __future__ import annotations

from dataclasses import dataclass

from gistcache.config import GIST_TOKEN
from gistcache.errors import GistError
from gistcache.masks import insert_gist_tokens

IGNORE_INDEX = -100
_SPLIT = "\u0000GISTCACHE-SPLIT\u0000"
INSTRUCTION_SLOT = "\u0001gistcache-instruction-slot\u0001"


@dataclass(frozen=True)
class PromptText:
    prompt: str  # compressed by the gist tokens
    after: str  # follows the gist tokens: the input and the answer cue


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on the answer and its end-of-sequence token
    num_prompt_tokens: int  # tokens before the first gist token


def resolve_template(tokenizer, template: str) -> str:
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise GistError("--template chat: this tokenizer has no chat template; use --template plain")
    return template


def check_instruction(instruction: str) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise GistError("the instruction is empty: give the text to compress")
    if GIST_TOKEN in instruction:
        raise GistError(f"the instruction contains the reserved text {GIST_TOKEN}: remove it")
    return instruction


def format_prompt(tokenizer, instruction: str, input: str = "", template: str = "auto") -> PromptText:
    """Split one example into the compressed part and the part after the gist tokens."""
    check_instruction(instruction)
    if GIST_TOKEN in (input or ""):
        raise GistError(f"the input contains the reserved text {GIST_TOKEN}: remove it")
    template = resolve_template(tokenizer, template)
    instruction = instruction.strip()
    input = (input or "").strip()
    if template == "plain":
        after = f"\nInput: {input}\nOutput:" if input else "\nOutput:"
        return PromptText(prompt=f"Instruction: {instruction}\n", after=after)
    content = instruction + _SPLIT + (f"\n\n{input}" if input else "")
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    prompt, after = text.split(_SPLIT)
    return PromptText(prompt=prompt, after=after)


def answer_text(output: str, template: str) -> str:
    return output if template == "chat" else f" {output}"


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def prefix_text(tokenizer, template: str) -> str:
    """The template's text before the instruction: the same for every instruction."""
    text = format_prompt(tokenizer, INSTRUCTION_SLOT, "", template)
    return text.prompt.split(INSTRUCTION_SLOT)[0]


def fixed_prefix_ids(tokenizer, template: str) -> list[int]:
    """Token ids of the fixed prefix (BOS where the tokenizer adds one to plain text, then
    `prefix_text`). Every `encode_prompt` starts with exactly these ids: the `prefix` mask keeps them
    visible after the gist, and their keys/values are computed once per run."""
    return _prefix_ids(tokenizer, template, prefix_text(tokenizer, template))


def _prefix_ids(tokenizer, template: str, prefix: str) -> list[int]:
    """`prefix` (the template's text before the instruction) as ids, BOS first where plain text gets one."""
    ids = tokenizer(prefix, add_special_tokens=False).input_ids
    if resolve_template(tokenizer, template) == "plain" and _adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def visible_prefix_ids(tokenizer, template: str, mask: str) -> list[int]:
    """The fixed prefix that stays visible after the gist: `fixed_prefix_ids` under the prefix mask, else []."""
    return fixed_prefix_ids(tokenizer, template) if mask == "prefix" else []


def encode_prompt(tokenizer, text: PromptText, template: str) -> list[int]:
    """Token ids of the compressed part: the fixed prefix's ids, then the rest tokenized on its own,
    so the prefix is token for token the same for every instruction."""
    prefix = prefix_text(tokenizer, template)
    if not text.prompt.startswith(prefix):
        raise GistError("the chat template changes the text before the instruction from one instruction to the "
                        "next: use --template plain")
    rest = tokenizer(text.prompt[len(prefix):], add_special_tokens=False).input_ids
    return [*_prefix_ids(tokenizer, template, prefix), *rest]  # the template is rendered once, not twice


def encode_after(tokenizer, text: PromptText) -> list[int]:
    return tokenizer(text.after, add_special_tokens=False).input_ids


def encode_instruction(tokenizer, instruction: str, template: str) -> list[int]:
    """Token ids of the part the gist tokens compress, for one instruction (no gist ids)."""
    return encode_prompt(tokenizer, format_prompt(tokenizer, instruction, "", template), template)


def encode_input(tokenizer, input: str, template: str) -> list[int]:
    """Token ids that follow the gist tokens for one input (the answer cue included).

    The text after the gist does not depend on the instruction, so a cached instruction can be
    continued with any input.
    """
    return encode_after(tokenizer, format_prompt(tokenizer, "-", input, template))


def encode_example(tokenizer, text: PromptText, num_gist_tokens: int, gist_token_id: int, template: str,
                   output: str | None = None, *, gist_every: int = 0, num_prefix_tokens: int = 0,
                   raw_tail: int = 0) -> EncodedExample:
    """prompt ids + N gist ids + after ids (+ answer ids + EOS, which alone are labelled); with `gist_every` K,
    N gist ids after every K prompt tokens past the fixed prefix's `num_prefix_tokens`, and with `raw_tail` W
    the prompt's last tokens after the last gist (masks.py)."""
    template = resolve_template(tokenizer, template)
    prompt_ids = encode_prompt(tokenizer, text, template)
    ids = [*insert_gist_tokens(prompt_ids, gist_token_id, num_gist_tokens, gist_every, num_prefix_tokens, raw_tail),
           *encode_after(tokenizer, text)]
    labels = [IGNORE_INDEX] * len(ids)
    if output is not None:
        answer = tokenizer(answer_text(output, template), add_special_tokens=False).input_ids
        answer.append(tokenizer.eos_token_id)
        ids += answer
        labels += answer
    return EncodedExample(input_ids=ids, labels=labels, num_prompt_tokens=len(prompt_ids))


def encode_examples(tokenizer, examples: list, *, num_gist_tokens: int, gist_token_id: int, template: str,
                    max_length: int, gist_every: int = 0, num_prefix_tokens: int = 0,
                    raw_tail: int = 0) -> tuple[list[EncodedExample], int]:
    """Tokenize examples (anything with `instruction`, `input`, `output`, such as `gistcache.data.Example`).

    Rows longer than `max_length` are dropped, never cut (a cut could cut the gist); returns the
    encoded rows and how many were dropped.
    """
    encoded, too_long = [], 0
    for ex in examples:
        text = format_prompt(tokenizer, ex.instruction, ex.input, template)
        enc = encode_example(tokenizer, text, num_gist_tokens, gist_token_id, template, output=ex.output,
                             gist_every=gist_every, num_prefix_tokens=num_prefix_tokens, raw_tail=raw_tail)
        if len(enc.input_ids) > max_length:
            too_long += 1
            continue
        encoded.append(enc)
    return encoded, too_long
