"""The training loop: gist tokens learned through the masked forward.

accelerate handles devices (one CPU process here; `accelerate launch` for DDP over many GPUs),
the sharding of the batches over processes (`accelerator.prepare` on `make_loader`'s DataLoader),
gradient accumulation and bf16 on GPU. `train` prepares the data and the models, runs the
optimizer steps (`_run_steps`), then writes the run folder: weights, config.json, metrics.json,
train.log and the model card. The rows are tokenized in `gistcache.train.encode`, the losses computed in
`gistcache.train.losses`. `--resume` continues from the newest intact checkpoint and ends
bit-identical to the uninterrupted run (see `gistcache.train.checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gistcache._io import atomic_write_text, pad_token_id
from gistcache.environment import cpu_name, package_versions
from gistcache.errors import GistError
from gistcache.model import GistModel, dtype_fingerprints, fingerprint_model, load_base_model, load_tokenizer, save_run
from gistcache.run import LOG_FILE, METRICS_FILE, remove_run_outputs
from gistcache.train.card import write_model_card
from gistcache.train.checkpoint import (check_out_dir, comparable_config, find_resume_point, gather_rng_state,
                                       load_checkpoint, remove_stale_temps, save_checkpoint, set_rng_state)
from gistcache.train.config import TrainConfig
from gistcache.train.data import fingerprint_rows, make_loader, prepare_examples
from gistcache.train.distill import Teacher, make_teacher, with_teacher_answers
from gistcache.train.encode import encode_rows
from gistcache.train.heap import trim_freed_memory
from gistcache.train.losses import heldout_losses, training_loss
from gistcache.train.tuning import (MAX_GRAD_NORM, init_from_run, make_optimizer, make_scheduler, norm_before_clip,
                                    trainable_parameters, wrap_for_tuning)

log = logging.getLogger("gistcache.train")


def train(config: TrainConfig, *, show_progress: bool = True) -> dict:
    """Train gist tokens as `config` says and write the run folder. Returns the metrics.

    The run's log file is attached to the `gistcache.train` logger for the call only: removed, closed and the
    logger's level and propagation put back whether training ends or raises."""
    level, propagate, handlers = log.level, log.propagate, list(log.handlers)
    try:
        return _train(config, show_progress=show_progress)
    finally:
        for handler in [h for h in log.handlers if h not in handlers]:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
        log.propagate = propagate


