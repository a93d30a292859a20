"""FLOPs of prefill and greedy generation, counted with `torch.utils.flop_counter.FlopCounterMode`.

Counts are exact per example: one row at a time (batch size 1), no padding. The counter sees
every matrix product (the linear layers, the output head, attention). Two choices:

- attention is counted dense, as the stock formula does (the causal half is not subtracted); on
  the CPU, PyTorch's fused attention kernel `_scaled_dot_product_flash_attention_for_cpu` has no
  formula in torch, so the same dense SDPA formula is registered for it here;
- the prefill forward computes logits for the last position only (`logits_to_keep=1`, as
  `generate` does), so the output head costs the same for every condition.

`prefill` is the forward over the whole sequence before the first new token; `decode` the sum of
the one-token forwards after it, until EOS or `max_new_tokens`. For the gist condition the prefill
is the forward over the input tokens given the N cached gist positions; compressing the
instruction is a separate, one-time count (`compress_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gistcache.cache import GistCache
from gistcache.inference.compression import compress
from gistcache.inference.generation import build_batch, greedy_tokens
from gistcache.masks import make_position_ids
from gistcache.model import GistModel, cache_kwarg, returned_cache

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Dense attention FLOPs (QK^T and AV), as torch counts its GPU attention kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_formulas() -> dict:
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flop} if op is not None else {}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the CPU fused attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=_custom_formulas())


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run `fn(*args, **kwargs)` under the counter: (its result, total FLOPs)."""
    counter = flop_counter()
    with counter, torch.no_grad():
        result = fn(*args, **kwargs)
    return result, int(counter.get_total_flops())


@dataclass
class GenerationFlops:
    prefill: int  # FLOPs of the forward before the first new token
    decode: int  # FLOPs of the one-token forwards after it
    new_tokens: int  # tokens generated (EOS included)


def greedy_flops(model: GistModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, *, cache=None, max_new_tokens: int) -> GenerationFlops:
    """Greedy-decode one row and count its prefill and decode FLOPs separately.

    input_ids: (1, T) ids fed now (gist ids are embedded with the gist embedding);
    attention_mask: (1, C + T) with C the positions already in `cache` (0 without one);
    position_ids: (1, T) rotary positions of the fed tokens.
    """
    lm = model.model
    key = cache_kwarg(model.stock_model)
    flops = {"prefill": 0, "decode": 0}
    out, mask, position = None, attention_mask, position_ids[:, -1:]  # position: (1, 1)

    def next_logits(new: list[int]) -> torch.Tensor:
        nonlocal out, mask, position
        if new:  # one more token: a one-token forward over the returned cache
            position = position + 1
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            step = torch.tensor([[new[-1]]], device=input_ids.device)  # (1, 1)
            kwargs = dict(inputs_embeds=model.embed(step), attention_mask=mask, position_ids=position,
                          **{key: returned_cache(out)})
        else:  # prefill: the whole input, after the `cache` given
            kwargs = dict(inputs_embeds=model.embed(input_ids), attention_mask=mask, position_ids=position_ids,
                          logits_to_keep=1, **({key: cache} if cache is not None else {}))
        counter = flop_counter()
        with counter:
            out = lm(use_cache=True, **kwargs)
        flops["decode" if new else "prefill"] += int(counter.get_total_flops())
        return out.logits[0, -1]  # (V,)

    with torch.no_grad(), model.decoding():  # what reads the cache (the base model for --decoder base)
        new = greedy_tokens(model, next_logits, max_new_tokens)
    return GenerationFlops(prefill=flops["prefill"], decode=flops["decode"], new_tokens=len(new))


def causal_flops(model: GistModel, ids: list[int], *, max_new_tokens: int, position_offset: int = 0) -> GenerationFlops:
    """FLOPs of greedy generation from `ids` under a plain causal mask (positions from `position_offset`)."""
    x = torch.tensor([ids], device=model.device)  # (1, T)
    mask = torch.ones_like(x)
    return greedy_flops(model, x, mask, make_position_ids(mask, position_offset), max_new_tokens=max_new_tokens)


def gist_flops(model: GistModel, cache: GistCache, input_text: str, *, max_new_tokens: int) -> GenerationFlops:
    """FLOPs of greedy generation of one input continuing from a GistCache (N cached positions)."""
    batch = build_batch(model, cache, [input_text], max_new_tokens=max_new_tokens)
    N = batch.num_cached
    # the N placeholders stand for the cached positions: feed only the input tokens
    return greedy_flops(model, batch.input_ids[:, N:], batch.attention_mask, batch.position_ids[:, N:],
                        cache=batch.cache, max_new_tokens=max_new_tokens)


def compress_flops(model: GistModel, instruction: str) -> int:
    """FLOPs of compressing one instruction (the forward over prompt + N gist tokens)."""
    _, flops = count_flops(compress, model, instruction, batch_size=1)
    return flops


def add_reductions(rows: list[dict]) -> None:
    """Add to each evaluation row its FLOP reductions against `full` on the same split: prefill against the
    same run's full prompt (its `full` row, or the full-prompt prefill counted for runs without one),
    prefill + generation against the same run's `full` row, else the first run's."""
    for row in rows:
        same = [r for r in rows if r["split"] == row["split"] and r["condition"] == "full"]
        full = next((r for r in same if r["run"] == row["run"]), None) or (same[0] if same else None)
        if row["full_prefill_flops"] is None and full is not None and full["run"] == row["run"]:
            row["full_prefill_flops"] = full["prefill_flops"]
        ref = row["full_prefill_flops"]
        row["prefill_reduction_vs_full"] = (round(1 - row["prefill_flops"] / ref, 6)
                                            if ref and row["prefill_flops"] is not None else None)
        total, ref_total = _total(row), _total(full) if full else None
        row["total_flops"] = total
        row["total_reduction_vs_full"] = round(1 - total / ref_total, 6) if total is not None and ref_total else None


def _total(row: dict) -> float | None:
    if row.get("prefill_flops") is None:
        return None
    return row["prefill_flops"] + (row.get("generation_flops") or 0)
