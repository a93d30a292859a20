"""The losses of training: one batch's objective (labels, the teacher's KL, or both) and the held-out losses."""

from __future__ import annotations

import torch

from gistcache.model import GistModel
from gistcache.model.loss import answer_loss_sum
from gistcache.prompts import IGNORE_INDEX
from gistcache.train.config import TrainConfig
from gistcache.train.data import collate
from gistcache.train.distill import Teacher, distill_loss, teacher_logits


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
