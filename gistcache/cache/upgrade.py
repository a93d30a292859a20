"""Version 1 cache files -> version 2: their keys moved in place to the position-free layout.

A version 1 file holds the gist keys at the prompt's own positions P..P+N-1. `upgrade_caches`
turns them to F..F+N-1 (F: the run's visible fixed prefix, 0 under the paper's mask) with
`gistcache.model.rotary.move_keys`, and rewrites each file atomically with version 2 metadata. It needs
the run that made the files, but not its weights: the identity comes from the run folder (its
recorded base fingerprint, its run fingerprint, template, mask and N), the rotary frequencies from
the base model's config.

Version 1 files were written by models that `load_run` built in float32 and then cast, rotary
frequencies included, to the cache's dtype; their keys are turned back with those frequencies and
forward with the float32 ones that a model loaded in any dtype uses now. Every file is read and
checked before the first one is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gistcache.cache import FORMAT_VERSION, GistCache, read_cache_file, save_cache
from gistcache.cache.identity import ModelIdentity, check_identity
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.model import load_base_config, load_run_tokenizer
from gistcache.model.rotary import config_inv_freq, move_keys
from gistcache.prompts import resolve_template, visible_prefix_ids
from gistcache.run import read_run_config, resolve_run_dir, run_fingerprint


@dataclass
class Upgrade:
    """What `upgrade_caches` did to one file."""

    path: Path
    upgraded: bool  # False: it was already version 2 and was left as it was
    moved_from: int  # position of the first gist key before
    moved_to: int  # and after (key_start)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "upgraded": self.upgraded, "moved_from": self.moved_from,
                "moved_to": self.moved_to}


def upgrade_caches(paths: list[str | Path], run_dir: str | Path | None = None) -> list[Upgrade]:
    """Rewrite version 1 cache files of the run in `run_dir` (None: the shipped run) as version 2, in place."""
    if not paths:
        raise GistError("give at least one cache file to upgrade: gist cache upgrade FILE... --run RUN")
    run_dir = resolve_run_dir(run_dir)
    data = read_run_config(run_dir)
    gist = GistConfig.from_dict(data["gist"])
    tokenizer = load_run_tokenizer(run_dir)
    template = resolve_template(tokenizer, gist.template)
    identity = ModelIdentity(base_fingerprint=data["base_fingerprint"], run_fingerprint=run_fingerprint(run_dir),
                             template=template, mask=gist.mask, positions=gist.positions,
                             gist_every=gist.gist_every, raw_tail=gist.raw_tail)
    key_start = len(visible_prefix_ids(tokenizer, template, gist.mask))
    inv_freq = config_inv_freq(load_base_config(gist.model))  # refuses rotary scaling that is not shift-invariant
    plans: list[tuple[Upgrade, GistCache | None]] = []
    for path in map(Path, paths):
        cache, version = read_cache_file(path, versions=(1, FORMAT_VERSION))
        if version == 1:
            cache = replace(cache, positions=gist.positions)  # version 1 files predate the position layouts
        check_identity(cache, identity, gist.num_gist_tokens, source=f"cache {path}")
        if version == FORMAT_VERSION:
            plans.append((Upgrade(path, False, cache.key_start, cache.key_start), None))
            continue
        P = cache.num_prompt_tokens
        made_with = inv_freq.to(cache.dtype).float()  # the frequencies the version 1 model turned its keys with
        keys = [move_keys(k, made_with, P, inv_freq, key_start) for k in cache.keys]
        plans.append((Upgrade(path, True, P, key_start), replace(cache, keys=keys, key_start=key_start)))
    for upgrade, cache in plans:
        if cache is not None:
            save_cache(cache, upgrade.path)
    return [upgrade for upgrade, _ in plans]
