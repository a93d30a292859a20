"""`gist eval`: build an EvalConfig from flags, call gistcache.eval.loop.evaluate, print the tables."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from gistcache.cli.common import check_writable_folder, console, friendly_errors, print_json
from gistcache.cli.options import JsonOut
from gistcache.errors import GistError
from gistcache.eval import loop, peers
from gistcache.eval.config import EvalConfig, resolve_config
from gistcache.eval.fidelity import fidelity_markdown, fidelity_table
from gistcache.eval.length import length_markdown
from gistcache.eval.report import length_rich_table, table_rows
from gistcache.model import quiet_transformers
from gistcache.run import resolve_run_dir
from gistcache.train.card import write_model_card

# columns left off the screen table on a terminal narrower than the whole table
NARROW_DROPPED = ("EM", "prefill FLOPs", "gen FLOPs", "compress FLOPs", "wall s")


@friendly_errors
@quiet_transformers()
def eval_(
    run: Annotated[Optional[list[str]], typer.Option("--run", help="A run folder written by `gist train`, or a shipped run's name (repeatable). Default: the shipped run.")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", help="full | none | truncate | base (the untouched base model reading the full prompt) | truncate-end (keeps the instruction's last tokens instead of its first; asked for by name only) | echo (no model: the input itself as the answer, a control on what ROUGE-L gives for repeating the input; by name only) | kvpress:PRESS (a KV-cache press at the gist cache's memory, run in .venv-peers: snapkv, expected_attention, knorm, streaming_llm, tova, random; kvpress:PRESS@R removes the fraction R of the prompt) (repeatable). Default: the first four; presses alone are added to them.")] = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="seen | unseen | human | an Alpaca-format FILE (repeatable). Default: all three splits.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first N examples of each split.")] = None,
    truncate_tokens: Annotated[Optional[int], typer.Option("--truncate-tokens", help="Instruction tokens the truncate baseline keeps. Default: the run's number of gist tokens.")] = None,
    control_runs: Annotated[Optional[str], typer.Option("--control-runs", help="pos=RUN,neg=RUN: runs trained with --condition pos_control / neg_control, each evaluated under its own condition.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder. Default: RUN/eval-<timestamp>.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens per answer, every condition.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder with alpaca_plus_validation_<split>.json. Default: $GISTCACHE_DATA or ../shared/data/alpaca_plus.")] = None,
    flops_examples: Annotated[int, typer.Option("--flops-examples", help="Count FLOPs on the first K examples of each split (batch size 1; 0: none).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    update_card: Annotated[bool, typer.Option("--update-card", help="Write the fidelity table (and the table by "
                                              "prompt length) into the run's model card (RUN/README.md).")] = False,
    json_out: JsonOut = False,
) -> None:
    """Compare the gist cache with the full, truncated and no-instruction prompts: ROUGE-L, FLOPs, bytes."""
    config = EvalConfig(
        runs=run or [str(resolve_run_dir(None))], baselines=baseline, splits=split, limit=limit, truncate_tokens=truncate_tokens,
        control_runs=control_runs, out=out, max_new_tokens=max_new_tokens, batch_size=batch_size, data_dir=data_dir,
        flops_examples=flops_examples, seed=seed, device=device, dtype=dtype,
    )
    config = resolve_config(config)  # the run folders and files are checked, and --out chosen, before models load
    check_writable_folder(config.out, "--out")
    if update_card and len(config.runs) != 1:
        raise GistError(f"--update-card writes one run's model card: give one --run, not {len(config.runs)}")
    # kvpress baselines run in the peers virtualenv and are merged into the same results (eval/peers.py)
    evaluate = peers.evaluate if peers.has_presses(config) else loop.evaluate
    results = evaluate(config, show_progress=not json_out)
    failure = peers.failure_line(results)  # a press that failed: the other conditions are written, then exit 2
    if update_card:
        write_model_card(config.runs[0], [fidelity_markdown(results), length_markdown(results)])
    if json_out:
        print_json({**{k: results[k] for k in ("out", "runs", "rows")}, "length": results.get("length", []),
                    **({"failed": results["failed"]} if "failed" in results else {})})
        if failure:
            raise GistError(failure)
        return
    headers, rows = table_rows(results)
    keep, table = list(range(len(headers))), Table(title=f"gist eval -> {results['out']}")
    narrow = console.width < 150  # a narrow terminal gets the columns people compare; results.md has them all
    if narrow:
        keep = [i for i, h in enumerate(headers) if h not in NARROW_DROPPED]
        table = Table(title=table.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i in keep:
        table.add_column(headers[i], justify="left" if i < headers.index("n") else "right",
                         no_wrap=headers[i] in ("condition", "ROUGE-L [95% CI]", "compression"))
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    console.print(table)
    if len(keep) < len(headers):
        console.print("(narrow terminal: all columns are in results.md)", highlight=False)
    if results.get("fidelity"):
        headers, rows = fidelity_table(results["fidelity"])
        keep, table = list(range(len(headers))), Table(
            title="fidelity: what the gist keeps of the full prompt (95% bootstrap)", box=box.SIMPLE_HEAD)
        if narrow:  # retention and gap closed; the agreement columns are in results.md
            keep = [i for i, h in enumerate(headers) if h in ("run", "split", "n", "retention", "gap closed")]
            table = Table(title=table.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for i in keep:
            table.add_column(headers[i], justify="left" if headers[i] in ("run", "split") else "right",
                             no_wrap=headers[i] in ("retention", "gap closed"))
        for row in rows:
            table.add_row(*(row[i] for i in keep))
        console.print(table)
    if (length_table := length_rich_table(results, narrow=narrow, width=console.width)) is not None:
        console.print(length_table)
    console.print(f"wrote results.json, results.md, predictions.jsonl, {', '.join(results['plots'])} in {results['out']}",
                  highlight=False)
    if failure:
        raise GistError(failure)

