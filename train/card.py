"""The model card of a run folder (RUN/README.md): what the run is, how it was made, what it measured.

Generated from the run's own files (config.json, metrics.json), plus sections that other steps
measured on the run (`gist eval --update-card` adds its fidelity table and its table by prompt length), so
every figure on the card is one the run or its evaluation wrote.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from gistcache._io import atomic_write_text
from gistcache.model.shipped import LONG_PROMPT_TOKENS
from gistcache.run import DEFAULT_RUN, LONG_RUN, PRETRAINED_DIR
from gistcache.train.config import TrainConfig

# TrainConfig fields whose flag is not `--field-name`
FLAG_NAMES = {"num_gist_tokens": "--num-gist", "attn_implementation": "--attn", "exclude_data": "--exclude"}
# fields that say where and how a run was written, not what it is
NOT_RECIPE = ("out", "resume", "overwrite", "save_every")
# fields that name files or folders: the card names them by file name, never by the training machine's path
PATH_FIELDS = ("data", "eval_data", "exclude_data")


def shown_path(path: str) -> str:
    """A path as a card shows it: its file name (`/home/me/data/train.json` -> `train.json`)."""
    return Path(path).name or str(path)


def shown_model(model: str) -> str:
    """The base model as a card shows it: an alias or hub id as it is, a local path (absolute or from the home
    folder) by its name."""
    return shown_path(model) if model.startswith(("/", "~")) or Path(model).is_absolute() else model


def train_command(train: dict) -> str:
    """The `gist train` command that gives this train config: every flag whose value is not the default."""
    defaults = TrainConfig(out="RUN", preset=train.get("preset", "test"))
    parts = ["gist train", f"--out {shown_path(train.get('out', 'RUN'))}"]
    for f in fields(TrainConfig):
        if f.name in NOT_RECIPE or f.name not in train:
            continue
        value, default = train[f.name], getattr(defaults, f.name)
        if f.name == "preset":  # the preset's own sizes are left out below, so the preset itself must show
            default = f.default
        if value == default:
            continue
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        if f.name in PATH_FIELDS:
            value = [shown_path(item) for item in value] if isinstance(value, list) else shown_path(value)
        elif f.name == "model":
            value = shown_model(value)
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            parts += [f"{flag} {item}" for item in value]
        else:
            parts.append(f"{flag} {value}")
    return " \\\n  ".join(parts)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _resumed(metrics: dict) -> bool:
    """Optimizer time summed over segments exceeds the last segment's wall time only when the run resumed."""
    return (metrics.get("train_seconds") or 0.0) > (metrics.get("wall_seconds") or 0.0)


def _segment_note(metrics: dict) -> str:
    return " in the last segment" if _resumed(metrics) else ""


def _training_time(metrics: dict) -> str:
    train, wall = metrics.get("train_seconds") or 0.0, metrics.get("wall_seconds") or 0.0
    if _resumed(metrics):  # the optimizer steps of every segment, the wall time of the last
        return f"{train / 60:.1f} min of optimizer steps over resumed segments (the last took {wall / 60:.1f} min)"
    return f"{train / 60:.1f} min of optimizer steps, {wall / 60:.1f} min in all"


def _gist_count(gist: dict) -> str:
    """`N gist token(s)`, or N per chunk of K instruction tokens for a chunked run (masks.count_gist_slots)."""
    n = gist["num_gist_tokens"]
    if gist.get("gist_every"):
        local = "; each chunk reads the earlier ones through their gists only" if gist.get(
            "chunk_attention") == "local" else ""
        return (f"{n} gist token(s) after every {gist['gist_every']} instruction tokens{_tail(gist)} (the cache "
                f"grows with the prompt{local})")
    return f"{n} gist token(s)"


def _tail(gist: dict) -> str:
    """`, the last min(W, P - K) tokens kept raw` for a run with a raw tail (masks.py), else nothing."""
    w = gist.get("raw_tail")
    return f", the last min({w}, P - {gist['gist_every']}) tokens kept raw" if w else ""


def _run_flag(run_dir: Path) -> str:
    """` --run RUN` for the card's commands; nothing for the run shipped in the package, which every command
    uses when no run is named (a card rendered in a run folder and then copied into the package would send
    its users to a folder they do not have); ` --run NAME` for another run shipped in the package."""
    if run_dir.resolve() == (PRETRAINED_DIR / DEFAULT_RUN).resolve():
        return ""
    if run_dir.resolve().parent == PRETRAINED_DIR.resolve():
        return f" --run {run_dir.name}"
    return f" --run {run_dir}"


