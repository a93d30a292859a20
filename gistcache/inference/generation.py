"""Generate from gist caches, in one batch, and the slow masked reference that defines the result.

`generate` loads each cache's gist keys/values into a transformers `DynamicCache` and lets
`model.generate` continue with the input tokens. The caches are position-free (see gistcache/cache/):
the gist sits at positions F..F+N-1 after the run's fixed prefix, whatever the prompt's length.
Row b of a batch of B (cache, input) pairs::

    cache slots     [prefix_0 .. prefix_{F-1}] gist_0 .. gist_{N-1}   (gist keys/values from the cache file)
    sequence        [F+N placeholders]        [left padding] [input tokens] [new tokens ...]
    attention_mask   1 .. 1                     0 .. 0         1 .. 1         1 ...
    position_ids     0 .. F-1, F .. F+N-1       F+N            F+N .. F+N+L-1 F+N+L ...

The prefix slots exist only for runs trained with the `prefix` mask (F = 0 otherwise): the
keys/values of the template's fixed prefix, computed once per loaded run (`GistModel.prefix_kv`),
never stored in a cache file, and turned per row to the cache's `prefix_start` (F - P), so that
the input reads them at the distance it had in training (see gistcache/cache/). Their position ids above
are never used: the cache slots are not run again.

The left padding sits between the gist and the input; the 2D attention mask hides it and the
position ids count only real tokens from F+N, so each row sees exactly what it saw in training
(up to the shift of every position by the same amount, which rotary attention does not see). The
placeholders stand for the cached positions: transformers slices them off before the first
forward (they are never embedded). A single row needs none of this: `GistCache.to_dynamic_cache`
and `GistCache.input_ids` give a stock `generate` call the same prefix, with no position ids.

Decoding starts from the model's own `generation_config`; the settings given here (and any
`generate_kwargs`) override it. `GREEDY` is what the CLI and the evaluation pass: plain greedy
decoding whatever the model's config suggests.

`generate_masked` is the definition: greedy decoding that re-runs the whole masked forward
(instruction, gist, input, tokens so far) every step, with no cache at all. `generate_causal`
continues plain token sequences under a causal mask, for the full-prompt baselines. The decoding
settings (`GenerateConfig`) and what every path shares are in `gistcache.inference.decoding`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gistcache._io import left_pad, pad_token_id
from gistcache.cache import GistCache, slot_mask, stack_layers
from gistcache.cache.identity import check_cache, model_identity
from gistcache.config import check_batch_size
from gistcache.errors import GistError
from gistcache.inference.decoding import (GenerateConfig, _decode, _pair, _until_eos, check_context, greedy_tokens,
                                          suppressed_token_ids)
from gistcache.masks import make_position_ids
from gistcache.model import GistModel, cache_kwarg
from gistcache.model.rotary import check_shift_invariant
from gistcache.prompts import encode_input, encode_instruction

# plain greedy decoding, whatever the model's generation_config suggests (the CLI's and the evaluation's default)
GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@dataclass
class GenerationBatch:
    """The model inputs for B (cache, input) pairs: see the module docstring for the layout."""

    input_ids: torch.Tensor  # (B, F+N+L): F+N placeholders, then left-padded input ids
    attention_mask: torch.Tensor  # (B, F+N+L): 1 on the cached slots and real input tokens
    position_ids: torch.Tensor  # (B, F+N+L): rotary positions, the input continuing at F+N
    cache: object  # transformers DynamicCache holding (B, kv_heads, F+N, head_dim) per layer
    num_cached: int  # S = F + the largest M: the run's fixed prefix (prefix mask only, else 0) and the gist slots


def build_batch(model: GistModel, caches: GistCache | list[GistCache], inputs: str | list[str], *,
                max_new_tokens: int = 0) -> GenerationBatch:
    """Check the caches against `model`, tokenize the inputs and lay out one left-padded batch."""
    from transformers import DynamicCache  # deferred: transformers takes seconds to import

    caches, inputs = _pair(caches, inputs, "cache")
    check_shift_invariant(model.config)
    identity = model_identity(model)
    for i, cache in enumerate(caches):
        if not isinstance(cache, GistCache):
            raise GistError(f"cache {i} is {type(cache).__name__}, not a GistCache: load it with load_cache")
        check_cache(model, cache, identity=identity, source=f"cache {i}")
    input_ids = [encode_input(model.tokenizer, text, identity.template) for text in inputs]
    check_context(model, [c.context_used for c in caches], input_ids, max_new_tokens)

    B, device = len(inputs), model.device
    pad_id = pad_token_id(model.tokenizer)
    padded, input_mask = left_pad(input_ids, pad_id, device)  # (B, L) each
    slots = slot_mask(caches, model.num_prefix_tokens).to(device, input_mask.dtype)  # (B, S): S = F + largest M
    num_cached = slots.shape[1]
    offsets = torch.tensor([c.offset for c in caches], device=device)  # (B,) F + M_b: where each input starts
    cached_pos = torch.arange(num_cached, device=device).view(1, num_cached).expand(B, num_cached)  # never used
    position_ids = torch.cat([cached_pos, make_position_ids(input_mask, offsets)], dim=1)  # (B, S+L)
    attention_mask = torch.cat([slots, input_mask], dim=1)
    full_ids = torch.cat([torch.full((B, num_cached), pad_id, device=device), padded], dim=1)  # (B, S+L)
    kv = stack_layers(model, caches, device)
    return GenerationBatch(input_ids=full_ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=DynamicCache(ddp_cache_data=kv), num_cached=num_cached)


def generation_config_for(model: GistModel, settings: GenerateConfig, generation_config=None, **generate_kwargs):
    """The transformers GenerationConfig of one call: the model's own (or `generation_config`), then the
    settings that are not None, then `generate_kwargs`. The run's EOS, padding and the suppressed gist
    token are filled in unless given."""
    config = copy.deepcopy(generation_config if generation_config is not None else model.model.generation_config)
    updates = {k: v for k, v in vars(settings).items() if v is not None and k not in ("seed", "min_new_tokens")}
    updates["min_new_tokens"] = settings.min_new_tokens or None
    if not {**vars(config), **updates, **generate_kwargs}.get("do_sample"):
        for name in ("temperature", "top_p", "top_k"):  # sampling settings mean nothing to greedy or beam search
            updates.pop(name, None)
    if generation_config is None or generation_config.eos_token_id is None:
        updates["eos_token_id"] = model.tokenizer.eos_token_id  # answers end at the run's end of turn
    if config.pad_token_id is None:
        updates["pad_token_id"] = pad_token_id(model.tokenizer)
    suppressed = [*(config.suppress_tokens or []), *suppressed_token_ids(model)]
    updates["suppress_tokens"] = list(dict.fromkeys(suppressed)) or None
    try:
        config.update(**{**updates, **generate_kwargs})
        config.validate()
    except ValueError as exc:
        raise GistError(f"generation settings do not fit together: {str(exc).splitlines()[0][:200]}") from exc
    return config


def generate_ids(model: GistModel, caches: GistCache | list[GistCache], inputs: str | list[str], *,
                 max_new_tokens: int = 128, min_new_tokens: int = 0, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, streamer=None, generation_config=None, **generate_kwargs) -> list[list[int]]:
    """Like `generate`, returning each row's new token ids (up to and including EOS)."""
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    n_rows = max(1 if isinstance(x, (str, GistCache)) else len(x) for x in (caches, inputs))
    if streamer is not None and n_rows > 1:
        raise GistError(f"streaming takes one input at a time, got {n_rows}: generate them one by one")
    gen_config = generation_config_for(model, cfg, generation_config, **generate_kwargs)
    batch = build_batch(model, caches, inputs, max_new_tokens=gen_config.max_new_tokens)
    device = model.device
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=cfg.seed is not None):
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        with model.decoding():
            out = model.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       position_ids=batch.position_ids, generation_config=gen_config,
                                       streamer=streamer, **{cache_kwarg(model.stock_model): batch.cache})
    return _until_eos(model, out[:, batch.input_ids.shape[1]:].tolist())


