"""A gist cache and its file: the keys and values of the N gist positions of every layer.

`GistCache` holds them with what they were made from (`gistcache.compression` makes one). The
cache is position-free: its keys sit at rotary positions `key_start .. key_start+N-1`, right after
the run's fixed template prefix (F = `key_start` tokens, prefix mask only; 0 under the paper's
mask), whatever the prompt's length P was, and the input continues at `offset = key_start + N`. So
the cache is a plain prefix of F+N slots: `to_dynamic_cache` and `input_ids` hand it to a stock
transformers `generate`, with no position ids.

Rotary attention sees only distances, so this changes no output as long as every distance the
input reads stays what it was in the run's forward. Under the paper's mask the input reads only
the gist: the prompt's P positions drop out of the model's context entirely (`context_used` = N).
Under the prefix mask it also reads the fixed prefix (its keys/values are computed once per run,
never stored here). In the `compact` positions (masks.py; the default) the run was trained with
the input reading the prefix right before the gist, so the cache is a plain prefix of F+N slots
and `context_used` = F+N. A run in the `original` positions read the prefix P+N positions back,
so its caches turn the prefix keys to `prefix_start = F - P` and use P+N positions::

    run's forward     prefix 0..F-1   instruction F..P-1   gist P..P+N-1   input P+N ..
    compact cache     prefix 0..F-1   (dropped)            gist F..F+N-1   input F+N ..
    original cache    prefix F-P..    (dropped)            gist F..F+N-1   input F+N ..

A cache file is safetensors (never pickle): tensors `layers.{i}.keys` and `layers.{i}.values`,
each (1, kv_heads, N, head_dim), and string metadata naming the format version, the base model
and run fingerprints, the template, where the keys start, the prompt's token count and SHA-256,
dtype, shapes and a SHA-256 of the tensor bytes, so a truncated, altered or foreign file is
refused with the field that does not fit. Version 1 files (keys at the prompt's own positions
P..P+N-1) are refused with the command that converts them (`gist cache upgrade`, see upgrade.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gistcache._io import atomic_path
from gistcache._version import __version__
from gistcache.config import DTYPES, dtype_name
from gistcache.errors import GistError
from gistcache.identity import check_cache
from gistcache.masks import MASKS, POSITIONS
from gistcache.model import GistModel
from gistcache.rotary import model_inv_freq, move_keys

FORMAT = "gistcache-kv"
FORMAT_VERSION = 2
REQUIRED_METADATA = ("format_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens", "input_position",
                     "num_prompt_tokens", "prompt_sha256", "template", "dtype", "num_layers", "key_shapes",
                     "value_shapes", "tensor_sha256", "position_free", "key_start", "prefix_start")
PLACEHOLDER_ID = 0  # stands for a cached position in `input_ids`; never embedded


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
    key_start: int = 0  # rotary position of the first gist key: the run's fixed-prefix tokens (prefix mask), else 0
    positions: str = "compact"  # the run's position layout (masks.py): where the input reads the fixed prefix
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise GistError(f"a gist cache needs one key and one value tensor per layer, got {len(self.keys)} keys "
                            f"and {len(self.values)} values")
        if self.num_gist_tokens < 1 or self.num_prompt_tokens < 0 or not 0 <= self.key_start <= self.num_prompt_tokens:
            raise GistError(f"num_gist_tokens {self.num_gist_tokens} must be >= 1, num_prompt_tokens "
                            f"{self.num_prompt_tokens} >= 0 and key_start {self.key_start} between 0 and it")
        if self.positions not in POSITIONS:
            raise GistError(f"unknown positions {self.positions!r}: known are {', '.join(POSITIONS)}")
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
        """Rotary position of the first token after the gist: key_start + N (the prompt's length does not count)."""
        return self.key_start + self.num_gist_tokens

    @property
    def prefix_start(self) -> int:
        """Rotary position of the run's first fixed-prefix key in this cache: 0, or key_start - P for a
        prefix-mask run in the original positions (the prefix stays P+N before the input)."""
        return self.key_start - self.num_prompt_tokens if self.key_start and self.positions == "original" else 0

    @property
    def context_used(self) -> int:
        """Positions of the model's context the cache uses up: from its first key to the first input position.

        N under the paper's mask; F + N under the prefix mask in the compact positions (a plain
        prefix); P + N in the original positions, where the input reads the fixed prefix at the
        distance it had after the whole prompt.
        """
        return self.offset - self.prefix_start

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
        return self.nbytes // self.num_gist_tokens * (self.num_prompt_tokens + self.num_gist_tokens)

    @property
    def compression_ratio(self) -> float:
        return self.num_prompt_tokens / self.num_gist_tokens

    def metadata(self) -> dict[str, str]:
        """The string metadata written into the safetensors header."""
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "gistcache_version": __version__,
            "base_fingerprint": self.base_fingerprint,
            "run_fingerprint": self.run_fingerprint,
            "num_gist_tokens": str(self.num_gist_tokens),
            "position_free": "true",
            "key_start": str(self.key_start),
            "prefix_start": str(self.prefix_start),
            "positions": self.positions,
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

    def input_ids(self, placeholder_id: int = PLACEHOLDER_ID) -> torch.Tensor:
        """(1, key_start + N) placeholder ids that stand for the cached positions in a stock `generate` call.

        transformers slices them off before the first forward (the cache already holds those
        positions), so they are never embedded. Any id in the vocabulary works except the pad id,
        which `generate` would mask out when no attention mask is given.
        """
        return torch.full((1, self.offset), placeholder_id, dtype=torch.long)

    def to_dynamic_cache(self, model: GistModel | object, *, device: str | torch.device | None = None):
        """A transformers `DynamicCache` holding this cache as a plain prefix of key_start + N positions.

        `model` is the `GistModel` the cache belongs to (checked field by field; it supplies the
        config and, for prefix-mask runs, the fixed prefix's keys/values, which no cache file
        holds), or for a paper-mask cache a bare transformers config. The cache is built with the
        config, so sliding-window layers are set up as the model expects. Continue with
        `generate(input_ids=torch.cat([cache.input_ids(), ids], dim=1), past_key_values=...)` and
        no position ids: the input takes positions key_start + N onwards.
        """
        from transformers import DynamicCache  # deferred: transformers takes seconds to import

        if isinstance(model, GistModel):
            check_cache(model, self)
            layers = stack_layers(model, [self], device or model.device)
            config = model.config
        else:
            if self.key_start:
                raise GistError(f"this cache was made by a run trained with the {self.mask!r} mask: the keys/values "
                                f"of its {self.key_start} fixed-prefix tokens come from the run, not the file; pass "
                                f"the GistModel: cache.to_dynamic_cache(model)")
            layers = [(k.to(device or "cpu"), v.to(device or "cpu")) for k, v in zip(self.keys, self.values)]
            config = model
        return DynamicCache(ddp_cache_data=layers, config=config)


def stack_layers(model: GistModel, caches: list[GistCache],
                 device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (B, kv_heads, F+N, head_dim): one row per cache, the run's fixed
    prefix (prefix mask only, F = 0 otherwise) turned to the cache's `prefix_start`, then its gist."""
    prefix = model.prefix_kv()  # [(keys, values)] at positions 0..F-1; [] under the paper's mask
    inv_freq = model_inv_freq(model.model) if prefix else None
    kv = []
    for layer in range(caches[0].num_layers):
        keys = torch.cat([c.keys[layer] for c in caches]).to(device)  # (B, kv_heads, N, head_dim)
        values = torch.cat([c.values[layer] for c in caches]).to(device)
        if prefix:
            pk, pv = prefix[layer]  # (1, kv_heads, F, head_dim)
            pk = torch.cat([move_keys(pk, inv_freq, 0, inv_freq, c.prefix_start) for c in caches])  # (B, ...)
            keys = torch.cat([pk.to(device, keys.dtype), keys], dim=2)
            values = torch.cat([pv.to(device, values.dtype).expand(len(caches), -1, -1, -1), values], dim=2)
        kv.append((keys, values))
    return kv


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (catches any altered byte)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_cache_path(path: str | Path) -> Path:
    """Refuse a folder where a cache file is to be written (checked before anything is computed)."""
    path = Path(path)
    if path.is_dir():
        raise GistError(f"--out {path} is a folder: give a file name such as {path / 'prompt.safetensors'}")
    return path


def save_cache(cache: GistCache, path: str | Path) -> Path:
    """Write `cache` as safetensors at `path`, atomically (temp file, then os.replace)."""
    path = check_cache_path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in cache.tensors().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=cache.metadata())
    return path


def read_cache_metadata(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> dict[str, str]:
    """The header metadata of a cache file, checked for format and one of `versions` (tensors not read)."""
    path = Path(path)
    meta = _open(path, lambda f: f.metadata())
    _check_format(path, meta, versions=versions)
    return meta


def _open(path: Path, fn):
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


def _check_format(path: Path, meta: dict | None, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> None:
    if not meta or meta.get("format") != FORMAT:
        raise GistError(f"{path} is a safetensors file but not a gist cache (no format={FORMAT!r} metadata): "
                        f"give a file written by `gist compress`")
    if meta.get("format_version") == "1" and 1 not in versions:
        raise GistError(f"{path} is a version 1 gist cache (its keys sit at the prompt's own positions): convert it "
                        f"in place with `gist cache upgrade {path} --run RUN` (RUN: the run that made it)")
    if meta.get("format_version") not in {str(v) for v in versions}:
        raise GistError(f"{path} has unknown format_version {meta.get('format_version')!r} (this gistcache reads "
                        f"{FORMAT_VERSION}): compress the prompt again with this version")
    missing = [k for k in REQUIRED_METADATA if k not in meta and (meta["format_version"] != "1" or k not in
                                                                 ("position_free", "key_start", "prefix_start"))]
    if missing:
        raise GistError(f"{path} lacks metadata field {missing[0]!r}: it was not written by `gist compress`")


def load_cache(path: str | Path, model: GistModel | None = None) -> GistCache:
    """Read a cache file, verifying its metadata and tensor SHA-256; with `model`, also check it fits.

    Only safetensors is read; nothing is unpickled. A version 1 file is refused with the command
    that converts it.
    """
    cache, _ = read_cache_file(path)
    if model is not None:
        check_cache(model, cache, source=f"cache {path}")
    return cache


def read_cache_file(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> tuple[GistCache, int]:
    """(cache, format version) of a file of one of `versions`, its metadata and tensor SHA-256 verified.

    A version 1 cache comes back with key_start 0 and its keys still at positions P..P+N-1: only
    `gistcache.upgrade` asks for one, to move them.
    """
    path = Path(path)

    def read(f):
        meta = f.metadata()
        _check_format(path, meta, versions=versions)
        return meta, {name: f.get_tensor(name) for name in f.keys()}

    meta, tensors = _open(path, read)
    version = int(meta["format_version"])
    try:
        num_layers = int(meta["num_layers"])
        num_gist = int(meta["num_gist_tokens"])
        num_prompt = int(meta["num_prompt_tokens"])
        offset = int(meta["input_position"])
        key_start = int(meta.get("key_start", 0))
        key_shapes = json.loads(meta["key_shapes"])
        value_shapes = json.loads(meta["value_shapes"])
    except (ValueError, json.JSONDecodeError) as exc:
        raise GistError(f"{path} has malformed metadata ({exc}): compress the prompt again") from exc
    if version >= 2 and meta["position_free"] != "true":
        raise GistError(f"{path} has position_free {meta['position_free']!r}, a version {version} cache is always "
                        f"position-free: the file was altered; compress the prompt again")
    # version 2 files from before the position layouts existed: prefix-mask caches were in the original positions
    positions = meta.get("positions", "original" if key_start else "compact")
    if positions not in POSITIONS:
        raise GistError(f"{path} has positions {positions!r}: known are {', '.join(POSITIONS)}; the file was altered")
    if version >= 2 and meta["prefix_start"] != str(key_start - num_prompt if key_start and positions == "original"
                                                    else 0):
        raise GistError(f"{path} has prefix_start {meta['prefix_start']}, which does not fit key_start {key_start}, "
                        f"num_prompt_tokens {num_prompt} and positions {positions!r}: the file was altered; "
                        f"compress the prompt again")
    start = num_prompt if version == 1 else key_start  # where the keys sit
    if offset != start + num_gist:
        raise GistError(f"{path} has input_position {offset} != {'num_prompt_tokens' if version == 1 else 'key_start'} "
                        f"{start} + num_gist_tokens {num_gist}: the file was altered; compress the prompt again")
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
                      mask=meta.get("mask", "paper"), key_start=key_start, positions=positions)
    return cache, version
