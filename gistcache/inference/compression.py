"""Compress an instruction into the KV cache of its gist tokens.

`compress` runs `prompt ids + N gist ids` once through the model. Up to the last gist token the
gist mask is plain causal, so the gist positions read the whole prompt; everything after the gist
only ever reads the gist positions' keys and values (and, under the prefix mask, the template's
fixed prefix of F tokens). Those N positions of every layer are all we keep: the prompt's own keys
and values are dropped. The kept keys are then turned from positions P..P+N-1 to F..F+N-1
(`gistcache.model.rotary.move_keys`): attention depends only on the distance between query and key, so
generation continuing at F+N reads exactly what it would have read at P+N, and the prompt's
length no longer counts against the model's context::

    positions   0 .. F-1        F .. P-1        P .. P+N-1      P+N ...
    compress    fixed prefix    instruction     gist tokens     -
    kept        (run's prefix)  (dropped)       keys/values, moved to F .. F+N-1
    generate    prefix KV       -               cache at F ..   input tokens from F+N, then new tokens

Under the paper's mask F = 0: the cache holds positions 0..N-1 and the input starts at N.

A chunked run (`gist_every` K, masks.py) puts N gist tokens after every chunk of K instruction tokens:
the M = N * ceil((P - F) / K) gist positions are kept, each turned from where it stood to F..F+M-1,
still in one forward pass. With a raw tail (`raw_tail` W) the chunks cover all but the instruction's last
t = min(W, P - F - K) tokens; those are then read after the gist slots, at F+M..F+M+t-1, by the model that
reads the caches (`GistModel.decoding`), as in training, and their keys/values are kept too: M + t slots.
"""

from __future__ import annotations

import torch

from gistcache._io import left_pad, pad_token_id, sha256_text
from gistcache.cache import GistCache
from gistcache.cache.identity import model_identity
from gistcache.config import check_batch_size
from gistcache.errors import GistError
from gistcache.masks import make_position_ids, raw_tail_length
from gistcache.model import GistModel, cache_kwarg, cache_layers, returned_cache
from gistcache.model.compact import gist_slots
from gistcache.model.rotary import model_inv_freq, turn_keys
from gistcache.prompts import check_instruction, encode_instruction

PREVIEW_CHARS = 60


def compress_ids(model: GistModel, prompt_ids: list[list[int]], *, batch_size: int = 8) -> list[list[tuple]]:
    """Run each row's prompt with its gist tokens (`GistModel.insert_gist`; left-padded batches) and return the
    gist KV per row.

    Returns, per row, [(keys, values)] per layer, each (1, kv_heads, M, head_dim) on the CPU (M = N for one
    chunk), the keys moved to positions F..F+M-1 (F = `model.num_prefix_tokens`).
    """
    check_batch_size(batch_size)
    inv_freq = model_inv_freq(model.stock_model)  # refuses rotary scaling that is not shift-invariant, before any work
    F = model.num_prefix_tokens
    limit = model.max_context()
    rows_ids = [model.insert_gist(ids) for ids in prompt_ids]
    for i, (ids, full) in enumerate(zip(prompt_ids, rows_ids)):
        if len(full) >= limit:
            raise GistError(f"prompt {i} has {len(ids)} tokens + {len(full) - len(ids)} gist tokens, over the model's "
                            f"context of {limit}: shorten it")
    tails = [ids[len(ids) - raw_tail_length(len(ids) - F, model.gist_every, model.raw_tail):] for ids in prompt_ids]
    rows_ids = [full[:len(full) - len(tail)] for full, tail in zip(rows_ids, tails)]  # up to the last gist
    pad_id = pad_token_id(model.tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(rows_ids[i]))  # less padding per batch
    out: list = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([rows_ids[i] for i in rows], pad_id, model.device)  # (B, T) each
        with torch.no_grad():
            if bool(attention_mask.all()) and model.chunk_attention == "causal":
                # No padding: over prompt + gist the gist mask is plain causal, so the stock causal
                # forward (fast sdpa path) computes exactly the masked forward's keys and values.
                res = model.model(inputs_embeds=model.embed(input_ids), use_cache=True, logits_to_keep=1)
            else:
                # Left padding, or chunk-local attention: the masked forward (a padding query sees only
                # itself, so no softmax row is empty and no NaN reaches real rows); positions count real tokens.
                res = model(input_ids, attention_mask, use_cache=True, logits_to_keep=1)
        kv = cache_layers(returned_cache(res))
        columns, _, count = gist_slots(input_ids == model.gist_token_id)  # (B, Mmax), (B,)
        positions = make_position_ids(attention_mask).gather(1, columns)  # (B, Mmax): where each gist stood
        for b, i in enumerate(rows):
            M = int(count[b])
            cols = columns[b, -M:]
            moved_to = torch.arange(F, F + M).view(1, M)
            out[i] = [(turn_keys(k[b:b + 1, :, cols, :].detach(), inv_freq, positions[b:b + 1, -M:], inv_freq,
                                 moved_to).to("cpu").contiguous(),
                       v[b:b + 1, :, cols, :].detach().to("cpu").contiguous().clone()) for k, v in kv]
            if tails[i]:
                out[i] = _with_raw_tail(model, out[i], tails[i])
    return out


