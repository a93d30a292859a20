"""Two evaluations of the same rows side by side: the paired difference of their answers (`gist compare`).

`gist eval` writes every answer to OUT/predictions.jsonl. Two such folders (or one folder twice) are compared
row by row on the rows both hold: the same split, index, instruction, input and reference (an evaluation with
a larger --limit holds the smaller one's rows first). For each pair of conditions (A's label, B's label):

    ROUGE-L A, B          mean ROUGE-L F x100 of each, with a 95% percentile-bootstrap interval
    B - A                 the paired difference of the means: every resample draws the same rows for both
    exact match A, B      x100

so "run B keeps more than run A" is read from one interval that excludes 0, not from two overlapping ones.
With by_length the rows are also split by the instruction's tokens (eval/length.py's buckets).
"""

from __future__ import annotations

import json
from pathlib import Path

from gistcache.errors import GistError
from gistcache.eval.length import BUCKETS, bucket_of
from gistcache.eval.rouge import bootstrap_statistic, exact_match, rouge_l_scores, summarize

ROW_IDENTITY = ("instruction", "input", "reference")  # what must agree for two records to be the same row


def read_predictions(folder: str | Path) -> list[dict]:
    """The records of FOLDER/predictions.jsonl (written by `gist eval`), in file order."""
    path = Path(folder) / "predictions.jsonl"
    if not path.is_file():
        raise GistError(f"{folder}: no predictions.jsonl here; give a folder written by `gist eval --out`")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GistError(f"{path} line {n} is not JSON ({exc.msg}): the file is damaged") from None
            if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict) or \
                    not all(isinstance(record.get(k), str) for k in ("split", *ROW_IDENTITY)):
                raise GistError(f"{path} line {n} is not a `gist eval` record (split, instruction, input, reference, "
                                "outputs)")
            records.append(record)
    return records


def parse_pairs(conditions: list[str] | None, labels_a: list[str], labels_b: list[str]) -> list[tuple[str, str]]:
    """(A's label, B's label) pairs: each condition is a label both folders hold, or A_LABEL=B_LABEL; none: every
    label both hold, in A's order."""
    if not conditions:
        pairs = [(label, label) for label in labels_a if label in labels_b]
        if not pairs:
            raise GistError(f"the two evaluations share no condition (A: {', '.join(labels_a)}; B: "
                            f"{', '.join(labels_b)}): name a pair with --condition A_LABEL=B_LABEL")
        return pairs
    pairs = []
    for spec in conditions:
        a, _, b = spec.partition("=")
        b = b or a
        for label, held, side in ((a, labels_a, "A"), (b, labels_b, "B")):
            if label not in held:
                raise GistError(f"--condition {spec}: evaluation {side} has no condition {label!r} "
                                f"(it has {', '.join(held)})")
        pairs.append((a, b))
    return pairs


def matched_rows(records_a: list[dict], records_b: list[dict]) -> list[tuple[dict, dict]]:
    """(A's record, B's record) for every (split, index) both hold; refused if such a pair differs in its row."""
    by_key = {(r["split"], r.get("index")): r for r in records_b}
    pairs = []
    for ra in records_a:
        rb = by_key.get((ra["split"], ra.get("index")))
        if rb is None:
            continue
        for key in ROW_IDENTITY:
            if ra[key] != rb[key]:
                raise GistError(f"split {ra['split']} row {ra.get('index')}: the evaluations' {key} differ, so they "
                                "did not evaluate the same rows; compare evaluations of the same split file")
        pairs.append((ra, rb))
    if not pairs:
        raise GistError("the two evaluations hold no row in common (same split name and index)")
    return pairs


def _labels(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(label for r in records for label in r["outputs"]))


def compare_evaluations(folder_a: str | Path, folder_b: str | Path, *, conditions: list[str] | None = None,
                        by_length: bool = False, resamples: int = 1000, seed: int = 0) -> dict:
    """{"a", "b", "rows"}: one row per (split, bucket, pair of conditions), as the module docstring says.

    Each row: {"split", "bucket" ("all" or a length bucket), "a_condition", "b_condition", "examples", "rouge_a",
    "rouge_b", "difference" ({"mean", "ci_low", "ci_high"}, x100), "em_a", "em_b" (x100)}."""
    records_a, records_b = read_predictions(folder_a), read_predictions(folder_b)
    matched = matched_rows(records_a, records_b)
    pairs = parse_pairs(conditions, _labels([a for a, _ in matched]), _labels([b for _, b in matched]))
    if by_length and any("instruction_only_tokens" not in a for a, _ in matched):
        raise GistError(f"{folder_a}: its records do not count the instruction's tokens (an evaluation from before "
                        "they did): evaluate again to compare by length")
    stat = dict(resamples=resamples, seed=seed)
    rows = []
    for split in dict.fromkeys(a["split"] for a, _ in matched):
        in_split = [(a, b) for a, b in matched if a["split"] == split]
        groups = [("all", in_split)]
        if by_length:
            groups += [(label, [(a, b) for a, b in in_split if bucket_of(a["instruction_only_tokens"]) == label])
                       for label, _, _ in BUCKETS]
        for bucket, group in groups:
            if not group:
                continue
            references = [a["reference"] for a, _ in group]
            for label_a, label_b in pairs:
                answers_a = [_answer(a, label_a, folder_a) for a, _ in group]
                answers_b = [_answer(b, label_b, folder_b) for _, b in group]
                score_a, score_b = rouge_l_scores(answers_a, references), rouge_l_scores(answers_b, references)
                em = [[exact_match(p, r) for p, r in zip(answers, references)] for answers in (answers_a, answers_b)]
                rows.append({"split": split, "bucket": bucket, "a_condition": label_a, "b_condition": label_b,
                             "examples": len(group),
                             "rouge_a": summarize(score_a, **stat), "rouge_b": summarize(score_b, **stat),
                             "difference": bootstrap_statistic([score_a, score_b], lambda a, b: b - a, **stat),
                             "em_a": round(100 * sum(em[0]) / len(group), 2),
                             "em_b": round(100 * sum(em[1]) / len(group), 2)})
    return {"a": str(folder_a), "b": str(folder_b), "rows": rows}


def _answer(record: dict, label: str, folder: str | Path) -> str:
    answer = record["outputs"].get(label)
    if not isinstance(answer, str):
        raise GistError(f"{folder}: split {record['split']} row {record.get('index')} has no {label!r} answer")
    return answer
