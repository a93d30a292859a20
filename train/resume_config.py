"""The run config a checkpoint records, and what `--resume` compares with it: which fields may change
(`RESUME_SAFE_FIELDS`) and the differences from the command line, each named by its flag."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, fields
from pathlib import Path

from gistcache.train.config import DEFAULTS, TrainConfig

# TrainConfig fields `--resume` accepts with another value than the checkpoint's: how long to train
# (the schedule's end moves with them: the learning rate from the resumed step on follows the new
# length), how often to checkpoint, and how the same computation is run (precision, attention kernel;
# exactness then holds no more, the run's meaning does). Every other field, a field added later
# included, must match: it changes the rows, their order, the model or the optimisation.
RESUME_SAFE_FIELDS = ("max_steps", "epochs", "save_every", "mixed_precision", "attn_implementation")
# how this command runs, not what the run is (the preset's effect is in the size fields it fills)
_COMMAND_FIELDS = ("out", "resume", "overwrite", "preset")
_PATH_FIELDS = ("data", "eval_data", "exclude_data")
_FLAGS = {"num_gist_tokens": "--num-gist", "exclude_data": "--exclude", "attn_implementation": "--attn"}


def flag_name(field_name: str) -> str:
    """The `gist train` flag that sets a TrainConfig field."""
    return _FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def resume_differences(config: TrainConfig, saved: dict) -> list[str]:
    """'--flag NEW (checkpoint: OLD)' for each TrainConfig field that differs from the saved run config,
    except RESUME_SAFE_FIELDS. Fields are read from the dataclass, so a new field is compared too; a field
    the checkpoint predates is compared with its default."""
    current = comparable_config(config)
    differences = []
    for f in fields(TrainConfig):
        if f.name in RESUME_SAFE_FIELDS or f.name in _COMMAND_FIELDS:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        if default is None:  # a field a preset may set: what it takes when no preset sets it
            default = DEFAULTS.get(f.name)
        old = saved.get(f.name, default)
        if current[f.name] != old:
            differences.append(f"{flag_name(f.name)} {_show(current[f.name])} (checkpoint: {_show(old)})")
    return differences


def comparable_config(config: TrainConfig) -> dict:
    """The config as a checkpoint records it: file paths made absolute (a model too, when it is a path)."""
    data = config.to_dict()
    for name in _PATH_FIELDS:
        data[name] = [os.path.abspath(p) for p in data[name]]
    if Path(data["model"]).exists():
        data["model"] = os.path.abspath(data["model"])
    return data


def _show(value) -> str:
    if isinstance(value, str):
        return value
    return "unset" if value is None else json.dumps(value)
