"""What an evaluation reports: the summary table (screen and results.md), results.md, and the output folder.

    OUT/results.json        config, runs, one row per (run, split, condition), fidelity
    OUT/results.md          the table, the fidelity section, how each column is measured
    OUT/predictions.jsonl   one line per example: every condition's answer
    OUT/*.png               the plots (see plot.py)

The folder is written whole into a temporary folder beside it, then renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from gistcache._io import atomic_path, format_bytes
from gistcache.errors import GistError
from gistcache.eval.fidelity import fidelity_markdown
from gistcache.eval.length import length_markdown, length_table, narrow_length_table
from gistcache.eval.plot import plot_results


def format_count(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes), None -> '—'."""
    if x is None:
        return "—"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text): the summary table shared by the screen and results.md."""
    multi = len({r["run"] for r in results["rows"]}) > 1
    headers = (["run"] if multi else []) + ["split", "condition", "n", "ROUGE-L [95% CI]", "EM", "compression",
                                            "prefill FLOPs", "vs full", "gen FLOPs", "compress FLOPs",
                                            "prompt state", "wall s"]
    out = []
    for r in results["rows"]:
        rl = r["rouge_l"]
        comp = "—" if r["compression_mean"] is None else f"{r['compression_mean']:.1f}x (max {r['compression_max']:.0f}x)"
        red = r["prefill_reduction_vs_full"]
        out.append(([r["run"]] if multi else []) + [
            r["split"], r["condition"], str(r["examples"]),
            f"{rl['mean']:.1f} [{rl['ci_low']:.1f}, {rl['ci_high']:.1f}]", f"{r['exact_match']['mean']:.1f}", comp,
            format_count(r["prefill_flops"]), _format_change(red),
            format_count(r["generation_flops"]), format_count(r.get("compress_flops")),
            format_bytes(r["prompt_state_bytes_mean"], ".3g"), f"{r['wall_s']:.1f}",
        ])
    return headers, out


def _format_change(reduction: float | None) -> str:
    """0.74 (a 74% reduction) -> '-74%'; None -> '—'."""
    if reduction is None:
        return "—"
    change = round(-reduction * 100)
    return f"{change:+d}%" if change else "0%"


def markdown_table(results: dict) -> str:
    headers, rows = table_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """results.md: the runs, the summary table, the fidelity section and how each column is measured."""
    cfg = results["config"]
    k = cfg["flops_examples"]
    runs = ", ".join(f"{r['name']} ({r['condition']}, N={r['num_gist_tokens']}"
                     + (f" per {r['gist_every']} tokens)" if r.get("gist_every") else ")") for r in results["runs"])
    return "\n".join([
        "# gist eval", "",
        f"Runs: {runs}. Greedy, max_new_tokens={cfg['max_new_tokens']}, device {cfg['device_resolved']}.", "",
        markdown_table(results), "",
        fidelity_markdown(results),
        length_markdown(results),
        f"ROUGE-L: F x100, 95% bootstrap interval ({cfg['bootstrap_resamples']} resamples, seed {cfg['seed']}). "
        "EM: exact match x100 after strip + lower-case. Compression: instruction tokens (template included) / "
        "prompt-state positions. FLOPs: mean per example over the first "
        f"{k} examples of each split, batch size 1 (FlopCounterMode); gist prefill is the forward over the input "
        "given the gist cache, its compress FLOPs are one-time per instruction. vs full: change of prefill FLOPs "
        "against the full prompt. Prompt state: positions x layers x 2 x kv_heads x head_dim x dtype bytes.", "",
    ])


def length_rich_table(results: dict, *, narrow: bool = False, width: int | None = None):
    """The by-length table as a rich Table for the screen, or None when the results have none. `narrow` (a
    terminal under 150 columns): one table per (run, split) of ROUGE-L by condition, gist retention and
    compression, or, where that table is wider than `width`, one line per bucket that the terminal wraps whole
    (no number cut); results.md has every column."""
    if not results.get("length"):
        return None
    if narrow:
        return Group(*(_narrow_length_table(rows, width) for rows in _by_run_split(results["length"])))
    headers, rows = length_table(results["length"])
    table = Table(title="by instruction length (tokens): ROUGE-L, EM, retention, gap closed, compression",
                  box=box.SIMPLE_HEAD)
    for h in headers:
        table.add_column(h, justify="left" if h in ("run", "split", "tokens") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _by_run_split(rows: list[dict]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("run", ""), r.get("split", "")), []).append(r)
    return list(groups.values())


def _narrow_length_table(rows: list[dict], width: int | None = None) -> Table | Text:
    run, split = rows[0].get("run", ""), rows[0].get("split", "")
    title = f"ROUGE-L by length: {' '.join(x for x in (run, split) if x)}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    headers, cells = narrow_length_table(rows)
    for h in headers:
        table.add_column(h, justify="left" if h == "tokens" else "right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    if width is None or Console(width=10_000).measure(table).maximum <= width:
        return table
    lines = [f"{row[0]} tokens (n {row[1]}): " + ", ".join(f"{h} {v}" for h, v in zip(headers[2:], row[2:]))
             for row in cells]
    return Text("\n".join([title, *lines]))


def write_outputs(out: str | Path, results: dict, examples: dict, predictions: dict) -> None:
    """Write the output folder whole (plots, results.json, results.md, predictions.jsonl), then rename it into place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GistError(f"--out {out} appeared while evaluating and is not empty: choose another --out")
    with atomic_path(out, folder=True) as tmp:
        results["plots"] = [p.name for p in plot_results(results, tmp)]
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(results_markdown(results))
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for split, exs in examples.items():
                for i, (ex, pred) in enumerate(zip(exs, predictions[split])):
                    record = {"split": split, "index": i, "source": ex.source, "instruction": ex.instruction,
                              "input": ex.input, "reference": ex.output,
                              "outputs": {k: v for k, v in pred.items() if isinstance(v, str)},
                              **{k: v for k, v in pred.items() if not isinstance(v, str)}}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
