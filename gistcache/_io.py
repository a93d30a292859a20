"""Small helpers every layer shares: atomic writes, hashing, left padding, byte counts for people.

Each exists once here, with one behaviour: a write lands whole or not at all (a temporary sibling,
then `os.replace`); padding goes on the left with the tokenizer's pad id, else its EOS id.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (an empty folder with `folder=True`).

    When the block ends without an error it replaces `path` (a folder already there is removed
    first); otherwise it is deleted and `path` is left as it was. An OS error (a full or read-only
    disk, also inside a safetensors write) names `path`, so the one line a user sees says where.
    """
    path = Path(path)
    if file_in_the_way(path) is not None:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if folder:
            tmp.mkdir()
        yield tmp
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as exc:
        # a full or read-only disk: the error names `path`, not the temporary sibling (or no file at all)
        os_error = _as_os_error(exc)
        if os_error is not None and os_error.filename in (None, str(tmp)):
            raise OSError(os_error.errno, os_error.strerror, str(path)) from exc
        raise
    finally:
        _remove(tmp)


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is a file (so `path` can never be written), else None."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _as_os_error(exc: BaseException) -> OSError | None:
    """`exc` as an OSError: itself, or the OS error inside a safetensors write error ("... (os error 28) ...")."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_files(paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of files, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad id, else its EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows: list[list[int]], pad_id: int, device: str | torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids (B, T) with `pad_id` in front of the shorter rows, mask (B, T): 1 on real tokens)."""
    T = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (T - len(row)) + list(row) for row in rows], device=device)
    mask = torch.tensor([[0] * (T - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


def format_bytes(n: float | None, spec: str = ".1f") -> str:
    """1536 -> '1.5 KiB' (powers of 1024, `spec` formats the number; whole bytes below 1 KiB); None -> '—'."""
    if n is None:
        return "—"
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= factor:
            return f"{n / factor:{spec}} {unit}"
    return f"{n:.0f} B"
