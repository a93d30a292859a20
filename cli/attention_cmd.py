"""`gist attention`: build an AttentionConfig from flags, call gistcache.eval.attention.measure_attention."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from gistcache.cli.common import console, friendly_errors, print_json
from gistcache.cli.options import JsonOut
from gistcache.eval.attention import AttentionConfig, measure_attention
from gistcache.model import quiet_transformers


@friendly_errors
@quiet_transformers()
def attention(
    run: Annotated[Optional[str], typer.Option("--run", help="A run folder written by `gist train`. Default: the untrained --model.")] = None,
    model: Annotated[str, typer.Option(help="Base model measured when no --run is given.")] = "smollm2-135m",
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Alpaca-format file(s). Default: built-in rows.")] = None,
    examples: Annotated[int, typer.Option("--examples", help="Rows to measure (batch size 1).")] = 24,
    seed: Annotated[int, typer.Option(help="Which rows.")] = 1,
    num_gist: Annotated[int, typer.Option("--num-gist", help="Gist tokens, when no --run is given.")] = 1,
    template: Annotated[str, typer.Option(help="auto | chat | plain, when no --run is given.")] = "auto",
    json_out: JsonOut = False,
) -> None:
    """Where tokens after the gist put their attention under each condition's mask, and their answer loss."""
    config = AttentionConfig(run=run, model=model, data=data or [], examples=examples, seed=seed,
                             num_gist_tokens=num_gist, template=template)
    result = measure_attention(config)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"gist attention: {result['source']}, {result['conditions'][0]['examples']} examples")
    for name in ("condition", "attention on first visible key", "attention on gist", "answer loss"):
        table.add_column(name, justify="left" if name == "condition" else "right")
    for row in result["conditions"]:
        loss = row["answer_loss"]
        table.add_row(row["condition"], f"{row['first_visible_share']:.3f}", f"{row['gist_share']:.3f}",
                      "—" if loss is None else f"{loss:.3f}")
    console.print(table)
