"""ROUGE-L, exact match and the bootstrap interval used to report them.

ROUGE-L is the F-measure of the longest common subsequence of words (rouge-score's `rougeL`
with the Porter stemmer, as in the gisting paper). For a prediction of p words, a reference of r
words and an LCS of l words::

    precision = l / p     recall = l / r     F = 2 * precision * recall / (precision + recall)

Scores here are in [0, 1]; reports multiply by 100.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from gistcache.errors import GistError


@functools.lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    from rouge_score.rouge_scorer import RougeScorer  # deferred: it loads nltk, slow for `gist --help`

    return RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, reference: str, *, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure of one prediction against one reference, in [0, 1]."""
    return _scorer(use_stemmer).score(reference, prediction)["rougeL"].fmeasure


def rouge_l_scores(predictions: list[str], references: list[str], *, use_stemmer: bool = True) -> list[float]:
    """ROUGE-L F of each (prediction, reference) pair, in [0, 1]."""
    if len(predictions) != len(references):
        raise GistError(f"{len(predictions)} predictions and {len(references)} references: give one per reference")
    return [rouge_l(p, r, use_stemmer=use_stemmer) for p, r in zip(predictions, references)]


def normalize_answer(text: str) -> str:
    """What exact match compares: the text stripped and lower-cased."""
    return text.strip().lower()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def bootstrap_ci(values: list[float], *, resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`: (low, high).

    `resamples` means of len(values) draws with replacement, from a generator seeded with `seed`
    (so the same values and seed give the same interval).
    """
    if not values:
        raise GistError("no values to bootstrap: evaluate at least one example")
    if resamples < 1:
        raise GistError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise GistError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)  # (n,)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(resamples, len(data)))  # (resamples, n)
    means = data[idx].mean(axis=1)  # (resamples,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_statistic(columns: list[list[float]], statistic, *, resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95, scale: float = 100.0) -> dict:
    """{"mean", "ci_low", "ci_high"} of `statistic` over the columns' means, with a paired percentile bootstrap.

    columns: k lists of n per-example values (the same examples in the same order); each resample
    draws n example indices with replacement and applies `statistic(mean_1, ..., mean_k)` to the k
    column means (numpy arrays of shape (resamples,)). A resample where the statistic is not finite
    (a zero denominator) is left out of the interval. Values are multiplied by `scale`.
    """
    data = np.asarray(columns, dtype=np.float64)  # (k, n)
    if data.ndim != 2 or data.shape[1] == 0:
        raise GistError("no values to bootstrap: evaluate at least one example")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.shape[1], size=(resamples, data.shape[1]))  # (resamples, n)
    means = data[:, idx].mean(axis=2)  # (k, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(*data.mean(axis=1)))
        stats = np.asarray(statistic(*means), dtype=np.float64)  # (resamples,)
    stats = stats[np.isfinite(stats)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail]) if len(stats) else (math.nan, math.nan)
    return {"mean": _round(point * scale), "ci_low": _round(float(low) * scale), "ci_high": _round(float(high) * scale)}


def summarize(values: list[float], *, resamples: int = 1000, seed: int = 0, scale: float = 100.0) -> dict:
    """{"mean", "ci_low", "ci_high"} of `values`, multiplied by `scale` (100: percent)."""
    low, high = bootstrap_ci(values, resamples=resamples, seed=seed)
    mean = float(np.mean(values))
    return {"mean": _round(mean * scale), "ci_low": _round(low * scale), "ci_high": _round(high * scale)}


def _round(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else x
