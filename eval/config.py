"""`EvalConfig`: what `gist eval` evaluates, and `resolve_config`, which finds its files.

The dataclass checks its own fields (no I/O), so the library refuses what the CLI does.
`resolve_config` does the rest before any model loads: it reads each run's config.json (and
checks the control runs' conditions), finds the split files (a named split lives in `--data-dir`,
else `$GISTCACHE_DATA`, else `../shared/data/alpaca_plus` when that folder exists) and picks the
output folder (default: `<first run>/eval-<timestamp>`, `runs/<name>-eval-<timestamp>` for a shipped run; it must not hold anything yet). A `kvpress:PRESS`
baseline needs the peers virtualenv's python (`peers_python`): `$GISTCACHE_PEERS_PYTHON`, else
`.venv-peers/bin/python` in the current folder or the gistcache checkout (`make peers-venv` builds it).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from gistcache.config import torch_dtype
from gistcache.errors import GistError
from gistcache.eval.conditions import (BASELINES, CONTROL_CONDITIONS, EXTRA_BASELINES, PRESS_PREFIX, is_press,
                                       parse_press)
from gistcache.run import PRETRAINED_DIR, read_run_config, resolve_run_dir

SPLITS = ("seen", "unseen", "human")
SPLIT_FILE = "alpaca_plus_validation_{}.json"
DATA_ENV = "GISTCACHE_DATA"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "alpaca_plus"
PEERS_PYTHON_ENV = "GISTCACHE_PEERS_PYTHON"
PEERS_VENV = ".venv-peers"


@dataclass
class EvalConfig:
    """What `gist eval` evaluates; checked here so the library refuses what the CLI does."""

    runs: list[str] | str
    baselines: list[str] | None = None  # default: full, none, truncate, base; kvpress:PRESS[@R] alone adds to them
    splits: list[str] | None = None  # default: seen, unseen, human
    limit: int | None = None  # first N examples of each split
    truncate_tokens: int | None = None  # default: each run's num_gist_tokens
    control_runs: dict[str, str] | str | None = None  # {"pos": RUN, "neg": RUN} or "pos=RUN,neg=RUN"
    out: str | None = None  # default: default_out(first run), set by resolve_config
    max_new_tokens: int = 64
    batch_size: int = 8
    data_dir: str | None = None
    flops_examples: int = 8  # FLOPs counted on the first K examples of each split (0: none)
    bootstrap_resamples: int = 1000
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "float32"
    split_files: dict[str, str] = field(default_factory=dict)  # {label: file}, set by resolve_config

    def __post_init__(self) -> None:
        self.runs = [self.runs] if isinstance(self.runs, str) else list(self.runs or [])
        if not self.runs:
            raise GistError("no run to evaluate: pass --run RUN (a folder written by `gist train`)")
        self.control_runs = parse_control_runs(self.control_runs)
        baselines = list(BASELINES) if self.baselines is None else list(self.baselines)
        if baselines and all(is_press(name) for name in baselines):  # presses alone: beside the default baselines
            baselines = [*BASELINES, *baselines]
        for i, name in enumerate(baselines):
            if is_press(name):
                baselines[i] = parse_press(name).name  # one spelling per press: kvpress:snapkv
            elif name not in (*BASELINES, *EXTRA_BASELINES):
                raise GistError(f"unknown baseline {name!r}: use {', '.join((*BASELINES, *EXTRA_BASELINES))} or "
                                f"{PRESS_PREFIX}PRESS")
        self.baselines = list(dict.fromkeys(baselines))
        self.splits = list(SPLITS) if not self.splits else list(self.splits)
        for name, value, low in (("--limit", self.limit, 1), ("--truncate-tokens", self.truncate_tokens, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise GistError(f"{name} must be a whole number >= {low}, got {value!r}")
        for name, value, low in (("--max-new-tokens", self.max_new_tokens, 1), ("--batch-size", self.batch_size, 1),
                                 ("--flops-examples", self.flops_examples, 0),
                                 ("bootstrap_resamples", self.bootstrap_resamples, 1)):
            if not isinstance(value, int) or value < low:
                raise GistError(f"{name} must be a whole number >= {low}, got {value!r}")
        torch_dtype(self.dtype)
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise GistError(f"unknown --device {self.device!r}: use auto, cpu, cuda or cuda:N")

    def to_dict(self) -> dict:
        return asdict(self)


def default_out(run: str) -> str:
    """RUN/eval-<timestamp>; for a run shipped in the package (named or given by its path), runs/<name>-eval-<timestamp>
    in the current folder, never inside the installed package."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = resolve_run_dir(run)
    if folder.resolve().parent == PRETRAINED_DIR.resolve():
        return str(Path("runs") / f"{folder.name}-eval-{stamp}")
    return str(Path(run) / f"eval-{stamp}")


