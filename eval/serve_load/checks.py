"""The checks of the load run (eval/serve_load/): a reason is one line, the counts of a load (every miss a failure
line), the store verified as `gist cache verify --run` does, what each bad kind's refusal must say."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import BAD_KINDS, Fixtures, Result


def one_line(reason: str | None) -> bool:
    return isinstance(reason, str) and bool(reason.strip()) and "\n" not in reason and len(reason) <= 400


def tally(results: list[Result], fx: Fixtures, failures: list[str], phase: str) -> dict:
    """Counts of a load; every miss appended to `failures` as one line."""
    good = [r for r in results if r.good]
    bad = [r for r in results if not r.good]
    answered = [r for r in good if r.status == 200 and r.text is not None]
    compared = [r for r in answered if r.pair in fx.references]
    equal = [r for r in compared if r.text == fx.references[r.pair]]
    answers: dict[tuple, set] = {}
    for r in answered:
        answers.setdefault(r.pair, set()).add(r.text)
    inconsistent = [p for p, texts in answers.items() if len(texts) > 1]
    refused = [r for r in bad if r.status is not None and 400 <= r.status < 500 and one_line(r.reason)
               and expected_ok(r.kind, r.reason, fx)]
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    lost = [r for r in results if r.status is None]
    reasons: dict[str, str] = {}
    for r in bad:
        reasons.setdefault(r.kind, f"{r.status} {r.reason}")
    for r in good:
        if r not in answered:
            failures.append(f"{phase}: a good {r.kind} request for pair {r.pair} got {r.status}: {r.reason}")
    for r in compared:
        if r.text != fx.references[r.pair]:
            failures.append(f"{phase}: {r.kind} answer to pair {r.pair} is {r.text!r}, gist generate says "
                            f"{fx.references[r.pair]!r}")
    for p in inconsistent:
        failures.append(f"{phase}: pair {p} got {len(answers[p])} different answers: {sorted(answers[p])!r}")
    for r in bad:
        if r not in refused:
            failures.append(f"{phase}: bad request {r.kind} got {r.status} {str(r.reason)[:300]!r}, not a one-line "
                            f"4xx saying {fx.expected[r.kind]!r}")
    seconds = sorted(r.seconds for r in answered)
    return {"sent": len(results), "good": len(good), "answered": len(answered), "compared": len(compared),
            "equal": len(equal), "pairs": len(answers), "inconsistent_pairs": len(inconsistent), "bad": len(bad),
            "refused_with_reason": len(refused), "server_errors": len(server_errors), "lost": len(lost),
            "latency_p50_s": round(seconds[len(seconds) // 2], 3) if seconds else None,
            "latency_max_s": round(seconds[-1], 3) if seconds else None,
            "bad_kinds": {k: sum(r.kind == k for r in bad) for k in BAD_KINDS if any(r.kind == k for r in bad)},
            "reasons": reasons}


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_store(store_dir: Path, model, protected: dict[str, str]) -> dict:
    """Every entry of the store as `gist cache verify --run` checks it; the entries damaged on purpose must hold the
    bytes the run left there."""
    from gistcache.store import SUFFIX, CacheStore
    from gistcache.store.verify import verify_caches

    store = CacheStore(store_dir)
    entries = store.entries(unreadable=True)
    paths = [e.path for e in entries if e.key not in protected]
    verdicts = verify_caches(paths, model, store) if paths else []
    bad = [f"{v.path.name}: {v.file if v.file != 'ok' else v.fits if v.fits != 'ok' else v.recompressed}"
           for v in verdicts if not v.ok]
    changed = [key[:12] for key, sha in protected.items()
               if not (store.root / f"{key}{SUFFIX}").is_file() or file_sha(store.root / f"{key}{SUFFIX}") != sha]
    leftovers = [p.name for p in store.root.iterdir() if ".tmp-" in p.name]
    return {"entries": len(entries), "verified_ok": sum(v.ok for v in verdicts), "failed": bad,
            "recompressed": sum(v.recompressed == "ok" for v in verdicts), "damaged_on_purpose": len(protected),
            "damaged_on_purpose_changed": changed, "cut_short_writes_left": len(leftovers)}


# missing fields: the completion's `prompt` or the chat's `messages`
MISSING = ("`prompt` is the input text", "`messages` must hold")


def expected_ok(kind: str, reason: str, fx: Fixtures) -> bool:
    if kind == "missing_field":
        return any(m in reason for m in MISSING)
    return fx.expected[kind] in reason
