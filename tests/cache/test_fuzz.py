"""A fuzzer over gist cache files (issue 16, item 5): every mutated file is refused with the library's own error,
in one line and under a time limit, or loads to exactly the original tensors and metadata.

Mutations, drawn by a seeded generator from tiny models' caches (paper mask float32, prefix mask in the original
positions, prefix mask in bfloat16):

- raw (the hashes left as they were): byte flips in the header and in the tensors, truncations, bytes appended,
  header fields set to a JSON value of any type (number, true/false, null, text, nested lists up to thousands
  deep, huge numbers, long text), fields deleted or added, tensor descriptions (dtype, shape, offsets) changed,
  tensors swapped or replaced by NaN, inf, zeros or another prompt's keys. Each must be refused, or load to
  the original exactly (a flip inside the header's padding changes nothing).
- sealed (the hashes recomputed, as a deliberate forger would): the same field and tensor mutations with
  `tensor_sha256` and `sha256` written anew. A hash cannot catch these, so only this holds: a non-finite value
  or a field out of type or bounds (judged here by the schema written out independently, `field_is_valid`) is
  refused; an accepted file reads back exactly as written (no value silently coerced). Zeros or another
  prompt's keys load (counted as "undetectable": `gist cache verify --run` recompresses and catches them).

`GISTCACHE_FUZZ=N` sets the number of mutations (default 300, a few seconds), `GISTCACHE_FUZZ_SEED` the seed;
`make fuzz` runs 10,000 and prints the summary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from gistcache.cache import HEADER, SEAL, GistCache, load_cache, metadata_sha256, save_cache, tensor_sha256
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.masks import MASKS, POSITIONS
from tiny import make_prefix_model

COUNT = int(os.environ.get("GISTCACHE_FUZZ", "300"))
SEED = int(os.environ.get("GISTCACHE_FUZZ_SEED", "16"))
TIME_LIMIT_S = 2.0
PROMPTS = ("Reverse the word you are given", "Add one to the number")
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
INT_FIELDS = ("num_gist_tokens", "num_prompt_tokens", "num_layers", "key_start", "prefix_start", "input_position")


# --- the file layout, written out independently of gistcache.cache -----------------------------------

def split(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, tensor bytes) of a well-formed safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


class Raw(str):
    """A header value written into the JSON as it is (a nesting too deep for json.dumps to write)."""


def pack(header: dict, body: bytes) -> bytes:
    """A safetensors file from any JSON header (NaN and Infinity tokens, `Raw` text too) and tensor bytes."""
    raws = {}

    def placeholder(value):
        if isinstance(value, Raw):
            raws[f"@raw{len(raws)}@"] = str(value)
            return f"@raw{len(raws) - 1}@"
        return value

    meta = header.get("__metadata__")
    if isinstance(meta, dict):
        header = {**header, "__metadata__": {k: placeholder(v) for k, v in meta.items()}}
    raw = json.dumps(header, separators=(",", ":"))
    for key, text in raws.items():
        raw = raw.replace(f'"{key}"', text)
    raw = raw.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def tensors_of(header: dict, body: bytes) -> dict[str, torch.Tensor]:
    dtypes = {v: k for k, v in ST_DTYPES.items()}
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            a, b = info["data_offsets"]
            out[name] = torch.frombuffer(bytearray(body[a:b]), dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def with_tensor(header: dict, body: bytes, name: str, value: torch.Tensor) -> bytes:
    """`body` with tensor `name` replaced by `value` (same dtype and shape)."""
    a, b = header[name]["data_offsets"]
    raw = value.to(tensors_of(header, body)[name].dtype).contiguous().view(torch.uint8).numpy().tobytes()
    assert len(raw) == b - a
    return body[:a] + raw + body[b:]


def reseal(header: dict, body: bytes) -> dict:
    """The header with tensor_sha256 and the seal recomputed for `body`: what a forger does."""
    header = json.loads(json.dumps(header))
    meta = header["__metadata__"]
    if isinstance(meta, dict):
        try:
            if "tensor_sha256" in meta:
                meta["tensor_sha256"] = tensor_sha256(tensors_of(header, body))
        except Exception:  # a tensor description the forger broke: keep the old hash
            pass
        if SEAL in meta and all(isinstance(v, str) for v in meta.values()):
            meta[SEAL] = metadata_sha256(meta)
    return header


def field_is_valid(name: str, value: object, meta: dict) -> bool:
    """The schema, written out here from the format's description: could `value` stand in field `name` of a file
    whose other fields are `meta` (the tensors unchanged)? False means a loader must refuse the file."""
    if not isinstance(value, str):
        return False
    original = meta[name]
    if name in ("prompt_preview",):
        return len(value) <= 1000
    if name == "created":
        return len(value) <= 64
    if name == "gistcache_version":
        return len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in ".+_-") for c in value)
    if name in ("base_fingerprint", "run_fingerprint"):
        return 1 <= len(value) <= 128 and value.isascii() and value.isalnum()
    if name == "prompt_sha256":
        return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    if name == "template":
        return value in ("chat", "plain")
    if name == "mask":  # the paper's mask has no prefix: key_start 0 and compact positions
        return value in MASKS and (value == "prefix" or (meta["key_start"], meta["positions"]) == ("0", "compact"))
    if name == "positions":  # original positions move the prefix: prefix_start must follow
        ok = value in POSITIONS and (meta["mask"] == "prefix" or value == "compact")
        start = int(meta["key_start"]) - int(meta["num_prompt_tokens"]) if value == "original" and meta["key_start"] != "0" else 0
        return ok and str(start) == meta["prefix_start"]
    if name == "num_prompt_tokens":
        if not value.isascii() or not value.isdigit() or value != str(int(value)) or int(value) > 1 << 24:
            return False
        P, F = int(value), int(meta["key_start"])
        start = F - P if F and meta["positions"] == "original" else 0
        return F <= P and str(start) == meta["prefix_start"]
    # everything else (format, version, ints tied to the tensors, shapes, dtype, digests) has one valid value
    return value == original


# --- mutations ----------------------------------------------------------------------------------------

def any_json(rng: random.Random, original: str) -> object:
    """A replacement for a header value: every JSON type, numbers written oddly, deep lists, long text, near misses."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 7, 10**6, 10**18, 2**64, -(2**31), 10**300])
    if kind == 1:
        return rng.choice([True, False, None, 1.5, -0.0, 1e308, float("nan"), float("inf"), {}, {"a": "1"}])
    if kind == 2:  # nested lists: a wrong depth, or deep enough to exhaust a recursive parser
        depth = rng.choice([1, 2, 3, 5, 50, 5000, 100_000])
        return Raw("[" * depth + "1" + "]" * depth)
    if kind == 3:
        depth = rng.choice([1, 3, 100, 3000, 20000])
        return "[" * depth + "1" + "]" * depth
    if kind == 4:  # numbers as text, written oddly
        return rng.choice(["0", "-1", "1", "2", "3", "+2", " 2", "2 ", "02", "2.0", "1e3", "0x2", "1_0", "\u0663",
                           "1000000", "1000000000", "99999999999999999999999999", "-0", "", "NaN", "inf"])
    if kind == 5:
        return rng.choice(["true", "false", "null", "[]", "{}", "[[1, 2, 2, 8]]", "[[1,2,2,8],[1,2,2,8]]", "[1, 2]",
                           "[[1, 2, 2, 8], [1, 2, 2, 8], [1, 2, 2, 8]]", "[[true, 2, 2, 8], [1, 2, 2, 8]]",
                           "[[1.0, 2, 2, 8], [1, 2, 2, 8]]", "[[1, 2, 2, 8, 1], [1, 2, 2, 8]]"])
    if kind == 6:
        return rng.choice(["paper", "prefix", "compact", "original", "chat", "plain", "auto", "float32", "bfloat16",
                           "float16", "float64", "int8", "true", "false", "1", "2", "gistcache-kv", "pt"])
    if kind == 7:
        return "".join(rng.choice("0123456789abcdef") for _ in range(64))
    if kind == 8:
        return "x" * rng.choice([0, 1, 65, 1001, 100_000])
    if kind == 9:  # one character changed
        if not original:
            return "a"
        i = rng.randrange(len(original))
        return original[:i] + chr((ord(original[i]) + rng.randrange(1, 60)) % 128 or 65) + original[i + 1:]
    if kind == 10:  # a number moved by a little or a lot
        if original.lstrip("-").isdigit():
            return str(int(original) + rng.choice([1, -1, 2, 500, -500, 10**6, 10**9]))
        return original + " "
    return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 40)))


