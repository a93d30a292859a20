"""gistcache: compress long prompts into the KV cache of a few trained gist tokens.

Mu et al., "Learning to Compress Prompts with Gist Tokens" (NeurIPS 2023).
"""

from gistcache._version import __version__
from gistcache.cache import GistCache, load_cache, save_cache
from gistcache.cache.identity import check_cache
from gistcache.cache.upgrade import upgrade_caches
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import (GREEDY, GenerateConfig, GenerationBatch, build_batch, generate,
                                            generate_ids, generate_masked, generate_masked_ids)
from gistcache.masks import gist_attention_mask, make_gist_mask, make_position_ids
from gistcache.model import GistModel, load_base_model, load_run, load_tokenizer
from gistcache.model.rotary import check_shift_invariant, move_keys
from gistcache.store import CacheStore, cache_key, compress_cached

__all__ = [
    "GREEDY",
    "CacheStore",
    "GenerateConfig",
    "GenerationBatch",
    "GistCache",
    "GistConfig",
    "GistError",
    "GistModel",
    "build_batch",
    "cache_key",
    "check_cache",
    "check_shift_invariant",
    "compress",
    "compress_cached",
    "generate",
    "generate_ids",
    "generate_masked",
    "generate_masked_ids",
    "gist_attention_mask",
    "load_base_model",
    "load_cache",
    "load_run",
    "load_tokenizer",
    "make_gist_mask",
    "make_position_ids",
    "move_keys",
    "save_cache",
    "upgrade_caches",
]
