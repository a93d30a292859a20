"""Handing a run to a serving engine: `export` writes it as a Hugging Face folder with the gist embedding, the
fixed-prefix keys/values and the fingerprints beside it. The vLLM connector that reads such a folder stays at
`gistcache.vllm` (vLLM configs name it by that dotted path)."""
