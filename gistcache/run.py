"""A run folder: what training leaves behind and every later step reads.

    RUN/config.json                  {"gist": GistConfig, "train": TrainConfig, "base_fingerprint": ...,
                                      "base_fingerprints": {"bfloat16": ..., "float16": ...}}
    RUN/gist_embedding.safetensors   the trained gist embedding (1, H)
    RUN/adapter_model.safetensors    LoRA adapter (+ adapter_config.json), for --tune lora
    RUN/model.safetensors            full weights, for --tune full only
    RUN/tokenizer/                   the tokenizer with <GIST>
    RUN/metrics.json, RUN/train.log, RUN/README.md (the model card), RUN/checkpoints/step-N/

`load_gist_model` (`GistModel.from_pretrained`) and `save_gist_model` (`GistModel.save_pretrained`)
are the life cycle; `load_run` is the older name of the first. The base model is loaded once, in
the dtype asked for, and checked by its fingerprint (see `check_base_fingerprint`). Tensors are
read only from safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistcache._io import atomic_write_text
from gistcache._version import __version__
from gistcache.config import DTYPES, GistConfig, dtype_name
from gistcache.errors import GistError
from gistcache.model import GistModel, add_gist_token, fingerprint_model, load_base_model, quiet_transformers

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
# the gist run that ships inside the package, used when no run is named (see its README.md)
DEFAULT_RUN = "smollm2-135m-gist1"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
WEIGHT_FILES = (GIST_FILE, ADAPTER_FILE, FULL_FILE)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """A run folder; None names the run shipped with the package (`DEFAULT_RUN`, for the default model)."""
    if run_dir is not None:
        return Path(run_dir)
    path = PRETRAINED_DIR / DEFAULT_RUN
    if not is_run_dir(path):
        raise GistError(f"the shipped run {DEFAULT_RUN} is missing from {PRETRAINED_DIR}: reinstall gistcache, or "
                        f"pass --run RUN (a folder written by `gist train`)")
    return path


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / GIST_FILE).is_file()


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


def _name_base_model(adapter_config: Path, base_model: str | None) -> None:
    """peft records the base model's installed folder; record the name the run was trained with instead
    (an alias such as smollm2-135m, a hub id or a path as given), so the adapter means the same elsewhere."""
    if base_model is None or not adapter_config.is_file():
        return
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = base_model
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_run_weights(model: GistModel, out_dir: str | Path, tune: str, base_model: str | None = None) -> None:
    """Write the trained parameters of `model` into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        tmp = Path(tmp)
        save_file({"gist_embedding": model.gist_embedding.detach().float().cpu().contiguous()}, tmp / GIST_FILE)
        if tune == "lora":
            with quiet_transformers(), hub_offline():  # peft would look the base model's name up on the hub
                model.model.save_pretrained(tmp, safe_serialization=True)
            _name_base_model(tmp / ADAPTER_CONFIG_FILE, base_model)
        elif tune == "full":
            state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
            # tied weights share storage; safetensors stores each tensor once
            seen: dict[int, str] = {}
            unique = {}
            for k, v in state.items():
                ptr = v.data_ptr()
                if ptr in seen:
                    continue
                seen[ptr] = k
                unique[k] = v.clone()
            save_file(unique, tmp / FULL_FILE, metadata={"format": "pt"})
        for path in tmp.iterdir():
            if path.is_file():
                os.replace(path, out_dir / path.name)


