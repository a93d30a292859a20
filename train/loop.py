"""The training loop: gist tokens learned through the masked forward.

accelerate handles devices (one CPU process here; `accelerate launch` for DDP over many GPUs),
gradient accumulation and bf16 on GPU. Checkpoints and the final run are written with
safetensors only (the optimizer state too), each folder atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistcache.errors import GistError
from gistcache.prompts import IGNORE_INDEX
from gistcache.model import (GistModel, answer_loss_sum, atomic_write_text, fingerprint_model, load_base_model,
                             load_tokenizer)
from gistcache.run import (ADAPTER_FILE, CONFIG_FILE, FULL_FILE, GIST_FILE, cpu_name, package_versions,
                           remove_run_outputs, save_run, save_run_weights)
from gistcache.train.card import write_model_card
from gistcache.train.config import TrainConfig
from gistcache.train.data import (Example, builtin_examples, collate, drop_contaminated, encode_examples, heldout_split,
                                  load_many, shuffled, split_by_instruction)
from gistcache.train.distill import (Teacher, check_has_inputs, distill_loss, make_teacher, teacher_logits,
                                     with_teacher_answers)

log = logging.getLogger("gistcache.train")
CHECKPOINTS = "checkpoints"
MAX_GRAD_NORM = 1.0  # over all trainable parameters together, as Hugging Face's Trainer does by default


# --- the run folder before training -------------------------------------------------------------

def check_out_dir(config: TrainConfig) -> Path:
    """Refuse an output folder that holds another run, unless --overwrite or --resume."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise GistError(f"--out {out} is a file: give a folder for the run")
    holds_run = (out / CONFIG_FILE).is_file() or (out / CHECKPOINTS).is_dir()
    if config.resume:
        if not (out / CHECKPOINTS).is_dir() or latest_checkpoint(out) is None:
            raise GistError(f"--resume: {out} has no checkpoint to continue from (train with --save-every N)")
    elif holds_run and not config.overwrite:
        raise GistError(f"{out} holds another run: pass --overwrite to replace it, or --resume to continue it")
    return out


def latest_checkpoint(out: Path) -> Path | None:
    steps = []
    for path in (out / CHECKPOINTS).glob("step-*"):
        if (path / "state.json").is_file() and path.name[5:].isdigit():
            steps.append((int(path.name[5:]), path))
    return max(steps)[1] if steps else None


# --- data -----------------------------------------------------------------------------------------

def prepare_examples(config: TrainConfig) -> tuple[list[Example], list[Example], dict]:
    """Training and held-out examples, after the contamination filter; counts for the report."""
    stats: dict = {}
    eval_rows = load_many(config.eval_data) if config.eval_data else []
    if config.data:
        train_rows = load_many(config.data, require_output=not config.teacher_answers)
        if config.teacher_answers:
            check_has_inputs(config.data, train_rows)
        excluded = load_many(config.exclude_data) if config.exclude_data else []
        train_rows, stats["dropped_contaminated"] = drop_contaminated(train_rows, [*eval_rows, *excluded])
        train_rows = shuffled(train_rows, config.seed)
        if not eval_rows and config.eval_examples:
            # hold out whole instructions of the user's data: at most 10% of the rows
            eval_rows, train_rows = split_by_instruction(train_rows, config.eval_examples, config.seed)
    else:
        n_train = config.max_examples or 2000
        train_rows = builtin_examples(n_train, seed=config.seed, held_out=False)
        if eval_rows:
            train_rows, stats["dropped_contaminated"] = drop_contaminated(train_rows, eval_rows)
        else:
            # as the paper's seen/unseen splits: new inputs for the training tasks, and tasks never trained on
            seen_pairs = {(ex.instruction, ex.input) for ex in train_rows}
            half = config.eval_examples // 2
            seen = [ex for ex in builtin_examples(4 * half, seed=config.seed + 1, held_out=False)
                    if (ex.instruction, ex.input) not in seen_pairs][:half]
            unseen = builtin_examples(config.eval_examples - len(seen), seed=config.seed + 1, held_out=True)
            eval_rows = seen + unseen
            stats["dropped_contaminated"] = 0
    if config.max_examples:
        train_rows = train_rows[: config.max_examples]
    eval_rows = shuffled(eval_rows, config.seed)[: config.eval_examples]
    if not train_rows:
        raise GistError("no training examples left after the contamination filter: check --data and --eval-data")
    return train_rows, eval_rows, stats


