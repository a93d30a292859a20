"""gistcache: compress long prompts into the KV cache of a few trained gist tokens.

Mu et al., "Learning to Compress Prompts with Gist Tokens" (NeurIPS 2023).
"""

from gistcache._version import __version__
from gistcache.cache import GistCache, load_cache, save_cache
from gistcache.compression import compress
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.generation import GenerateConfig, generate, generate_masked
from gistcache.identity import check_cache
from gistcache.masks import gist_attention_mask, make_gist_mask, make_position_ids
from gistcache.model import GistModel, load_base_model, load_tokenizer
from gistcache.run import load_run
from gistcache.store import CacheStore, cache_key, compress_cached

__all__ = [
    "CacheStore",
    "GenerateConfig",
    "GistCache",
    "GistConfig",
    "GistError",
    "GistModel",
    "cache_key",
    "check_cache",
    "compress",
    "compress_cached",
    "generate",
    "generate_masked",
    "gist_attention_mask",
    "load_base_model",
    "load_cache",
    "load_run",
    "load_tokenizer",
    "make_gist_mask",
    "make_position_ids",
    "save_cache",
]
