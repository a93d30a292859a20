"""Reading a cache file: its bytes read once, the tensors decoded from them by safetensors, the header checked
field by field (header.py), then the tensor bytes and their values. See `gistcache.cache` for what is refused."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from gistcache.cache.format import FORMAT_VERSION, tensor_sha256
from gistcache.cache.gist_cache import GistCache
from gistcache.cache.header import ALTERED, MAX_FILE_BYTES, MAX_HEADER_BYTES, _check_header, _int_list
from gistcache.cache.identity import check_cache
from gistcache.cache.writer import check_finite
from gistcache.errors import GistError
from gistcache.model import GistModel


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_cache_metadata(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> dict[str, str]:
    """The header metadata of a cache file of one of `versions`, every field checked and the seal verified when
    the file has one. Only the header is read: the tensors' names, shapes and dtypes are checked as it declares
    them, and their byte ranges against the file's size (a truncated file is refused), but their bytes are not
    read or hashed, so `gist cache ls` over a large store reads a few KB an entry. A version 2 file written
    before the seal is returned too: `gist cache ls` lists it, and it can be replaced or removed."""
    path = Path(path)
    meta, declared = _read_header(path)
    return _check_header(path, meta, declared, versions=versions, need_seal=False).meta


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
    """(cache, format version) of a file of one of `versions`, read once and checked (module docstring).

    A version 1 cache comes back with key_start 0 and its keys still at positions P..P+N-1: only
    `gistcache.cache.upgrade` asks for one, to move them. It has no seal; its tensor SHA-256 is checked.
    """
    path = Path(path)
    meta, tensors = _read(path)
    header = _check_header(path, meta, tensors, versions=versions, need_seal=True)
    if tensor_sha256(tensors) != meta["tensor_sha256"]:
        raise GistError(f"{path} tensor bytes do not match their tensor_sha256: {ALTERED}")
    keys = [tensors[f"layers.{i}.keys"] for i in range(header.num_layers)]
    values = [tensors[f"layers.{i}.values"] for i in range(header.num_layers)]
    cache = GistCache(keys=keys, values=values, num_gist_tokens=header.num_gist, num_prompt_tokens=header.num_prompt,
                      prompt_sha256=meta["prompt_sha256"], template=meta["template"],
                      base_fingerprint=meta["base_fingerprint"], run_fingerprint=meta["run_fingerprint"],
                      prompt_preview=meta.get("prompt_preview", ""), created=meta.get("created", ""),
                      mask=header.mask, key_start=header.key_start, positions=header.positions,
                      gist_every=header.gist_every, gist_per_chunk=header.gist_per_chunk, raw_tail=header.raw_tail)
    check_finite(cache, str(path))
    return cache, header.version


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) from one read of the file's bytes, so a writer replacing the file meanwhile cannot
    mix two versions. safetensors decodes the tensors (their offsets, dtypes and shapes checked there); only the
    header's `__metadata__` is read here, since safetensors returns it from a file name but not from bytes."""
    data = _read_bytes(path)
    meta = _checked_metadata(path, _header_json(path, data))
    try:
        tensors = load(data)
    except SafetensorError as exc:
        _unreadable(path, " ".join(str(exc).split())[:120])
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # a shape torch cannot hold
        _unreadable(path, f"a tensor shape torch cannot hold: {type(exc).__name__}")
    return meta, tensors


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, _Declared]]:
    """(metadata, the tensors as the header declares them) from the header's bytes alone, in one open of the
    file; each tensor's byte range checked against its shape and dtype and the ranges against the file's size."""
    with _open_cache(path) as (fh, size):
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) == 8 and n <= min(MAX_HEADER_BYTES, size - 8):
            head += fh.read(n)
    header = _header_json(path, head)  # refuses a short file or a length that does not fit what was read
    meta = _checked_metadata(path, header)
    declared, end = {}, 0
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (_int_list(shape, 0, 1 << 64) and _int_list(offsets, 0, 1 << 64) and len(offsets) == 2
                and "dtype" in entry):
            _unreadable(path, f"tensor {name[:40]!r} has no dtype, shape and data_offsets")
        # a text dtype no cache holds was refused by _checked_metadata; any other kind of value is refused here
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            _unreadable(path, f"tensor {name[:40]!r} has dtype {str(entry['dtype'])[:20]!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            _unreadable(path, f"tensor {name[:40]!r} spans {offsets[1] - offsets[0]} bytes, not its shape's")
        declared[name], end = _Declared(tuple(shape), dtype), max(end, offsets[1])
    if 8 + n + end != size:
        _unreadable(path, f"its tensors end at byte {8 + n + end} of a file of {size} bytes")
    return meta, declared


@dataclass(frozen=True)
class _Declared:
    """A tensor as a safetensors header declares it: what `_check_header` compares with the metadata."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _checked_metadata(path: Path, header: dict) -> dict[str, str]:
    """The header's `__metadata__` (taken out of `header`), text only; a tensor of a dtype no cache holds refused
    before safetensors decodes it."""
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        _unreadable(path, "its __metadata__ is not a JSON object")
    for key, value in (meta or {}).items():
        if not isinstance(value, str):
            raise GistError(f"{path} has metadata field {key[:40]!r} holding {_json_kind(value)}, not text: "
                            f"safetensors metadata is text only; {ALTERED}")
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in SAFETENSORS_DTYPES:
            raise GistError(f"{path} tensor {name[:40]!r} has dtype {dtype[:20]!r}: a gist cache holds "
                            f"{', '.join(SAFETENSORS_DTYPES)} tensors; {ALTERED}")
    return meta or {}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes (a file grown since it was opened does not match its header: refused when decoded)."""
    with _open_cache(path) as (fh, _):
        return fh.read(MAX_FILE_BYTES + 1)


@contextmanager
def _open_cache(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """(open file, its size); a folder, a missing file or one too large to be a cache refused."""
    if path.is_dir():
        raise GistError(f"cache file {path} is a folder: give a file written by `gist compress --out FILE`")
    if not path.is_file():
        raise GistError(f"cache file {path} does not exist: make one with `gist compress \"...\" --out {path}`")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise GistError(f"{path} is {size} bytes, more than any gist cache: give a file written by "
                            f"`gist compress`")
        yield fh, size


def _header_json(path: Path, data: bytes) -> dict:
    """The safetensors header (an 8-byte little-endian length, then JSON), parsed; a repeated key refused."""
    if len(data) < 8:
        _unreadable(path, f"{len(data)} bytes, shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        _unreadable(path, f"its header length {n} does not fit the file of {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _unreadable(path, f"its header is not JSON: {type(exc).__name__}: {str(exc)[:80]}")
    if not isinstance(header, dict):
        _unreadable(path, "its header is not a JSON object")
    return header


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


def _json_kind(value: object) -> str:
    return {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)
