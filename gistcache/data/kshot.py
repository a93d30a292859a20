"""K-shot prompts: a task's instruction plus k worked examples of the same task, for long-prompt training and
evaluation.

Any Alpaca-format file whose rows name their task in `source` (as `superni/superni_train.json` does: the
task name, its rows sharing one instruction) becomes rows whose instruction is::

    {the row's instruction}

    Examples:

    Input: {another row's input}
    Output: {another row's output}

    Input: ...
    Output: ...

and whose `input` / `output` are the row's own (shots are rows of the same task and instruction; a row is
never among its own shots, nor is a row of the same input). Per row, k is drawn uniformly from the shot counts whose instruction fits `max_prompt_tokens` tokens
(counted with the tokenizer of the model that will read it) and, with `min_prompt_tokens`, reaches that many;
a row with no such k is skipped. Everything is seeded: the same rows, seed and tokenizer give the same file.

A task list (`--tasks`, `--exclude-tasks`) may name the held-out SuperNI sets of `heldout_tasks` as LONG_DEV and
LONG_TUNE.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

from gistcache._io import atomic_path
from gistcache.data.alpaca import _records_with_lines
from gistcache.data.heldout_tasks import LONG_DEV_NAME, LONG_TUNE_NAME, NAMED_TASK_SETS
from gistcache.errors import GistError


def format_kshot(instruction: str, shots: list[dict]) -> str:
    """The k-shot instruction: the task's instruction, then each shot's input and output."""
    text = instruction.strip()
    if not shots:
        return text
    blocks = [f"Input: {s['input'].strip()}\nOutput: {s['output'].strip()}" for s in shots]
    return text + "\n\nExamples:\n\n" + "\n\n".join(blocks)


def read_task_rows(path: str | Path) -> list[dict]:
    """Alpaca-format rows that name their task: {instruction, input, output, source} each, source non-empty."""
    path = Path(path)
    if not path.is_file():
        raise GistError(f"data file {path} does not exist: give an Alpaca-format JSON file whose rows name "
                        f"their task in 'source'")
    records = _records_with_lines(path)
    return check_task_rows([record for _, record in records], where=[f"{path}:{line}" for line, _ in records])


def check_task_rows(rows: list, where: list[str] | None = None) -> list[dict]:
    """Refuse rows that are not {instruction, input, output, source} with text values, naming the first bad one."""
    if not rows:
        raise GistError("the k-shot builder was given no rows")
    checked = []
    for i, row in enumerate(rows):
        at = where[i] if where else f"row {i}"
        if not isinstance(row, dict):
            raise GistError(f"{at}: expected an object with instruction, input, output, source; "
                            f"got {type(row).__name__}")
        source = row.get("source")
        if not isinstance(source, str) or not source.strip():
            raise GistError(f"{at}: no task field 'source' (the task name): the k-shot builder draws shots from "
                            f"rows of the same task, so every row must name its task")
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise GistError(f"{at}: field {key!r} must be non-empty text")
        if not isinstance(row.get("input", ""), str):
            raise GistError(f"{at}: field 'input' must be text")
        checked.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"],
                        "source": source.strip()})
    return checked


def resolve_task_list(spec: str | Iterable[str] | None, known: Iterable[str], flag: str) -> set[str] | None:
    """A task list as names, a comma-separated string, a file (one name a line, or a JSON list), `LONG_DEV` or
    `LONG_TUNE` (alone or among names); every name must be a task of the rows."""
    if spec is None:
        return None
    if isinstance(spec, str):
        path = Path(spec)
        if spec not in NAMED_TASK_SETS and path.is_file():
            text = path.read_text(encoding="utf-8")
            try:
                names = json.loads(text)
            except json.JSONDecodeError:
                names = [line.split("#")[0] for line in text.splitlines()]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise GistError(f"{flag} {spec}: give a JSON list of task names or one name a line")
        else:
            names = spec.split(",")
    else:
        names = list(spec)
    out: set[str] = set()
    for name in (n.strip() for n in names):
        if name in NAMED_TASK_SETS:
            out.update(NAMED_TASK_SETS[name])
        elif name:
            out.add(name)
    if not out:
        raise GistError(f"{flag}: the task list is empty: give task names, a file of them, {LONG_DEV_NAME} or "
                        f"{LONG_TUNE_NAME}")
    unknown = sorted(out - set(known))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise GistError(f"{flag}: no rows of task {', '.join(unknown[:3])}{more} in the data: check the names "
                        f"(the rows' 'source' field)")
    return out


def build_kshot(rows: list[dict] | str | Path, *, tokenizer, max_prompt_tokens: int, seed: int = 0,
                include_tasks: str | Iterable[str] | None = None, exclude_tasks: str | Iterable[str] | None = None,
                min_shots: int = 0, max_shots: int | None = None, per_task: int | None = None,
                min_prompt_tokens: int = 0, recall: float = 0.0) -> list[dict]:
    """Turn task-named rows into k-shot rows {instruction, input, output, source, num_shots, instruction_tokens}.

    For each kept row, shots are other rows of its task with the same instruction (never itself, nor a row with
    the same input), in a
    seeded order; k is drawn uniformly among the counts from `min_shots` to `max_shots` (default: all other
    rows) whose instruction has at most `max_prompt_tokens` and at least `min_prompt_tokens` tokens
    (`tokenizer(text, add_special_tokens=False)`). A row with no such k is left out. `per_task` keeps that many
    rows of each task (a seeded draw; shots still come from all its rows). `include_tasks` / `exclude_tasks`
    take names, a comma-separated string, a file, or "LONG_DEV"; a name with no rows is refused.

    `recall` R: in a seeded draw, that fraction of the rows with at least one shot take one of their shots' input
    and output as their own (marked `"recall": true`): the answer stands word for word in the prompt, so such a
    row rewards a cache that keeps the prompt's exact words (label sets, tags, formats), which the teacher
    reading the full prompt copies. The other rows are the same as with R = 0.
    """
    if isinstance(rows, (str, Path)):
        rows = read_task_rows(rows)
    else:
        rows = check_task_rows(rows)
    check_kshot_options(max_prompt_tokens=max_prompt_tokens, min_prompt_tokens=min_prompt_tokens, min_shots=min_shots,
                  max_shots=max_shots, per_task=per_task, recall=recall)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["source"], []).append(row)
    include = resolve_task_list(include_tasks, by_task, "--tasks")
    exclude = resolve_task_list(exclude_tasks, by_task, "--exclude-tasks") or set()
    tasks = [t for t in by_task if (include is None or t in include) and t not in exclude]
    if not tasks:
        raise GistError("no task is left after --tasks / --exclude-tasks: keep at least one")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = []
    for task in tasks:
        task_rows = by_task[task]
        indices = list(range(len(task_rows)))
        if per_task is not None and per_task < len(indices):
            indices = sorted(random.Random(f"{seed}:{task}:rows").sample(indices, per_task))
        for i in indices:
            row = task_rows[i]
            rng = random.Random(f"{seed}:{task}:{i}")  # str seeds are hashed with SHA-512: stable across runs
            # shots: the task's other rows under the same instruction (a file whose 'source' spans several
            # instructions, e.g. an Alpaca+ split, never mixes them), never one with the row's own input
            pool = [r for j, r in enumerate(task_rows) if j != i and r["input"].strip() != row["input"].strip()
                    and r["instruction"].strip() == row["instruction"].strip()]
            rng.shuffle(pool)
            top = len(pool) if max_shots is None else min(max_shots, len(pool))
            fitting: list[tuple[int, int]] = []  # (k, tokens) for every k in range that fits
            for k in range(0, top + 1):
                tokens = count(format_kshot(row["instruction"], pool[:k]))
                if tokens > max_prompt_tokens:
                    break  # more shots only add tokens
                if k >= min_shots and tokens >= min_prompt_tokens:
                    fitting.append((k, tokens))
            if not fitting:
                continue
            k, tokens = rng.choice(fitting)
            built = {"instruction": format_kshot(row["instruction"], pool[:k]), "input": row["input"],
                     "output": row["output"], "source": task, "num_shots": k, "instruction_tokens": tokens}
            if k and recall:
                draw = random.Random(f"{seed}:{task}:{i}:recall")  # its own stream: the other draws are R = 0's
                if draw.random() < recall:
                    shot = pool[draw.randrange(k)]
                    built.update(input=shot["input"], output=shot["output"], recall=True)
            out.append(built)
    if not out:
        raise GistError(f"no row fits: every task's instruction with {min_shots}+ shots is longer than "
                        f"--max-prompt-tokens {max_prompt_tokens} (or shorter than --min-prompt-tokens "
                        f"{min_prompt_tokens}): raise the budget or lower --min-shots")
    return out


def check_kshot_options(*, max_prompt_tokens, min_prompt_tokens, min_shots, max_shots, per_task,
                        recall=0.0) -> None:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_prompt_tokens) or max_prompt_tokens <= 0:
        raise GistError(f"--max-prompt-tokens {max_prompt_tokens}: give a positive number of tokens, e.g. 2048")
    if not is_int(min_prompt_tokens) or min_prompt_tokens < 0 or min_prompt_tokens > max_prompt_tokens:
        raise GistError(f"--min-prompt-tokens {min_prompt_tokens}: give 0 up to --max-prompt-tokens "
                        f"{max_prompt_tokens}")
    if not is_int(min_shots) or min_shots < 0:
        raise GistError(f"--min-shots {min_shots}: give 0 or more")
    if max_shots is not None and (not is_int(max_shots) or max_shots < min_shots):
        raise GistError(f"--max-shots {max_shots}: give a number of shots >= --min-shots {min_shots}")
    if per_task is not None and (not is_int(per_task) or per_task <= 0):
        raise GistError(f"--per-task {per_task}: give a positive number of rows per task")
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 <= recall <= 1:
        raise GistError(f"--recall {recall}: give the fraction of rows that answer one of their own shots, 0 to 1")


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows as one JSON array, atomically (a temporary sibling, then os.replace)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def summarize(rows: list[dict]) -> dict:
    """Counts for a report: rows, tasks, instruction tokens (min / median / max) and shots (min / max)."""
    tokens = sorted(r["instruction_tokens"] for r in rows)
    shots = [r["num_shots"] for r in rows]
    return {"rows": len(rows), "tasks": len({r["source"] for r in rows}),
            "instruction_tokens": {"min": tokens[0], "median": tokens[len(tokens) // 2], "max": tokens[-1]},
            "shots": {"min": min(shots), "max": max(shots), "mean": round(sum(shots) / len(shots), 2)},
            "recall_rows": sum(bool(r.get("recall")) for r in rows)}
