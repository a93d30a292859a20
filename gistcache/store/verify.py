"""`gist cache verify`: what can be proven about cache files, file by file.

Three checks, each as far as the inputs allow:

1. the file itself (always): every header field, the seal, the tensor bytes and their values
   (`load_cache`; see gistcache/cache/ for what the hashes do and do not protect against);
2. that it fits a run (with a model): fingerprints, N, template, mask, positions, shapes, dtype
   (`identity.check_cache`);
3. that it is what the run computes for its prompt (with a model and the prompt's text, which a
   store keeps beside each entry, checked by the prompt's SHA-256): the prompt is compressed again
   and every key and value compared within a tolerance for the dtype. Only this catches a file
   whose values were swapped for other finite ones and whose hashes were recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gistcache.cache import GistCache, load_cache
from gistcache.cache.identity import check_cache
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.model import GistModel
from gistcache.store import CacheStore

# (atol, rtol) between a cache and its prompt compressed again: batching, padding and kernels move the last bits
TOLERANCES = {torch.float64: (1e-6, 1e-6), torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3),
              torch.bfloat16: (3e-2, 3e-2)}
OK = "ok"


@dataclass
class Verdict:
    """What `verify_caches` found for one file: each check's result ("ok", a reason, or None when not run)."""

    path: Path
    file: str
    fits: str | None = None
    recompressed: str | None = None
    max_abs_diff: float | None = None
    prompt_preview: str = ""

    @property
    def ok(self) -> bool:
        return self.file == OK and self.fits in (OK, None) and (
            self.recompressed is None or self.recompressed == OK or self.recompressed.startswith("not run"))

    def to_dict(self) -> dict:
        return {"path": str(self.path), "ok": self.ok, "file": self.file, "fits_run": self.fits,
                "recompressed": self.recompressed, "max_abs_diff": self.max_abs_diff,
                "prompt_preview": self.prompt_preview}


def verify_caches(paths: list[str | Path], model: GistModel | None = None, store: CacheStore | None = None, *,
                  atol: float | None = None) -> list[Verdict]:
    """Check each file (see the module docstring); with `model` also its fit and, when `store` knows its prompt, its
    values against the prompt compressed again (`atol` overrides the dtype's tolerance)."""
    if not paths:
        raise GistError("give at least one cache file to verify: gist cache verify FILE... [--run RUN]")
    out = []
    for path in map(Path, paths):
        try:
            cache = load_cache(path)
        except GistError as exc:
            out.append(Verdict(path, file=str(exc)))
            continue
        verdict = Verdict(path, file=OK, prompt_preview=cache.prompt_preview)
        out.append(verdict)
        if model is None:
            continue
        try:
            check_cache(model, cache, source="the cache")
        except GistError as exc:
            verdict.fits = str(exc)
            continue
        verdict.fits = OK
        prompt = store.prompt_for(cache) if store is not None else None
        if prompt is None:
            verdict.recompressed = "not run: the prompt is unknown (the store keeps the prompts it compressed)"
            continue
        verdict.recompressed, verdict.max_abs_diff = compare(cache, compress(model, prompt), atol)
    return out


def compare(cache: GistCache, fresh: GistCache, atol: float | None = None) -> tuple[str, float | None]:
    """("ok" or what differs, the largest absolute difference) between a cache and its prompt compressed again."""
    for name in ("num_prompt_tokens", "key_start", "positions", "prefix_start"):
        if getattr(cache, name) != getattr(fresh, name):
            return (f"{name} {getattr(cache, name)} differs from the recompressed cache's "
                    f"{getattr(fresh, name)}"), None
    default_atol, rtol = TOLERANCES.get(cache.dtype, (1e-4, 1e-4))
    atol = default_atol if atol is None else atol
    worst, where = 0.0, ""
    within = True
    for kind, mine, theirs in (("keys", cache.keys, fresh.keys), ("values", cache.values, fresh.values)):
        for i, (a, b) in enumerate(zip(mine, theirs)):
            a, b = a.float(), b.to(a.device).float()
            diff = (a - b).abs()
            if float(diff.max()) > worst:
                worst, where = float(diff.max()), f"layer {i} {kind}"
            within = within and bool((diff <= atol + rtol * b.abs()).all())
    if not within:
        return (f"differs from the prompt compressed again: max |difference| {worst:.3g} in {where}, over the "
                f"tolerance {atol:g} + {rtol:g} x |value|"), worst
    return OK, worst