def generate(model: GistModel, caches: GistCache | list[GistCache], inputs: str | list[str], *,
             max_new_tokens: int = 128, min_new_tokens: int = 0, do_sample: bool | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             seed: int | None = None, streamer=None, generation_config=None, **generate_kwargs) -> list[str]:
    """Continue each (cache, input) pair in one batch; return the generated text of each row.

    One cache with many inputs is broadcast. Decoding starts from the model's `generation_config`
    (or the one given); the settings here that are not None, then `generate_kwargs` (any
    transformers GenerationConfig field, e.g. `**GREEDY`), override it. Stops at EOS; the gist token
    is never generated. `seed` makes sampling repeatable without touching the global RNG.
    `streamer` is a transformers streamer (`put`/`end`) and takes one row at a time.
    """
    rows = generate_ids(model, caches, inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                        streamer=streamer, generation_config=generation_config, **generate_kwargs)
    return _decode(model, rows)


def generate_masked(model: GistModel, instructions: str | list[str], inputs: str | list[str], *,
                    max_new_tokens: int = 128) -> list[str]:
    """Greedy reference text: see `generate_masked_ids`."""
    return _decode(model, generate_masked_ids(model, instructions, inputs, max_new_tokens=max_new_tokens))


def generate_masked_ids(model: GistModel, instructions: str | list[str], inputs: str | list[str], *,
                        max_new_tokens: int = 128) -> list[list[int]]:
    """Greedy reference: every step re-runs the full masked forward over one row, no cache.

    Slow (quadratic in length) and row by row, but it is the definition the cache path must match
    token for token.
    """
    GenerateConfig(max_new_tokens=max_new_tokens)
    instructions, inputs = _pair(instructions, inputs, "instruction")
    identity = model_identity(model)
    tok = model.tokenizer
    rows = []
    for instruction, text in zip(instructions, inputs):
        ids = [*model.insert_gist(encode_instruction(tok, instruction, identity.template)),
               *encode_input(tok, text, identity.template)]
        check_context(model, [0], [ids], max_new_tokens)

        def next_logits(new: list[int], ids: list[int] = ids) -> torch.Tensor:
            x = torch.tensor([ids + new], device=model.device)  # (1, T)
            return model(x, torch.ones_like(x), condition="gist").logits[0, -1]  # (V,)

        with torch.no_grad():
            rows.append(greedy_tokens(model, next_logits, max_new_tokens))
    return rows


