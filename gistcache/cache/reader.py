"""Reading a cache file: one open file, the header checked field by field (header.py) before the tensors,
then the tensor bytes and their values. See `gistcache.cache` for what is refused."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

import torch

from gistcache.cache.format import FORMAT_VERSION, tensor_sha256
from gistcache.cache.gist_cache import GistCache
from gistcache.cache.header import (ALTERED, MAX_FILE_BYTES, MAX_HEADER_BYTES, _check_header, _int_list,
                                    _TensorInfo)
from gistcache.cache.writer import check_finite
from gistcache.errors import GistError
from gistcache.identity import check_cache
from gistcache.model import GistModel


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


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



def _json_kind(value: object) -> str:
    return {bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)
