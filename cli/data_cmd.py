"""`gist data kshot`: Alpaca-format rows that name their task -> k-shot prompts (gistcache.data.kshot)."""

from __future__ import annotations

import random
from typing import Annotated, Optional

import typer
from rich.table import Table

from gistcache.cli.common import check_output_file, console, friendly_errors, print_json
from gistcache.cli.options import JsonOut
from gistcache.data.kshot import build_kshot, check_kshot_options, read_task_rows, summarize, write_rows
from gistcache.data.tasks import SHAPES, make_long_tasks
from gistcache.errors import GistError
from gistcache.model import load_tokenizer, quiet_transformers

app = typer.Typer(help="Build training and evaluation data files.", no_args_is_help=True)


@app.command("kshot")
@friendly_errors
@quiet_transformers()
def kshot(
    data: Annotated[str, typer.Argument(help="An Alpaca-format JSON file whose rows name their task in 'source' (e.g. superni_train.json).")],
    out: Annotated[str, typer.Option("--out", help="The JSON file to write (replaced atomically).")],
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Most instruction tokens of a k-shot prompt.")] = 2048,
    min_prompt_tokens: Annotated[int, typer.Option("--min-prompt-tokens", help="Fewest instruction tokens; a row that cannot reach it is left out.")] = 0,
    model: Annotated[str, typer.Option("--model", help="The model whose tokenizer counts the tokens.")] = "smollm2-135m",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Only these tasks: names, comma-separated, a file of names; LONG_DEV (the long dev split's tasks) and LONG_TUNE (the long tuning split's) stand for their lists.")] = None,
    exclude_tasks: Annotated[Optional[str], typer.Option("--exclude-tasks", help="Leave these tasks out: names, comma-separated, a file of names, LONG_DEV, LONG_TUNE (e.g. LONG_DEV,LONG_TUNE).")] = None,
    min_shots: Annotated[int, typer.Option("--min-shots", help="Fewest worked examples per prompt.")] = 0,
    max_shots: Annotated[Optional[int], typer.Option("--max-shots", help="Most worked examples per prompt. Default: all other rows of the task that fit.")] = None,
    per_task: Annotated[Optional[int], typer.Option("--per-task", help="Rows kept per task (a seeded draw). Default: all.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the shot order and of k.")] = 0,
    recall: Annotated[float, typer.Option("--recall", help="Fraction of rows (with shots) that answer one of their own shots, word for word in the prompt: training rows that reward keeping the prompt's exact words.")] = 0.0,
    shuffle: Annotated[Optional[int], typer.Option("--shuffle", help="Write the rows in an order shuffled with this seed (default: grouped by task), so `gist eval --limit N` reads a mix of tasks.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Turn rows that name their task into k-shot prompts: the task's instruction plus k worked examples of it."""
    check_kshot_options(max_prompt_tokens=max_prompt_tokens, min_prompt_tokens=min_prompt_tokens,
                        min_shots=min_shots, max_shots=max_shots, per_task=per_task, recall=recall)
    check_output_file(out, "--out")
    rows = read_task_rows(data)  # refused before the tokenizer loads
    tokenizer = load_tokenizer(model)
    built = build_kshot(rows, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, seed=seed,
                        include_tasks=tasks, exclude_tasks=exclude_tasks, min_shots=min_shots, max_shots=max_shots,
                        per_task=per_task, min_prompt_tokens=min_prompt_tokens, recall=recall)
    if shuffle is not None:
        random.Random(shuffle).shuffle(built)
    write_rows(built, out)
    summary = {"out": out, **summarize(built)}
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"k-shot rows written to {out}")
    t, s = summary["instruction_tokens"], summary["shots"]
    cells = {"rows": str(summary["rows"]), "tasks": str(summary["tasks"]),
             "tokens min/median/max": f"{t['min']}/{t['median']}/{t['max']}",
             "shots min/mean/max": f"{s['min']}/{s['mean']}/{s['max']}"}
    if recall:
        cells["recall rows"] = str(summary["recall_rows"])
    for column in cells:
        table.add_column(column, justify="right", overflow="fold")
    table.add_row(*cells.values())
    console.print(table)


SHAPES_HELP = ("fixed: the training family's four rule shapes; varied: a shape drawn per prompt, none with the "
               "held-out family's marks; label: every output is one made-up word, so an echo of the input scores 0.")


@app.command("long")
@friendly_errors
def long(
    out: Annotated[str, typer.Option("--out", help="The JSON file to write (replaced atomically).")],
    num: Annotated[int, typer.Option("--num", help="Rows to generate.")] = 200,
    held_out: Annotated[bool, typer.Option("--held-out", help="The held-out family (rules of another shape), for evaluation.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    shapes: Annotated[str, typer.Option("--shapes", help=SHAPES_HELP)] = "fixed",
) -> None:
    """Generate the built-in long-prompt family: a made-up rule shown by 10-99 worked examples, then a new word."""
    if num < 1:
        raise GistError(f"--num {num}: give a positive number of rows")
    if shapes not in SHAPES:
        raise GistError(f"--shapes {shapes!r}: use one of {', '.join(SHAPES)}")
    if shapes != "fixed" and held_out:
        raise GistError(f"--shapes {shapes} is a family of its own: the held-out family (--held-out) has its own "
                        "shapes")
    check_output_file(out, "--out")
    made = make_long_tasks(num, seed=seed, held_out=held_out, shapes=shapes)
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
             "source": f"builtin:{r['family']}"} for r in made]
    write_rows(rows, out)
    console.print(f"wrote {len(rows)} rows of {rows[0]['source']} to {out}", highlight=False)