def _with_raw_tail(model: GistModel, gist_kv: list[tuple], tail: list[int]) -> list[tuple]:
    """`gist_kv` (per layer, M slots at F..F+M-1) with the raw tail's keys/values after it: the tail read at
    F+M.. after the fixed prefix and the gist slots by the model that reads the caches, as in training."""
    from transformers import DynamicCache  # deferred: transformers is slow to import

    F, M, t = model.num_prefix_tokens, gist_kv[0][0].shape[2], len(tail)
    device = model.device
    prefix = model.prefix_kv() or [None] * len(gist_kv)  # no fixed prefix under the paper's mask
    kept = [(k.to(device), v.to(device)) if p is None else
            (torch.cat([p[0], k.to(device)], dim=2), torch.cat([p[1], v.to(device)], dim=2))
            for p, (k, v) in zip(prefix, gist_kv)]
    ids = torch.tensor([tail], device=device)
    positions = torch.arange(F + M, F + M + t, device=device).view(1, t)
    with torch.no_grad(), model.decoding():
        res = model.model(inputs_embeds=model.embed(ids), position_ids=positions,
                          **{cache_kwarg(model.stock_model): DynamicCache(ddp_cache_data=kept, config=model.config)},
                          use_cache=True, logits_to_keep=1)
    return [(torch.cat([g_k, k[:, :, -t:].detach().to("cpu", g_k.dtype)], dim=2).contiguous(),
             torch.cat([g_v, v[:, :, -t:].detach().to("cpu", g_v.dtype)], dim=2).contiguous())
            for (g_k, g_v), (k, v) in zip(gist_kv, cache_layers(returned_cache(res)))]


def untrained_length_warning(model: GistModel, prompt_tokens: list[int]) -> str | None:
    """One line naming the prompt lengths the run was trained on, when a prompt is longer than any of them (the
    run's `trained_prompt_tokens`; None when every prompt is within it or the run did not record it)."""
    trained = getattr(model.gist_config, "trained_prompt_tokens", None)
    if not trained or not prompt_tokens or max(prompt_tokens) <= trained[1]:
        return None
    longer = sum(n > trained[1] for n in prompt_tokens)
    what = f"{longer} of {len(prompt_tokens)} prompts are" if len(prompt_tokens) > 1 else "the prompt is"
    return (f"warning: {what} longer ({max(prompt_tokens)} tokens) than any this run was trained on "
            f"({trained[0]}-{trained[1]} tokens): the cache may keep less of it")


def compress(model: GistModel, instructions: str | list[str], *, batch_size: int = 8) -> GistCache | list[GistCache]:
    """Compress one instruction (-> GistCache) or many (-> list, batched with left padding)."""
    single = isinstance(instructions, str)
    texts = [instructions] if single else list(instructions)
    if not texts:
        raise GistError("no instructions to compress: give at least one")
    for i, text in enumerate(texts):
        try:
            check_instruction(text)
        except GistError as exc:
            raise GistError(f"instruction {i}: {exc}") from None
    identity = model_identity(model)
    prompt_ids = [encode_instruction(model.tokenizer, text, identity.template) for text in texts]
    kvs = compress_ids(model, prompt_ids, batch_size=batch_size)
    caches = [
        GistCache(keys=[k for k, _ in kv], values=[v for _, v in kv], num_gist_tokens=kv[0][0].shape[2],
                  gist_every=model.gist_every, gist_per_chunk=model.num_gist_tokens, raw_tail=model.raw_tail,
                  num_prompt_tokens=len(ids), prompt_sha256=sha256_text(text), template=identity.template,
                  base_fingerprint=identity.base_fingerprint, run_fingerprint=identity.run_fingerprint,
                  prompt_preview=" ".join(text.split())[:PREVIEW_CHARS], mask=identity.mask,
                  key_start=model.num_prefix_tokens, positions=model.positions)
        for text, ids, kv in zip(texts, prompt_ids, kvs)
    ]
    return caches[0] if single else caches
