"""gistcache: compress long prompts into the KV cache of a few trained gist tokens.

Mu et al., "Learning to Compress Prompts with Gist Tokens" (NeurIPS 2023).
"""

from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.masks import gist_attention_mask, make_gist_mask, make_position_ids
from gistcache.model import GistModel, load_base_model, load_tokenizer
from gistcache.run import load_run

__all__ = [
    "GistConfig",
    "GistError",
    "GistModel",
    "gist_attention_mask",
    "load_base_model",
    "load_run",
    "load_tokenizer",
    "make_gist_mask",
    "make_position_ids",
]
__version__ = "0.1.0"
