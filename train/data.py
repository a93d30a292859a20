"""Instruction data: Alpaca-format files, Self-Instruct seed tasks, the built-in set, and batching.

Accepted files (JSON array or JSON Lines):
  - Alpaca: {"instruction": str, "input": str (may be empty or absent), "output": str}
  - Self-Instruct seed tasks: {"instruction": str, "instances": [{"input": str, "output": str}, ...]}
A record of any other shape is refused, naming the file and the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from gistcache.errors import GistError
from gistcache.prompts import IGNORE_INDEX, EncodedExample, encode_example, format_prompt


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    source: str  # "file:line" or "builtin:family"


def _records_with_lines(path: Path) -> list[tuple[int, object]]:
    """Parse a JSON array or JSON Lines file into (line number, record) pairs."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GistError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    stripped = text.lstrip()
    if not stripped:
        raise GistError(f"{path}: the file is empty")
    if stripped[0] == "[":
        decoder = json.JSONDecoder()
        out = []
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise GistError(f"{path}: the JSON array is not closed")
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise GistError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
            out.append((line, record))
    out = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            out.append((line, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise GistError(f"{path}:{line}: invalid JSON ({exc.msg}); expected one JSON object per line") from exc
    return out


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise GistError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise GistError(f"{where}: field {key!r} is empty")
    return value


def load_examples(path: str | Path) -> list[Example]:
    """Read one Alpaca-format or Self-Instruct seed-task file."""
    path = Path(path)
    if not path.is_file():
        raise GistError(f"data file {path} does not exist")
    examples = []
    for line, record in _records_with_lines(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise GistError(f"{where}: expected an object with instruction/input/output, got {type(record).__name__}")
        if "instances" in record:
            instruction = _text(record, "instruction", where)
            instances = record["instances"]
            if not isinstance(instances, list) or not instances:
                raise GistError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
            for inst in instances:
                if not isinstance(inst, dict):
                    raise GistError(f"{where}: each instance must be an object with input and output")
                examples.append(Example(instruction, _text(inst, "input", where, required=False),
                                        _text(inst, "output", where), where))
        elif "instruction" in record and "output" in record:
            examples.append(Example(_text(record, "instruction", where), _text(record, "input", where, required=False),
                                    _text(record, "output", where), where))
        else:
            keys = ", ".join(sorted(record)) or "none"
            raise GistError(f"{where}: not Alpaca-shaped (has {keys}; needs instruction, input, output)")
    if not examples:
        raise GistError(f"{path}: holds no examples")
    return examples


def load_many(paths: list[str]) -> list[Example]:
    return [ex for path in paths for ex in load_examples(path)]


def builtin_examples(num_examples: int, *, seed: int, held_out: bool) -> list[Example]:
    from gistcache.train.tasks import make_builtin_tasks

    return [Example(r["instruction"], r["input"], r["output"], f"builtin:{r['family']}")
            for r in make_builtin_tasks(num_examples, seed=seed, held_out=held_out)]


def heldout_split(example: Example) -> str:
    """Which held-out split a built-in evaluation row belongs to, as the paper's seen/unseen splits:
    "seen_tasks" (new inputs of a task family trained on) or "unseen_tasks" (a family never trained on).
    Rows from the user's files are all "eval"."""
    kind, _, family = example.source.partition(":")
    if kind != "builtin":
        return "eval"
    from gistcache.train.tasks import HELD_OUT_FAMILIES

    return "unseen_tasks" if family in HELD_OUT_FAMILIES else "seen_tasks"


def normalize_instruction(text: str) -> str:
    return " ".join(text.strip().lower().split())


def drop_contaminated(train: list[Example], evaluation: list[Example]) -> tuple[list[Example], int]:
    """Drop training rows whose instruction (stripped, lower-cased) appears in the evaluation rows."""
    banned = {normalize_instruction(ex.instruction) for ex in evaluation}
    kept = [ex for ex in train if normalize_instruction(ex.instruction) not in banned]
    return kept, len(train) - len(kept)


def encode_examples(tokenizer, examples: list[Example], *, num_gist_tokens: int, gist_token_id: int,
                    template: str, max_length: int) -> tuple[list[EncodedExample], int]:
    """Tokenize examples; rows longer than max_length are dropped (never cut: that could cut the gist)."""
    encoded, too_long = [], 0
    for ex in examples:
        text = format_prompt(tokenizer, ex.instruction, ex.input, template)
        enc = encode_example(tokenizer, text, num_gist_tokens, gist_token_id, template, output=ex.output)
        if len(enc.input_ids) > max_length:
            too_long += 1
            continue
        encoded.append(enc)
    return encoded, too_long


def collate(batch: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: input_ids, attention_mask, labels, each (B, T)."""
    T = max(len(e.input_ids) for e in batch)
    ids, mask, labels = [], [], []
    for e in batch:
        pad = T - len(e.input_ids)
        ids.append([pad_token_id] * pad + e.input_ids)
        mask.append([0] * pad + [1] * len(e.input_ids))
        labels.append([IGNORE_INDEX] * pad + e.labels)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
