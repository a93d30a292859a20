"""`GistModel`: a causal LM plus the trained gist embedding, and its life cycle as a run folder
(`from_pretrained` from load.py's parts, `save_pretrained` through save.py; `load_run` and `load_untouched_base`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gistcache.config import GIST_TOKEN, GistConfig, check_decoder
from gistcache.errors import GistError
from gistcache.masks import (check_chunk_attention, check_gist_every, check_mask, check_positions, check_raw_tail,
                             count_gist_slots, gist_attention_mask, insert_gist_tokens, make_position_ids)
from gistcache.model.base import check_masked_attention, load_base_model
from gistcache.model.compact import compact_forward
from gistcache.model.kv import cache_layers, returned_cache
from gistcache.model.load import load_run_parts
from gistcache.model.save import save_gist_model
from gistcache.prompts import resolve_template, visible_prefix_ids


class GistModel(nn.Module):
    """A causal LM plus the trained gist embedding.

    `forward` runs the whole sequence (prompt, gist tokens, rest) under the gist mask of
    `condition` and of the run's mask variant (`mask`: "paper" or "prefix", see masks.py),
    passing the stock model a 4D additive mask and explicit position ids; a prefix-mask run in the
    `compact` position layout runs it in two passes instead (`gistcache.model.compact`). `template` is the
    prompt template the run uses ("auto" resolves by the tokenizer).

    A run folder loads with `GistModel.from_pretrained(RUN)` and is written with
    `save_pretrained(DIR)`; a model loaded so knows its run: `gist_config`, `run_dir` and
    `run_fingerprint` (None for a model built in memory, whose caches get a fingerprint of its
    weights instead, see gistcache/cache/identity.py).
    """

    def __init__(self, model: nn.Module, tokenizer, num_gist_tokens: int, *,
                 gist_embedding: torch.Tensor | None = None, base_fingerprint: str | None = None,
                 template: str = "auto", mask: str = "paper", positions: str = "compact", decoder: str = "tuned",
                 gist_every: int = 0, raw_tail: int = 0, chunk_attention: str = "causal",
                 gist_config: GistConfig | None = None,
                 run_dir: str | Path | None = None, run_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.num_gist_tokens = num_gist_tokens  # N: after each chunk of `gist_every` instruction tokens
        self.gist_every = check_gist_every(gist_every)  # K (0: one chunk), see masks.py
        self.raw_tail = check_raw_tail(raw_tail, gist_every)  # W: the instruction's last tokens kept raw, masks.py
        self.chunk_attention = check_chunk_attention(chunk_attention, gist_every)  # what a chunk reads, masks.py
        self.template = resolve_template(tokenizer, template)
        self.mask = check_mask(mask)
        # where the tokens after the gist find the prefix (masks.py); the paper's mask has no prefix: "compact"
        self.positions = check_positions(positions) if self.mask == "prefix" else "compact"
        if self.gist_every and self.positions != "compact":
            raise GistError("--gist-every needs --positions compact (masks.py)")
        # the template's fixed prefix: visible after the gist under the prefix mask
        self.prefix_ids = visible_prefix_ids(tokenizer, self.template, self.mask)
        self.decoder = check_decoder(decoder)  # "base": the tokens after the gist run with the adapter off (`decoding`)
        if decoder == "base" and not hasattr(model, "disable_adapter"):
            raise GistError("a run with --decoder base keeps its LoRA adapter apart from the weights: load it "
                            "unmerged (GistModel.from_pretrained does so for such runs)")
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.gist_token_id = tokenizer.convert_tokens_to_ids(GIST_TOKEN)
        weight = model.get_input_embeddings().weight
        if gist_embedding is None:
            gist_embedding = weight.detach().float().mean(dim=0, keepdim=True)  # (1, H)
        if tuple(gist_embedding.shape) != (1, weight.shape[1]):
            raise GistError(f"gist embedding has shape {tuple(gist_embedding.shape)}, the model needs (1, {weight.shape[1]})")
        self.gist_embedding = nn.Parameter(gist_embedding.detach().clone().to(weight.device, torch.float32))
        self.base_fingerprint = base_fingerprint
        self.gist_config = gist_config  # what the run is, for a model from a run folder
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_fingerprint = run_fingerprint

    @classmethod
    def from_pretrained(cls, run_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device_map=None,
                        attn_implementation: str | None = None, merge: bool = True) -> "GistModel":
        """Load the trained gist model of a run folder (None: the run shipped with the package).

        The base weights are loaded once, in `dtype`, where `device_map` puts them (default: the
        CPU), and refused if their fingerprint is not the one the run was trained on. LoRA
        adapters are merged (`merge=True`) for plain-speed inference. See `gistcache.model.load`.
        """
        model, tokenizer, fields = load_run_parts(run_dir, dtype=dtype, device_map=device_map,
                                                  attn_implementation=attn_implementation, merge=merge)
        return cls(model, tokenizer, **fields).eval()

    def save_pretrained(self, out_dir: str | Path, *, train_config: dict | None = None) -> Path:
        """Write this model as a run folder that `from_pretrained` loads (`save.save_gist_model`)."""
        return save_gist_model(self, out_dir, train_config=train_config)

    @property
    def config(self):
        return self.model.config

    @property
    def stock_model(self) -> nn.Module:
        """The transformers model itself, under a peft wrapper if there is one (its forward names the cache argument)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that read the caches, under the stock model's own names: the model's weights, or for a run
        with decoder="base" the untouched base weights beneath its unmerged LoRA adapter."""
        if self.decoder != "base":
            return self.model.state_dict()
        return {name.replace(".base_layer.", "."): tensor for name, tensor in self.stock_model.state_dict().items()
                if "lora_" not in name}

    @property
    def device(self) -> torch.device:
        return self.gist_embedding.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, H) embeddings, gist positions taking the gist embedding."""
        layer = self.model.get_input_embeddings()
        is_gist = input_ids == self.gist_token_id
        embeds = layer(input_ids.masked_fill(is_gist, 0))
        return torch.where(is_gist.unsqueeze(-1), self.gist_embedding.to(embeds.dtype), embeds)

    def decoding(self) -> contextlib.AbstractContextManager:
        """The context in which `self.model` reads what comes after the gist (the input, the answer).

        For a run with `decoder="base"` the LoRA adapter is switched off inside it, so the untouched
        base model reads the cache; the prefix, instruction and gist (compress) are always read
        with the adapter on. Otherwise it changes nothing.
        """
        return self.model.disable_adapter() if self.decoder == "base" else contextlib.nullcontext()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens of the fixed prefix that stay visible after the gist (0 under the paper's mask)."""
        return len(self.prefix_ids)

    def insert_gist(self, prompt_ids: list[int]) -> list[int]:
        """Prompt ids (fixed prefix first) with this run's gist ids: N after each chunk of `gist_every` tokens, the
        raw tail (if any) after the last."""
        return insert_gist_tokens(prompt_ids, self.gist_token_id, self.num_gist_tokens, self.gist_every,
                                  self.num_prefix_tokens, self.raw_tail)

    def num_gist_slots(self, num_prompt_tokens: int) -> int:
        """The slots a cache of a prompt of `num_prompt_tokens` holds: M gist slots (N when `gist_every` is 0), plus
        the raw tail's tokens (masks.count_gist_slots)."""
        return count_gist_slots(num_prompt_tokens, self.num_gist_tokens, self.gist_every, self.num_prefix_tokens,
                                self.raw_tail)

    @property
    def computes_compact(self) -> bool:
        """Does the gist condition run as two passes (`gistcache.model.compact`)? Prefix-mask runs in the compact
        positions, and every chunked run (its M gist slots move to F..F+M-1)."""
        return bool(self.gist_every) or (self.positions == "compact" and self.num_prefix_tokens > 0)

    def train(self, mode: bool = True):
        self._prefix_kv = None  # the weights may change: recompute the prefix keys/values when next needed
        return super().train(mode)

    @torch.no_grad()
    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the fixed prefix at positions 0..F-1, per layer (1, kv_heads, F, head_dim).

        The prefix sees only itself, so a plain causal forward over it gives exactly the keys and
        values the masked forward has there. Computed once and kept (until `train()`); [] under the
        paper's mask.
        """
        if not self.prefix_ids:
            return []
        if self._prefix_kv is None:
            ids = torch.tensor([self.prefix_ids], device=self.device)  # (1, F)
            out = self.model(inputs_embeds=self.embed(ids), use_cache=True, logits_to_keep=1)
            layers = cache_layers(returned_cache(out))
            self._prefix_kv = [(k.detach().clone(), v.detach().clone()) for k, v in layers]
        return self._prefix_kv

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                condition: str = "gist", **kwargs):
        """Masked forward over (B, T) ids; `attention_mask` (B, T) marks real tokens (left padding)."""
        check_masked_attention(getattr(self.config, "_attn_implementation", None))
        if condition == "gist" and self.computes_compact:
            return compact_forward(self, input_ids, attention_mask, labels=labels, **kwargs)
        embeds = self.embed(input_ids)
        mask = gist_attention_mask(input_ids, attention_mask, self.gist_token_id, condition, embeds.dtype,
                                   self.num_prefix_tokens, chunked=bool(self.gist_every))
        position_ids = make_position_ids(attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                          labels=labels, **kwargs)

    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @contextlib.contextmanager
    def cache_reader(self) -> Iterator[nn.Module]:
        """The stock transformers model that continues this run's caches, for its own `generate` or forward:
        `with model.cache_reader() as lm: lm.generate(input_ids=..., cache=cache.to_dynamic_cache(model))`.

        Right for both decoders: a `--decoder base` run yields its model with the LoRA adapter switched off
        for the block (the untouched base model reads its caches, `decoding`), any other run its model as is.
        """
        with self.decoding():
            yield self.model


def load_gist_model(run_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device_map=None,
                    attn_implementation: str | None = None, merge: bool = True) -> GistModel:
    """`GistModel.from_pretrained` as a function."""
    return GistModel.from_pretrained(run_dir, dtype=dtype, device_map=device_map,
                                     attn_implementation=attn_implementation, merge=merge)


def load_run(run_dir: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = None, merge: bool = True) -> GistModel:
    """`GistModel.from_pretrained` under its older name, with `device` (a device name) for `device_map`."""
    try:
        device_map = None if torch.device(device).type == "cpu" else str(device)
    except RuntimeError as exc:
        raise GistError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    return GistModel.from_pretrained(run_dir, dtype=dtype, device_map=device_map,
                                     attn_implementation=attn_implementation, merge=merge)


def load_untouched_base(model: GistModel, *, dtype: torch.dtype, device: str | torch.device) -> GistModel:
    """The base model of a run from `load_run` before any tuning (no adapter, no trained weights), with the
    run's tokenizer and template: what a user runs without gistcache, for full-prompt comparisons. A run trained
    with `--decoder base` is returned itself: it reads everything but its own gist with the adapter off."""
    if model.decoder == "base":
        return model
    base = load_base_model(model.gist_config.model, dtype=dtype, device=device)
    return GistModel(base, model.tokenizer, model.num_gist_tokens, template=model.template).eval()
