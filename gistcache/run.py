"""A run folder: what training leaves behind and every later step reads.

    RUN/config.json                  {"gist": GistConfig, "train": TrainConfig, "base_fingerprint": ...}
    RUN/gist_embedding.safetensors   the trained gist embedding (1, H)
    RUN/adapter_model.safetensors    LoRA adapter (+ adapter_config.json), for --tune lora
    RUN/model.safetensors            full weights, for --tune full only
    RUN/tokenizer/                   the tokenizer with <GIST>
    RUN/metrics.json, RUN/train.log, RUN/README.md (the model card), RUN/checkpoints/step-N/

Tensors are read only from safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistcache._io import atomic_write_text, hash_files
from gistcache._version import __version__
from gistcache.config import GistConfig
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
        data = json.loads((run_dir / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise GistError(f"{run_dir / CONFIG_FILE} is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    for key in ("gist", "base_fingerprint"):
        if key not in data:
            raise GistError(f"{run_dir / CONFIG_FILE} lacks {key!r}: it was not written by `gist train`")
    return data


def run_fingerprint(run_dir: str | Path | None) -> str:
    """SHA-256 over what the run is (its gist config) and its trained parameter files."""
    run_dir = resolve_run_dir(run_dir)
    gist = json.dumps(read_run_config(run_dir)["gist"], sort_keys=True)
    files = [run_dir / name for name in WEIGHT_FILES if (run_dir / name).is_file()]
    return hashlib.sha256(f"{gist}\n{hash_files(files)}".encode()).hexdigest()


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
            with quiet_transformers():
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
             base_fingerprint: str) -> None:
    """Write a complete run folder: tokenizer, weights, then config.json last (its presence marks a run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    save_run_weights(model, out_dir, gist_config.tune, gist_config.model)
    config = {"gistcache_version": __version__, "gist": gist_config.to_dict(),
              "train": train_config or {}, "base_fingerprint": base_fingerprint}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def load_run(run_dir: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = None, merge: bool = True) -> GistModel:
    """Rebuild the trained gist model of a run folder for inference.

    Refuses a base model whose fingerprint differs from the one the run was trained on.
    LoRA adapters are merged into the weights (`merge=True`) for plain-speed inference.
    `run_dir=None` loads the run shipped with the package (`DEFAULT_RUN`).
    """
    run_dir = resolve_run_dir(run_dir)
    data = read_run_config(run_dir)
    gist_config = GistConfig.from_dict(data["gist"])
    # fingerprinted in float32, as at training time; cast to `dtype` afterwards
    base = load_base_model(gist_config.model, dtype=torch.float32, device="cpu",
                           attn_implementation=attn_implementation)
    fingerprint = fingerprint_model(base)
    if fingerprint != data["base_fingerprint"]:
        raise GistError(f"base model {gist_config.model!r} is not the one run {run_dir} was trained on "
                        f"(fingerprint {fingerprint[:12]} != {data['base_fingerprint'][:12]})")
    model = base
    if gist_config.tune == "lora":
        from peft import PeftModel  # deferred: peft takes seconds to import

        if not (run_dir / ADAPTER_FILE).is_file():
            raise GistError(f"run {run_dir} was tuned with LoRA but has no {ADAPTER_FILE}")
        with quiet_transformers():
            model = PeftModel.from_pretrained(base, str(run_dir), use_safetensors=True)
        if merge:
            model = model.merge_and_unload()
    elif gist_config.tune == "full":
        if not (run_dir / FULL_FILE).is_file():
            raise GistError(f"run {run_dir} was fully tuned but has no {FULL_FILE}")
        state = load_file(run_dir / FULL_FILE)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _tied_names(model)]
        if missing or unexpected:
            raise GistError(f"{run_dir / FULL_FILE} does not fit the base model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        model.tie_weights()
    tokenizer = load_run_tokenizer(run_dir)
    gist = load_file(run_dir / GIST_FILE)
    if "gist_embedding" not in gist:
        raise GistError(f"{run_dir / GIST_FILE} holds no tensor named 'gist_embedding'")
    gist_model = GistModel(model.to(dtype), tokenizer, gist_config.num_gist_tokens,
                           gist_embedding=gist["gist_embedding"], base_fingerprint=fingerprint,
                           template=gist_config.template, mask=gist_config.mask)
    gist_model.gist_config = gist_config
    gist_model.run_dir = run_dir
    gist_model.run_fingerprint = run_fingerprint(run_dir)
    return gist_model.to(device).eval()


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
    run's tokenizer and template: what a user runs without gistcache, for full-prompt comparisons."""
    base = load_base_model(model.gist_config.model, dtype=dtype, device=device)
    return GistModel(base, model.tokenizer, model.num_gist_tokens, template=model.template).eval()


def remove_run_outputs(run_dir: Path) -> None:
    """Clear a previous run's files (used with --overwrite), its model card included; leave unrelated files alone."""
    for name in (*WEIGHT_FILES, CONFIG_FILE, ADAPTER_CONFIG_FILE, METRICS_FILE, LOG_FILE, MODEL_CARD_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for name in (TOKENIZER_DIR, CHECKPOINTS_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
