"""The set-up of the load run (eval/serve_load/): the store's caches (a tampered entry, another run's cache, a file
named by path) and gist generate's reference answers, as `Fixtures`."""

from __future__ import annotations

import shutil
from pathlib import Path

from .checks import MISSING, file_sha
from .config import FOREIGN, INPUTS, INSTRUCTIONS, OTHER, TAMPERED, Fixtures, LoadConfig


def another_run(into: Path) -> Path:
    """A second run: the shipped run's files with its trained gist embedding moved a little (what another training
    run gives): its run fingerprint, and so its caches, differ."""
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from gistcache.run import GIST_FILE, resolve_run_dir

    src = resolve_run_dir(None)
    shutil.copytree(src, into, ignore=shutil.ignore_patterns("metrics.json", "README.md"))
    tensors = load_file(src / GIST_FILE)
    with safe_open(str(src / GIST_FILE), "pt") as f:
        meta = f.metadata()
    save_file({k: v + 0.01 * torch.ones_like(v) for k, v in tensors.items()}, str(into / GIST_FILE), metadata=meta)
    return into


def make_fixtures(model, store_dir: Path, work: Path, config: LoadConfig, progress) -> Fixtures:
    from gistcache.cache import load_cache
    from gistcache.errors import GistError
    from gistcache.inference.generation import GREEDY, generate
    from gistcache.model import GistModel
    from gistcache.store import CacheStore, compress_cached

    store = CacheStore(store_dir)
    pool = INSTRUCTIONS[:config.instructions]
    results = compress_cached(model, [*pool, OTHER, TAMPERED], store)
    keys = [r.key for r in results[:len(pool)]]
    other, tampered = results[-2], results[-1]
    # a tampered entry: bytes flipped in the tensor data (the end of the file) of a store entry
    path = store.path_for(tampered.key)
    data = bytearray(path.read_bytes())
    for j in range(len(data) - 24, len(data) - 16):
        data[j] ^= 0x5A
    path.write_bytes(bytes(data))
    try:
        load_cache(path)
        raise GistError("flipping bytes in a cache file went unnoticed by load_cache")
    except GistError as exc:
        if "unnoticed" in str(exc):
            raise
    progress("another run: the shipped run with its gist embedding moved, compressing one instruction")
    foreign_model = GistModel.from_pretrained(another_run(work / "another-run"))
    foreign = compress_cached(foreign_model, FOREIGN, store)[0]
    del foreign_model
    if foreign.key in keys:
        raise GistError("the other run's cache has the key of one of the shipped run's")
    file_path = work / "named-by-path.safetensors"
    shutil.copyfile(store.path_for(keys[0]), file_path)

    pairs = [(a, b) for b in range(len(INPUTS)) for a in range(config.instructions)][:config.sample]
    progress(f"gist generate (greedy, {config.max_tokens} new tokens) on {len(pairs)} (instruction, input) pairs")
    references = {}
    for a in sorted({a for a, _ in pairs}):
        texts = [INPUTS[b] for aa, b in pairs if aa == a]
        outs = generate(model, results[a].cache, texts, max_new_tokens=config.max_tokens, **GREEDY)
        references.update({(a, INPUTS.index(t)): o for t, o in zip(texts, outs)})
    # the replace phase asks the pool's first instruction for its first two inputs
    rin = [0, 1]
    for b in rin:
        if (0, b) not in references:
            references[(0, b)] = generate(model, results[0].cache, [INPUTS[b]], max_new_tokens=config.max_tokens,
                                          **GREEDY)[0]
    other_refs = dict(zip(rin, generate(model, other.cache, [INPUTS[b] for b in rin],
                                        max_new_tokens=config.max_tokens, **GREEDY)))
    expected = {"unknown_key": "no cache in", "tampered": "tensor bytes do not match", "foreign_run": "another run",
                "file_path": "store keys only", "too_long": "maximum context length", "malformed_json": "JSON",
                "missing_field": " or ".join(MISSING)}
    protected = {tampered.key: file_sha(store.path_for(tampered.key)),
                 foreign.key: file_sha(store.path_for(foreign.key))}
    return Fixtures(keys=keys, tampered_key=tampered.key, foreign_key=foreign.key, other_key=other.key,
                    file_path=str(file_path), references=references, other_references=other_refs,
                    expected=expected, protected=protected)