def resolve_config(config: EvalConfig) -> EvalConfig:
    """`config` with its split files and output folder found, after checking every run folder.

    Reads files, writes nothing; calling it again on its own result changes nothing.
    """
    # a shipped run's name (`--run smollm2-135m-gist1`) becomes its folder, so every later step reads files there
    config = replace(config, runs=[str(resolve_run_dir(run)) for run in config.runs],
                     control_runs={key: str(resolve_run_dir(run)) for key, run in config.control_runs.items()})
    for run in config.runs:
        read_run_config(run)
    for key, run in config.control_runs.items():
        trained = read_run_config(run)["gist"].get("condition", "gist")
        if trained != CONTROL_CONDITIONS[key]:
            raise GistError(f"--control-runs {key}={run}: that run was trained with condition {trained!r}, not "
                            f"{CONTROL_CONDITIONS[key]!r}: give a run trained with --condition "
                            f"{CONTROL_CONDITIONS[key]}")
    split_files = resolve_splits(config.splits, config.data_dir)
    if any(is_press(b) for b in config.baselines):
        peers_python()
    out = config.out or default_out(config.runs[0])
    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise GistError(f"--out {out} already exists and is not an empty folder: choose another --out")
    return replace(config, split_files=split_files, out=out)


def peers_python() -> Path:
    """The python of the peers virtualenv, where the kvpress baselines run; refuses in one line when there is none."""
    env = os.environ.get(PEERS_PYTHON_ENV)
    if env:
        if not Path(env).is_file():
            raise GistError(f"${PEERS_PYTHON_ENV} is {env}, which does not exist: point it at the python of the peers "
                            f"virtualenv, or unset it and build {PEERS_VENV} with `make peers-venv`")
        return Path(env)
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):  # here, or the gistcache checkout
        python = root / PEERS_VENV / "bin" / "python"
        if python.is_file():
            return python
    raise GistError(f"kvpress baselines run in the peers virtualenv {PEERS_VENV} (kvpress pins transformers < 5.3), "
                    f"which is not here: build it with `make peers-venv` in the gistcache checkout, or set "
                    f"${PEERS_PYTHON_ENV} to its python")


def default_data_dir() -> Path | None:
    """`$GISTCACHE_DATA`, else `../shared/data/alpaca_plus` if it exists here, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


def resolve_splits(splits: list[str], data_dir: str | None) -> dict[str, str]:
    """{label: file} for `seen|unseen|human` (under the data folder) or Alpaca-format file paths."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    if data_dir and not folder.is_dir():
        raise GistError(f"--data-dir {data_dir} is not a folder: give the folder holding "
                        f"{SPLIT_FILE.format('<split>')}")
    resolved: dict[str, str] = {}
    for split in splits:
        if split in SPLITS:
            if folder is None:
                raise GistError(f"split {split!r} needs the Alpaca+ files: pass --data-dir DIR (holding "
                                f"{SPLIT_FILE.format(split)}), set ${DATA_ENV}, or give a file path")
            path = folder / SPLIT_FILE.format(split)
            if not path.is_file():
                raise GistError(f"split {split!r}: {path} does not exist: pass --data-dir DIR holding "
                                f"{SPLIT_FILE.format(split)}, or give a file path")
            label = split
        elif Path(split).is_file():
            path, label = Path(split), Path(split).stem
        elif "/" in split or split.endswith((".json", ".jsonl")):
            raise GistError(f"data file {split} does not exist: give an Alpaca-format JSON/JSONL file")
        else:
            raise GistError(f"unknown split {split!r}: use {', '.join(SPLITS)} or an Alpaca-format JSON/JSONL file")
        base, i = label, 2
        while label in resolved:
            label, i = f"{base}-{i}", i + 1
        resolved[label] = str(path)
    return resolved


def parse_control_runs(spec: str | dict | None) -> dict[str, str]:
    """`"pos=RUN,neg=RUN"` (either or both) -> {"pos": RUN, "neg": RUN}."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in spec.split(",") if part.strip())
    out: dict[str, str] = {}
    for key, value in items:
        key, value = key.strip(), str(value).strip()
        if key not in CONTROL_CONDITIONS or not value:
            raise GistError(f"--control-runs {spec!r}: write pos=RUN,neg=RUN (either or both), got {key!r}")
        if key in out:
            raise GistError(f"--control-runs names {key!r} twice: give one run each")
        out[key] = value
    return out
