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
each (1, kv_heads, N, head_dim), and string metadata (`HEADER`: the format version, the base model
and run fingerprints, the template, mask and positions, where the keys start, the prompt's token
count and SHA-256, dtype, shapes, `tensor_sha256` over the tensor bytes and `sha256`, the seal).

Reading a file (`read_cache_file`) takes the header and the tensors from one open file descriptor
(a writer replacing the file meanwhile cannot mix two versions), and refuses, in one line naming the
field, before anything is allocated for the tensors: a header that is not safetensors, a field of
the wrong type, out of its bounds or contradicting another (`num_layers` must be the number of layer
tensors in the file, each shape four whole numbers equal to the tensor's, `input_position` =
`key_start` + N, ...), an unknown or missing field. Then the seal, the tensor bytes, and any NaN or
inf among the keys and values (refused; a model that produces them is refused at save time too).

What the hashes protect against: `tensor_sha256` is a SHA-256 over every tensor's name, dtype,
shape and bytes; `sha256` is a SHA-256 over the canonical JSON (sorted keys, no spaces, ASCII) of
every other header field, `tensor_sha256` included, so it covers the whole file. Any accident (a
flipped bit, a truncated copy, a file half-written) and any naive edit (a field changed by hand, a
tensor swapped) is refused. It is not a signature: whoever edits a file and recomputes both hashes
with this module gets a file that loads. The checks above still refuse such a file when a field is
out of type or bounds or a value is not finite, but a cache whose values were swapped for other
finite values (zeros, another prompt's keys) or whose token counts were changed consistently
cannot be told from a real one by the file alone; `gist cache verify FILE --run RUN` recompresses
the prompt when it is known (the store keeps it) and compares.

Version 2 files written before the seal existed (no `sha256` field) are refused with the command
that makes them again (`gist compress`; a store entry is simply recompressed on its next lookup);
`read_cache_metadata` still lists them. Version 1 files (keys at the prompt's own positions
P..P+N-1) are refused with the command that converts them (`gist cache upgrade`, see upgrade.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, NoReturn

import torch
from safetensors.torch import save_file

from gistcache._io import atomic_path
from gistcache._version import __version__
from gistcache.config import DTYPES, dtype_name
from gistcache.errors import GistError
from gistcache.identity import check_cache
from gistcache.masks import MASKS, POSITIONS, count_gist_slots
from gistcache.model import GistModel
from gistcache.rotary import model_inv_freq, move_keys

FORMAT = "gistcache-kv"
FORMAT_VERSION = 2
SEAL = "sha256"  # the header field holding the seal (`metadata_sha256`)
# every field a version 2 file holds (the metadata() order); all of them are checked and sealed
HEADER = ("format", "format_version", "gistcache_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens",
          "position_free", "key_start", "prefix_start", "positions", "input_position", "num_prompt_tokens",
          "prompt_sha256", "prompt_preview", "template", "mask", "dtype", "num_layers", "key_shapes", "value_shapes",
          "tensor_sha256", "created", SEAL)
CHUNK_FIELDS = ("gist_every", "gist_per_chunk")  # written by chunked runs only (masks.py), sealed like the rest
# what older files must hold: version 2 before the seal (positions, mask and the texts optional), and version 1
UNSEALED_REQUIRED = ("format_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens", "input_position",
                     "num_prompt_tokens", "prompt_sha256", "template", "dtype", "num_layers", "key_shapes",
                     "value_shapes", "tensor_sha256", "position_free", "key_start", "prefix_start")
V1_REQUIRED = tuple(k for k in UNSEALED_REQUIRED if k not in ("position_free", "key_start", "prefix_start"))
TEMPLATES = ("chat", "plain")  # a cache records the template its run resolved to
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
    # a chunked run (masks.py): N = gist_per_chunk gist tokens after every gist_every instruction tokens, so the
    # cache holds num_gist_tokens = M = N * ceil((num_prompt_tokens - key_start) / gist_every) slots; 0: one chunk
    gist_every: int = 0
    gist_per_chunk: int = 0  # N; 0 reads as num_gist_tokens (one chunk)
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
        if not self.gist_every:
            self.gist_per_chunk = self.gist_per_chunk or self.num_gist_tokens
        expected = count_gist_slots(self.num_prompt_tokens, self.gist_per_chunk, self.gist_every, self.key_start)
        if self.gist_every < 0 or self.gist_per_chunk < 1 or self.num_gist_tokens != expected:
            raise GistError(f"num_gist_tokens {self.num_gist_tokens} does not fit gist_per_chunk {self.gist_per_chunk}"
                            f" after every {self.gist_every} of {self.num_prompt_tokens - self.key_start} instruction "
                            f"tokens ({expected} gist tokens)")
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
        """The string metadata written into the safetensors header, sealed (`sha256`, see `metadata_sha256`)."""
        meta = {
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
        if self.gist_every:  # a one-chunk cache is written as before gist_every existed, byte for byte
            meta.update(gist_every=str(self.gist_every), gist_per_chunk=str(self.gist_per_chunk))
        return {**meta, SEAL: metadata_sha256(meta)}

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
    """[(keys, values)] per layer, each (B, kv_heads, S, head_dim): `cached_slots` with the model's own fixed
    prefix (prefix mask only, F = 0 otherwise)."""
    prefix = model.prefix_kv()  # [(keys, values)] at positions 0..F-1; [] under the paper's mask
    return cached_slots(caches, prefix, model_inv_freq(model.stock_model) if prefix else None, device)


def cached_slots(caches: list[GistCache], prefix: list[tuple[torch.Tensor, torch.Tensor]],
                 inv_freq: torch.Tensor | None, device: str | torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first slots of a request, per layer (B, kv_heads, S, head_dim), one row per cache: the fixed
    prefix `prefix` (per layer (1, kv_heads, F, head_dim) at positions 0..F-1; [] when F = 0) turned to the
    cache's `prefix_start`, then its M gist slots. Caches of different M (chunked runs) are laid out
    [prefix F][zeros][gist M_b], S = F + the largest M; `slot_mask` says which slots are real. `generate`
    (through `stack_layers`) and a serving engine (the exported prefix, `gistcache.export.served_kv`) both lay
    out a request with it."""
    width = max(c.num_gist_tokens for c in caches)
    kv = []
    for layer in range(caches[0].num_layers):
        keys = torch.cat([_left_pad_slots(c.keys[layer], width) for c in caches]).to(device)  # (B, kv_heads, M, hd)
        values = torch.cat([_left_pad_slots(c.values[layer], width) for c in caches]).to(device)
        if prefix:
            pk, pv = prefix[layer]  # (1, kv_heads, F, head_dim)
            pk = torch.cat([move_keys(pk, inv_freq, 0, inv_freq, c.prefix_start) for c in caches])  # (B, ...)
            keys = torch.cat([pk.to(device, keys.dtype), keys], dim=2)
            values = torch.cat([pv.to(device, values.dtype).expand(len(caches), -1, -1, -1), values], dim=2)
        kv.append((keys, values))
    return kv


def slot_mask(caches: list[GistCache], num_prefix_tokens: int) -> torch.Tensor:
    """(B, F + largest M) long: 1 on the real slots of `cached_slots`' layout, 0 on its padding."""
    width = max(c.num_gist_tokens for c in caches)
    return torch.tensor([[1] * num_prefix_tokens + [0] * (width - c.num_gist_tokens) + [1] * c.num_gist_tokens
                         for c in caches], dtype=torch.long)


def _left_pad_slots(t: torch.Tensor, width: int) -> torch.Tensor:
    """(1, kv_heads, M, head_dim) -> (1, kv_heads, width, head_dim), zeros before the M slots."""
    missing = width - t.shape[2]
    return t if not missing else torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order (catches any altered byte)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata_sha256(meta: dict[str, str]) -> str:
    """The seal: SHA-256 of the canonical JSON of every header field but `sha256` itself (tensor_sha256 included)."""
    fields = {k: v for k, v in meta.items() if k != SEAL}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{FORMAT}|{canonical}".encode("ascii")).hexdigest()


def check_cache_path(path: str | Path) -> Path:
    """Refuse a folder where a cache file is to be written (checked before anything is computed)."""
    path = Path(path)
    if path.is_dir():
        raise GistError(f"--out {path} is a folder: give a file name such as {path / 'prompt.safetensors'}")
    return path


FINITE_FIX = "compress the prompt again (in float32 if the model overflows in a half-precision dtype)"


def check_finite(cache: GistCache, source: str) -> None:
    """Refuse NaN or inf among the keys and values: they poison every answer read from the cache."""
    for kind, tensors in (("keys", cache.keys), ("values", cache.values)):
        for i, t in enumerate(tensors):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise GistError(f"{source} layer {i} {kind} hold {bad} non-finite value{'s' if bad > 1 else ''} "
                                f"(NaN or inf), which would poison every answer: {FINITE_FIX}")


def save_cache(cache: GistCache, path: str | Path) -> Path:
    """Write `cache` as safetensors at `path`, atomically (temp file, then os.replace); refuse NaN or inf."""
    path = check_cache_path(path)
    check_finite(cache, "the cache to write")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in cache.tensors().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=cache.metadata())
    return path


# --- reading a file: one open file, the header checked field by field before the tensors --------------

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
MAX_FILE_BYTES = 1 << 30  # a gist cache of 10 tokens of an 80-layer model is a few MB
MAX_HEADER_BYTES = 1 << 20  # its header a few KB
MAX_GIST_TOKENS = 4096
MAX_PROMPT_TOKENS = 1 << 24
MAX_HEADS, MAX_HEAD_DIM = 1 << 12, 1 << 16
_INT = re.compile(r"0|-?[1-9][0-9]{0,15}")  # plain decimal: no plus sign, space, leading zero or exponent
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[0-9A-Za-z]{1,128}")  # compared for equality only (SHA-256 hex from this package)
_VERSION_TEXT = re.compile(r"[0-9A-Za-z.+_-]{0,64}")
ALTERED = "the file was altered or damaged; compress the prompt again"


@dataclass(frozen=True)
class _TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    """A cache file's header, every field checked: what `read_cache_file` builds the cache from."""

    meta: dict[str, str]
    version: int
    num_layers: int
    num_gist: int
    num_prompt: int
    key_start: int
    positions: str
    mask: str
    dtype: torch.dtype
    gist_every: int = 0
    gist_per_chunk: int = 0


def read_cache_metadata(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> dict[str, str]:
    """The header metadata of a cache file of one of `versions`, every field checked and the seal verified when
    the file has one (the tensor bytes are not read). A version 2 file written before the seal is returned too:
    `gist cache ls` lists it, and it can be replaced or removed."""
    path = Path(path)
    with _open_cache(path) as fh:
        meta, infos = _read_header(path, fh)
    return _check_header(path, meta, infos, versions=versions, need_seal=False).meta


def load_cache(path: str | Path, model: GistModel | None = None) -> GistCache:
    """Read a cache file, every header field, its seal, its tensor SHA-256 and its values checked; with `model`,
    also check that it fits.

    Only safetensors is read; nothing is unpickled. A version 1 file is refused with the command
    that converts it.
    """
    cache, _ = read_cache_file(path)
    if model is not None:
        check_cache(model, cache, source=f"cache {path}")
    return cache


def read_cache_file(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> tuple[GistCache, int]:
    """(cache, format version) of a file of one of `versions`, read from one open file and checked (module docstring).

    A version 1 cache comes back with key_start 0 and its keys still at positions P..P+N-1: only
    `gistcache.upgrade` asks for one, to move them. It has no seal; its tensor SHA-256 is checked.
    """
    path = Path(path)
    with _open_cache(path) as fh:
        meta, infos = _read_header(path, fh)
        header = _check_header(path, meta, infos, versions=versions, need_seal=True)
        data = bytearray(fh.read(MAX_FILE_BYTES + 1))  # the same open file: header and tensors of one version
    size = max((info.end for info in infos.values()), default=0)
    if len(data) != size:
        _unreadable(path, f"{len(data)} bytes of tensor data, the header describes {size}")
    tensors = {}
    for name, info in infos.items():
        raw = torch.frombuffer(data, dtype=torch.uint8, count=info.end - info.begin, offset=info.begin)
        if sys.byteorder == "big":  # safetensors stores little-endian
            raw = raw.reshape(-1, _itemsize(info.dtype)).flip(1).reshape(-1)
        tensors[name] = raw.clone().view(info.dtype).reshape(info.shape)
    if tensor_sha256(tensors) != meta["tensor_sha256"]:
        raise GistError(f"{path} tensor bytes do not match their tensor_sha256: {ALTERED}")
    keys = [tensors[f"layers.{i}.keys"] for i in range(header.num_layers)]
    values = [tensors[f"layers.{i}.values"] for i in range(header.num_layers)]
    cache = GistCache(keys=keys, values=values, num_gist_tokens=header.num_gist, num_prompt_tokens=header.num_prompt,
                      prompt_sha256=meta["prompt_sha256"], template=meta["template"],
                      base_fingerprint=meta["base_fingerprint"], run_fingerprint=meta["run_fingerprint"],
                      prompt_preview=meta.get("prompt_preview", ""), created=meta.get("created", ""),
                      mask=header.mask, key_start=header.key_start, positions=header.positions,
                      gist_every=header.gist_every, gist_per_chunk=header.gist_per_chunk)
    check_finite(cache, str(path))
    return cache, header.version


@contextlib.contextmanager
def _open_cache(path: Path) -> Iterator[BinaryIO]:
    """The cache file, open for reading; a folder, a missing file or one too large to be a cache refused."""
    if path.is_dir():
        raise GistError(f"cache file {path} is a folder: give a file written by `gist compress --out FILE`")
    if not path.is_file():
        raise GistError(f"cache file {path} does not exist: make one with `gist compress \"...\" --out {path}`")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise GistError(f"{path} is {size} bytes, more than any gist cache: give a file written by "
                            f"`gist compress`")
        yield fh


def _unreadable(path: Path, reason: str) -> NoReturn:
    raise GistError(f"{path} is not a readable safetensors file ({reason}): it is truncated or not a gist cache; "
                    f"compress the prompt again")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key[:40]!r} appears twice")
        out[key] = value
    return out


def _read_header(path: Path, fh: BinaryIO) -> tuple[dict, dict[str, _TensorInfo]]:
    """(metadata, tensor infos) from the safetensors header at the start of `fh`:
    its JSON parsed and its layout checked (known float dtypes, offsets that tile the data), nothing allocated."""
    size = os.fstat(fh.fileno()).st_size
    prefix = fh.read(8)
    if len(prefix) < 8:
        _unreadable(path, f"{len(prefix)} bytes, shorter than a safetensors header")
    n = int.from_bytes(prefix, "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        _unreadable(path, f"its header length {n} does not fit the file of {size} bytes")
    raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _unreadable(path, f"its header is not JSON: {type(exc).__name__}: {str(exc)[:80]}")
    if not isinstance(header, dict):
        _unreadable(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        _unreadable(path, "its __metadata__ is not a JSON object")
    for key, value in (meta or {}).items():
        if not isinstance(value, str):
            raise GistError(f"{path} has metadata field {key[:40]!r} holding {_json_kind(value)}, not text: "
                            f"safetensors metadata is text only; {ALTERED}")
    data_size = size - 8 - n
    infos: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        infos[name] = _tensor_info(path, name, entry)
    at = 0
    for name, info in sorted(infos.items(), key=lambda kv: kv[1].begin):
        if info.begin != at:
            _unreadable(path, f"tensor {name[:40]!r} starts at byte {info.begin} of the data, not {at}")
        at = info.end
    if at != data_size:
        _unreadable(path, f"its tensors take {at} bytes, the file holds {data_size} after the header")
    return meta or {}, infos


def _tensor_info(path: Path, name: str, entry: object) -> _TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        _unreadable(path, f"tensor {name[:40]!r} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise GistError(f"{path} tensor {name[:40]!r} has dtype {str(dtype)[:20]!r}: a gist cache holds "
                        f"{', '.join(SAFETENSORS_DTYPES)} tensors; {ALTERED}")
    if not (_int_list(shape, 0, 1 << 32) and len(shape) <= 8 and _int_list(offsets, 0, MAX_FILE_BYTES)
            and len(offsets) == 2 and offsets[0] <= offsets[1]):
        _unreadable(path, f"tensor {name[:40]!r} has a malformed shape or data_offsets")
    numel = 1
    for dim in shape:
        numel *= dim
    torch_dtype = SAFETENSORS_DTYPES[dtype]
    if numel * _itemsize(torch_dtype) != offsets[1] - offsets[0]:
        _unreadable(path, f"tensor {name[:40]!r} of shape {shape} takes {offsets[1] - offsets[0]} bytes")
    return _TensorInfo(torch_dtype, tuple(shape), offsets[0], offsets[1])


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _int_list(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value)


def _json_kind(value: object) -> str:
    return {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_header(path: Path, meta: dict[str, str], infos: dict[str, _TensorInfo], *,
                  versions: tuple[int, ...], need_seal: bool) -> _Header:
    """Every header field checked for type, bounds and agreement with the others and with the tensors in the file,
    then the seal; the first field that does not fit is named."""
    if not meta or meta.get("format") != FORMAT:
        raise GistError(f"{path} is a safetensors file but not a gist cache (no format={FORMAT!r} metadata): "
                        f"give a file written by `gist compress`")
    if meta.get("format_version") == "1" and 1 not in versions:
        raise GistError(f"{path} is a version 1 gist cache (its keys sit at the prompt's own positions): convert it "
                        f"in place with `gist cache upgrade {path} --run RUN` (RUN: the run that made it)")
    if meta.get("format_version") not in {str(v) for v in versions}:
        raise GistError(f"{path} has unknown format_version {str(meta.get('format_version'))[:20]!r} (this gistcache "
                        f"reads {FORMAT_VERSION}): compress the prompt again with this version")
    version = int(meta["format_version"])
    sealed = version >= 2 and SEAL in meta
    if version >= 2 and not sealed and need_seal:
        raise GistError(f"{path} was written by an older gistcache whose header has no seal (sha256), so edits to "
                        f"it cannot be detected: compress the prompt again (`gist compress \"...\" --out {path}`; a "
                        f"store entry is recompressed on its next lookup)")
    required = HEADER if sealed else V1_REQUIRED if version == 1 else UNSEALED_REQUIRED
    missing = [k for k in required if k not in meta]
    if missing:
        raise GistError(f"{path} lacks metadata field {missing[0]!r}: it was not written by `gist compress`")
    if sealed:
        unknown = sorted(set(meta) - set(HEADER) - set(CHUNK_FIELDS))
        if unknown:
            raise GistError(f"{path} has an unknown metadata field {unknown[0][:40]!r}: {ALTERED}")
    f = _Fields(path, meta)
    f.text("base_fingerprint", 128, pattern=_FINGERPRINT), f.text("run_fingerprint", 128, pattern=_FINGERPRINT)
    f.digest("prompt_sha256"), f.digest("tensor_sha256")
    if sealed:
        f.digest(SEAL)
    f.choice("template", TEMPLATES)
    mask = f.choice("mask", MASKS, default="paper")
    dtype = DTYPES[f.choice("dtype", tuple(DTYPES))]
    f.text("prompt_preview", 1000, default="")
    f.text("created", 64, default="")
    f.text("gistcache_version", 64, pattern=_VERSION_TEXT, default="")
    num_gist = f.number("num_gist_tokens", 1, MAX_GIST_TOKENS)
    num_prompt = f.number("num_prompt_tokens", 0, MAX_PROMPT_TOKENS)
    names = set(infos)
    num_layers = f.number("num_layers", 1, max(1, len(names) // 2))
    expected = {f"layers.{i}.{kind}" for i in range(num_layers) for kind in ("keys", "values")}
    if names != expected:
        differ = sorted(names ^ expected)[:3]
        raise GistError(f"{path} tensors do not match num_layers {num_layers} (differ in {differ}): {ALTERED}")
    key_start = 0
    positions = f.choice("positions", POSITIONS, default="compact")
    if version >= 2:
        if meta["position_free"] != "true":
            raise GistError(f"{path} has position_free {meta['position_free'][:20]!r}, a version {version} cache is "
                            f"always position-free: {ALTERED}")
        key_start = f.number("key_start", 0, num_prompt)
        if "positions" not in meta:  # version 2 files from before the position layouts: prefix-mask caches were original
            positions = "original" if key_start else "compact"
        if mask == "paper" and (key_start, positions) != (0, "compact"):
            raise GistError(f"{path} has key_start {key_start} and positions {positions!r} under the paper's mask, "
                            f"which has no fixed prefix (0, 'compact'): {ALTERED}")
        prefix_start = key_start - num_prompt if key_start and positions == "original" else 0
        if f.number("prefix_start", -MAX_PROMPT_TOKENS, 0) != prefix_start:
            raise GistError(f"{path} has prefix_start {meta['prefix_start']}, which does not fit key_start {key_start}, "
                            f"num_prompt_tokens {num_prompt} and positions {positions!r}: {ALTERED}")
    gist_every, gist_per_chunk = 0, num_gist
    if any(name in meta for name in CHUNK_FIELDS):
        missing = [name for name in CHUNK_FIELDS if name not in meta]
        if missing or not sealed:
            raise GistError(f"{path} has {' and '.join(n for n in CHUNK_FIELDS if n in meta)} without "
                            f"{missing[0] if missing else 'a seal'}: {ALTERED}")
        gist_every = f.number("gist_every", 1, MAX_PROMPT_TOKENS)
        gist_per_chunk = f.number("gist_per_chunk", 1, MAX_GIST_TOKENS)
        if mask == "prefix" and positions != "compact":
            raise GistError(f"{path} has gist_every {gist_every} in the {positions!r} positions; chunked caches are "
                            f"compact: {ALTERED}")
        if num_gist != count_gist_slots(num_prompt, gist_per_chunk, gist_every, key_start):
            raise GistError(f"{path} has num_gist_tokens {num_gist}, which does not fit gist_per_chunk {gist_per_chunk} "
                            f"after every {gist_every} of its {num_prompt - key_start} instruction tokens: {ALTERED}")
    start = num_prompt if version == 1 else key_start  # where the keys sit
    offset = f.number("input_position", 0, MAX_PROMPT_TOKENS + MAX_GIST_TOKENS)
    if offset != start + num_gist:
        raise GistError(f"{path} has input_position {offset} != {'num_prompt_tokens' if version == 1 else 'key_start'} "
                        f"{start} + num_gist_tokens {num_gist}: {ALTERED}")
    for kind in ("keys", "values"):
        shapes = f.shapes(f"{kind[:-1]}_shapes", num_layers)
        for i, shape in enumerate(shapes):
            info = infos[f"layers.{i}.{kind}"]
            if tuple(shape) != info.shape:
                raise GistError(f"{path} layer {i} {kind} shape {list(info.shape)} differs from its metadata "
                                f"{kind[:-1]}_shapes {shape}: {ALTERED}")
            if shape[0] != 1 or shape[2] != num_gist or not 1 <= shape[1] <= MAX_HEADS or not 1 <= shape[3] <= MAX_HEAD_DIM:
                raise GistError(f"{path} layer {i} {kind} have shape {shape}: expected (1, kv_heads, "
                                f"num_gist_tokens {num_gist}, head_dim); {ALTERED}")
            if info.dtype != dtype:
                raise GistError(f"{path} layer {i} {kind} are {dtype_name(info.dtype)}, metadata dtype says "
                                f"{dtype_name(dtype)}: {ALTERED}")
    if sealed and meta[SEAL] != metadata_sha256(meta):
        raise GistError(f"{path} header does not match its seal (sha256): a metadata field was changed; {ALTERED}")
    return _Header(meta=meta, version=version, num_layers=num_layers, num_gist=num_gist, num_prompt=num_prompt,
                   key_start=key_start, positions=positions, mask=mask, dtype=dtype, gist_every=gist_every,
                   gist_per_chunk=gist_per_chunk)


class _Fields:
    """Typed reads of header fields, each refused in one line that names the field and what it must be."""

    def __init__(self, path: Path, meta: dict[str, str]):
        self.path, self.meta = path, meta

    def _get(self, name: str, default: str | None) -> str:
        return self.meta.get(name, default) if default is not None else self.meta[name]

    def _refuse(self, name: str, value: str, expected: str) -> NoReturn:
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise GistError(f"{self.path} has {name} {shown!r}: expected {expected}; {ALTERED}")

    def number(self, name: str, lo: int, hi: int) -> int:
        value = self.meta[name]
        if not _INT.fullmatch(value) or not lo <= int(value) <= hi:
            self._refuse(name, value, f"a whole number from {lo} to {hi}, written plainly")
        return int(value)

    def digest(self, name: str) -> str:
        value = self.meta[name]
        if not _HEX64.fullmatch(value):
            self._refuse(name, value, "64 lowercase hex digits (a SHA-256)")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self._get(name, default)
        if value not in choices:
            self._refuse(name, value, f"one of {', '.join(choices)}")
        return value

    def text(self, name: str, max_chars: int, *, pattern: re.Pattern | None = None, default: str | None = None) -> str:
        value = self._get(name, default)
        if len(value) > max_chars or (pattern is not None and not pattern.fullmatch(value)):
            self._refuse(name, value, f"text of at most {max_chars} characters" + (
                f" matching {pattern.pattern}" if pattern is not None else ""))
        return value

    def shapes(self, name: str, num_layers: int) -> list[list[int]]:
        """A JSON list of num_layers shapes of four whole numbers, written as `json.dumps` writes it."""
        value = self.meta[name]
        expected = f"a JSON list of {num_layers} shapes of 4 whole numbers"
        if len(value) > 100 * num_layers + 2:
            self._refuse(name, value, expected)
        try:
            shapes = json.loads(value)
        except (ValueError, RecursionError):
            self._refuse(name, value, expected)
        if not (isinstance(shapes, list) and len(shapes) == num_layers
                and all(_int_list(s, 0, 1 << 32) and len(s) == 4 for s in shapes)) or json.dumps(shapes) != value:
            self._refuse(name, value, expected)
        return shapes