def generate_full_prompt(model: GistModel, instructions: str | list[str], inputs: str | list[str], *,
                         max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` reading each whole instruction and its input, with no gist token, under
    a plain causal mask: what runs without gistcache. Give the untouched base model (`load_base_model`
    wrapped in a GistModel) for the answer a user would get today."""
    GenerateConfig(max_new_tokens=max_new_tokens)
    instructions, inputs = _pair(instructions, inputs, "instruction")
    tok = model.tokenizer
    seqs = [[*encode_instruction(tok, instruction, model.template), *encode_input(tok, text, model.template)]
            for instruction, text in zip(instructions, inputs)]
    return generate_causal(model, seqs, max_new_tokens=max_new_tokens, batch_size=batch_size)


def generate_causal(model: GistModel, sequences: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
                    position_offsets: list[int] | None = None, on_batch=None) -> list[str]:
    """Greedy-generate after each token-id sequence under a plain causal mask; return the new text.

    The no-cache baselines use it (full, truncated or no instruction). Batches of `batch_size` rows
    (sorted by length, then put back in order), left-padded, fed as `inputs_embeds=model.embed(ids)`
    so gist ids take the gist embedding. `position_offsets[b]` shifts row b's rotary positions (its
    first real token gets that position; default 0). Stops at EOS; the gist token is never
    generated. `on_batch(n)` is called after each batch.
    """
    check_batch_size(batch_size)
    if not sequences:
        return []
    if any(not ids for ids in sequences):
        raise GistError("an empty token sequence cannot be continued: every row needs at least one token")
    offsets = list(position_offsets) if position_offsets is not None else [0] * len(sequences)
    check_context(model, offsets, sequences, max_new_tokens, what="sequence")
    device, pad_id = model.device, pad_token_id(model.tokenizer)
    suppressed = suppressed_token_ids(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[str | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([sequences[i] for i in rows], pad_id, device)  # (B, T) each
        position_ids = make_position_ids(mask, torch.tensor([offsets[i] for i in rows], device=device))  # (B, T)
        with torch.no_grad(), model.decoding():
            new = model.model.generate(inputs_embeds=model.embed(ids), attention_mask=mask, position_ids=position_ids,
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=model.tokenizer.eos_token_id, pad_token_id=pad_id,
                                       suppress_tokens=suppressed or None)
        # with inputs_embeds and no input_ids, generate returns only the new tokens: (B, <= max_new_tokens)
        for i, text in zip(rows, _decode(model, new.tolist())):
            out[i] = text
        if on_batch is not None:
            on_batch(len(rows))
    return out  # type: ignore[return-value]
