"""Scalar values from a GGUF file's key-value header, read without parsing the rest of the file.

`gguf.GGUFReader` maps the whole file and builds every tensor's description and every array (the vocabulary,
the merges) to answer one question, which takes 1-4 s on the default model; reading the header alone and
skipping what is not asked for takes a small fraction of that. The layout (GGUF versions 2 and 3, little
endian): magic `GGUF`, version u32, tensor count u64, key-value count u64, then each pair as a string key
(u64 length + UTF-8 bytes), a u32 value type and the value; an array value is its item type (u32), its count
(u64) and the items.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from gistcache.errors import GistError

# value type -> struct format of a fixed-size scalar (8: string, 9: array are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_scalars(path: str | Path, keys: set[str] | frozenset[str]) -> dict[str, int | float | bool | str]:
    """{key: value} for those of `keys` the file's header holds as a scalar or string (arrays are skipped)."""
    try:
        with open(path, "rb") as f:
            magic, version = f.read(4), _unpack(f, "<I")
            if magic != b"GGUF" or version not in (2, 3):
                raise GistError(f"{path} is not a GGUF file of version 2 or 3")
            _unpack(f, "<Q")  # tensors: described after the header, never read here
            found = {}
            for _ in range(_unpack(f, "<Q")):
                key = _read_string(f)
                kind = _unpack(f, "<I")
                if key in keys and kind != _ARRAY:
                    found[key] = _read_value(f, kind)
                else:
                    _skip_value(f, kind)
            return found
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise GistError(f"cannot read the GGUF header of {path} ({type(exc).__name__}): is the file whole?") from exc


def _unpack(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error("the file ends inside its header")
    return struct.unpack(fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    size = _unpack(f, "<Q")
    data = f.read(size)
    if len(data) != size:
        raise struct.error("the file ends inside its header")
    return data.decode("utf-8")


def _read_value(f: BinaryIO, kind: int):
    if kind == _STRING:
        return _read_string(f)
    if kind not in _SCALARS:
        raise struct.error(f"unknown GGUF value type {kind}")
    return _unpack(f, _SCALARS[kind])


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        f.seek(_unpack(f, "<Q"), 1)
    elif kind == _ARRAY:
        item, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if item in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    elif kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)
    else:
        raise struct.error(f"unknown GGUF value type {kind}")
