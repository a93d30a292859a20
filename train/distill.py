"""Self-distillation from the full prompt: the teacher reads the whole instruction, the student the gist.

The teacher is the base model reading the prompt and the input under a plain causal mask, with no
gist token at all: exactly what a user would run without gistcache. The student is the gisted
model under its gist mask. `distill_loss` is KL(teacher || student) over the answer tokens, at a
temperature (scaled by T^2, as Hinton et al.), so the target is "answer as the full prompt would".

Which module is the teacher, per `--tune`:
    lora  the student's own base weights, with the adapter disabled (no copy)
    gist  the frozen base model itself (no copy)
    full  a frozen copy made before training (needs memory for a second model)

The teacher sequence is the student's with the N gist tokens taken out and N pads put on the
left, so every answer token stays in the same column and the two logit tensors line up::

    student   [pad] p p p G i i a a a
    teacher   [pad] pad p p p i i a a a      (positions count real tokens only)

`with_teacher_answers` replaces the data's answers by the teacher's own greedy answers (cached in
the run folder), so a file of instructions and inputs trains a gist without reference outputs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from gistcache._io import atomic_write_text
from gistcache.errors import GistError
from gistcache.inference.generation import generate_full_prompt
from gistcache.masks import make_position_ids
from gistcache.model import GistModel
from gistcache.prompts import IGNORE_INDEX

TEACHER_ANSWERS_FILE = "teacher_answers.jsonl"


@dataclass
class Teacher:
    """The module that reads the full prompt, and how to call it without the student's changes."""

    module: nn.Module
    disable_adapter: bool  # LoRA: run the student's base with its adapter switched off

    def context(self):
        return self.module.disable_adapter() if self.disable_adapter else contextlib.nullcontext()


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where a teacher copy would live (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_teacher(base: nn.Module, tune: str, device: torch.device) -> Teacher:
    """The teacher for `--tune` (see the module docstring); call before the base is wrapped."""
    if tune == "lora":
        return Teacher(module=base, disable_adapter=True)  # the peft wrapper is set by the caller
    if tune == "gist":
        return Teacher(module=base, disable_adapter=False)
    need = model_bytes(base)
    free = free_memory_bytes(device)
    # the copy plus the student's gradients and optimizer state must still fit: ask for twice its size
    if free is not None and free < 2 * need:
        raise GistError(f"--objective distill with --tune full keeps a frozen copy of the model as teacher: it needs "
                        f"about {2 * need / 2**30:.1f} GiB more free memory on {device} (free: {free / 2**30:.1f} GiB); "
                        f"use --tune lora, where the teacher is the base with the adapter disabled")
    teacher = copy.deepcopy(base).eval()
    teacher.requires_grad_(False)
    return Teacher(module=teacher, disable_adapter=False)


def teacher_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, gist_token_id: int,
                  pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's (B, T) batch with each row's gist tokens removed and as many pads put on the left."""
    rows_ids, rows_mask = [], []
    for ids, mask in zip(input_ids, attention_mask):
        keep = ids != gist_token_id  # (T,)
        n = int((~keep).sum())
        rows_ids.append(torch.cat([ids.new_full((n,), pad_token_id), ids[keep]]))
        rows_mask.append(torch.cat([mask.new_zeros(n), mask[keep]]))
    return torch.stack(rows_ids), torch.stack(rows_mask)


@torch.no_grad()
def teacher_logits(teacher: Teacher, student: GistModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   pad_token_id: int, logits_to_keep: int = 0) -> torch.Tensor:
    """(B, K, V) logits of the teacher reading each row without its gist tokens, for the last K
    columns (0: all), aligned with the student's."""
    ids, mask = teacher_batch(input_ids, attention_mask, student.gist_token_id, pad_token_id)
    embeds = student.model.get_input_embeddings()(ids)
    with teacher.context():
        out = teacher.module(inputs_embeds=embeds, attention_mask=mask, position_ids=make_position_ids(mask),
                             logits_to_keep=logits_to_keep)
    return out.logits


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over answer tokens of KL(teacher || student) at `temperature`, times temperature^2.

    logits: (B, T, V), aligned; labels: (B, T), IGNORE_INDEX off the answer. The token at column t
    is predicted from column t-1, as in the label loss.
    """
    answer = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    if not bool(answer.any()):
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][answer].float() / temperature  # (M, V)
    t = teacher_logits[:, :-1][answer].float() / temperature  # (M, V)
    log_t = torch.log_softmax(t, dim=-1)
    kl = (log_t.exp() * (log_t - torch.log_softmax(s, dim=-1))).sum(dim=-1)  # (M,)
    return kl.mean() * temperature ** 2


# --- answers written by the teacher -----------------------------------------------------------------

def check_has_inputs(paths: list[str], rows: list) -> None:
    """--teacher-answers answers inputs: a file in which no row has an input cannot train a gist."""
    for path in paths:
        if not any(ex.input.strip() for ex in rows if ex.source.startswith(f"{path}:")):
            raise GistError(f"--teacher-answers: {path} has no row with an input; the teacher answers inputs under "
                            f"each instruction: give rows with instruction and input")


def _row_key(teacher_id: str, instruction: str, input: str) -> str:
    return hashlib.sha256(f"{teacher_id}\0{instruction}\0{input}".encode()).hexdigest()


def with_teacher_answers(rows: list, model: GistModel, out_dir: Path, *, max_new_tokens: int, batch_size: int,
                         base_fingerprint: str, on_batch=None) -> list:
    """`rows` with each output replaced by the teacher's greedy answer to the full prompt.

    `model` wraps the untouched base model (before any tuning). Answers are cached in
    `out_dir/teacher_answers.jsonl` (one {"key", "output"} per row), so a resumed or repeated run
    reuses them; the file is rewritten atomically after each batch. The key covers the base model's
    fingerprint, the template and `max_new_tokens`, so answers of another teacher are never reused.
    """
    path = out_dir / TEACHER_ANSWERS_FILE
    teacher_id = f"{base_fingerprint}|{model.template}|{max_new_tokens}"
    cached: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                cached[item["key"]] = item["output"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill: answer that row again
    todo = {}  # one generation per (instruction, input), however many rows repeat it
    for ex in rows:
        key = _row_key(teacher_id, ex.instruction, ex.input)
        if key not in cached:
            todo.setdefault(key, ex)
    pending = list(todo.items())
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        answers = generate_full_prompt(model, [ex.instruction for _, ex in chunk], [ex.input for _, ex in chunk],
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
        for (key, _), answer in zip(chunk, answers):
            cached[key] = answer.strip()
        lines = [json.dumps({"key": k, "output": v}, ensure_ascii=False) for k, v in cached.items()]
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
        if on_batch is not None:
            on_batch(len(chunk))
    return [replace(ex, output=cached[_row_key(teacher_id, ex.instruction, ex.input)]) for ex in rows]