# --- tuning modes ---------------------------------------------------------------------------------

def wrap_for_tuning(base, config: TrainConfig):
    """Freeze or wrap the base model as --tune asks; the gist embedding always learns."""
    if config.tune == "gist":
        base.requires_grad_(False)
        return base
    if config.tune == "lora":
        from peft import LoraConfig, get_peft_model

        gc = config.gist_config()
        targets = [m for m in gc.lora_target_modules if any(n.endswith(m) for n, _ in base.named_modules())]
        if not targets:
            raise GistError(f"--tune lora: the model has none of the modules {gc.lora_target_modules}")
        lora = LoraConfig(r=gc.lora_r, lora_alpha=gc.lora_alpha, lora_dropout=gc.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(base, lora)
    base.requires_grad_(True)
    return base


def trainable_parameters(model: GistModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- checkpoints (safetensors and JSON only) ------------------------------------------------------

def save_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, out: Path, step: int,
                    state: dict, tune: str) -> None:
    ckpt_root = out / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
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
    final = ckpt_root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("checkpoint %s", final)


def load_checkpoint(model: GistModel, optimizer: torch.optim.Optimizer, scheduler, ckpt: Path, tune: str) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    with torch.no_grad():
        model.gist_embedding.copy_(load_file(ckpt / GIST_FILE)["gist_embedding"])
    if tune == "lora":
        from peft import set_peft_model_state_dict

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


# --- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def heldout_losses(model: GistModel, groups: dict[str, list], *, batch_size: int, pad_token_id: int, condition: str,
                   device: torch.device) -> dict[str, float]:
    """Token-weighted mean cross-entropy on the answers of held-out examples, under `condition`:
    one value per group of encoded examples, and "all" over every group together. Empty: {}."""
    was_training = model.training
    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    for name, encoded in groups.items():
        total, count = 0.0, 0
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], pad_token_id).items()}
            logits = model(batch["input_ids"], batch["attention_mask"], condition=condition).logits
            batch_total, batch_count = answer_loss_sum(logits, batch["labels"])
            total, count = total + batch_total, count + batch_count
        if count:
            sums[name] = (total, count)
    model.train(was_training)
    losses = {name: total / count for name, (total, count) in sums.items()}
    if sums:
        losses["all"] = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
    return losses


# --- the loop -------------------------------------------------------------------------------------

