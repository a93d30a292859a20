"""Writing a cache file: atomically, never with NaN or inf among the keys and values."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from gistcache._io import atomic_path
from gistcache.cache.gist_cache import GistCache
from gistcache.errors import GistError


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
