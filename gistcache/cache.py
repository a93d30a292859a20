"""Compress an instruction into the KV cache of its gist tokens, and save or load that cache.

`compress` runs `prompt ids + N gist ids` once through the model. Up to the last gist token the
gist mask is plain causal, so the gist positions read the whole prompt; everything after the gist
only ever reads the gist positions' keys and values. Those N positions of every layer are all we
keep: the prompt's own keys and values are dropped. Generation continues at rotary position
`offset = num_prompt_tokens + N`, as if the prompt were still there::

    positions   0 .. P-1        P .. P+N-1      P+N ...
    compress    prompt tokens   gist tokens     -
    kept        (dropped)       keys/values     -
    generate    -               cache           input tokens, then new tokens

A cache file is safetensors (never pickle): tensors `layers.{i}.keys` and `layers.{i}.values`,
each (1, kv_heads, N, head_dim), and string metadata naming the format version, the base model
and run fingerprints, the template, the prompt's token count and SHA-256, dtype, shapes and a
SHA-256 of the tensor bytes, so a truncated, altered or foreign file is refused with the field
that does not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from gistcache.errors import GistError
from gistcache.masks import MASKS
from gistcache.model import GistModel, cache_layers, fingerprint_model
from gistcache.prompts import check_instruction, encode_instruction

FORMAT = "gistcache-kv"
FORMAT_VERSION = 1
PREVIEW_CHARS = 60
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
REQUIRED_METADATA = ("format_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens", "input_position",
                     "num_prompt_tokens", "prompt_sha256", "template", "dtype", "num_layers", "key_shapes",
                     "value_shapes", "tensor_sha256")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class GistCache:
    """The keys and values of the N gist positions of every layer, for one instruction.

    keys[i], values[i]: (1, kv_heads, N, head_dim) for layer i, on the CPU.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    num_gist_tokens: int
    num_prompt_tokens: int  # tokens before the first gist token (template text included)
    prompt_sha256: str  # SHA-256 of the instruction text (UTF-8)
    template: str  # resolved: "plain" or "chat"
    base_fingerprint: str
    run_fingerprint: str
    prompt_preview: str = ""
    mask: str = "paper"  # the mask variant of the run that made it ("prefix": add the run's fixed-prefix keys/values)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise GistError(f"a gist cache needs one key and one value tensor per layer, got {len(self.keys)} keys "
                            f"and {len(self.values)} values")
        if self.num_gist_tokens < 1 or self.num_prompt_tokens < 0:
            raise GistError(f"num_gist_tokens {self.num_gist_tokens} must be >= 1 and num_prompt_tokens "
                            f"{self.num_prompt_tokens} >= 0")
        dtype = self.keys[0].dtype
        for i, t in enumerate([*self.keys, *self.values]):
            layer, kind = i % len(self.keys), "keys" if i < len(self.keys) else "values"
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != self.num_gist_tokens:
                raise GistError(f"layer {layer} {kind} have shape {tuple(t.shape)}: expected "
                                f"(1, kv_heads, {self.num_gist_tokens}, head_dim)")
            if t.dtype != dtype:
                raise GistError(f"layer {layer} {kind} are {dtype_name(t.dtype)}, layer 0 keys {dtype_name(dtype)}: "
                                f"all tensors of a cache share one dtype")

    @property
    def offset(self) -> int:
        """Rotary position of the first token after the gist: prompt tokens + N."""
        return self.num_prompt_tokens + self.num_gist_tokens

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (the file adds a small JSON header)."""
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    @property
    def full_prompt_kv_bytes(self) -> int:
        """Bytes of the KV cache the uncompressed prompt (+ N gist positions) would take."""
        return self.nbytes // self.num_gist_tokens * self.offset

    @property
    def compression_ratio(self) -> float:
        return self.num_prompt_tokens / self.num_gist_tokens

    def metadata(self) -> dict[str, str]:
        """The string metadata written into the safetensors header."""
        from gistcache import __version__

        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "gistcache_version": __version__,
            "base_fingerprint": self.base_fingerprint,
            "run_fingerprint": self.run_fingerprint,
            "num_gist_tokens": str(self.num_gist_tokens),
            "input_position": str(self.offset),
            "num_prompt_tokens": str(self.num_prompt_tokens),
            "prompt_sha256": self.prompt_sha256,
            "prompt_preview": self.prompt_preview,
            "template": self.template,
            "mask": self.mask,
            "dtype": dtype_name(self.dtype),
            "num_layers": str(self.num_layers),
            "key_shapes": json.dumps([list(t.shape) for t in self.keys]),
            "value_shapes": json.dumps([list(t.shape) for t in self.values]),
            "tensor_sha256": tensor_sha256(self.tensors()),
            "created": self.created,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"layers.{i}.keys"] = k
            out[f"layers.{i}.values"] = v
        return out


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (catches any altered byte)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- which model a cache belongs to ---------------------------------------------------------------

@dataclass(frozen=True)
class ModelIdentity:
    """What a cache must match: the base weights, the trained run, the template."""

    base_fingerprint: str
    run_fingerprint: str
    template: str
    mask: str


def model_identity(model: GistModel) -> ModelIdentity:
    """Fingerprints of a model from `load_run` (read from the run), or of an in-memory GistModel.

    An in-memory model (no run folder) gets a run fingerprint over its current weights, its gist
    embedding and N, so a cache made from it fits it and nothing else.
    """
    template = model.template
    base = model.base_fingerprint or fingerprint_model(model.model)
    run = getattr(model, "run_fingerprint", None)
    if run is None:
        h = hashlib.sha256(b"gistcache-unsaved-run|")
        h.update(fingerprint_model(model.model).encode())
        h.update(str(model.num_gist_tokens).encode())
        h.update(model.gist_embedding.detach().float().cpu().numpy().tobytes())
        run = h.hexdigest()
    return ModelIdentity(base_fingerprint=base, run_fingerprint=run, template=template, mask=model.mask)


def model_kv_shape(model: GistModel) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) from the model config."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def check_cache(model: GistModel, cache: GistCache, *, identity: ModelIdentity | None = None,
                source: str = "the cache") -> None:
    """Refuse a cache that does not fit `model`, naming the first field that differs."""
    identity = identity or model_identity(model)
    fix = "compress the prompt again with this run (gist compress ... --run RUN)"
    if cache.base_fingerprint != identity.base_fingerprint:
        raise GistError(f"{source} was made with another base model (base_fingerprint {cache.base_fingerprint[:12]} "
                        f"!= {identity.base_fingerprint[:12]} of this model): {fix}")
    if cache.mask != identity.mask:
        raise GistError(f"{source} was made by a run trained with the {cache.mask!r} mask, this run was trained with "
                        f"the {identity.mask!r} mask: {fix}")
    if cache.run_fingerprint != identity.run_fingerprint:
        raise GistError(f"{source} was made with another run (run_fingerprint {cache.run_fingerprint[:12]} "
                        f"!= {identity.run_fingerprint[:12]} of this run): {fix}")
    if cache.num_gist_tokens != model.num_gist_tokens:
        raise GistError(f"{source} has num_gist_tokens {cache.num_gist_tokens}, this run uses "
                        f"{model.num_gist_tokens}: {fix}")
    if cache.template != identity.template:
        raise GistError(f"{source} has template {cache.template!r}, this run uses {identity.template!r}: {fix}")
    num_layers, kv_heads, head_dim = model_kv_shape(model)
    if cache.num_layers != num_layers:
        raise GistError(f"{source} has num_layers {cache.num_layers}, the model has {num_layers}: {fix}")
    want = (1, kv_heads, cache.num_gist_tokens, head_dim)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        for kind, t in (("keys", k), ("values", v)):
            if tuple(t.shape) != want:
                raise GistError(f"{source} layer {i} {kind} shape {tuple(t.shape)} does not fit the model "
                                f"(1, kv_heads={kv_heads}, {cache.num_gist_tokens}, head_dim={head_dim}): {fix}")
    model_dtype = model.model.dtype
    if cache.dtype != model_dtype:
        raise GistError(f"{source} has dtype {dtype_name(cache.dtype)}, the model runs in {dtype_name(model_dtype)}: "
                        f"load the run with --dtype {dtype_name(cache.dtype)} or compress again")
    if cache.offset >= model.max_context():
        raise GistError(f"{source} continues at position {cache.offset}, past the model's context of "
                        f"{model.max_context()}: compress a shorter prompt")


# --- compress -------------------------------------------------------------------------------------

def compress_ids(model: GistModel, prompt_ids: list[list[int]], *, batch_size: int = 8) -> list[list[tuple]]:
    """Run `prompt + N gist` for each row (left-padded batches) and return the gist KV per row.

    Returns, per row, [(keys, values)] per layer, each (1, kv_heads, N, head_dim) on the CPU.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GistError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    N = model.num_gist_tokens
    limit = model.max_context()
    for i, ids in enumerate(prompt_ids):
        if len(ids) + N >= limit:
            raise GistError(f"prompt {i} has {len(ids)} tokens + {N} gist tokens, over the model's context of "
                            f"{limit}: shorten it")
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    out: list = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        seqs = [[*prompt_ids[i], *([model.gist_token_id] * N)] for i in rows]
        T = max(len(s) for s in seqs)
        input_ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], device=model.device)  # (B, T)
        attention_mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=model.device)
        with torch.no_grad():
            if bool(attention_mask.all()):
                # No padding: over prompt + gist the gist mask is plain causal, so the stock causal
                # forward (fast sdpa path) computes exactly the masked forward's keys and values.
                res = model.model(inputs_embeds=model.embed(input_ids), use_cache=True, logits_to_keep=1)
            else:
                # Left padding: the masked forward hides it (a padding query sees only itself, so no
                # softmax row is empty and no NaN reaches real rows); positions count real tokens.
                res = model(input_ids, attention_mask, use_cache=True, logits_to_keep=1)
        kv = cache_layers(res.cache if "cache" in res else res.past_key_values)
        for b, i in enumerate(rows):
            # left padding puts every row's gist tokens in the last N columns
            out[i] = [(k[b:b + 1, :, T - N:, :].detach().to("cpu").contiguous().clone(),
                       v[b:b + 1, :, T - N:, :].detach().to("cpu").contiguous().clone()) for k, v in kv]
    return out


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
        GistCache(keys=[k for k, _ in kv], values=[v for _, v in kv], num_gist_tokens=model.num_gist_tokens,
                  num_prompt_tokens=len(ids), prompt_sha256=sha256_text(text), template=identity.template,
                  base_fingerprint=identity.base_fingerprint, run_fingerprint=identity.run_fingerprint,
                  prompt_preview=" ".join(text.split())[:PREVIEW_CHARS], mask=identity.mask)
        for text, ids, kv in zip(texts, prompt_ids, kvs)
    ]
    return caches[0] if single else caches