def train(config: TrainConfig, *, show_progress: bool = True) -> dict:
    """Train gist tokens as `config` says and write the run folder. Returns the metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = check_out_dir(config)
    train_rows, eval_rows, stats = prepare_examples(config)  # refuses bad data before anything is written
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=mixed)
    set_seed(config.seed)
    main = accelerator.is_main_process

    started = time.perf_counter()
    tokenizer = load_tokenizer(config.model)
    base = load_base_model(config.model, attn_implementation=config.attn_implementation)
    base_fingerprint = fingerprint_model(base)
    load_seconds = time.perf_counter() - started
    if config.teacher_answers:
        untouched = GistModel(base, tokenizer, config.num_gist_tokens, template=config.template, mask=config.mask)
        answered = with_teacher_answers([*train_rows, *eval_rows] if not config.eval_data else train_rows, untouched,
                                        out, max_new_tokens=config.teacher_max_new_tokens,
                                        batch_size=config.batch_size, base_fingerprint=base_fingerprint)
        train_rows = answered[:len(train_rows)]
        if not config.eval_data:
            eval_rows = answered[len(train_rows):]
    teacher = make_teacher(base, config.tune, accelerator.device) if config.objective != "labels" else None
    model = GistModel(wrap_for_tuning(base, config), tokenizer, config.num_gist_tokens,
                      base_fingerprint=base_fingerprint, template=config.template, mask=config.mask)
    if teacher is not None and teacher.disable_adapter:
        teacher.module = model.model  # the peft wrapper, whose adapter the teacher switches off
    gist_id = model.gist_token_id
    context = min(config.max_length, model.max_context())
    encoded, too_long = encode_examples(tokenizer, train_rows, num_gist_tokens=config.num_gist_tokens,
                                        gist_token_id=gist_id, template=config.template, max_length=context)
    eval_groups, eval_too_long = {}, 0
    for row in eval_rows:  # the built-in set is scored per split: seen task families and held-out ones
        eval_groups.setdefault(heldout_split(row), []).append(row)
    for name, rows in eval_groups.items():
        eval_groups[name], dropped = encode_examples(tokenizer, rows, num_gist_tokens=config.num_gist_tokens,
                                                     gist_token_id=gist_id, template=config.template,
                                                     max_length=context)
        eval_too_long += dropped
    if not encoded:
        raise GistError(f"every training example is longer than {context} tokens: raise --max-length")
    stats.update(train_examples=len(encoded), eval_examples=sum(len(g) for g in eval_groups.values()),
                 dropped_too_long=too_long + eval_too_long)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            remove_run_outputs(out)
    accelerator.wait_for_everyone()
    handler = _log_to(out / "train.log") if main else None
    log.info("config %s", json.dumps(config.to_dict()))
    log.info("data %s", json.dumps(stats))

    batches_per_epoch = math.ceil(len(encoded) / (config.batch_size * accelerator.num_processes))
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = int(total_steps * config.warmup_ratio)

    params = trainable_parameters(model)
    # the gist embedding is one vector learned from scratch, like a soft prompt: it gets its own rate
    others = [p for p in params if p is not model.gist_embedding]
    groups = [{"params": [model.gist_embedding], "lr": config.gist_lr or config.lr, "weight_decay": 0.0}]
    if others:
        groups.append({"params": others, "lr": config.lr, "weight_decay": config.weight_decay})
    optimizer = torch.optim.AdamW(groups)
    gist_param = model.gist_embedding
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps))

    state = {"loss_curve": [], "grad_norm_curve": [], "tokens": 0, "train_seconds": 0.0}
    step = 0
    if config.resume:
        ckpt = latest_checkpoint(out)
        state = load_checkpoint(model, optimizer, scheduler, ckpt, config.tune)
        step = state["step"]
        state.setdefault("grad_norm_curve", [])  # checkpoints from before it was recorded
        log.info("resumed from %s", ckpt)

    device = accelerator.device
    model.to(device)
    if step == 0:
        state["heldout_before"] = heldout_losses(model, eval_groups, batch_size=config.batch_size,
                                                 pad_token_id=tokenizer.pad_token_id, condition=config.condition,
                                                 device=device)
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    progress = _progress(show_progress and main)
    task = progress.add_task("training", total=total_steps, completed=step, loss=float("nan"), tps=0.0)
    micro = step * config.grad_accum  # micro-batches already consumed (for --resume)
    pad_id = tokenizer.pad_token_id
    rank, world = accelerator.process_index, accelerator.num_processes
    running, t0 = [], time.perf_counter()
    with progress if show_progress and main else nullcontext():
        epoch = 0
        while step < total_steps:
            order = shuffled(encoded, config.seed + epoch)
            batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            batches = batches[rank::world]
            skip = micro - epoch * len(batches) if micro > epoch * len(batches) else 0
            for batch_index, rows in enumerate(batches):
                if batch_index < skip:
                    continue
                if step >= total_steps:
                    break
                batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
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
                micro += 1
                state["tokens"] += int(batch["attention_mask"].sum()) * world
                running.append(float(loss.detach()))
                if accelerator.sync_gradients:
                    step += 1
                    mean = sum(running) / len(running)
                    running = []
                    state["loss_curve"].append([step, round(mean, 5)])
                    state["grad_norm_curve"].append([step, round(grad_norm, 4), round(gist_grad_norm, 4)])
                    elapsed = state["train_seconds"] + time.perf_counter() - t0
                    tps = state["tokens"] / max(elapsed, 1e-9)
                    progress.update(task, completed=step, loss=mean, tps=tps)
                    log.info("step %d loss %.4f grad_norm %.3f (gist %.3f) lr %.2e tokens/s %.1f", step, mean,
                             grad_norm, gist_grad_norm, scheduler.get_last_lr()[0], tps)
                    if config.save_every and step % config.save_every == 0 and main:
                        state["train_seconds"] = elapsed
                        t0 = time.perf_counter()
                        save_checkpoint(accelerator.unwrap_model(model), optimizer.optimizer, scheduler,
                                        out, step, state, config.tune)
            epoch += 1
    state["train_seconds"] += time.perf_counter() - t0
    accelerator.wait_for_everyone()
    unwrapped: GistModel = accelerator.unwrap_model(model)
    after = heldout_losses(unwrapped, eval_groups, batch_size=config.batch_size, pad_token_id=pad_id,
                           condition=config.condition, device=device)
    before = state.get("heldout_before", {})
    by_split = {name: {"before": before.get(name), "after": after.get(name), "examples": len(eval_groups[name])}
                for name in eval_groups if name != "eval"}
    metrics = {
        "condition": config.condition, "mask": config.mask, "objective": config.objective, "tune": config.tune,
        "num_gist_tokens": config.num_gist_tokens,
        "steps": step, "heldout_loss": after.get("all"), "heldout_loss_before": before.get("all"),
        "heldout_loss_by_split": by_split,
        "final_train_loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
        "tokens": state["tokens"], "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": round(state["train_seconds"], 2), "model_load_seconds": round(load_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2), "device": str(device),
        "mixed_precision": mixed, "processes": world, **stats, "versions": package_versions(),
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "loss_curve": state["loss_curve"], "grad_norm_curve": state["grad_norm_curve"],
    }
    if main:
        save_run(unwrapped, out, config.gist_config(), train_config=config.to_dict(),
                 base_fingerprint=base_fingerprint)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_model_card(out)
        log.info("held-out loss %s (before %s)", json.dumps(after), json.dumps(before))
    if handler:
        log.removeHandler(handler)
        handler.close()
    return metrics


def training_loss(model, teacher: Teacher | None, batch: dict, config: TrainConfig, pad_id: int) -> torch.Tensor:
    """The objective of one batch: label cross-entropy, KL from the full-prompt teacher, or their sum.

    Rows are left-padded, so every answer sits in the last columns: logits are computed for the last
    K columns only (K = the longest answer + 1), which spares the output head most positions.
    """
    labels = batch["labels"]  # (B, T)
    answer = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    keep = labels.shape[1] - int(answer[0]) + 1 if len(answer) else 1
    keep = min(keep, labels.shape[1])
    logits = model(batch["input_ids"], batch["attention_mask"], condition=config.condition,
                   logits_to_keep=keep).logits  # (B, K, V)
    labels = labels[:, -keep:]
    loss = None
    if config.objective != "distill":
        total, count = answer_loss_sum(logits, labels, reduce=False)
        loss = total / count.clamp(min=1)
    if teacher is None:
        return loss
    student: GistModel = getattr(model, "module", model)  # DDP wraps it
    target = teacher_logits(teacher, student, batch["input_ids"], batch["attention_mask"], pad_id, keep)
    kl = distill_loss(logits, target, labels, config.distill_temperature)
    return kl if loss is None else kl + loss


def norm_before_clip(param: torch.nn.Parameter, total_norm: float, max_norm: float = MAX_GRAD_NORM) -> float:
    """The norm `param.grad` had before a global clip to `max_norm` that found `total_norm`.

    Recorded for the gist embedding: one vector that every token after the gist reads, in every
    layer, whose gradient can outweigh all the model's weights together (docs/results.md, 1d).
    """
    if param.grad is None:
        return 0.0
    coef = min(1.0, max_norm / (total_norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
    return float(param.grad.norm()) / coef


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 10% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return max(0.1, 1.0 - 0.9 * frac)


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), disable=not enabled,
    )
