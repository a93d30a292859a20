"""Writing a `GistModel` as a run folder (`GistModel.save_pretrained`): its weights, tokenizer and config.json,
all or nothing (`gistcache.run.files.staged_run`).

`model` is a GistModel throughout (its `model`, `tokenizer`, `gist_embedding`, and for `save_gist_model` the run it
knows); this module does not import the class, so gist_model.py imports this one and no import runs back."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from gistcache._io import atomic_write_text
from gistcache._version import __version__
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.model.base import quiet_transformers
from gistcache.run.config import read_run_config
from gistcache.run.files import staged_run
from gistcache.run.layout import (ADAPTER_CONFIG_FILE, CONFIG_FILE, FULL_FILE, GIST_FILE, METRICS_FILE,
                                  MODEL_CARD_FILE, TOKENIZER_DIR)
from gistcache.run.offline import hub_offline


def _name_base_model(adapter_config: Path, base_model: str | None) -> None:
    """peft records the base model's installed folder; record the name the run was trained with instead
    (an alias such as smollm2-135m, a hub id or a path as given), so the adapter means the same elsewhere."""
    if base_model is None or not adapter_config.is_file():
        return
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = base_model
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_run_weights(model: nn.Module, out_dir: str | Path, tune: str, base_model: str | None = None) -> None:
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


def save_run(model: nn.Module, out_dir: str | Path, gist_config: GistConfig, *, train_config: dict | None = None,
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


def save_gist_model(model: nn.Module, out_dir: str | Path, *, train_config: dict | None = None) -> Path:
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