def save_run(model: GistModel, out_dir: str | Path, gist_config: GistConfig, *, train_config: dict | None = None,
             base_fingerprint: str, base_fingerprints: dict[str, str] | None = None,
             write_extra: Callable[[Path], None] | None = None) -> None:
    """Write a complete run folder: tokenizer, weights, config.json (its presence marks a run), and what
    `write_extra(folder)` writes beside them (metrics, the model card), all or nothing (`staged_run`).

    `base_fingerprints` maps other dtype names to the fingerprint of the base weights loaded in that
    dtype (`fingerprint_model(base, as_dtype=...)`), so that a load in that dtype is checked without
    a float32 copy.
    """
    with staged_run(Path(out_dir)) as staged:
        model.tokenizer.save_pretrained(staged / TOKENIZER_DIR)
        save_run_weights(model, staged, gist_config.tune, gist_config.model)
        config = {"gistcache_version": __version__, "gist": gist_config.to_dict(),
                  "train": train_config or {}, "base_fingerprint": base_fingerprint}
        if base_fingerprints:
            config["base_fingerprints"] = base_fingerprints
        atomic_write_text(staged / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        if write_extra is not None:
            write_extra(staged)


@contextlib.contextmanager
def staged_run(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write a run into; when the block ends, its files move into
    `out_dir` (the folder renamed when `out_dir` does not exist; else file by file, config.json last, after the
    old config.json is removed). After any failure (a full disk, a write refused) the temporary folder is
    removed and `out_dir` holds no run files of this save: the run is complete or absent. What else `out_dir`
    holds (train.log, checkpoints/) stays."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.saving-"))
    try:
        yield staged
        if not out_dir.exists():
            os.rename(staged, out_dir)
            return
        names = sorted(p.name for p in staged.iterdir() if p.name != CONFIG_FILE) + [CONFIG_FILE]
        (out_dir / CONFIG_FILE).unlink(missing_ok=True)  # no run there until the new one is whole
        moved = []
        try:
            for name in names:
                target = out_dir / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(staged / name, target)
                moved.append(target)
        except BaseException:
            for target in moved:
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face offline mode for the block (`HF_HUB_OFFLINE`), restored after it: loading or saving a run
    reads only its own folder, and peft would otherwise look the adapter's base model (a short name such as
    smollm2-135m) up on the hub."""
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    constants = sys.modules.get("huggingface_hub.constants")  # imported by transformers before any load
    saved_constant = constants.HF_HUB_OFFLINE if constants is not None else None
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants = sys.modules.get("huggingface_hub.constants")  # perhaps first imported inside the block
        if constants is not None:
            constants.HF_HUB_OFFLINE = (saved_constant if saved_constant is not None else
                                        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"))


def dtype_fingerprints(base) -> dict[str, str]:
    """{dtype name: fingerprint of `base`'s float32 weights once cast to it} for the dtypes other than float32."""
    return {name: fingerprint_model(base, as_dtype=dtype) for name, dtype in DTYPES.items()
            if dtype not in (torch.float32, torch.float64)}


def check_base_fingerprint(base, data: dict, spec: str, run_dir: Path, *, attn_implementation: str | None = None) -> None:
    """Refuse a base model whose weights are not the ones the run was trained on.

    The fingerprint is computed in the weights' own dtype on their own device. It equals the run's
    float32 `base_fingerprint` for float32 weights and for a checkpoint stored in the dtype it was
    loaded in; else the run's `base_fingerprints` entry for that dtype decides. A run written before
    those entries existed, loaded from a float32 checkpoint in another dtype, is checked once
    against a float32 load on the CPU (the only case that still materialises float32 weights).
    """
    expected = data["base_fingerprint"]
    fingerprint = fingerprint_model(base)
    dtype = dtype_name(base.dtype)
    if fingerprint == expected or fingerprint == data.get("base_fingerprints", {}).get(dtype):
        return
    if base.dtype != torch.float32 and dtype not in data.get("base_fingerprints", {}):
        reference = load_base_model(spec, dtype=torch.float32, attn_implementation=attn_implementation)
        fingerprint = fingerprint_model(reference)
        del reference
        if fingerprint == expected:
            return
    raise GistError(f"base model {spec!r} is not the one run {run_dir} was trained on "
                    f"(fingerprint {fingerprint[:12]} != {expected[:12]})")


def load_gist_model(run_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device_map=None,
                    attn_implementation: str | None = None, merge: bool = True) -> GistModel:
    """Rebuild the trained gist model of a run folder for inference (`GistModel.from_pretrained`).

    Refuses a folder that is not a run, a base model that cannot be loaded, and one whose
    fingerprint differs from the one the run was trained on; nothing is written. LoRA adapters are
    merged into the weights (`merge=True`) for plain-speed inference. `run_dir=None` loads the run
    shipped with the package (`DEFAULT_RUN`). The weights are loaded once, in `dtype`, on the CPU or
    where `device_map` puts them.
    """
    run_dir = resolve_run_dir(run_dir)
    data = read_run_config(run_dir)
    gist_config = GistConfig.from_dict(data["gist"])
    fingerprint = run_fingerprint(run_dir)  # refuses an adapter config that contradicts config.json, before any load
    base = load_base_model(gist_config.model, dtype=dtype, attn_implementation=attn_implementation,
                           device_map=device_map)
    check_base_fingerprint(base, data, gist_config.model, run_dir, attn_implementation=attn_implementation)
    model = base
    if gist_config.tune == "lora":
        if not (run_dir / ADAPTER_FILE).is_file():
            raise GistError(f"run {run_dir} was tuned with LoRA but has no {ADAPTER_FILE}")
        with reading_run_file(run_dir / ADAPTER_CONFIG_FILE, run_dir / ADAPTER_FILE):
            model = attach_adapter(base, run_dir, gist_config.model)
        if merge and gist_config.decoder == "tuned":  # decoder "base" switches the adapter off after the gist
            model = model.merge_and_unload()
    elif gist_config.tune == "full":
        if not (run_dir / FULL_FILE).is_file():
            raise GistError(f"run {run_dir} was fully tuned but has no {FULL_FILE}")
        with reading_run_file(run_dir / FULL_FILE):
            state = load_file(run_dir / FULL_FILE)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _tied_names(model)]
        if missing or unexpected:
            raise GistError(f"{run_dir / FULL_FILE} does not fit the base model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        model.tie_weights()
    tokenizer = load_run_tokenizer(run_dir)
    with reading_run_file(run_dir / GIST_FILE):
        gist = load_file(run_dir / GIST_FILE)
    if "gist_embedding" not in gist:
        raise GistError(f"{run_dir / GIST_FILE} holds no tensor named 'gist_embedding'")
    return GistModel(model, tokenizer, gist_config.num_gist_tokens, gist_embedding=gist["gist_embedding"],
                     base_fingerprint=data["base_fingerprint"], template=gist_config.template, mask=gist_config.mask,
                     positions=gist_config.positions, decoder=gist_config.decoder, gist_every=gist_config.gist_every,
                     gist_config=gist_config, run_dir=run_dir, run_fingerprint=fingerprint).eval()


def attach_adapter(base, folder: Path, model_name: str):
    """`base` under the LoRA adapter saved in `folder` (adapter_config.json, adapter_model.safetensors), unmerged.
    The base model the adapter config records is replaced by `model_name`: the run's config.json names it."""
    from peft import PeftConfig, PeftModel  # deferred: peft takes seconds to import

    with quiet_transformers(), hub_offline():  # the adapter is in `folder` and its base loaded: nothing to look up
        adapter = PeftConfig.from_pretrained(str(folder))
        adapter.base_model_name_or_path = model_name
        return PeftModel.from_pretrained(base, str(folder), config=adapter, use_safetensors=True)


@contextlib.contextmanager
def reading_run_file(*paths: Path) -> Iterator[None]:
    """A run's weight file (or the adapter's config beside it) that cannot be read is refused naming it."""
    try:
        yield
    except GistError:
        raise
    except Exception as exc:  # safetensors' and peft's own errors for truncated or hand-edited files
        reason = type(exc).__name__ + (f": {str(exc).strip().splitlines()[0][:160]}" if str(exc).strip() else "")
        raise GistError(f"cannot read {' or '.join(map(str, paths))} ({reason}): the run is damaged or incomplete; "
                        f"copy it again or train it again") from exc


def load_run(run_dir: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = None, merge: bool = True) -> GistModel:
    """`GistModel.from_pretrained` under its older name, with `device` (a device name) for `device_map`."""
    try:
        device_map = None if torch.device(device).type == "cpu" else str(device)
    except RuntimeError as exc:
        raise GistError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    return GistModel.from_pretrained(run_dir, dtype=dtype, device_map=device_map,
                                     attn_implementation=attn_implementation, merge=merge)


def save_gist_model(model: GistModel, out_dir: str | Path, *, train_config: dict | None = None) -> Path:
    """Write `model` as a run folder (`GistModel.save_pretrained`): its weights, tokenizer and config.json.

    The model must know its run (`gist_config`, set by `from_pretrained`) and its base fingerprint; a
    LoRA run must have been loaded with `merge=False`, so the adapter can be written as an adapter.
    The model card and metrics of the run it was loaded from are copied along.
    """
    out_dir = Path(out_dir)
    if model.gist_config is None or model.base_fingerprint is None:
        raise GistError("save_pretrained needs a model that knows its run (gist_config and base_fingerprint): load "
                        "it with GistModel.from_pretrained(RUN), or write a trained one with `gist train`")
    if model.gist_config.tune == "lora" and not hasattr(model.model, "peft_config"):
        raise GistError("this model's LoRA adapter was merged into its weights when it was loaded: load it with "
                        "GistModel.from_pretrained(RUN, merge=False) to save it")
    if model.run_dir is not None and out_dir.resolve() == model.run_dir.resolve():
        raise GistError(f"{out_dir} is the run this model was loaded from: give another folder")
    source = read_run_config(model.run_dir) if model.run_dir is not None else {}

    def copy_card_and_metrics(staged: Path) -> None:
        for name in (MODEL_CARD_FILE, METRICS_FILE):
            if model.run_dir is not None and (model.run_dir / name).is_file():
                shutil.copy2(model.run_dir / name, staged / name)

    save_run(model, out_dir, model.gist_config, train_config=train_config or source.get("train"),
             base_fingerprint=model.base_fingerprint, base_fingerprints=source.get("base_fingerprints"),
             write_extra=copy_card_and_metrics)
    return out_dir


def load_run_tokenizer(run_dir: str | Path):
    """The tokenizer a run was trained with (its `<GIST>` token included)."""
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

    try:
        with quiet_transformers():
            return add_gist_token(AutoTokenizer.from_pretrained(Path(run_dir) / TOKENIZER_DIR))
    except Exception as exc:
        raise GistError(f"cannot load the tokenizer of run {run_dir} ({type(exc).__name__}): is the run complete?") from exc


def _tied_names(model) -> set[str]:
    names = set()
    if getattr(model.config, "tie_word_embeddings", False):
        names.add("lm_head.weight")
    return names


def load_untouched_base(model: GistModel, *, dtype: torch.dtype, device: str | torch.device) -> GistModel:
    """The base model of a run from `load_run` before any tuning (no adapter, no trained weights), with the
    run's tokenizer and template: what a user runs without gistcache, for full-prompt comparisons. A run trained
    with `--decoder base` is returned itself: it reads everything but its own gist with the adapter off."""
    if model.decoder == "base":
        return model
    base = load_base_model(model.gist_config.model, dtype=dtype, device=device)
    return GistModel(base, model.tokenizer, model.num_gist_tokens, template=model.template).eval()


def remove_run_outputs(run_dir: Path) -> None:
    """Clear a previous run's files (used with --overwrite), its model card included; leave unrelated files alone."""
    for name in (*WEIGHT_FILES, CONFIG_FILE, ADAPTER_CONFIG_FILE, METRICS_FILE, LOG_FILE, MODEL_CARD_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for name in (TOKENIZER_DIR, CHECKPOINTS_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
