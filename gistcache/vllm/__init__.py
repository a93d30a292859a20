"""Serving gist caches from vLLM (issue 14): a KV connector, request building and `gist serve`.

`gistcache.vllm.requests` (no vLLM needed) resolves caches and builds requests;
`gistcache.vllm.connector` is the KV connector (imports vLLM); `gistcache.vllm.server` runs
vLLM's OpenAI server with it. Importing `gistcache` or this package never imports vLLM.
"""

from gistcache.vllm.requests import CONNECTOR, CONNECTOR_MODULE, PARAM, GistRequests, kv_transfer_config

__all__ = ["CONNECTOR", "CONNECTOR_MODULE", "PARAM", "GistRequests", "kv_transfer_config", "vllm_available"]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