def model_card(run_dir: str | Path, extra_sections: list[str] = (), *, folder: str | Path | None = None) -> str:
    """Markdown for RUN/README.md; `extra_sections` (markdown) go after the command. The card reads the files in
    `run_dir` and names the run by `folder` (default: `run_dir`), where the run is saved through a temporary one."""
    run_dir = Path(run_dir)
    shown = Path(folder) if folder is not None else run_dir
    config = json.loads((run_dir / "config.json").read_text())
    gist, train = config["gist"], config.get("train", {})
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    tuning = {"lora": f"LoRA rank {gist['lora_r']}, alpha {gist['lora_alpha']}, on "
                      f"{', '.join(gist['lora_target_modules'])}, plus the gist embedding",
              "gist": "the gist embedding only (the base model frozen)",
              "full": "all weights and the gist embedding"}[gist["tune"]]
    lines = [
        f"# gist run `{shown.name}`", "",
        f"Compresses an instruction into the keys/values of {_gist_count(gist)} of "
        f"`{shown_model(gist['model'])}`.", "",
        "| | |", "| --- | --- |",
        f"| base model | `{shown_model(gist['model'])}` (fingerprint `{config['base_fingerprint'][:16]}`) |",
        f"| gist tokens | {gist['num_gist_tokens']}"
        + (f" after every {gist['gist_every']} instruction tokens{_tail(gist)}" if gist.get("gist_every") else "")
        + " |",
        *([f"| trained prompt lengths | {gist['trained_prompt_tokens'][0]}-{gist['trained_prompt_tokens'][1]} tokens "
           f"(`gist compress` warns past them) |"] if gist.get("trained_prompt_tokens") else []),
        f"| mask | `{gist.get('mask', 'paper')}`" + (f", `{gist.get('positions', 'original')}` positions"
                                                     if gist.get("mask") == "prefix" else "")
        + f" (condition `{gist['condition']}`) |",
        f"| template | `{gist['template']}` |",
        f"| tuned | {tuning} |",
        *([f"| reads the caches | the untouched base model (`--decoder base`: the adapter works only where the gist "
           f"is written) |"] if gist.get("decoder") == "base" else []),
        f"| objective | `{train.get('objective', 'labels')}` |",
        f"| data | {', '.join(shown_path(d) for d in train.get('data', [])) or 'the built-in instruction set'} |",
    ]
    if train.get("exclude_data"):
        lines.append(f"| instructions excluded | those of {', '.join(shown_path(d) for d in train['exclude_data'])} |")
    if metrics:
        lines += [
            f"| training examples | {metrics.get('train_examples')} ({_fmt(metrics.get('dropped_contaminated'))} "
            f"dropped as contaminated, {_fmt(metrics.get('dropped_too_long'))} as too long) |",
            f"| steps | {metrics.get('steps')} |",
            f"| training time | {_training_time(metrics)} on {metrics.get('cpu') or metrics.get('device')} "
            f"({metrics.get('threads')} threads{_segment_note(metrics)}) |",
            f"| held-out loss | {_fmt(metrics.get('heldout_loss_before'))} before, "
            f"{_fmt(metrics.get('heldout_loss'))} after ({metrics.get('eval_examples')} examples) |",
            f"| versions | {', '.join(f'{k} {v}' for k, v in (metrics.get('versions') or {}).items())} |",
        ]
    if train:
        lines += ["", "## Command", "", "```bash", train_command(train), "```"]
    for section in extra_sections:
        if section.strip():
            lines += ["", section.strip()]
    run_flag = _run_flag(shown)
    lines += ["", "## Use", "", "```bash", f"gist compress \"<instruction>\"{run_flag} --out prompt.safetensors",
              f"gist generate{run_flag} --cache prompt.safetensors --input \"<input>\"", "```", ""]
    if shown.resolve() == (PRETRAINED_DIR / LONG_RUN).resolve():
        lines += [f"With no `--run`, `gist compress` and `gist generate` use this run for an instruction of more than "
                  f"{LONG_PROMPT_TOKENS} tokens (`{DEFAULT_RUN}` for a shorter one), and `gist generate --cache` "
                  f"reads a file with the run that made it.", ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, extra_sections: list[str] = (), *, folder: str | Path | None = None) -> Path:
    path = Path(run_dir) / "README.md"
    atomic_write_text(path, model_card(run_dir, extra_sections, folder=folder))
    return path

