"""A cache file's header checked field by field (type, bounds, agreement with the others and with the
tensors, decoded or as the safetensors header declares them, then the seal); see `gistcache.cache`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NoReturn, Protocol

import torch

from gistcache.cache.format import (CHUNK_FIELDS, FORMAT, FORMAT_VERSION, HEADER, SEAL, TAIL_FIELD, TEMPLATES,
                                    UNSEALED_REQUIRED, V1_REQUIRED, metadata_sha256)
from gistcache.config import DTYPES, dtype_name
from gistcache.errors import GistError
from gistcache.masks import MASKS, POSITIONS, count_gist_slots

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
    raw_tail: int = 0


class _Shaped(Protocol):
    """What the checks read of a tensor: a decoded one, or one as its safetensors header declares it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _int_list(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value)


def _check_header(path: Path, meta: dict[str, str], tensors: Mapping[str, torch.Tensor | _Shaped], *,
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
        unknown = sorted(set(meta) - set(HEADER) - set(CHUNK_FIELDS) - {TAIL_FIELD})
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
    names = set(tensors)
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
    gist_every, gist_per_chunk, raw_tail = 0, num_gist, 0
    if TAIL_FIELD in meta and not all(name in meta for name in CHUNK_FIELDS):
        raise GistError(f"{path} has {TAIL_FIELD} without {' and '.join(CHUNK_FIELDS)}: {ALTERED}")
    if any(name in meta for name in CHUNK_FIELDS):
        missing = [name for name in CHUNK_FIELDS if name not in meta]
        if missing or not sealed:
            raise GistError(f"{path} has {' and '.join(n for n in CHUNK_FIELDS if n in meta)} without "
                            f"{missing[0] if missing else 'a seal'}: {ALTERED}")
        gist_every = f.number("gist_every", 1, MAX_PROMPT_TOKENS)
        gist_per_chunk = f.number("gist_per_chunk", 1, MAX_GIST_TOKENS)
        raw_tail = f.number(TAIL_FIELD, 1, MAX_GIST_TOKENS) if TAIL_FIELD in meta else 0
        if mask == "prefix" and positions != "compact":
            raise GistError(f"{path} has gist_every {gist_every} in the {positions!r} positions; chunked caches are "
                            f"compact: {ALTERED}")
        if num_gist != count_gist_slots(num_prompt, gist_per_chunk, gist_every, key_start, raw_tail):
            tail = f" and a raw tail of up to {raw_tail}" if raw_tail else ""
            raise GistError(f"{path} has num_gist_tokens {num_gist}, which does not fit gist_per_chunk {gist_per_chunk} "
                            f"after every {gist_every} of its {num_prompt - key_start} instruction tokens{tail}: "
                            f"{ALTERED}")
    start = num_prompt if version == 1 else key_start  # where the keys sit
    offset = f.number("input_position", 0, MAX_PROMPT_TOKENS + MAX_GIST_TOKENS)
    if offset != start + num_gist:
        raise GistError(f"{path} has input_position {offset} != {'num_prompt_tokens' if version == 1 else 'key_start'} "
                        f"{start} + num_gist_tokens {num_gist}: {ALTERED}")
    for kind in ("keys", "values"):
        shapes = f.shapes(f"{kind[:-1]}_shapes", num_layers)
        for i, shape in enumerate(shapes):
            tensor = tensors[f"layers.{i}.{kind}"]
            if tuple(shape) != tuple(tensor.shape):
                raise GistError(f"{path} layer {i} {kind} shape {list(tensor.shape)} differs from its metadata "
                                f"{kind[:-1]}_shapes {shape}: {ALTERED}")
            if shape[0] != 1 or shape[2] != num_gist or not 1 <= shape[1] <= MAX_HEADS or not 1 <= shape[3] <= MAX_HEAD_DIM:
                raise GistError(f"{path} layer {i} {kind} have shape {shape}: expected (1, kv_heads, "
                                f"num_gist_tokens {num_gist}, head_dim); {ALTERED}")
            if tensor.dtype != dtype:
                raise GistError(f"{path} layer {i} {kind} are {dtype_name(tensor.dtype)}, metadata dtype says "
                                f"{dtype_name(dtype)}: {ALTERED}")
    if sealed and meta[SEAL] != metadata_sha256(meta):
        raise GistError(f"{path} header does not match its seal (sha256): a metadata field was changed; {ALTERED}")
    return _Header(meta=meta, version=version, num_layers=num_layers, num_gist=num_gist, num_prompt=num_prompt,
                   key_start=key_start, positions=positions, mask=mask, dtype=dtype, gist_every=gist_every,
                   gist_per_chunk=gist_per_chunk, raw_tail=raw_tail)


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