class Mutation:
    def __init__(self, kind: str, data: bytes, sealed: bool = False, must_refuse: bool = True,
                 undetectable: bool = False, expect_meta: dict | None = None, detail: str = ""):
        self.kind, self.data, self.sealed, self.must_refuse = kind, data, sealed, must_refuse
        self.undetectable, self.expect_meta, self.detail = undetectable, expect_meta, detail


def mutate(rng: random.Random, base: dict) -> Mutation:
    data: bytes = base["bytes"]
    header, body = split(data)
    meta = header["__metadata__"]
    n = struct.unpack("<Q", data[:8])[0]
    names = sorted(k for k in header if k != "__metadata__")
    kind = rng.choice(["flip_header", "flip_header", "flip_tensor", "truncate", "extend", "field", "field", "field",
                       "delete", "add", "tensor_info", "replace", "swap", "sealed_field", "sealed_field",
                       "sealed_field", "sealed_replace", "sealed_tensor_info"])
    if kind == "flip_header":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(0, 8 + n)] ^= rng.randrange(1, 256)
        return Mutation(kind, bytes(out), must_refuse=False)  # may be the header's padding: then it must load the same
    if kind == "flip_tensor":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(8 + n, len(data))] ^= rng.randrange(1, 256)
        return Mutation(kind, bytes(out))
    if kind == "truncate":
        return Mutation(kind, data[:rng.randrange(0, len(data))])
    if kind == "extend":
        return Mutation(kind, data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))))
    if kind in ("field", "sealed_field"):  # resealing rewrites the two hashes: the sealed kind changes the others
        name = rng.choice(sorted(meta) if kind == "field" else sorted(set(meta) - {SEAL, "tensor_sha256"}))
        value = any_json(rng, meta[name])
        header = json.loads(json.dumps(header))
        header["__metadata__"][name] = value
        if kind == "field":
            return Mutation(kind, pack(header, body), detail=f"{name}={str(value)[:40]!r}")
        header = reseal(header, body)
        valid = field_is_valid(name, value, meta)
        return Mutation(kind, pack(header, body), sealed=True, must_refuse=not valid,
                        expect_meta=header["__metadata__"] if valid else None, detail=f"{name}={str(value)[:40]!r}")
    if kind in ("delete", "add"):  # a missing or unknown field is refused, resealed or not
        header = json.loads(json.dumps(header))
        name = rng.choice(sorted(meta)) if kind == "delete" else rng.choice(["note", "positions2", "Mask", "extra"])
        if kind == "delete":
            del header["__metadata__"][name]
        else:
            header["__metadata__"][name] = "x"
        sealed = rng.random() < 0.5
        return Mutation(kind, pack(reseal(header, body) if sealed else header, body), sealed=sealed, detail=name)
    if kind in ("tensor_info", "sealed_tensor_info"):
        header = json.loads(json.dumps(header))
        name, part = rng.choice(names), rng.choice(["dtype", "shape", "data_offsets", "name", "drop"])
        info = header[name]
        if part == "dtype":
            info["dtype"] = rng.choice(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "", 3, None])
        elif part == "shape":
            info["shape"] = rng.choice([[], [1], info["shape"][::-1], [1, 1, 1, 10**6], [1, 2, 2, 8, 1],
                                        [x * 2 for x in info["shape"]], "1,2,2,8", [True, 2, 2, 8], [-1, 2, 2, 8]])
        elif part == "data_offsets":
            a, b = info["data_offsets"]
            info["data_offsets"] = rng.choice([[a, b + 4], [a + 4, b], [b, a], [0, 0], [a, 2**64], [a], "0,8", None])
        elif part == "name":
            header[name.replace("layers.", "layer.") if rng.random() < 0.5 else name + "x"] = header.pop(name)
        else:
            del header[name]
        detail = f"{name} {part}={header.get(name, {}).get(part) if part in ('dtype', 'shape', 'data_offsets') else ''}"
        if kind == "sealed_tensor_info":
            return Mutation(kind, pack(reseal(header, body), body), sealed=True, detail=detail)
        return Mutation(kind, pack(header, body), detail=detail)
    if kind in ("replace", "sealed_replace"):
        name = rng.choice(names)
        shape = header[name]["shape"]
        fill = rng.choice(["nan", "inf", "-inf", "zeros", "other", "one_nan"])
        if fill == "other":
            value = base["other"][name]
        elif fill == "one_nan":
            value = base["tensors"][name].clone()
            value.view(-1)[rng.randrange(value.numel())] = float("nan")
        else:
            value = torch.full(shape, {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                                       "zeros": 0.0}[fill])
        body = with_tensor(header, body, name, value)
        if kind == "replace":
            return Mutation(f"replace_{fill}", pack(header, body))
        finite = fill in ("zeros", "other")
        return Mutation(f"sealed_replace_{fill}", pack(reseal(header, body), body), sealed=True,
                        must_refuse=not finite, undetectable=finite)
    # swap two tensors' bytes (same size): the tensor hash must catch it
    a, b = rng.sample(names, 2)
    ta, tb = tensors_of(header, body)[a].clone(), tensors_of(header, body)[b].clone()
    if ta.shape != tb.shape or torch.equal(ta, tb):
        return Mutation("swap", data[:-1])
    body = with_tensor(header, with_tensor(header, body, a, tb), b, ta)
    return Mutation("swap", pack(header, body))


