"""The forward of a prefix-mask run in the `compact` positions: two passes, computed as a cache is.

In the compact layout (masks.py) the tokens after the gist read the run's fixed prefix (F tokens)
at positions 0..F-1 and the gist at F..F+N-1, as if the instruction had never been there; the gist
tokens themselves read the prefix and the instruction where they are. One sequence cannot hold
the prefix at two distances at once, so the forward is what compress + generate do, with
gradients flowing through both passes::

    pass 1   prefix 0..F-1   instruction F..P-1   gist P..P+N-1     causal: the gist reads everything
             (chunk-local for a run with chunk_attention "local", masks.py)
    kept     prefix keys/values                   gist keys/values, the keys turned from P.. to F..
    pass 2   input (and answer) from F+N, reading the F+N kept slots and each other (causal);
             a run with decoder="base" runs it with the LoRA adapter off (`GistModel.decoding`)

A chunked run (`gist_every` K, masks.py) interleaves the instruction with its gist tokens in pass 1
(`s a b G c G`) and keeps all M of them, their keys turned from where they stood to F..F+M-1;
pass 2 starts at F+M. Rows of one batch may hold different M: the kept slots are laid out
[prefix F][padding][gist M_b] per row, the padding hidden from pass 2. Under the paper's mask F = 0.

The batch is left-padded (B, T), as everywhere. Row b's last gist ends at column end[b]: pass 1 takes
its columns first[b]..end[b]-1, left-padded again; pass 2 takes the columns from end[b], which end
at T in every row, so its outputs stay in the input's last columns. The logits come back in the
input's columns: pass 2's after the gist, pass 1's up to it.

`GistModel.forward` runs it (gist_model.py imports this module), so the model comes in as `TwoPassModel`,
what the two passes read of a `GistModel`, and this module imports nothing of gist_model.py.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

from gistcache.errors import GistError
from gistcache.masks import (check_prefix_fits, chunk_local_mask, find_gist_spans, make_gist_mask, make_position_ids,
                             to_additive_mask)
from gistcache.model.kv import cache_kwarg, cache_layers, returned_cache
from gistcache.model.rotary import model_inv_freq, turn_keys


class TwoPassModel(Protocol):
    """What `compact_forward` reads of the `GistModel` whose forward it is."""

    model: nn.Module  # the stock model, or its PEFT wrapper
    gist_token_id: int
    num_gist_tokens: int
    gist_every: int
    chunk_attention: str

    @property
    def num_prefix_tokens(self) -> int: ...

    @property
    def stock_model(self) -> nn.Module: ...

    @property
    def config(self): ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def decoding(self) -> contextlib.AbstractContextManager: ...


def compact_forward(model: TwoPassModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs):
    """Logits (B, T or logits_to_keep, V) of the gist condition in the compact positions; see the module."""
    from transformers.modeling_outputs import CausalLMOutputWithPast  # deferred: transformers is slow to import

    if kwargs.pop("output_attentions", False):
        raise GistError("attention maps are drawn from the one-pass masked forward: a run in the compact positions "
                        "computes in two passes; draw them for a run trained with --positions original")
    kwargs.pop("use_cache", None)  # after the gist the cache holds only the kept slots: none is returned
    B, T = input_ids.shape
    F, N = model.num_prefix_tokens, model.num_gist_tokens
    device = input_ids.device
    real = attention_mask.bool()
    first = real.long().argmax(dim=1)  # (B,) left padding
    start, end = find_gist_spans(input_ids, model.gist_token_id, contiguous=not model.gist_every)
    check_prefix_fits(first, start, F)

    # pass 1: prefix + instruction + gist, causal, each row left-padded to E columns
    length = end - first  # (B,) P + N
    E = int(length.max())
    source = end.view(B, 1) - E + torch.arange(E, device=device).view(1, E)  # (B, E): input column of each
    real1 = source >= first.view(B, 1)
    ids1 = torch.where(real1, input_ids.gather(1, source.clamp(min=0)), torch.zeros_like(source))
    C = T - int(end.min())  # columns after the earliest gist end: pass 2's width
    both = not logits_to_keep or logits_to_keep > C  # are logits of pass 1's columns asked for?
    embeds1 = model.embed(ids1)
    dtype = embeds1.dtype
    if model.chunk_attention == "local":  # each chunk reads the earlier ones through their gists only (masks.py)
        mask1 = chunk_local_mask(ids1, real1, model.gist_token_id, F)
    else:
        mask1 = make_gist_mask(ids1, real1, model.gist_token_id, "pos_control")  # causal, padding sees itself
    out1 = model.model(inputs_embeds=embeds1, attention_mask=to_additive_mask(mask1, dtype),
                       position_ids=make_position_ids(real1.long()), use_cache=True, logits_to_keep=0 if both else 1)
    if C == 0:  # no row has tokens after its gist: pass 1 was the whole forward, cache included (compress)
        if labels is not None:
            out1.loss = _loss(out1.logits, labels)
        return out1
    prefix_cols = (E - length).view(B, 1) + torch.arange(F, device=device).view(1, F)  # (B, F)
    gist_cols, gist_real, M = gist_slots(ids1 == model.gist_token_id)  # (B, Mmax) each, (B,)
    Mmax = gist_cols.shape[1]
    positions1 = make_position_ids(real1.long())  # (B, E): pass 1's rotary positions
    moved_to = F + torch.arange(Mmax, device=device).view(1, Mmax) - (Mmax - M).view(B, 1)  # (B, Mmax): F..F+M_b-1
    inv_freq = model_inv_freq(model.stock_model)
    kept = []
    for keys, values in cache_layers(returned_cache(out1)):  # each (B, kv_heads, E, head_dim)
        kv_heads, head_dim = keys.shape[1], keys.shape[3]
        index = prefix_cols.view(B, 1, F, 1).expand(-1, kv_heads, -1, head_dim)
        gist_index = gist_cols.view(B, 1, Mmax, 1).expand(-1, kv_heads, -1, head_dim)
        gist_keys = turn_keys(keys.gather(2, gist_index), inv_freq, positions1.gather(1, gist_cols), inv_freq,
                              moved_to)  # from where each gist stood to F..F+M_b-1
        kept.append((torch.cat([keys.gather(2, index), gist_keys], dim=2),
                     torch.cat([values.gather(2, index), values.gather(2, gist_index)], dim=2)))

    # pass 2: everything after the gist, from position F+N, reading the kept slots
    from transformers import DynamicCache  # deferred: transformers is slow to import

    columns = torch.arange(T - C, T, device=device).view(1, C)
    real2 = real[:, T - C:] & (columns >= end.view(B, 1))  # (B, C)
    causal2 = make_gist_mask(input_ids[:, T - C:], real2, model.gist_token_id, "pos_control")  # (B, C, C)
    kept_real = torch.cat([torch.ones(B, F, dtype=torch.bool, device=device), gist_real], dim=1)  # (B, F+Mmax)
    kept_visible = kept_real.view(B, 1, F + Mmax).expand(B, C, F + Mmax)  # every query reads the real kept slots
    with model.decoding():  # a run with decoder="base" reads the kept slots with its adapter off
        out2 = model.model(inputs_embeds=model.embed(input_ids[:, T - C:]),
                           attention_mask=to_additive_mask(torch.cat([kept_visible, causal2], dim=2), dtype),
                           position_ids=make_position_ids(real2.long(), F + M),
                           logits_to_keep=0 if both else logits_to_keep,
                           **{cache_kwarg(model.stock_model): DynamicCache(ddp_cache_data=kept, config=model.config)},
                           use_cache=False, **kwargs)
    logits = _columns_of_input(out1.logits, out2.logits, end, T) if both else out2.logits
    if logits_to_keep and logits.shape[1] > logits_to_keep:
        logits = logits[:, -logits_to_keep:]
    return CausalLMOutputWithPast(loss=None if labels is None else _loss(logits, labels), logits=logits)


def gist_slots(is_gist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gist columns of each row of (B, E) `is_gist`, right-aligned: `(columns, real, count)`, columns and real
    (B, Mmax) (padding slots point at column 0 and are not real), count (B,) = M_b."""
    count = is_gist.sum(dim=1)  # (B,)
    Mmax = int(count.max())
    columns = torch.zeros(is_gist.shape[0], Mmax, dtype=torch.long, device=is_gist.device)
    real = torch.zeros(is_gist.shape[0], Mmax, dtype=torch.bool, device=is_gist.device)
    for b in range(is_gist.shape[0]):
        cols = is_gist[b].nonzero().view(-1)
        columns[b, Mmax - len(cols):] = cols
        real[b, Mmax - len(cols):] = True
    return columns, real, count


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` (the last columns of the input) against `labels` (B, T)."""
    shifted = labels[:, -logits.shape[1]:][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             shifted.reshape(-1), ignore_index=-100)


def _columns_of_input(logits1: torch.Tensor, logits2: torch.Tensor, end: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, V): column j of row b from pass 2 when j >= end[b], else from pass 1 (whose column j - end[b] + E
    it is). Padding columns stay zero; nothing reads them. Row slices are plain copies (no index of B*T*V)."""
    B, E, V = logits1.shape
    C = logits2.shape[1]
    out = logits2.new_zeros(B, T, V)
    for b, e in enumerate(end.tolist()):
        out[b, e:] = logits2[b, C - (T - e):]
        n = min(e, E)  # pass 1 holds row b's last n columns before its gist ends
        out[b, e - n:e] = logits1[b, E - n:]
    return out
