"""The cache file's format: its name and version, the header fields it holds, and the two SHA-256 hashes
that seal it (`tensor_sha256` over the tensors, `metadata_sha256` over the header). See `gistcache.cache`."""

from __future__ import annotations

import hashlib
import json

import torch

from gistcache.config import dtype_name

FORMAT = "gistcache-kv"
FORMAT_VERSION = 2
SEAL = "sha256"  # the header field holding the seal (`metadata_sha256`)
# every field a version 2 file holds (the metadata() order); all of them are checked and sealed
HEADER = ("format", "format_version", "gistcache_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens",
          "position_free", "key_start", "prefix_start", "positions", "input_position", "num_prompt_tokens",
          "prompt_sha256", "prompt_preview", "template", "mask", "dtype", "num_layers", "key_shapes", "value_shapes",
          "tensor_sha256", "created", SEAL)
CHUNK_FIELDS = ("gist_every", "gist_per_chunk")  # written by chunked runs only (masks.py), sealed like the rest
TAIL_FIELD = "raw_tail"  # W, written by runs with a raw tail only (masks.py), beside the chunk fields
# what older files must hold: version 2 before the seal (positions, mask and the texts optional), and version 1
UNSEALED_REQUIRED = ("format_version", "base_fingerprint", "run_fingerprint", "num_gist_tokens", "input_position",
                     "num_prompt_tokens", "prompt_sha256", "template", "dtype", "num_layers", "key_shapes",
                     "value_shapes", "tensor_sha256", "position_free", "key_start", "prefix_start")
V1_REQUIRED = tuple(k for k in UNSEALED_REQUIRED if k not in ("position_free", "key_start", "prefix_start"))
TEMPLATES = ("chat", "plain")  # a cache records the template its run resolved to
PLACEHOLDER_ID = 0  # stands for a cached position in `input_ids`; never embedded


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