# --- running them ----------------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def informative(meta: dict) -> dict:
    """Metadata but the version that wrote it and the seal over it (a loaded cache writes its own)."""
    return {k: v for k, v in meta.items() if k not in ("gistcache_version", SEAL)}


def same(a: GistCache, b: GistCache) -> bool:
    tensors_equal = all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip([*a.keys, *a.values],
                                                                                 [*b.keys, *b.values]))
    return a.num_layers == b.num_layers and tensors_equal and a.metadata() == b.metadata()


def run_fuzz(bases: list[dict], count: int, seed: int, folder: Path) -> tuple[Counter, list[str]]:
    """Apply `count` mutations; (counts by outcome, descriptions of the failures)."""
    rng = random.Random(seed)
    stats: Counter = Counter()
    failures: list[str] = []
    path = folder / "fuzzed.safetensors"
    use_alarm = hasattr(signal, "setitimer")
    previous = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
    try:
        for i in range(count):
            base = bases[i % len(bases)]
            m = mutate(rng, base)
            if m.data == base["bytes"]:  # the mutation happened to change nothing: it must load the same
                m = Mutation(m.kind, m.data, detail=m.detail)
            path.write_bytes(m.data)
            started = time.perf_counter()
            outcome, loaded, error = "accepted", None, None
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
                loaded = load_cache(path)
            except GistError as exc:
                outcome, error = "refused", exc
            except Hang:
                outcome = "hang"
            except Exception as exc:  # noqa: BLE001 - a crash is what the fuzzer looks for
                outcome, error = "crash", exc
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            if time.perf_counter() - started > TIME_LIMIT_S:
                outcome = "hang"
            stats[f"{'sealed' if m.sealed else 'raw'} {outcome}"] += 1
            problem = None
            if outcome in ("crash", "hang"):
                problem = f"{outcome}: {type(error).__name__}: {str(error)[:200]}"
            elif outcome == "refused" and "\n" in str(error):
                problem = f"a refusal of {str(error).count(chr(10)) + 1} lines"
            elif outcome == "accepted" and not m.sealed and not same(loaded, base["cache"]):
                problem = "accepted but different from the original"
            elif outcome == "accepted" and m.sealed:
                if m.must_refuse:
                    problem = "accepted a sealed file with a field out of type or bounds, or a non-finite value"
                elif not all(torch.isfinite(t).all() for t in [*loaded.keys, *loaded.values]):
                    problem = "accepted non-finite values"
                elif m.expect_meta is not None and informative(loaded.metadata()) != informative(m.expect_meta):
                    problem = "accepted a sealed file but reads back other metadata than it holds"
                elif m.undetectable:
                    stats["sealed accepted: finite values swapped (undetectable by a hash)"] += 1
                else:
                    stats["sealed accepted: a valid field changed (undetectable by a hash)"] += 1
            if problem is not None:
                stats[f"FAIL {problem.split(':')[0]}"] += 1
                failures.append(f"#{i} {m.kind} {m.detail} on {base['name']}: {problem}")
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return stats, failures


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[dict]:
    """Cache files of tiny models: paper mask float32 (N=2), prefix mask original positions (N=1), prefix bfloat16
    (N=3), each with another prompt's cache of the same shapes."""
    folder = tmp_path_factory.mktemp("fuzz-bases")
    out = []
    for name, mask, N, dtype in (("paper-f32", "paper", 2, torch.float32), ("prefix-original", "prefix-original", 1,
                                  torch.float32), ("prefix-bf16", "prefix", 3, torch.bfloat16)):
        model = make_prefix_model("llama", N, mask=mask)
        model.model.to(dtype)
        cache, other = compress(model, list(PROMPTS))
        path = save_cache(cache, folder / f"{name}.safetensors")
        data = path.read_bytes()
        header, body = split(data)
        out.append({"name": name, "cache": load_cache(path), "bytes": data, "tensors": tensors_of(header, body),
                    "other": other.tensors()})
    return out


