"""The run folder while training: whether `--out` may be written, and the checkpoints that `--resume` reads.

    OUT/checkpoints/step-N/   gist_embedding.safetensors (+ the adapter or full weights),
                              optimizer.safetensors, state.json (step, scheduler, curves)

Safetensors and JSON only (the optimizer state too); each checkpoint folder is written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistcache._io import atomic_path
from gistcache.errors import GistError
from gistcache.model import GistModel
from gistcache.run import ADAPTER_FILE, CHECKPOINTS_DIR, CONFIG_FILE, FULL_FILE, GIST_FILE, save_run_weights
from gistcache.train.config import TrainConfig
from gistcache.train.tuning import trainable_parameters

log = logging.getLogger("gistcache.train")


def check_out_dir(config: TrainConfig) -> Path:
    """Refuse an output folder that holds another run, unless --overwrite or --resume."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise GistError(f"--out {out} is a file: give a folder for the run")
    holds_run = (out / CONFIG_FILE).is_file() or (out / CHECKPOINTS_DIR).is_dir()
    if config.resume:
        if not (out / CHECKPOINTS_DIR).is_dir() or latest_checkpoint(out) is None:
            raise GistError(f"--resume: {out} has no checkpoint to continue from (train with --save-every N)")
    elif holds_run and not config.overwrite:
        raise GistError(f"{out} holds another run: pass --overwrite to replace it, or --resume to continue it")
    return out


def latest_checkpoint(out: Path) -> Path | None:
    steps = []
    for path in (out / CHECKPOINTS_DIR).glob("step-*"):
        if (path / "state.json").is_file() and path.name[5:].isdigit():
            steps.append((int(path.name[5:]), path))
    return max(steps)[1] if steps else None


def save_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, out: Path, step: int,
                    state: dict, tune: str) -> None:
    final = out / CHECKPOINTS_DIR / f"step-{step}"
    with atomic_path(final, folder=True) as tmp:
        save_run_weights(model, tmp, tune)
        tensors = {}
        params = trainable_parameters(model)
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {**state, "step": step, "scheduler": scheduler.state_dict(), "num_params": len(params)}
        (tmp / "state.json").write_text(json.dumps(state))
    log.info("checkpoint %s", final)


def load_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, ckpt: Path, tune: str) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    with torch.no_grad():
        model.gist_embedding.copy_(load_file(ckpt / GIST_FILE)["gist_embedding"])
    if tune == "lora":
        from peft import set_peft_model_state_dict  # deferred: peft takes seconds to import

        set_peft_model_state_dict(model.model, load_file(ckpt / ADAPTER_FILE))
    elif tune == "full":
        model.model.load_state_dict(load_file(ckpt / FULL_FILE), strict=False)
        model.model.tie_weights()
    params = trainable_parameters(model)
    if state["num_params"] != len(params):
        raise GistError(f"checkpoint {ckpt} has {state['num_params']} trainable tensors, this run {len(params)}: "
                        f"resume with the same --tune and model")
    tensors = load_file(ckpt / "optimizer.safetensors")
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        p = params[int(i)]
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the scheduler does not restore it
        group["lr"] = lr
    return state
