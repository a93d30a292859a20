"""The run fingerprint: SHA-256 over every file of a run that changes what it computes (a cache records it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gistcache.run.config import read_adapter_config, read_run_config
from gistcache.run.layout import TOKENIZER_DIR, WEIGHT_FILES, resolve_run_dir


def run_fingerprint(run_dir: str | Path | None) -> str:
    """SHA-256 over every file of the run that changes what it computes (a cache records it; any edit refuses the
    caches made before it).

    That is the gist section of config.json and the adapter's config (both as canonical JSON: sorted keys,
    the adapter's fields that change nothing at inference left out, `ADAPTER_FIELDS_IGNORED`), and the bytes
    of the weight files and of every file under tokenizer/ (vocabulary, special tokens, chat template),
    each named by its path in the run. The adapter's r and lora_alpha must equal config.json's lora_r and
    lora_alpha (`read_adapter_config`).
    """
    run_dir = resolve_run_dir(run_dir)
    gist = read_run_config(run_dir)["gist"]
    adapter = read_adapter_config(run_dir, gist)
    h = hashlib.sha256(b"gistcache-run|2\n")
    h.update(_canonical(gist).encode() + b"\n")
    h.update(_canonical({k: v for k, v in adapter.items() if k not in ADAPTER_FIELDS_IGNORED}
                        if adapter is not None else None).encode() + b"\n")
    files = [run_dir / name for name in WEIGHT_FILES if (run_dir / name).is_file()]
    tokenizer = run_dir / TOKENIZER_DIR
    if tokenizer.is_dir():
        files += sorted((p for p in tokenizer.rglob("*") if p.is_file()), key=lambda p: p.relative_to(run_dir).as_posix())
    for path in files:
        name = path.relative_to(run_dir).as_posix()
        h.update(f"{name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# adapter_config.json fields that do not change what the loaded adapter computes: where the base model was
# (ignored on load: the run's config.json names it), the mode it was saved in, the peft version and revision
ADAPTER_FIELDS_IGNORED = frozenset({"base_model_name_or_path", "inference_mode", "peft_version", "revision"})


def _canonical(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
