"""Hugging Face offline mode around loading and saving a run: only the run's own folder is read."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face offline mode for the block (`HF_HUB_OFFLINE`), restored after it: loading or saving a run
    reads only its own folder, and peft would otherwise look the adapter's base model (a short name such as
    smollm2-135m) up on the hub."""
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    constants = sys.modules.get("huggingface_hub.constants")  # imported by transformers before any load
    saved_constant = constants.HF_HUB_OFFLINE if constants is not None else None
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants = sys.modules.get("huggingface_hub.constants")  # perhaps first imported inside the block
        if constants is not None:
            constants.HF_HUB_OFFLINE = (saved_constant if saved_constant is not None else
                                        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"))
