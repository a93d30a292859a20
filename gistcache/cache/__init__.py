"""A gist cache and its file: the keys and values of the N gist positions of every layer.

`GistCache` holds them with what they were made from (`gistcache.inference.compression` makes one). The
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

Reading a file (`read_cache_file`) reads its bytes once (a writer replacing the file meanwhile cannot
mix two versions) and has safetensors decode the tensors from them, and refuses, in one line naming
the field: a file that is not safetensors, a tensor that is not float, a field of the wrong type, out
of its bounds or contradicting another (`num_layers` must be the number of layer tensors in the file,
each shape four whole numbers equal to the tensor's, `input_position` = `key_start` + N, ...), an
unknown or missing field. Then the seal, the tensor bytes, and any NaN or inf among the keys and
values (refused; a model that produces them is refused at save time too).

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

from gistcache.cache.format import (CHUNK_FIELDS, FORMAT, FORMAT_VERSION, HEADER, PLACEHOLDER_ID, SEAL, TEMPLATES,
                                    UNSEALED_REQUIRED, V1_REQUIRED, metadata_sha256, tensor_sha256)
from gistcache.cache.gist_cache import GistCache, cached_slots, slot_mask, stack_layers
from gistcache.cache.header import (ALTERED, MAX_FILE_BYTES, MAX_GIST_TOKENS, MAX_HEAD_DIM, MAX_HEADER_BYTES,
                                    MAX_HEADS, MAX_PROMPT_TOKENS)
from gistcache.cache.reader import SAFETENSORS_DTYPES, load_cache, read_cache_file, read_cache_metadata
from gistcache.cache.writer import FINITE_FIX, check_cache_path, check_finite, save_cache

__all__ = ["ALTERED", "CHUNK_FIELDS", "FINITE_FIX", "FORMAT", "FORMAT_VERSION", "HEADER", "MAX_FILE_BYTES",
           "MAX_GIST_TOKENS", "MAX_HEADER_BYTES", "MAX_HEADS", "MAX_HEAD_DIM", "MAX_PROMPT_TOKENS", "PLACEHOLDER_ID",
           "SAFETENSORS_DTYPES", "SEAL", "TEMPLATES", "UNSEALED_REQUIRED", "V1_REQUIRED", "GistCache", "cached_slots",
           "check_cache_path", "check_finite", "load_cache", "metadata_sha256", "read_cache_file",
           "read_cache_metadata", "save_cache", "slot_mask", "stack_layers", "tensor_sha256"]