def test_fuzz_cache_files(bases, tmp_path):
    """GISTCACHE_FUZZ mutations (default 300): 0 crashes, 0 hangs (2 s each), 0 multi-line refusals, 0 accepted
    files that differ among raw mutations, 0 sealed files accepted out of type or bounds or with NaN/inf."""
    started = time.perf_counter()
    stats, failures = run_fuzz(bases, COUNT, SEED, tmp_path)
    seconds = time.perf_counter() - started
    print(summary(stats, failures, COUNT, SEED, seconds))
    assert not failures, "\n".join(failures[:20])
    assert stats["raw refused"] > COUNT // 4 and stats["sealed refused"] > COUNT // 20  # the mutations bite


def summary(stats: Counter, failures: list[str], count: int, seed: int, seconds: float) -> str:
    crashes = sum(v for k, v in stats.items() if k.startswith("FAIL crash"))
    hangs = sum(v for k, v in stats.items() if k.startswith("FAIL hang"))
    different = stats["FAIL accepted but different from the original"]
    lines = [f"\ngist cache fuzz: {count} mutations, seed {seed}, {seconds:.1f} s ({1000 * seconds / count:.1f} ms each)",
             f"  crashes {crashes}, hangs {hangs}, accepted-but-different (raw) {different}, "
             f"failures of any kind {len(failures)}"]
    lines += [f"  {k}: {v}" for k, v in sorted(stats.items())]
    lines.append("  (raw accepted: loaded identical to the original, e.g. a flip in the header's padding)")
    lines += [f"  {f}" for f in failures[:20]]
    return "\n".join(lines)


def test_every_header_field_is_sealed(bases, tmp_path):
    """Each field of the header, changed to another plausible value without resealing, is refused."""
    base = bases[1]
    header, body = split(base["bytes"])
    assert set(header["__metadata__"]) == set(HEADER)
    for name in HEADER:
        changed = json.loads(json.dumps(header))
        value = changed["__metadata__"][name]
        changed["__metadata__"][name] = str(int(value) + 1) if value.lstrip("-").isdigit() else value[:-1] + (
            "0" if value[-1:] != "0" else "1")
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(pack(changed, body))
        with pytest.raises(GistError) as refused:
            load_cache(path)
        assert "\n" not in str(refused.value) and (name in str(refused.value) or "seal" in str(refused.value)), name