# --- save / load ----------------------------------------------------------------------------------

def save_cache(cache: GistCache, path: str | Path) -> Path:
    """Write `cache` as safetensors at `path`, atomically (temp file, then os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise GistError(f"--out {path} is a folder: give a file name such as {path / 'prompt.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in cache.tensors().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=cache.metadata())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_cache_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a cache file, checked for format and version (tensors not read)."""
    path = Path(path)
    meta = _open(path, lambda f: f.metadata())
    _check_format(path, meta)
    return meta


def _open(path: Path, fn):
    from safetensors import safe_open

    if not path.is_file():
        raise GistError(f"cache file {path} does not exist: make one with `gist compress \"...\" --out {path}`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return fn(f)
    except GistError:
        raise
    except Exception as exc:  # safetensors raises its own error kinds for bad headers and short files
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise GistError(f"{path} is not a readable safetensors file ({reason}): it is truncated or not a gist "
                        f"cache; compress the prompt again") from exc


def _check_format(path: Path, meta: dict | None) -> None:
    if not meta or meta.get("format") != FORMAT:
        raise GistError(f"{path} is a safetensors file but not a gist cache (no format={FORMAT!r} metadata): "
                        f"give a file written by `gist compress`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise GistError(f"{path} has unknown format_version {meta.get('format_version')!r} (this gistcache reads "
                        f"{FORMAT_VERSION}): compress the prompt again with this version")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise GistError(f"{path} lacks metadata field {missing[0]!r}: it was not written by `gist compress`")


def load_cache(path: str | Path, model: GistModel | None = None) -> GistCache:
    """Read a cache file, verifying its metadata and tensor SHA-256; with `model`, also check it fits.

    Only safetensors is read; nothing is unpickled.
    """
    path = Path(path)

    def read(f):
        meta = f.metadata()
        _check_format(path, meta)
        return meta, {name: f.get_tensor(name) for name in f.keys()}

    meta, tensors = _open(path, read)
    try:
        num_layers = int(meta["num_layers"])
        num_gist = int(meta["num_gist_tokens"])
        num_prompt = int(meta["num_prompt_tokens"])
        offset = int(meta["input_position"])
        key_shapes = json.loads(meta["key_shapes"])
        value_shapes = json.loads(meta["value_shapes"])
    except (ValueError, json.JSONDecodeError) as exc:
        raise GistError(f"{path} has malformed metadata ({exc}): compress the prompt again") from exc
    if offset != num_prompt + num_gist:
        raise GistError(f"{path} has input_position {offset} != num_prompt_tokens {num_prompt} + num_gist_tokens "
                        f"{num_gist}: the file was altered; compress the prompt again")
    expected = {f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("keys", "values")}
    if set(tensors) != expected:
        extra = sorted(set(tensors) ^ expected)[:3]
        raise GistError(f"{path} tensors do not match num_layers {num_layers} (differ in {extra}): "
                        f"the file was altered; compress the prompt again")
    if meta.get("mask", "paper") not in MASKS:
        raise GistError(f"{path} has mask {meta['mask']!r}: known are {', '.join(MASKS)}; the file was altered")
    if meta["dtype"] not in DTYPES:
        raise GistError(f"{path} has dtype {meta['dtype']!r}: supported are {', '.join(DTYPES)}")
    keys = [tensors[f"layers.{i}.keys"] for i in range(num_layers)]
    values = [tensors[f"layers.{i}.values"] for i in range(num_layers)]
    for kind, ts, shapes in (("keys", keys, key_shapes), ("values", values, value_shapes)):
        for i, t in enumerate(ts):
            if i >= len(shapes) or list(t.shape) != shapes[i]:
                raise GistError(f"{path} layer {i} {kind} shape {list(t.shape)} differs from its metadata "
                                f"{kind[:-1]}_shapes: the file was altered; compress the prompt again")
            if dtype_name(t.dtype) != meta["dtype"]:
                raise GistError(f"{path} layer {i} {kind} are {dtype_name(t.dtype)}, metadata dtype says "
                                f"{meta['dtype']}: the file was altered; compress the prompt again")
    if tensor_sha256(tensors) != meta["tensor_sha256"]:
        raise GistError(f"{path} tensor bytes do not match their tensor_sha256: the file was altered or damaged; "
                        f"compress the prompt again")
    cache = GistCache(keys=keys, values=values, num_gist_tokens=num_gist, num_prompt_tokens=num_prompt,
                      prompt_sha256=meta["prompt_sha256"], template=meta["template"],
                      base_fingerprint=meta["base_fingerprint"], run_fingerprint=meta["run_fingerprint"],
                      prompt_preview=meta.get("prompt_preview", ""), created=meta.get("created", ""),
                      mask=meta.get("mask", "paper"))
    if model is not None:
        check_cache(model, cache, source=f"cache {path}")
    return cache
