"""Training's data: which rows train and which are held out, and the left-padded batches.

Rows come from the user's Alpaca-format files or the built-in task set (`gistcache.data`); the
contamination filter drops training rows whose instruction is held out or excluded. Tokenizing
is `gistcache.prompts.encode_examples`; `collate` pads a batch on the left. `make_loader` gives
the DataLoader that `accelerator.prepare` shards over processes: the order of one epoch is a
pure function of (seed, epoch), so a checkpoint finds its place from the epoch and the batches done.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from gistcache._io import left_pad
from gistcache.data.alpaca import (Example, builtin_examples, drop_contaminated, load_examples, load_many, shuffled,
                                   split_by_instruction)
from gistcache.errors import GistError
from gistcache.prompts import IGNORE_INDEX, EncodedExample
from gistcache.train.config import TrainConfig
from gistcache.train.distill import check_has_inputs

# Example and load_examples are gistcache.data's; they stay importable from here, where training reads its rows
__all__ = ["Example", "ShuffledOrder", "TokenBudgetBatches", "collate", "fingerprint_rows", "load_examples", "make_loader",
           "prepare_examples"]


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


def fingerprint_rows(rows: list[Example]) -> str:
    """SHA-256 of the training rows in their order: a resumed run must read the rows its checkpoint read."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps([row.instruction, row.input, row.output]).encode())
    return h.hexdigest()


class ShuffledOrder(Sampler[int]):
    """Indices 0..n-1 in the order `shuffled` gives for `seed + epoch` (the order training has always used).

    It draws from no global random generator, so where a run is in its data is (epoch, batches done)
    and nothing else; `accelerate` calls `set_epoch` through the batch sampler it wraps.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(shuffled(range(self.n), self.seed + self.epoch))

    def __len__(self) -> int:
        return self.n


class TokenBudgetBatches(Sampler[list[int]]):
    """Batches of rows of like length, each at most `batch_size` rows and `batch_tokens` padded tokens (rows x
    its longest row), so long prompts train without running out of memory and short ones are not padded to them.

    Each epoch's order (`ShuffledOrder`) is cut into windows of 64 batches' rows, each window sorted by length
    and cut into batches, and the batches shuffled again: a pure function of (seed, epoch), as the plain order
    is. A row longer than `batch_tokens` trains alone.
    """

    WINDOW = 64

    def __init__(self, lengths: list[int], batch_size: int, batch_tokens: int, seed: int) -> None:
        self.lengths, self.batch_size, self.batch_tokens = lengths, batch_size, batch_tokens
        self.sampler = ShuffledOrder(len(lengths), seed)  # accelerate's set_epoch reaches it here

    def _batches(self) -> list[list[int]]:
        order = list(self.sampler)
        window = self.WINDOW * self.batch_size
        batches: list[list[int]] = []
        for at in range(0, len(order), window):
            batch: list[int] = []
            for i in sorted(order[at:at + window], key=lambda i: self.lengths[i]):
                longest = self.lengths[i]  # the window is sorted: the row being added is the batch's longest
                if batch and (len(batch) == self.batch_size or longest * (len(batch) + 1) > self.batch_tokens):
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        return shuffled(batches, self.sampler.seed + self.sampler.epoch + 1)

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(encoded: list[EncodedExample], batch_size: int, seed: int, pad_token_id: int,
                batch_tokens: int = 0) -> DataLoader:
    """Batches of `batch_size` consecutive rows of each epoch's order, left-padded (`collate`); with
    `batch_tokens`, batches of like length under that many padded tokens (`TokenBudgetBatches`).

    Under `accelerate launch` with W processes, `accelerator.prepare` gives process r the batches
    r, r + W, ... of the order, so W processes at batch B and one process at batch B with
    `--grad-accum W` make each optimizer step from the same rows.
    """
    if batch_tokens:
        sampler = TokenBudgetBatches([len(e.input_ids) for e in encoded], batch_size, batch_tokens, seed)
    else:
        sampler = BatchSampler(ShuffledOrder(len(encoded), seed), batch_size, drop_last=False)
    # its own generator: the loader's per-epoch seed draw must not move the global torch RNG that dropout uses
    return DataLoader(encoded, batch_sampler=sampler, collate_fn=partial(collate, pad_token_id=pad_token_id),
                      generator=torch.Generator())
