"""The run folder's layout: its file names, where the shipped run is, and which folder a run name means."""

from __future__ import annotations

import shutil
from pathlib import Path

from gistcache.errors import GistError

CONFIG_FILE = "config.json"
GIST_FILE = "gist_embedding.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MODEL_CARD_FILE = "README.md"
METRICS_FILE = "metrics.json"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
# the gist runs that ship inside the package (see their README.md). When no run is named, DEFAULT_RUN is used,
# and commands given an instruction use LONG_RUN for a long one (gistcache/model/shipped.py).
# smollm2-135m-every64: one gist token after every 64 instruction tokens (the cache grows with the prompt);
# smollm2-135m-every64-long: the same ratio, for instructions of more than 128 tokens;
# smollm2-135m-gist1: the earlier default, one gist token whatever the length, kept so its caches still load.
DEFAULT_RUN = "smollm2-135m-every64"
LONG_RUN = "smollm2-135m-every64-long"
PRETRAINED_DIR = Path(__file__).parent.parent / "pretrained"  # gistcache/pretrained
WEIGHT_FILES = (GIST_FILE, ADAPTER_FILE, FULL_FILE)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """A run folder; None names the run shipped with the package (`DEFAULT_RUN`, for the default model), and a
    bare name that is no folder here but is a shipped run's (`--run smollm2-135m-gist1`) names that one."""
    if run_dir is not None:
        path = Path(run_dir)
        shipped = PRETRAINED_DIR / path.name
        if not path.exists() and len(path.parts) == 1 and is_run_dir(shipped):
            return shipped
        return path
    path = PRETRAINED_DIR / DEFAULT_RUN
    if not is_run_dir(path):
        raise GistError(f"the shipped run {DEFAULT_RUN} is missing from {PRETRAINED_DIR}: reinstall gistcache, or "
                        f"pass --run RUN (a folder written by `gist train`)")
    return path


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / GIST_FILE).is_file()


def remove_run_outputs(run_dir: Path) -> None:
    """Clear a previous run's files (used with --overwrite), its model card included; leave unrelated files alone."""
    for name in (*WEIGHT_FILES, CONFIG_FILE, ADAPTER_CONFIG_FILE, METRICS_FILE, LOG_FILE, MODEL_CARD_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for name in (TOKENIZER_DIR, CHECKPOINTS_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
