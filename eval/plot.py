"""Plots of an evaluation (matplotlib, Agg backend: no display needed).

- `rouge_by_condition.png`: ROUGE-L by condition (bars, 95% interval as error bars), one group
  per split;
- `fidelity.png`, when a gist run was evaluated with its baselines: retention (gist / full),
  gap closed ((gist - none) / (full - none)) and retention against the base model, per split,
  with their 95% intervals and a line at 100%;
- `rouge_vs_compression.png`, when more than one run is evaluated (several `--run`, e.g. runs at
  several `--gist-every` ratios, or control runs): one panel per split, ROUGE-L against the mean
  compression ratio (prompt positions / positions held before the input, template included for every
  condition; log scale), one line per condition (gist, truncate, ...) through its runs, each
  point named by its run, so gist at several ratios sits beside truncation to the same state
  (neg_control keeps no prompt state, so it has no ratio; the echo control, when run, is a dotted level).
"""

from __future__ import annotations

import math
from pathlib import Path


def plot_results(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNGs for `results` (from `evaluate`) into `out_dir`; return their paths."""
    import matplotlib  # deferred: matplotlib takes a second to import and only the written report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    rows = results["rows"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    paths = []

    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(splits) * max(1, len(labels)) * 0.6 + 2), 4.2))
    for j, label in enumerate(labels):
        xs, ys, errs = [], [], [[], []]
        for i, split in enumerate(splits):
            row = next((r for r in rows if r["split"] == split and r["label"] == label), None)
            if row is None:
                continue
            rl = row["rouge_l"]
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            ys.append(rl["mean"])
            errs[0].append(max(0.0, rl["mean"] - rl["ci_low"]))
            errs[1].append(max(0.0, rl["ci_high"] - rl["mean"]))
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=label)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel("ROUGE-L (F x100)")
    ax.set_title("ROUGE-L by condition and split (95% bootstrap interval)")
    ax.legend(fontsize="small", ncols=min(4, len(labels)))
    top = max([r["rouge_l"]["ci_high"] for r in rows] + [0.0])
    ax.set_ylim(0, min(100.0, max(5.0, top * 1.2)))
    paths.append(_save(plt, fig, out_dir / "rouge_by_condition.png"))

    fidelity = [f for f in results.get("fidelity", []) if f.get("retention") and math.isfinite(f["retention"]["mean"])]
    if fidelity:
        names = (("retention", "gist / full"), ("gap_closed", "gap closed"), ("retention_vs_base", "gist / base"))
        names = [(k, t) for k, t in names if any(f.get(k) for f in fidelity)]
        groups = [f"{f['run']} {f['split']}" if len({g['run'] for g in fidelity}) > 1 else f["split"] for f in fidelity]
        width = 0.8 / len(names)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2))
        for j, (key, title) in enumerate(names):
            vals = [f.get(key) if f.get(key) and math.isfinite(f[key]["mean"]) else None for f in fidelity]
            xs = [i + (j - (len(names) - 1) / 2) * width for i, v in enumerate(vals) if v]
            ys = [v["mean"] for v in vals if v]
            errs = [[max(0.0, v["mean"] - v["ci_low"]) for v in vals if v],
                    [max(0.0, v["ci_high"] - v["mean"]) for v in vals if v]]
            ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=title)
        ax.axhline(100, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("% of the full prompt's ROUGE-L")
        ax.set_title("What the gist keeps of the full prompt (95% bootstrap interval)")
        ax.legend(fontsize="small")
        paths.append(_save(plt, fig, out_dir / "fidelity.png"))

    if len(results.get("runs", [])) > 1:
        paths.append(_plot_compression(plt, rows, splits, out_dir / "rouge_vs_compression.png"))
    return paths


def _save(plt, fig, path: Path, bottom: float = 0.0) -> Path:
    fig.tight_layout(rect=(0, bottom, 1, 1))  # `bottom`: the figure's share kept free below the axes for a note
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_compression(plt, rows: list[dict], splits: list[str], path: Path) -> Path:
    """One panel per split: ROUGE-L (95% interval) against compression, a line per condition through its runs."""
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits) + 1, 4.4), squeeze=False)
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    alike = all(r.get("state_compression_mean") for r in rows if r["compression_mean"])  # results before it: not
    for ax, split in zip(axes[0], splits):
        for j, condition in enumerate(conditions):
            pts = sorted([(_compression(r, alike), r["rouge_l"], r["run"]) for r in rows
                          if r["split"] == split and r["condition"] == condition and _compression(r, alike)],
                         key=lambda p: p[0])
            if not pts:
                continue
            # conditions at one state (gist, truncate, presses) share an x: each is drawn a little apart to be seen
            spread = 1 + 0.015 * (j - (len(conditions) - 1) / 2)
            xs, ys = [p[0] * spread for p in pts], [p[1]["mean"] for p in pts]
            errs = [[max(0.0, p[1]["mean"] - p[1]["ci_low"]) for p in pts],
                    [max(0.0, p[1]["ci_high"] - p[1]["mean"]) for p in pts]]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, linestyle="-" if len(pts) > 1 else "none",
                        label=condition)
            if condition in ("gist", "truncate"):
                for x, y, (_, _, run) in zip(xs, ys, pts):
                    ax.annotate(run, (x, y), fontsize="x-small", xytext=(4, 4), textcoords="offset points")
        echo = next((r for r in rows if r["split"] == split and r["condition"] == "echo"), None)
        if echo is not None:  # a control with no state: a level to read the others against
            ax.axhline(echo["rouge_l"]["mean"], color="grey", linestyle=":", label="echo (the input as the answer)")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("compression (prompt positions / positions held)")
        ax.set_ylabel("ROUGE-L (F x100)")
        ax.set_title(f"{split}: ROUGE-L vs compression")
        ax.legend(fontsize="small")
    note = ("positions held before the input, template included, for every condition: gist, truncate and presses "
            "at one run's state sit at the same compression (drawn a little apart)" if alike else
            "gist: its cache's slots, the template not counted;\nthe others: the positions they keep, template included")
    fig.text(0.01, 0.01, note, fontsize="x-small", wrap=True)
    return _save(plt, fig, path, bottom=0.08)


def _compression(row: dict, alike: bool) -> float | None:
    """The row's x: prompt positions / positions held, template included for all (`alike`), else as the table has it."""
    return row.get("state_compression_mean") if alike else row["compression_mean"]


def merged_rows(eval_dirs: list[str | Path], renames: dict[str, str] | None = None) -> list[dict]:
    """The rows of several `gist eval` folders as one list, for one fidelity-vs-compression plot of runs evaluated
    apart (e.g. runs at several `--gist-every` ratios on one split file). Each row's x is computed from its folder's
    predictions.jsonl (prompt positions / positions held, per example), so folders written before
    `state_compression_mean` existed plot alike; a (run, split, condition) seen in an earlier folder is kept.
    `renames` maps a run's name in one folder to its name in another (one run evaluated under two names)."""
    import json

    renames = renames or {}
    rows, seen = [], set()
    for folder in map(Path, eval_dirs):
        results = json.loads((folder / "results.json").read_text())
        ratios: dict[tuple[str, str], list[float]] = {}
        for line in (folder / "predictions.jsonl").read_text().splitlines():
            pred = json.loads(line)
            for label, held in pred.get("cached_positions", {}).items():
                if held:
                    ratios.setdefault((pred["split"], label), []).append(pred["instruction_tokens"] / held)
        for row in results["rows"]:
            row = {**row, "run": renames.get(row["run"], row["run"])}
            key = (row["run"], row["split"], row["condition"])
            if key in seen:
                continue
            seen.add(key)
            xs = ratios.get((row["split"], row["label"]), [])
            rows.append({**row, "state_compression_mean": sum(xs) / len(xs) if len(xs) == row["examples"] else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m gistcache.eval.plot EVAL_DIR... --out FILE`: one ROUGE-L-vs-compression figure over the rows of
    several `gist eval` folders (runs at several ratios evaluated apart, on the same split files)."""
    import argparse
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(prog="python -m gistcache.eval.plot", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("eval_dirs", nargs="+", help="folders written by `gist eval` (results.json, predictions.jsonl)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a run evaluated under two names (a folder and its shipped name): plot OLD as NEW")
    args = parser.parse_args(argv)
    bad = [r for r in args.rename if "=" not in r]
    if bad:
        print(f"error: --rename takes OLD=NEW, got {bad[0][:60]!r}", file=sys.stderr)
        raise SystemExit(2)
    renames = dict(r.split("=", 1) for r in args.rename)
    for folder in map(Path, args.eval_dirs):
        if not ((folder / "results.json").is_file() and (folder / "predictions.jsonl").is_file()):
            print(f"error: {folder} holds no results.json and predictions.jsonl: give folders written by `gist eval`",
                  file=sys.stderr)
            raise SystemExit(2)
    rows = merged_rows(args.eval_dirs, renames)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    print(_plot_compression(plt, rows, splits, Path(args.out)))


if __name__ == "__main__":
    main()
