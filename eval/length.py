"""What the gist keeps at each prompt length: the per-bucket table of `gist eval`.

Examples are put in buckets by the tokens of their instruction alone (template excluded; the count
`truncate_prompt` cuts from):

    <=128   129-256   257-512   513-1024   1025-2048   >2048

and per bucket, for each condition present (gist, full, none, truncate, base, echo, ...):

    ROUGE-L, exact match      x100, mean with a 95% percentile-bootstrap interval (rouge.py)
    cached positions          mean positions of prompt state before the input: the gist cache's
                              `context_used` (F + its gist slots), the truncated prompt, the whole prompt
    compression               mean over examples of prompt positions (`encode_instruction`, template
                              included) / cached positions

and, against `full` and `none` (fidelity.py's definitions, paired bootstrap), for gist and truncate:

    retention    s(c) / s(full)        gap closed    (s(c) - s(none)) / (s(full) - s(none))

plus `gist_minus_truncate`: mean ROUGE-L of gist minus truncate (x100, paired bootstrap), so "gist beats
truncation to the same state" can be read bucket by bucket, and `gist_minus_truncate_end` the same against
truncate-end (the instruction's last tokens, the recent window) when it was run. Empty buckets are left out.
"""

from __future__ import annotations

from gistcache.eval.fidelity import format_interval, markdown_table
from gistcache.eval.rouge import bootstrap_statistic, exact_match, rouge_l_scores, summarize

# (label, lowest, highest) instruction tokens; the last bucket is open-ended
BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("<=128", 0, 128), ("129-256", 129, 256), ("257-512", 257, 512), ("513-1024", 513, 1024),
    ("1025-2048", 1025, 2048), (">2048", 2049, None),
)
COMPARED = ("gist", "truncate")  # conditions whose retention and gap closed are reported
# the truncations the gist is set against per bucket (condition, the row's key, the table's column)
AGAINST = (("truncate", "gist_minus_truncate", "gist-trunc"),
           ("truncate-end", "gist_minus_truncate_end", "gist-trunc-end"))
TABLE_CONDITIONS = ("gist", "truncate", "truncate-end", "none", "full", "base", "echo")


def bucket_of(instruction_tokens: int) -> str:
    """The label of the bucket holding an instruction of this many tokens."""
    for label, low, high in BUCKETS:
        if instruction_tokens >= low and (high is None or instruction_tokens <= high):
            return label
    raise ValueError(f"instruction_tokens must be >= 0, got {instruction_tokens}")