def _train(config: TrainConfig, *, show_progress: bool) -> dict:
    from accelerate import Accelerator  # deferred: accelerate is needed only when training runs
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    out = check_out_dir(config)
    resume = find_resume_point(out, config) if config.resume else None  # refuses other flags, needs an intact one
    train_rows, eval_rows, stats = prepare_examples(config)  # refuses bad data before anything is written
    rows_fingerprint = fingerprint_rows(train_rows)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # accumulation runs across the epoch's end, as one process always did: every step is grad_accum batches
    plugin = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin, mixed_precision=mixed)
    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, under `accelerate launch --multi_gpu`
    if launched != accelerator.num_processes:  # else each process would train the whole run into one folder
        raise GistError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}: "
                        f"without GPUs set ACCELERATE_USE_CPU=true, so they train one run over CPU processes")
    set_seed(config.seed)
    main = accelerator.is_main_process

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, attn_implementation=config.attn_implementation, for_training=True)
    base_fingerprint = fingerprint_model(base)
    if resume is not None:
        resume.check(rows_fingerprint=rows_fingerprint, processes=accelerator.num_processes,
                     base_fingerprint=base_fingerprint)
    base_fingerprints = dtype_fingerprints(base)  # so the run loads in bfloat16/float16 without a float32 copy
    load_seconds = time.perf_counter() - started
    # before anything is written: a teacher copy that does not fit is refused here
    teacher = make_teacher(base, config.tune, accelerator.device) if config.objective != "labels" else None
    if config.teacher_answers:
        untouched = GistModel(base, tokenizer, config.num_gist_tokens, template=config.template, mask=config.mask,
                              positions=config.positions)
        answered = with_teacher_answers([*train_rows, *eval_rows] if not config.eval_data else train_rows, untouched,
                                        out, max_new_tokens=config.teacher_max_new_tokens,
                                        batch_size=config.batch_size, base_fingerprint=base_fingerprint)
        train_rows = answered[:len(train_rows)]
        if not config.eval_data:
            eval_rows = answered[len(train_rows):]
    model = GistModel(wrap_for_tuning(base, config), tokenizer, config.num_gist_tokens,
                      base_fingerprint=base_fingerprint, template=config.template, mask=config.mask,
                      positions=config.positions, decoder=config.decoder, gist_every=config.gist_every,
                      raw_tail=config.raw_tail, chunk_attention=config.chunk_attention)
    if config.init_from and resume is None:  # refused here, before anything is written
        init_from_run(model, config.init_from, config, base_fingerprint)
    if teacher is not None and teacher.disable_adapter:
        teacher.module = model.model  # the peft wrapper, whose adapter the teacher switches off
    encoded, eval_groups = encode_rows(model, train_rows, eval_rows, config, stats)

    stale: list[str] = []
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            remove_run_outputs(out)
        stale = remove_stale_temps(out)
    accelerator.wait_for_everyone()
    if main:
        _log_to(out / LOG_FILE)  # detached by `train`, whatever happens
    log.info("config %s", json.dumps(config.to_dict()))
    log.info("data %s", json.dumps(stats))
    if main and stale:
        log.info("removed what a killed run left: %s", ", ".join(stale))

    pad_id = pad_token_id(tokenizer)
    loader = accelerator.prepare(make_loader(encoded, config.batch_size, config.seed, pad_id, config.batch_tokens))
    steps_per_epoch = max(1, len(loader) // config.grad_accum)  # len: this process's batches per epoch
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    device = accelerator.device
    model.to(device)  # before a checkpoint's optimizer state is loaded beside the parameters
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, int(total_steps * config.warmup_ratio), total_steps)

    state = {"loss_curve": [], "grad_norm_curve": [], "tokens": 0, "train_seconds": 0.0, "step": 0,
             "data": {"epoch": 0, "batch": 0}}
    rng = None
    if resume is not None:
        state, rng = load_checkpoint(model, optimizer, scheduler, resume.path, config.tune, accelerator.process_index)
        state.setdefault("grad_norm_curve", [])  # checkpoints from before it was recorded
        micro = state["step"] * config.grad_accum  # checkpoints from before the data position was recorded
        state.setdefault("data", {"epoch": micro // len(loader), "batch": micro % len(loader)})
        for note in resume.skipped:
            log.warning("skipped damaged checkpoint %s", note)
        log.info("resumed from %s", resume.path)
    # what a checkpoint records besides the step, for --resume to check
    state.update(run_config=comparable_config(config), base_fingerprint=base_fingerprint)
    state["data"].update(rows_fingerprint=rows_fingerprint, processes=accelerator.num_processes,
                         batches_per_epoch=len(loader))
    if state["step"] == 0:
        state["heldout_before"] = heldout_losses(model, eval_groups, batch_size=config.batch_size,
                                                 pad_token_id=pad_id, condition=config.condition, device=device)
    _run_steps(accelerator, model, optimizer, scheduler, teacher, loader, config, out, state, total_steps,
               pad_id=pad_id, rng=rng, show_progress=show_progress and main)
    accelerator.wait_for_everyone()
    unwrapped: GistModel = accelerator.unwrap_model(model)
    after = heldout_losses(unwrapped, eval_groups, batch_size=config.batch_size, pad_token_id=pad_id,
                           condition=config.condition, device=device)
    before = state.get("heldout_before", {})
    by_split = {name: {"before": before.get(name), "after": after.get(name), "examples": len(eval_groups[name])}
                for name in eval_groups if name != "eval"}
    metrics = {
        "condition": config.condition, "mask": config.mask, "positions": config.positions, "decoder": config.decoder, "objective": config.objective, "tune": config.tune,
        "num_gist_tokens": config.num_gist_tokens, "gist_every": config.gist_every,
        **({"raw_tail": config.raw_tail} if config.raw_tail else {}),
        "steps": state["step"], "heldout_loss": after.get("all"), "heldout_loss_before": before.get("all"),
        "heldout_loss_by_split": by_split,
        "final_train_loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
        "tokens": state["tokens"], "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": round(state["train_seconds"], 2), "model_load_seconds": round(load_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2), "device": str(device),
        "mixed_precision": mixed, "processes": accelerator.num_processes, **stats, "versions": package_versions(),
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "loss_curve": state["loss_curve"], "grad_norm_curve": state["grad_norm_curve"],
    }
    if main:
        run_config = config.gist_config()
        run_config.trained_prompt_tokens = stats["trained_prompt_tokens"]  # what `gist compress` warns past

        def write_metrics_and_card(staged: Path) -> None:  # inside the run's all-or-nothing save
            atomic_write_text(staged / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
            write_model_card(staged, folder=out)

        save_run(unwrapped, out, run_config, train_config=config.to_dict(), base_fingerprint=base_fingerprint,
                 base_fingerprints=base_fingerprints, write_extra=write_metrics_and_card)
        log.info("held-out loss %s (before %s)", json.dumps(after), json.dumps(before))
    return metrics


# batches between two returns of the C heap's free pages to the OS on the CPU (train/heap.py): each
# return costs the next batch its page faults (+23% a step when done every batch), so it runs every few
TRIM_EVERY = 4


def _run_steps(accelerator, model: GistModel, optimizer, scheduler, teacher: Teacher | None, loader,
               config: TrainConfig, out: Path, state: dict, total_steps: int, *,
               pad_id: int, rng: dict[str, torch.Tensor] | None, show_progress: bool) -> None:
    """Optimizer steps from `state["step"]` to `total_steps`; `state` gathers the step, curves, tokens, time and the
    place in the data (`state["data"]`: epoch, and this process's batches done in it).

    `loader` is the prepared DataLoader (this process's shard). `rng`: a checkpoint's random generators
    for this process, set right before the first step so a resumed run draws what the killed one would have.
    """
    params = trainable_parameters(model)
    gist_param = model.gist_embedding
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    step, position = state["step"], state["data"]
    if position["batch"] >= len(loader):  # the checkpoint ended an epoch
        position.update(epoch=position["epoch"] + 1, batch=0)
    progress = _progress(show_progress)
    task = progress.add_task("training", total=total_steps, completed=step, loss=float("nan"), tps=0.0)
    if rng is not None:
        set_rng_state(rng)
    running, tokens, t0 = [], 0, time.perf_counter()
    with progress if show_progress else nullcontext():
        while step < total_steps:
            loader.set_epoch(position["epoch"])
            batches = accelerator.skip_first_batches(loader, position["batch"]) if position["batch"] else loader
            for batch in batches:
                if step >= total_steps:
                    break
                with accelerator.accumulate(model):
                    with accelerator.autocast():  # the teacher runs outside the prepared forward
                        loss = training_loss(model, teacher, batch, config, pad_id)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = float(accelerator.clip_grad_norm_(params, MAX_GRAD_NORM))  # before clipping
                        gist_grad_norm = norm_before_clip(gist_param, grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                position["batch"] += 1
                if accelerator.device.type == "cpu" and position["batch"] % TRIM_EVERY == 0:
                    trim_freed_memory()  # the batches' tensors are freed: hand their pages back (train/heap.py)
                running.append(loss.detach().float())
                tokens += batch["attention_mask"].sum()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                state["step"] = step
                # every process's batch losses, rank by rank: the mean is the one-process mean at the same global batch
                losses = accelerator.gather(torch.stack(running)).tolist()
                mean = sum(losses) / len(losses)
                state["tokens"] += int(accelerator.gather(tokens.reshape(1)).sum())
                running, tokens = [], 0
                state["loss_curve"].append([step, round(mean, 5)])
                state["grad_norm_curve"].append([step, round(grad_norm, 4), round(gist_grad_norm, 4)])
                elapsed = state["train_seconds"] + time.perf_counter() - t0
                tps = state["tokens"] / max(elapsed, 1e-9)
                progress.update(task, completed=step, loss=mean, tps=tps)
                log.info("step %d loss %.4f grad_norm %.3f (gist %.3f) lr %.2e tokens/s %.1f", step, mean,
                         grad_norm, gist_grad_norm, scheduler.get_last_lr()[0], tps)
                if config.save_every and step % config.save_every == 0:
                    generators = gather_rng_state(accelerator)  # a collective: every process takes part
                    if accelerator.is_main_process:
                        state["train_seconds"] = elapsed
                        t0 = time.perf_counter()
                        save_checkpoint(accelerator.unwrap_model(model), optimizer.optimizer, scheduler,
                                        out, step, state, config.tune, generators)
            batches.end()  # a loop left early never reaches the loader's own end()
            if step < total_steps:
                position.update(epoch=position["epoch"] + 1, batch=0)
    state["train_seconds"] += time.perf_counter() - t0


def _log_to(path: Path) -> logging.Handler:
    for stale in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:  # left by a run that raised
        log.removeHandler(stale)
        stale.close()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), disable=not enabled,
    )
