"""Reading a cache file: its bytes read once, the tensors decoded from them by safetensors, the header checked
field by field (header.py), then the tensor bytes and their values. See `gistcache.cache` for what is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from gistcache.cache.format import FORMAT_VERSION, tensor_sha256
from gistcache.cache.gist_cache import GistCache
from gistcache.cache.header import ALTERED, MAX_FILE_BYTES, MAX_HEADER_BYTES, _check_header
from gistcache.cache.identity import check_cache
from gistcache.cache.writer import check_finite
from gistcache.errors import GistError
from gistcache.model import GistModel


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_cache_metadata(path: str | Path, *, versions: tuple[int, ...] = (FORMAT_VERSION,)) -> dict[str, str]:
    """The header metadata of a cache file of one of `versions`, every field checked and the seal verified when
    the file has one (the tensors are decoded to check their shapes and dtype, not hashed). A version 2 file
    written before the seal is returned too: `gist cache ls` lists it, and it can be replaced or removed."""
    path = Path(path)
    meta, tensors = _read(path)
    return _check_header(path, meta, tensors, versions=versions, need_seal=False).meta


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
                      gist_every=header.gist_every, gist_per_chunk=header.gist_per_chunk)
    check_finite(cache, str(path))
    return cache, header.version


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) from one read of the file's bytes, so a writer replacing the file meanwhile cannot
    mix two versions. safetensors decodes the tensors (their offsets, dtypes and shapes checked there); only the
    header's `__metadata__` is read here, since safetensors returns it from a file name but not from bytes."""
    data = _read_bytes(path)
    header = _header_json(path, data)
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        _unreadable(path, "its __metadata__ is not a JSON object")
    for key, value in (meta or {}).items():
        if not isinstance(value, str):
            raise GistError(f"{path} has metadata field {key[:40]!r} holding {_json_kind(value)}, not text: "
                            f"safetensors metadata is text only; {ALTERED}")
    for name, entry in header.items():  # refused before safetensors decodes a tensor of another dtype
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in SAFETENSORS_DTYPES:
            raise GistError(f"{path} tensor {name[:40]!r} has dtype {dtype[:20]!r}: a gist cache holds "
                            f"{', '.join(SAFETENSORS_DTYPES)} tensors; {ALTERED}")
    try:
        tensors = load(data)
    except SafetensorError as exc:
        _unreadable(path, " ".join(str(exc).split())[:120])
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # a shape torch cannot hold
        _unreadable(path, f"a tensor shape torch cannot hold: {type(exc).__name__}")
    return meta or {}, tensors


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a folder, a missing file or one too large to be a cache refused."""
    if path.is_dir():
        raise GistError(f"cache file {path} is a folder: give a file written by `gist compress --out FILE`")
    if not path.is_file():
        raise GistError(f"cache file {path} does not exist: make one with `gist compress \"...\" --out {path}`")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise GistError(f"{path} is {size} bytes, more than any gist cache: give a file written by "
                            f"`gist compress`")
        return fh.read(MAX_FILE_BYTES + 1)  # a file grown since fstat does not match its header: refused below


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