def length_rows(examples: list[dict], *, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per non-empty bucket, in bucket order, from per-example records.

    Each record: {"instruction_tokens": int (the instruction alone), "prompt_positions": int (the full prompt,
    template included), "reference": str, "outputs": {condition: answer}, "cached_positions": {condition: int}}.
    Every record holds the same conditions.
    """
    grouped: dict[str, list[dict]] = {}
    for ex in examples:
        grouped.setdefault(bucket_of(ex["instruction_tokens"]), []).append(ex)
    stat = dict(resamples=resamples, seed=seed)
    rows = []
    for label, low, high in BUCKETS:
        exs = grouped.get(label)
        if not exs:
            continue
        refs = [ex["reference"] for ex in exs]
        conditions = list(exs[0]["outputs"])
        scores = {c: rouge_l_scores([ex["outputs"][c] for ex in exs], refs) for c in conditions}
        per_condition = {}
        for c in conditions:
            cached = [ex["cached_positions"].get(c) for ex in exs]
            known = [n for n in cached if n]
            per_condition[c] = {
                "rouge_l": summarize(scores[c], **stat),
                "exact_match": summarize([exact_match(ex["outputs"][c], ex["reference"]) for ex in exs], **stat),
                "cached_positions_mean": _mean(known) if len(known) == len(exs) else None,
                "compression_mean": (_mean([ex["prompt_positions"] / n for ex, n in zip(exs, cached)])
                                     if len(known) == len(exs) else None),
            }
        row = {"bucket": label, "low": low, "high": high, "examples": len(exs),
               "instruction_tokens_mean": _mean([ex["instruction_tokens"] for ex in exs]),
               "prompt_positions_mean": _mean([ex["prompt_positions"] for ex in exs]),
               "conditions": per_condition}
        for c in COMPARED:
            row[f"{c}_retention"] = row[f"{c}_gap_closed"] = None
            if c in scores and "full" in scores:
                row[f"{c}_retention"] = bootstrap_statistic([scores[c], scores["full"]], lambda g, f: g / f, **stat)
                if "none" in scores:
                    row[f"{c}_gap_closed"] = bootstrap_statistic([scores[c], scores["none"], scores["full"]],
                                                                 lambda g, n, f: (g - n) / (f - n), **stat)
        for truncation, key, _ in AGAINST:
            row[key] = (bootstrap_statistic([scores["gist"], scores[truncation]], lambda g, t: g - t, **stat)
                        if "gist" in scores and truncation in scores else None)
        rows.append(row)
    return rows


def length_records(instruction_tokens: list[int], prompt_positions: list[int], references: list[str],
                   outputs: dict[str, list[str]], cached_positions: dict[str, list[int]]) -> list[dict]:
    """Per-example records for `length_rows` from per-condition columns (one value per example each)."""
    return [{"instruction_tokens": instruction_tokens[i], "prompt_positions": prompt_positions[i],
             "reference": references[i], "outputs": {c: answers[i] for c, answers in outputs.items()},
             "cached_positions": {c: cached_positions[c][i] for c in outputs if c in cached_positions}}
            for i in range(len(references))]


def length_table(rows: list[dict], *, conditions: tuple[str, ...] = TABLE_CONDITIONS
                 ) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text) of the per-bucket table for the screen and results.md; `rows` may span several
    (run, split) pairs, each row carrying "run" and "split". The gist-trunc-end column shows only when some
    row has truncate-end."""
    present = [c for c in conditions if any(c in r["conditions"] for r in rows)]
    against = [(key, column) for truncation, key, column in AGAINST
               if truncation == "truncate" or truncation in present]
    multi_run = len({r.get("run") for r in rows}) > 1
    headers = (["run"] if multi_run else []) + ["split", "tokens", "n"]
    headers += [f"{c} R-L" for c in present] + [f"{c} EM" for c in present]
    headers += ["gist ret.", "gist gap", "trunc ret.", *(column for _, column in against), "gist comp.",
                "trunc comp."]
    out = []
    for r in rows:
        cells = ([r.get("run", "")] if multi_run else []) + [r.get("split", ""), r["bucket"], str(r["examples"])]
        cells += [f"{r['conditions'][c]['rouge_l']['mean']:.1f}" if c in r["conditions"] else "—" for c in present]
        cells += [f"{r['conditions'][c]['exact_match']['mean']:.1f}" if c in r["conditions"] else "—"
                  for c in present]
        cells += [format_interval(r["gist_retention"], "%"), format_interval(r["gist_gap_closed"], "%"),
                  format_interval(r["truncate_retention"], "%"),
                  *(format_interval(r.get(key)) for key, _ in against),
                  _format_ratio(r["conditions"].get("gist")), _format_ratio(r["conditions"].get("truncate"))]
        out.append(cells)
    return headers, out


def narrow_length_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text) for a narrow screen, rows of one (run, split): ROUGE-L by condition, gist
    retention (mean) and compression; `length_table` has every column."""
    present = [c for c in TABLE_CONDITIONS if any(c in r["conditions"] for r in rows)]
    out = []
    for r in rows:
        retention = r.get("gist_retention")
        rouge = [f"{r['conditions'][c]['rouge_l']['mean']:.1f}" if c in r["conditions"] else "—" for c in present]
        out.append([r["bucket"], str(r["examples"]), *rouge, "—" if retention is None else f"{retention['mean']:.1f}%",
                    _format_ratio(r["conditions"].get("gist"))])
    return ["tokens", "n", *present, "gist ret.", "gist comp."], out


def length_markdown(results: dict) -> str:
    """The by-length section of results.md; "" when there is none."""
    rows = results.get("length")
    if not rows:
        return ""
    headers, cells = length_table(rows)
    lines = ["## By instruction length", "", *markdown_table(headers, cells)]
    lines += ["", "Buckets by the instruction's own tokens (template excluded). R-L: ROUGE-L F x100; EM: exact "
              "match x100. ret.: retention, c / full ROUGE-L; gap: (c - none) / (full - none); gist-trunc: gist minus "
              "truncate ROUGE-L (gist-trunc-end: minus truncate-end, the instruction's last tokens); comp.: prompt "
              "positions (template included) / cached positions (the gist cache's context_used, or the truncated "
              "prompt). 95% paired bootstrap intervals.", ""]
    return "\n".join(lines)


def _format_ratio(cond: dict | None) -> str:
    if not cond or cond.get("compression_mean") is None:
        return "—"
    return f"{cond['compression_mean']:.1f}x"


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
