"""Reading a run folder for `GistModel.from_pretrained`: the base model once, in the dtype asked for, checked by
its fingerprint, then the trained weights (`load_run_parts`); the run's tokenizer and its LoRA adapter.

Nothing here builds a `GistModel` (gist_model.py does, from these parts), so the model's own module imports this
one and no import runs back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from gistcache.config import DTYPES, GistConfig, dtype_name
from gistcache.errors import GistError
from gistcache.model.base import add_gist_token, load_base_model, quiet_transformers
from gistcache.model.fingerprint import fingerprint_model
from gistcache.run.config import read_run_config
from gistcache.run.files import reading_run_file
from gistcache.run.fingerprint import run_fingerprint
from gistcache.run.layout import ADAPTER_CONFIG_FILE, ADAPTER_FILE, FULL_FILE, GIST_FILE, TOKENIZER_DIR, resolve_run_dir
from gistcache.run.offline import hub_offline


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


def load_run_parts(run_dir: str | Path | None, *, dtype: torch.dtype, device_map, attn_implementation: str | None,
                   merge: bool) -> tuple[nn.Module, Any, dict]:
    """What `GistModel.from_pretrained` builds the trained gist model of a run folder from: (the base model with
    the run's trained weights, the run's tokenizer, the GistModel's keyword arguments: N, the gist embedding, the
    run's config, folder and fingerprints).

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
    return model, tokenizer, dict(
        num_gist_tokens=gist_config.num_gist_tokens, gist_embedding=gist["gist_embedding"],
        base_fingerprint=data["base_fingerprint"], template=gist_config.template, mask=gist_config.mask,
        positions=gist_config.positions, decoder=gist_config.decoder, gist_every=gist_config.gist_every,
        raw_tail=gist_config.raw_tail, chunk_attention=gist_config.chunk_attention, gist_config=gist_config,
        run_dir=run_dir, run_fingerprint=fingerprint)


def attach_adapter(base, folder: Path, model_name: str):
    """`base` under the LoRA adapter saved in `folder` (adapter_config.json, adapter_model.safetensors), unmerged.
    The base model the adapter config records is replaced by `model_name`: the run's config.json names it."""
    from peft import PeftConfig, PeftModel  # deferred: peft takes seconds to import

    with quiet_transformers(), hub_offline():  # the adapter is in `folder` and its base loaded: nothing to look up
        adapter = PeftConfig.from_pretrained(str(folder))
        adapter.base_model_name_or_path = model_name
        return PeftModel.from_pretrained(base, str(folder), config=adapter, use_safetensors=True)


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
