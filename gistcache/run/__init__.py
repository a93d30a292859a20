"""A run folder: what training leaves behind and every later step reads.

    RUN/config.json                  {"gist": GistConfig, "train": TrainConfig, "base_fingerprint": ...,
                                      "base_fingerprints": {"bfloat16": ..., "float16": ...}}
    RUN/gist_embedding.safetensors   the trained gist embedding (1, H)
    RUN/adapter_model.safetensors    LoRA adapter (+ adapter_config.json), for --tune lora
    RUN/model.safetensors            full weights, for --tune full only
    RUN/tokenizer/                   the tokenizer with <GIST>
    RUN/metrics.json, RUN/train.log, RUN/README.md (the model card), RUN/checkpoints/step-N/

`load_gist_model` (`GistModel.from_pretrained`) and `save_gist_model` (`GistModel.save_pretrained`)
are the life cycle; `load_run` is the older name of the first. The base model is loaded once, in
the dtype asked for, and checked by its fingerprint (see `check_base_fingerprint`). Tensors are
read only from safetensors; nothing is ever unpickled.
"""

from __future__ import annotations

from gistcache.run.config import check_run_config_types, read_adapter_config, read_run_config
from gistcache.run.fingerprint import ADAPTER_FIELDS_IGNORED, run_fingerprint
from gistcache.run.layout import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, CHECKPOINTS_DIR, CONFIG_FILE, DEFAULT_RUN,
                                  FULL_FILE, GIST_FILE, LOG_FILE, METRICS_FILE, MODEL_CARD_FILE, PRETRAINED_DIR,
                                  TOKENIZER_DIR, WEIGHT_FILES, is_run_dir, remove_run_outputs, resolve_run_dir)
from gistcache.run.load import (attach_adapter, check_base_fingerprint, dtype_fingerprints, load_gist_model, load_run,
                                load_run_tokenizer, load_untouched_base, reading_run_file)
from gistcache.run.offline import hub_offline
from gistcache.run.save import save_gist_model, save_run, save_run_weights, staged_run

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FIELDS_IGNORED", "ADAPTER_FILE", "CHECKPOINTS_DIR", "CONFIG_FILE",
           "DEFAULT_RUN", "FULL_FILE", "GIST_FILE", "LOG_FILE", "METRICS_FILE", "MODEL_CARD_FILE", "PRETRAINED_DIR",
           "TOKENIZER_DIR", "WEIGHT_FILES", "attach_adapter", "check_base_fingerprint", "check_run_config_types",
           "dtype_fingerprints", "hub_offline", "is_run_dir", "load_gist_model", "load_run", "load_run_tokenizer",
           "load_untouched_base", "read_adapter_config", "read_run_config", "reading_run_file", "remove_run_outputs",
           "resolve_run_dir", "run_fingerprint", "save_gist_model", "save_run", "save_run_weights", "staged_run"]
