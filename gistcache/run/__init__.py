"""A run folder: what training leaves behind and every later step reads.

    RUN/config.json                  {"gist": GistConfig, "train": TrainConfig, "base_fingerprint": ...,
                                      "base_fingerprints": {"bfloat16": ..., "float16": ...}}
    RUN/gist_embedding.safetensors   the trained gist embedding (1, H)
    RUN/adapter_model.safetensors    LoRA adapter (+ adapter_config.json), for --tune lora
    RUN/model.safetensors            full weights, for --tune full only
    RUN/tokenizer/                   the tokenizer with <GIST>
    RUN/metrics.json, RUN/train.log, RUN/README.md (the model card), RUN/checkpoints/step-N/

This package is the folder itself: its file names and the shipped runs (layout.py), config.json and
adapter_config.json read and checked (config.py), the run fingerprint a cache records (fingerprint.py),
Hugging Face offline mode while a run is read or written (offline.py), and its files read and
written safely (files.py: a damaged file named, a run written all or nothing). It never imports
gistcache.model: a run folder becomes a model in gistcache.model (`GistModel.from_pretrained`,
`save_pretrained`, `load_run`, `save_run`), which reads and writes it with what is here. The base
model is loaded once, in the dtype asked for, and checked by its fingerprint. Tensors are read only
from safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

from gistcache.run.config import check_run_config_types, read_adapter_config, read_run_config
from gistcache.run.files import reading_run_file, staged_run
from gistcache.run.fingerprint import ADAPTER_FIELDS_IGNORED, run_fingerprint
from gistcache.run.layout import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHECKPOINTS_DIR, CONFIG_FILE, DEFAULT_RUN,
                                  FULL_FILE, GIST_FILE, LOG_FILE, LONG_RUN, METRICS_FILE, MODEL_CARD_FILE,
                                  PRETRAINED_DIR, TOKENIZER_DIR, WEIGHT_FILES, is_run_dir, remove_run_outputs,
                                  resolve_run_dir)
from gistcache.run.offline import hub_offline

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FIELDS_IGNORED", "ADAPTER_FILE", "CHECKPOINTS_DIR", "CONFIG_FILE",
           "DEFAULT_RUN", "FULL_FILE", "GIST_FILE", "LOG_FILE", "LONG_RUN", "METRICS_FILE", "MODEL_CARD_FILE",
           "PRETRAINED_DIR", "TOKENIZER_DIR", "WEIGHT_FILES", "check_run_config_types", "hub_offline", "is_run_dir",
           "read_adapter_config", "read_run_config", "reading_run_file", "remove_run_outputs", "resolve_run_dir",
           "run_fingerprint", "staged_run"]
