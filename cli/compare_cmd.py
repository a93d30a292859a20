"""`gist compare`: two `gist eval` folders, paired row by row (gistcache.eval.compare)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from gistcache.cli.common import console, friendly_errors, print_json
from gistcache.cli.options import JsonOut
from gistcache.eval.compare import compare_evaluations
from gistcache.eval.fidelity import format_interval

COLUMNS = ("split", "tokens", "A", "B", "n", "ROUGE-L A", "ROUGE-L B", "B - A [95% CI]", "EM A", "EM B")
TABLE_WIDTH = 110  # the table fits a terminal this wide with short condition names; a narrower one gets lines


@friendly_errors
def compare(
    a: Annotated[str, typer.Argument(metavar="A", help="An evaluation folder (`gist eval --out`): A, the one subtracted.")],
    b: Annotated[str, typer.Argument(metavar="B", help="Another evaluation folder, or A again to set two of its conditions side by side.")],
    condition: Annotated[Optional[list[str]], typer.Option("--condition", help="A condition both hold (gist, full, truncate, RUN:gist, ...) or A_LABEL=B_LABEL (repeatable). Default: every condition both hold.")] = None,
    by_length: Annotated[bool, typer.Option("--by-length", help="Also compare within each instruction-length bucket.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    json_out: JsonOut = False,
) -> None:
    """The paired difference B - A of ROUGE-L on the rows two evaluations share, with its 95% interval."""
    result = compare_evaluations(a, b, conditions=condition, by_length=by_length, seed=seed)
    if json_out:
        print_json(result)
        return
    console.print(f"A: {a}", markup=False, highlight=False)
    console.print(f"B: {b}", markup=False, highlight=False)
    cells = [[row["split"], row["bucket"], row["a_condition"], row["b_condition"], str(row["examples"]),
              f"{row['rouge_a']['mean']:.1f}", f"{row['rouge_b']['mean']:.1f}", format_interval(row["difference"]),
              f"{row['em_a']:.1f}", f"{row['em_b']:.1f}"] for row in result["rows"]]
    if console.width < TABLE_WIDTH:  # one line per row, which a narrow terminal wraps whole, never cutting a number
        for split, bucket, label_a, label_b, n, rouge_a, rouge_b, difference, em_a, em_b in cells:
            console.print(f"{split} {bucket} {label_a} -> {label_b} (n {n}): ROUGE-L {rouge_a} -> {rouge_b}, "
                          f"B - A {difference}; EM {em_a} -> {em_b}", markup=False, highlight=False)
        return
    table = Table(title="gist compare: B - A on the same rows")
    for name in COLUMNS:
        label = name in ("A", "B")
        table.add_column(name, justify="left" if name in ("split", "tokens", "A", "B") else "right",
                         overflow="fold" if label else "ellipsis", no_wrap=not label)
    for row in cells:
        table.add_row(*row)
    console.print(table)
