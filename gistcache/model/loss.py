"""The answer loss: next-token cross-entropy over the labelled (answer) positions only.

Training's held-out loss and `gist attention` report it; the training objective uses it with the
graph kept (`reduce=False`).
"""

from __future__ import annotations

import torch
from torch import nn

from gistcache.prompts import IGNORE_INDEX


def answer_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, reduce: bool = True):
    """Summed next-token cross-entropy over the labelled (answer) positions, and how many there are.

    logits: (B, T, V); labels: (B, T), IGNORE_INDEX where unlabelled. Divide the sums of several
    batches by the summed counts for the token-weighted mean that the held-out loss reports.
    `reduce=False` returns both as tensors (the sum keeps its graph, for training).
    """
    labels = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    return (loss, count) if not reduce else (float(loss), int(count))
