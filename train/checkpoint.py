"""The run folder while training: whether `--out` may be written, and the checkpoints that `--resume` reads.

    OUT/checkpoints/step-N/   gist_embedding.safetensors (+ the adapter or full weights),
                              optimizer.safetensors, rng.safetensors (every process's generators),
                              state.json (step, scheduler, curves, data position, the run's config,
                              and the SHA-256 of every other file of the folder)

Safetensors and JSON only (the optimizer and RNG states too: nothing is ever unpickled); each
checkpoint folder is written atomically (`.step-N.tmp-PID`, then renamed). A kill can leave such a
temporary folder: the next run in OUT removes it. `--resume` takes the newest checkpoint whose
files match their hashes, skipping damaged ones, and refuses a command line that describes another
run than the checkpoint's (`resume_differences`, in `gistcache.train.resume_config`).

A resumed run ends bit-identical to the uninterrupted one (same device, same number of
processes): the weights, the optimizer and scheduler, Python's, numpy's and torch's random
generators (CPU, and every CUDA device) of each process, and the place in the data order
(epoch, batches done) are all restored (the generators: `gistcache.train.rng`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gistcache._io import atomic_path, hash_files
from gistcache.errors import GistError
from gistcache.model import GistModel, save_run_weights
from gistcache.run import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHECKPOINTS_DIR, CONFIG_FILE, FULL_FILE, GIST_FILE,
                           MODEL_CARD_FILE, TOKENIZER_DIR, read_run_config)
from gistcache.train.config import TrainConfig
from gistcache.train.resume_config import RESUME_SAFE_FIELDS, flag_name, resume_differences
from gistcache.train.resume_config import _COMMAND_FIELDS, _FLAGS, _PATH_FIELDS, _show, comparable_config  # noqa: F401
from gistcache.train.rng import gather_rng_state, rng_state, set_rng_state  # noqa: F401
from gistcache.train.tuning import trainable_parameters

log = logging.getLogger("gistcache.train")

CHECKPOINT_FORMAT = 2
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")
# what a finished run writes over: a folder holding one of them and no run is refused
_RUN_NAMES = (CONFIG_FILE, GIST_FILE, ADAPTER_FILE, ADAPTER_CONFIG_FILE, FULL_FILE, TOKENIZER_DIR, MODEL_CARD_FILE)
_TEMP = re.compile(r"\..+\.tmp-\d+|\.save-.+")  # atomic_path's and save_run_weights' temporary names


def check_out_dir(config: TrainConfig) -> Path:
    """Refuse an output folder that is a file, holds another run (unless --overwrite or --resume), or holds
    files a run would replace without being a run (even with --overwrite, which replaces only a complete run
    or a killed run's checkpoints). Writes nothing."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise GistError(f"--out {out} is a file: give a folder for the run")
    if config.resume:
        if not list_checkpoints(out):
            raise GistError(f"--resume: {out} has no checkpoint to continue from (train with --save-every N)")
        return out
    if not out.is_dir():
        return out
    if not _holds_checkpoints(out):
        raise GistError(f"{out / CHECKPOINTS_DIR} holds files that `gist train` did not write: give another --out")
    if (out / CONFIG_FILE).exists():
        if (problem := run_problem(out)) is not None:
            raise GistError(f"{out} is not a complete gist run ({problem}): --overwrite replaces only a folder written "
                            f"by `gist train`, so give another --out")
    elif not (out / CHECKPOINTS_DIR).exists():
        if found := [name for name in _RUN_NAMES if (out / name).exists()]:
            raise GistError(f"{out} holds {', '.join(found)} but no gist run: training would replace them, so give "
                            f"another --out")
        return out
    if not config.overwrite:
        raise GistError(f"{out} holds another run: pass --overwrite to replace it, or --resume to continue it")
    return out


def run_problem(out: Path) -> str | None:
    """Why `out` is not a complete run folder (its config, weights and tokenizer), or None."""
    try:
        data = read_run_config(out)
    except GistError as exc:
        return str(exc)
    gist = data["gist"] if isinstance(data["gist"], dict) else {}
    needed = [GIST_FILE, {"lora": ADAPTER_FILE, "full": FULL_FILE}.get(gist.get("tune"))]
    missing = [name for name in needed if name and not (out / name).is_file()]
    if not (out / TOKENIZER_DIR).is_dir():
        missing.append(f"{TOKENIZER_DIR}/")
    return f"no {', '.join(missing)}" if missing else None


def _holds_checkpoints(out: Path) -> bool:
    """True when OUT/checkpoints is absent or holds only step-N folders and temporary ones."""
    folder = out / CHECKPOINTS_DIR
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return all((_STEP_DIR.fullmatch(p.name) and p.is_dir()) or _TEMP.fullmatch(p.name) for p in folder.iterdir())


def list_checkpoints(out: Path) -> list[Path]:
    """The step-N folders of OUT/checkpoints that have a state.json, newest first."""
    folder = out / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(out: Path) -> Path | None:
    checkpoints = list_checkpoints(out)
    return checkpoints[0] if checkpoints else None


def remove_stale_temps(out: Path) -> list[str]:
    """Delete the temporary files and folders a killed run left in OUT and OUT/checkpoints; return their names.

    Call it only when this run owns OUT (its checks passed): two runs writing one folder are not supported.
    """
    removed = []
    for folder in (out, out / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP.fullmatch(path.name) and not path.is_symlink():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(str(path.relative_to(out)))
    return removed


@dataclass
class ResumePoint:
    """The checkpoint `--resume` continues from, its state.json, and the newer ones it skipped as damaged."""

    path: Path
    state: dict
    skipped: list[str] = field(default_factory=list)

    def check(self, *, rows_fingerprint: str, processes: int, base_fingerprint: str) -> None:
        """Refuse to continue on other rows, another number of processes, or other base weights."""
        data = self.state.get("data", {})
        if data.get("rows_fingerprint", rows_fingerprint) != rows_fingerprint:
            raise GistError(f"--resume: the training rows differ from those of {self.path} (a data file changed?): "
                            f"resume with the data the run was started on")
        if data.get("processes", processes) != processes:
            raise GistError(f"--resume: {self.path} was written by {data['processes']} processes, this run has "
                            f"{processes}: resume with `accelerate launch --num_processes {data['processes']}`")
        if self.state.get("base_fingerprint", base_fingerprint) != base_fingerprint:
            raise GistError(f"--resume: the base model is not the one {self.path} was trained from (fingerprint "
                            f"{base_fingerprint[:12]} != {self.state['base_fingerprint'][:12]})")


def find_resume_point(out: Path, config: TrainConfig) -> ResumePoint:
    """The newest intact checkpoint of `out`, after checking that `config` describes its run. Writes nothing."""
    skipped = []
    for path in list_checkpoints(out):
        problem, state = checkpoint_problem(path)
        if problem is None:
            break
        skipped.append(f"{path.name} ({problem})")
    else:
        raise GistError(f"--resume: no intact checkpoint in {out / CHECKPOINTS_DIR}: {'; '.join(skipped)}")
    for note in skipped:
        log.warning("checkpoint %s is damaged: resuming from %s", note, path.name)
    if "run_config" in state:
        differences = resume_differences(config, state["run_config"])
        if differences:
            safe = ", ".join(flag_name(name) for name in RESUME_SAFE_FIELDS)
            raise GistError(f"--resume: the command line describes another run than {path}: {'; '.join(differences)}; "
                            f"repeat the run's own flags (only {safe} may change)")
    return ResumePoint(path, state, skipped)


def saved_run_config(out: str | Path) -> dict:
    """The run config the newest intact checkpoint of `out` recorded ({} when there is none): what
    `gist train --resume` takes for every flag the command line leaves out."""
    for path in list_checkpoints(Path(out)):
        problem, state = checkpoint_problem(path)
        if problem is None:
            saved = state.get("run_config")
            return saved if isinstance(saved, dict) else {}
    return {}


def checkpoint_problem(path: Path) -> tuple[str | None, dict]:
    """(why the checkpoint at `path` cannot be used, or None; its state.json)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{STATE_FILE} unreadable: {type(exc).__name__}", {}
    if not isinstance(state, dict) or not {"step", "scheduler", "num_params", "loss_curve"} <= set(state):
        return f"{STATE_FILE} lacks the step, scheduler or curves", {}
    files = state.get("files")
    if not isinstance(files, dict):  # a checkpoint from before the hashes: only its files' presence is checked
        needed = [GIST_FILE, OPTIMIZER_FILE]
        missing = [name for name in needed if not (path / name).is_file()]
        return (f"no {', '.join(missing)}" if missing else None), state
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing", state
        if hash_files([path / name]) != digest:
            return f"{name} does not match its hash", state
    return None, state


def save_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, out: Path, step: int,
                    state: dict, tune: str, rng: dict[str, torch.Tensor]) -> None:
    """Write OUT/checkpoints/step-N atomically; state.json, written last, holds every other file's hash."""
    final = out / CHECKPOINTS_DIR / f"step-{step}"
    with atomic_path(final, folder=True) as tmp:
        save_run_weights(model, tmp, tune)
        tensors = {}
        params = trainable_parameters(model)
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
        save_file(tensors, tmp / OPTIMIZER_FILE)
        save_file({name: value.contiguous() for name, value in rng.items()}, tmp / RNG_FILE)
        files = {path.name: hash_files([path]) for path in sorted(tmp.iterdir()) if path.is_file()}
        state = {**state, "format": CHECKPOINT_FORMAT, "step": step, "scheduler": scheduler.state_dict(),
                 "num_params": len(params), "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(state))
    log.info("checkpoint %s", final)


def load_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, ckpt: Path, tune: str,
                    process_index: int = 0) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Load the weights, optimizer and scheduler of a checkpoint (`model` already on its device).

    Returns its state and this process's random generators (None for a checkpoint from before they
    were kept); the caller restores those right before the first step it runs.
    """
    state = json.loads((ckpt / STATE_FILE).read_text())
    params = trainable_parameters(model)
    if state["num_params"] != len(params):
        raise GistError(f"checkpoint {ckpt} has {state['num_params']} trainable tensors, this run {len(params)}: "
                        f"resume with the same --tune and model")
    try:
        _load_weights(model, ckpt, tune)
        tensors = load_file(ckpt / OPTIMIZER_FILE)
        rng = load_file(ckpt / RNG_FILE) if (ckpt / RNG_FILE).is_file() else None
    except (SafetensorError, RuntimeError, KeyError, ValueError) as exc:
        raise GistError(f"checkpoint {ckpt} does not fit this run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]})") from exc
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        p = params[int(i)]
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):  # the scheduler does not restore it
        group["lr"] = lr
    if rng is not None:
        rng = {name: value[process_index].clone() for name, value in rng.items()}  # a row of its own storage
    else:
        log.warning("checkpoint %s keeps no random generator state: the run continues, not bit-identical", ckpt)
    return state, rng


def _load_weights(model: GistModel, ckpt: Path, tune: str) -> None:
    with torch.no_grad():
        model.gist_embedding.copy_(load_file(ckpt / GIST_FILE)["gist_embedding"])
    if tune == "lora":
        from peft import set_peft_model_state_dict  # deferred: peft takes seconds to import

        set_peft_model_state_dict(model.model, load_file(ckpt / ADAPTER_FILE))
    elif tune == "full":
        model.model.load_state_dict(load_file(ckpt / FULL_FILE), strict=False)
        model.model.tie_weights()
