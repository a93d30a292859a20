"""A run's config.json and adapter_config.json, read and checked (a hand-edited field refused in one line)."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.run.layout import ADAPTER_CONFIG_FILE, CONFIG_FILE, GIST_FILE, is_run_dir, resolve_run_dir


def read_run_config(run_dir: str | Path | None) -> dict:
    run_dir = resolve_run_dir(run_dir)
    if not run_dir.is_dir():
        raise GistError(f"run folder {run_dir} does not exist: train one with `gist train --out {run_dir}`")
    if not is_run_dir(run_dir):
        raise GistError(f"{run_dir} is not a gist run (no {CONFIG_FILE} and {GIST_FILE}): "
                        f"give the --out folder of a finished `gist train`")
    try:
        data = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GistError(f"{run_dir / CONFIG_FILE} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise GistError(f"{run_dir / CONFIG_FILE} is not UTF-8 JSON ({exc.reason} at byte {exc.start}): it was "
                        f"not written by `gist train`") from exc
    check_run_config_types(data, run_dir / CONFIG_FILE)
    for key in ("gist", "base_fingerprint"):
        if key not in data:
            raise GistError(f"{run_dir / CONFIG_FILE} lacks {key!r}: it was not written by `gist train`")
    return data


# the JSON kinds a run config's values may have, for one-line refusals of hand-edited files
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
          dict: "an object", type(None): "null"}


def check_run_config_types(data: object, path: Path) -> None:
    """Refuse a config.json whose sections or gist fields are not of the types `gist train` writes.

    Each field of the "gist" section is checked against GistConfig's annotation (a hand-edited
    `"gist": null` or `"lora_r": "8"` is named here instead of failing later as a TypeError);
    values and unknown fields are GistConfig's own checks.
    """
    if not isinstance(data, dict):
        raise GistError(f"{path} holds {_kind(data)}, not a JSON object: it was not written by `gist train`")
    for key, kind in (("gist", dict), ("train", dict), ("base_fingerprint", str), ("base_fingerprints", dict)):
        if key in data and not isinstance(data[key], kind):
            raise GistError(f"{path}: {key!r} is {_kind(data[key])}, not {_KINDS[kind]}: it was not written by "
                            f"`gist train`; train the run again")
    if not all(isinstance(v, str) for v in data.get("base_fingerprints", {}).values()):
        raise GistError(f"{path}: 'base_fingerprints' must map dtype names to text")
    hints = typing.get_type_hints(GistConfig)
    for name, value in data.get("gist", {}).items():
        if name in hints and not _fits(value, hints[name]):
            raise GistError(f"{path}: gist field {name!r} is {_kind(value)} ({value!r}), not "
                            f"{_describe(hints[name])}: fix it or train the run again")


def _fits(value: object, annotation) -> bool:
    """Whether a JSON value has the type of a dataclass annotation (int, float, str, bool, list[...], X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if annotation is type(None):
        return value is None
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    return True  # a kind this check does not know: GistConfig decides


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ')}" if args else "a list"
    return _KINDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def read_adapter_config(run_dir: Path, gist: dict) -> dict | None:
    """RUN/adapter_config.json as a dict (None when the run has none), refused in one line when it is not a JSON
    object or when, for a LoRA run, its r or lora_alpha differ from config.json's lora_r or lora_alpha."""
    path = run_dir / ADAPTER_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GistError(f"{path} is not valid UTF-8 JSON ({exc}): the run's adapter config is damaged; copy the run "
                        f"again or train it again") from exc
    if not isinstance(data, dict):
        raise GistError(f"{path} is not a JSON object: the run's adapter config is damaged; train the run again")
    config = GistConfig.from_dict(gist)
    if config.tune == "lora":
        for ours, theirs in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
            if data.get(theirs) != getattr(config, ours):
                raise GistError(f"{path} has {theirs} {data.get(theirs)!r} but {run_dir / CONFIG_FILE} has {ours} "
                                f"{getattr(config, ours)!r}: one of them was edited; restore it or train the run again")
    return data
