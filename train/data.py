"""Training's data: which rows train and which are held out, and the left-padded batches.

Rows come from the user's Alpaca-format files or the built-in task set (`gistcache.data`); the
contamination filter drops training rows whose instruction is held out or excluded. Tokenizing
is `gistcache.prompts.encode_examples`; `collate` pads a batch on the left.
"""

from __future__ import annotations

import torch

from gistcache._io import left_pad
from gistcache.data.alpaca import (Example, builtin_examples, drop_contaminated, load_examples, load_many, shuffled,
                                   split_by_instruction)
from gistcache.errors import GistError
from gistcache.prompts import IGNORE_INDEX, EncodedExample
from gistcache.train.config import TrainConfig
from gistcache.train.distill import check_has_inputs

# Example and load_examples are gistcache.data's; they stay importable from here, where training reads its rows
__all__ = ["Example", "collate", "load_examples", "prepare_examples"]


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


def collate(batch: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a batch: input_ids, attention_mask, labels, each (B, T)."""
    input_ids, attention_mask = left_pad([e.input_ids for e in batch], pad_token_id)
    labels, _ = left_pad([e.labels for e in batch], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
