"""How much of what the full prompt does the gist keeps: retention, gap closed, agreement.

Per (run, split), from the per-example answers of the conditions evaluated on the same examples
(s = ROUGE-L F of an answer against the reference; means over the split):

    retention           mean s(gist) / mean s(full)
    gap closed          (mean s(gist) - mean s(none)) / (mean s(full) - mean s(none))
    retention vs base   mean s(gist) / mean s(base)     (base: the untouched base model, full prompt)
    agreement           ROUGE-L F and exact match between the gist answer and the full-prompt
                        answer of the same model (`full`), and of the untouched base model (`base`)

Each comes with a 95% paired percentile bootstrap interval: every resample draws the same
examples for all conditions. A metric whose conditions were not evaluated is None.
"""

from __future__ import annotations

from gistcache.eval.rouge import bootstrap_statistic, exact_match, rouge_l_scores

RATIO_METRICS = ("retention", "gap_closed", "retention_vs_base")
AGREEMENT_METRICS = ("agreement_full_rouge_l", "agreement_full_em", "agreement_base_rouge_l", "agreement_base_em")


def fidelity_row(answers: dict[str, list[str]], references: list[str], *, resamples: int = 1000,
                 seed: int = 0) -> dict:
    """The metrics above from `answers` ({condition: one answer per example}) and the references.

    Ratios are percentages (retention 95.0 means 95%); agreement is ROUGE-L F x100 and EM x100.
    """
    scores = {c: rouge_l_scores(a, references) for c, a in answers.items()}
    stat = dict(resamples=resamples, seed=seed)
    row: dict = {name: None for name in (*RATIO_METRICS, *AGREEMENT_METRICS)}
    if "gist" not in scores:
        return row
    if "full" in scores:
        row["retention"] = bootstrap_statistic([scores["gist"], scores["full"]], lambda g, f: g / f, **stat)
        if "none" in scores:
            row["gap_closed"] = bootstrap_statistic([scores["gist"], scores["none"], scores["full"]],
                                                    lambda g, n, f: (g - n) / (f - n), **stat)
    if "base" in scores:
        row["retention_vs_base"] = bootstrap_statistic([scores["gist"], scores["base"]], lambda g, b: g / b, **stat)
    for other in ("full", "base"):
        if other in answers:
            agree = rouge_l_scores(answers["gist"], answers[other])
            same = [exact_match(g, o) for g, o in zip(answers["gist"], answers[other])]
            row[f"agreement_{other}_rouge_l"] = bootstrap_statistic([agree], lambda m: m, **stat)
            row[f"agreement_{other}_em"] = bootstrap_statistic([same], lambda m: m, **stat)
    return row


def format_interval(value: dict | None, unit: str = "") -> str:
    """{"mean", "ci_low", "ci_high"} -> '95.1% [90.2, 99.8]'; None -> '—'."""
    if value is None:
        return "—"
    return f"{value['mean']:.1f}{unit} [{value['ci_low']:.1f}, {value['ci_high']:.1f}]"


FIDELITY_COLUMNS = (("retention", "retention", "%"), ("gap closed", "gap_closed", "%"),
                    ("retention vs base", "retention_vs_base", "%"),
                    ("agree full R-L", "agreement_full_rouge_l", ""), ("agree full EM", "agreement_full_em", ""),
                    ("agree base R-L", "agreement_base_rouge_l", ""), ("agree base EM", "agreement_base_em", ""))


def fidelity_table(fidelity: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text) for the screen and results.md."""
    multi = len({f["run"] for f in fidelity}) > 1
    headers = (["run"] if multi else []) + ["split", "n"] + [h for h, _, _ in FIDELITY_COLUMNS]
    rows = [([f["run"]] if multi else []) + [f["split"], str(f["examples"])] +
            [format_interval(f[key], unit) for _, key, unit in FIDELITY_COLUMNS] for f in fidelity]
    return headers, rows


def fidelity_markdown(results: dict) -> str:
    """The fidelity section of results.md (and of a run's model card); "" when there is none."""
    if not results.get("fidelity"):
        return ""
    cfg = results["config"]
    headers, rows = fidelity_table(results["fidelity"])
    lines = ["## Fidelity: what the gist keeps of the full prompt", "",
             f"Splits {', '.join(cfg['splits'])}, first {cfg['limit'] or 'all'} examples of each, greedy, "
             f"{cfg['max_new_tokens']} new tokens.", "",
             *markdown_table(headers, rows)]
    lines += ["", "Retention: gist / full ROUGE-L. Gap closed: (gist - none) / (full - none). Retention vs base: "
              "gist / base (the untouched base model reading the full prompt). Agreement: ROUGE-L F and exact "
              "match between the gist answer and the full-prompt answer of the same run (full) or of the base "
              "model (base). 95% paired bootstrap intervals.", ""]
    lines += ["ROUGE-L by condition: " + "; ".join(
        f"{r['split']} {r['condition']} {r['rouge_l']['mean']:.1f} [{r['rouge_l']['ci_low']:.1f}, "
        f"{r['rouge_l']['ci_high']:.1f}]" for r in results["rows"]) + ".", ""]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: the header row, the rule, one line a row."""
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]
