"""The conditions an evaluation compares, each built from the same instruction and input.

With P = `encode_instruction(instruction)` (the template text before the input, instruction
included: what the gist tokens replace), G = N gist ids and I = `encode_input(input)`:

    condition     sequence the model reads            mask            prompt state kept
    gist          I after the gist cache of P + G      gist (cache)    N positions
    full          P + G + I                            plain causal    P positions
    base          P + I (the untouched base model)     plain causal    P positions
    truncate      P[instruction cut to M] + G + I      plain causal    template + M positions
    truncate-end  P[instruction's last M kept] + G + I plain causal    template + M positions
    none          P[instruction removed] + G + I       plain causal    template positions
    pos_control   P + G + I (the pos_control run)      plain causal    P positions
    neg_control   I at positions P+N.. (neg_control)   see below       0 positions
    kvpress:PRESS P compressed by the press, then I     plain causal    K positions (below)
    echo          no model: the input itself is the answer  (none)    0 positions

`base` is what a user runs without gistcache: the base model before any tuning (no adapter, no
trained weights) reading the full prompt, with no gist token. The other baselines keep the N gist
tokens so that the gist-trained model reads the layout it was
trained on; they carry no information the visible prompt does not, so they are not counted as
prompt state. A run trained with `--decoder base` reads everything after its gist with the untouched
base model, which never reads a gist token as an input token: its baselines drop G (G is empty), so
its `full` is `base`.

`neg_control`: a run trained so that tokens after the gist see neither the prompt nor the gist.
Its masked forward lets the input and the new tokens attend only to themselves, at rotary
positions P+N onwards. That is exactly greedy generation over I alone with positions starting at
P+N and no cache, which is how it is generated here (batched). The gist-cache path would be
wrong for it: it would let the input attend to the gist keys/values, which this run never did
in training and which do carry the prompt (the gist tokens themselves see it).

`echo` is a control on the metric, not a way to keep a prompt: it answers every example with its own input (stripped)
and runs no model. Where a split's references hold the input (a rule applied to a word, a label beside the input's
words), ROUGE-L gives an answer credit for repeating the input; echo's score says how much, so a gist that scores
near echo may have learned to repeat the input rather than the prompt's rule (exact match tells them apart).

`kvpress:PRESS` (issue 24): a training-free KV-cache press of NVIDIA's kvpress compresses P during its prefill
(the untouched base model, for every run) so that every layer keeps K positions per KV head, then I is read
after them, at positions len(P).. (kvpress's layout). K is the gist cache's own count for that prompt, F + M
(`press_kept_positions`), so both hold the same memory; `kvpress:PRESS@R` removes the fraction R of P instead.
kvpress pins an older transformers, so these run in the peers virtualenv (`gistcache.eval.peers`,
`eval/peers_worker.py`), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gistcache.errors import GistError
from gistcache.eval.peers_worker import PRESSES
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate
from gistcache.masks import count_gist_slots
from gistcache.model import GistModel
from gistcache.prompts import (INSTRUCTION_SLOT, PromptText, encode_prompt, format_prompt, resolve_template,
                               visible_prefix_ids)

BASELINES = ("full", "none", "truncate", "base")
# asked for by name only, never by default: truncation that keeps the instruction's end (its last worked example),
# and the echo control (the input as the answer)
EXTRA_BASELINES = ("truncate-end", "echo")
NO_MODEL = ("echo",)  # conditions that generate nothing
TRUNCATIONS = {"truncate": "start", "truncate-end": "end"}  # condition -> the part of the instruction it keeps
CONTROL_CONDITIONS = {"pos": "pos_control", "neg": "neg_control"}
PRESS_PREFIX = "kvpress:"
PRESS_USAGE = f"write {PRESS_PREFIX}PRESS or {PRESS_PREFIX}PRESS@RATIO with PRESS one of {', '.join(PRESSES)}"


@dataclass(frozen=True)
class PressBaseline:
    """`kvpress:PRESS` (the gist cache's memory per prompt) or `kvpress:PRESS@R` (the fraction R of P removed)."""

    press: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        return PRESS_PREFIX + self.press + ("" if self.ratio is None else f"@{self.ratio:g}")


def is_press(baseline: str) -> bool:
    return isinstance(baseline, str) and baseline.strip().lower().startswith(PRESS_PREFIX)


def parse_press(baseline: str) -> PressBaseline:
    """`kvpress:snapkv` -> PressBaseline("snapkv"), `kvpress:knorm@0.5` -> PressBaseline("knorm", 0.5); refuses an
    unknown press, a missing name and a ratio outside [0, 1) in one line each."""
    text = baseline.strip()
    body = text[len(PRESS_PREFIX):]
    name, at, ratio_text = body.partition("@")
    name = name.strip().lower().replace("-", "_")
    if not name:
        raise GistError(f"--baseline {text!r} names no press: {PRESS_USAGE}")
    if name not in PRESSES:
        raise GistError(f"unknown press {name!r} in --baseline {text!r}: {PRESS_USAGE}")
    if not at:
        return PressBaseline(name)
    try:
        ratio = float(ratio_text)
    except ValueError:
        ratio = math.nan
    if not 0 <= ratio < 1:  # NaN fails too
        raise GistError(f"--baseline {text!r}: the ratio after @ is the fraction of prompt positions the press "
                        f"removes and must be in [0, 1), got {ratio_text.strip()!r}")
    return PressBaseline(name, ratio)


def press_kept_positions(tokenizer, gist_config, template: str, num_prompt_tokens: int,
                         ratio: float | None = None) -> int:
    """K: the positions a press keeps of a prompt of `num_prompt_tokens` (P). Without a ratio, as many as that
    prompt's gist cache holds: F (the run's visible fixed prefix) + its M gist slots (`truncate_budget`), at most
    P; with `ratio` R, kvpress's own count max(1, int(P * (1 - R))) (P when R is 0)."""
    if ratio is not None:
        return num_prompt_tokens if ratio == 0 else max(1, int(num_prompt_tokens * (1 - ratio)))
    prefix = len(visible_prefix_ids(tokenizer, template, gist_config.mask))
    return min(num_prompt_tokens, prefix + truncate_budget(tokenizer, gist_config, template, num_prompt_tokens))


@dataclass
class Prepared:
    """One example's token ids for one run: P, I and, for `truncate`, the cut prompt."""

    prompt: list[int]  # P: encode_instruction
    input: list[int]  # I: encode_input
    truncated: list[int] | None = None
    truncated_end: list[int] | None = None  # `truncate-end`: the instruction's last `kept` tokens
    kept: int | None = None
    instruction_tokens: int | None = None


def condition_sequences(condition: str, items: list[Prepared], gist_ids: list[int],
                        template_ids: list[int]) -> tuple[list[list[int]], list[int] | None]:
    """(token-id sequences, rotary position offsets or None) that a causal condition generates from (table above)."""
    if condition == "base":
        return [[*p.prompt, *p.input] for p in items], None
    if condition in ("full", "pos_control"):
        return [[*p.prompt, *gist_ids, *p.input] for p in items], None
    if condition == "truncate":
        return [[*p.truncated, *gist_ids, *p.input] for p in items], None
    if condition == "truncate-end":
        return [[*p.truncated_end, *gist_ids, *p.input] for p in items], None
    if condition == "none":
        return [[*template_ids, *gist_ids, *p.input] for p in items], None
    if condition == "neg_control":
        return [list(p.input) for p in items], [len(p.prompt) + len(gist_ids) for p in items]
    if condition in NO_MODEL:
        raise GistError(f"{condition} runs no model: its answers are echo_answers(inputs)")
    if is_press(condition):
        raise GistError(f"{condition} runs in the peers virtualenv: evaluate it with gistcache.eval.peers.evaluate "
                        f"(what `gist eval` calls), not gistcache.eval.loop.evaluate")
    raise AssertionError(condition)


def state_positions(condition: str, p: Prepared, num_gist: int, template_ids: list[int]) -> int:
    """Positions of prompt state kept before the input (the baselines' gist ids not counted)."""
    return {"gist": num_gist, "full": len(p.prompt), "base": len(p.prompt), "pos_control": len(p.prompt),
            "truncate": len(p.truncated or []), "truncate-end": len(p.truncated_end or []), "none": len(template_ids),
            "neg_control": 0, "echo": 0}[condition]


def echo_answers(inputs: list[str]) -> list[str]:
    """The echo control's answers: each input itself, stripped (an empty input answers "")."""
    return [text.strip() for text in inputs]


@dataclass(frozen=True)
class TruncatedPrompt:
    """The prompt ids with the instruction cut to its first (or last) `kept` tokens."""

    ids: list[int]
    kept: int  # instruction tokens kept: min(M, instruction_tokens)
    instruction_tokens: int  # tokens of the instruction itself, in context (template excluded)


def template_only_ids(tokenizer, template: str) -> list[int]:
    """The prompt ids with the instruction removed: the template's own text only (`none`)."""
    template = resolve_template(tokenizer, template)
    text = format_prompt(tokenizer, INSTRUCTION_SLOT, "", template)
    return encode_prompt(tokenizer, PromptText(prompt=text.prompt.replace(INSTRUCTION_SLOT, ""), after=""), template)


def truncate_prompt(tokenizer, instruction: str, template: str, max_tokens: int,
                    keep: str = "start") -> TruncatedPrompt:
    """`encode_instruction` with the instruction cut to its first `max_tokens` tokens (its last with `keep="end"`).

    The cut is made in the prompt's own tokenization (the ids are the full prompt ids with the
    instruction's tokens after the first `max_tokens` removed; template tokens kept), so a budget
    at least the instruction's length gives back the full prompt exactly. A token that straddles
    the template and the instruction counts as an instruction token.
    """
    if max_tokens < 0:
        raise GistError(f"the truncation budget must be >= 0 tokens, got {max_tokens}")
    template = resolve_template(tokenizer, template)
    text = format_prompt(tokenizer, instruction, "", template)
    full = encode_prompt(tokenizer, text, template)
    start = text.prompt.rfind(instruction.strip())
    end = start + len(instruction.strip())
    if start < 0:
        raise GistError(f"the template does not hold the instruction verbatim: cannot truncate {instruction[:40]!r}")
    first, last = _instruction_token_span(tokenizer, text.prompt, start, end)
    if first is None:  # a slow tokenizer without offsets: tokenize the three pieces apart
        pieces = [tokenizer(s, add_special_tokens=False).input_ids
                  for s in (text.prompt[:start], text.prompt[start:end], text.prompt[end:])]
        extra = full[:len(full) - sum(len(p) for p in pieces)]
        kept = min(max_tokens, len(pieces[1]))
        part = pieces[1][len(pieces[1]) - kept:] if keep == "end" else pieces[1][:kept]
        return TruncatedPrompt(ids=[*extra, *pieces[0], *part, *pieces[2]], kept=kept,
                               instruction_tokens=len(pieces[1]))
    n_text = len(tokenizer(text.prompt, add_special_tokens=False).input_ids)
    extra = len(full) - n_text  # a BOS that encode_prompt puts first
    first, last = first + extra, last + extra
    count = last - first
    kept = min(max_tokens, count)
    part = full[last - kept:last] if keep == "end" else full[first:first + kept]
    return TruncatedPrompt(ids=[*full[:first], *part, *full[last:]], kept=kept, instruction_tokens=count)


def instruction_token_count(tokenizer, instruction: str, template: str) -> int:
    """Tokens of the instruction alone, as it is tokenized inside the prompt (template excluded); tokenized on its
    own where the template does not hold it verbatim (only `truncate` needs the cut, and refuses then)."""
    try:
        return truncate_prompt(tokenizer, instruction, template, 0).instruction_tokens
    except GistError:
        return len(tokenizer(instruction.strip(), add_special_tokens=False).input_ids)


def truncate_budget(tokenizer, gist_config, template: str, num_prompt_tokens: int, fixed: int | None = None) -> int:
    """Instruction tokens `truncate` keeps for one prompt of `num_prompt_tokens` (`encode_instruction`): `fixed`
    (--truncate-tokens) when given, else as many as that prompt's gist cache holds slots: M = N, or N per
    chunk of `gist_every` instruction tokens, plus a raw tail's (`masks.count_gist_slots`, past the run's visible
    fixed prefix F).
    So truncation keeps the same number of positions as the gist cache, F of the template aside."""
    if fixed:
        return fixed
    prefix = len(visible_prefix_ids(tokenizer, template, gist_config.mask))
    return count_gist_slots(num_prompt_tokens, gist_config.num_gist_tokens, gist_config.gist_every, prefix,
                            gist_config.raw_tail)


def _instruction_token_span(tokenizer, text: str, start: int, end: int) -> tuple[int | None, int | None]:
    """Token indices [first, last) of `text` whose characters overlap [start, end), or (None, None)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None, None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        return None, None
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        return None, None
    if inside != list(range(inside[0], inside[-1] + 1)):
        raise GistError("the instruction's tokens are not contiguous in the prompt: cannot truncate it")
    return inside[0], inside[-1] + 1


def generate_gist(model: GistModel, instructions: list[str], inputs: list[str], *, max_new_tokens: int,
                  batch_size: int = 8, on_batch=None, context_used: list[int] | None = None) -> list[str]:
    """The gist condition: compress each instruction, then generate each input from its cache.

    `context_used`, when given, gets each cache's `context_used` (the positions it holds before the input)."""
    out: list[str] = []
    for start in range(0, len(instructions), batch_size):
        chunk = slice(start, start + batch_size)
        caches = compress(model, instructions[chunk], batch_size=batch_size)
        if context_used is not None:
            context_used += [c.context_used for c in caches]
        out += generate(model, caches, inputs[chunk], max_new_tokens=max_new_tokens, **GREEDY)
        if on_batch is not None:
            on_batch(len(caches))
    return out
