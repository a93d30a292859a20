"""A Hugging Face id with no network fails at once, in one line.

Without a network, huggingface_hub retries every request five times with backoff (22 lines of
warnings over 45 s) before transformers gives up. When a verb names a model that is not a local
folder, file or alias, and the hub's host cannot be reached within a few seconds, the verb runs in
offline mode (`HF_HUB_OFFLINE`): a model already in the local Hugging Face cache still loads, any
other fails at once. The setting is scoped to the call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def model_specs(kwargs: dict[str, Any]) -> list[str]:
    """The base models a verb's arguments name: `--model`, and the model of each `--run` folder."""
    specs = [kwargs["model"]] if isinstance(kwargs.get("model"), str) else []
    runs = kwargs.get("run")
    for run in [runs] if isinstance(runs, str) else (runs or []):
        try:
            model = json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))["gist"]["model"]
        except Exception:  # not a readable run: the verb itself says so, in one line
            continue
        if isinstance(model, str):
            specs.append(model)
    return specs


def is_hub_id(spec: str) -> bool:
    """True for a name that only the Hugging Face hub can resolve (not an alias, a local path or a .gguf)."""
    from gistcache.model import MODEL_ALIASES

    if spec in MODEL_ALIASES or spec.endswith(".gguf") or spec.startswith(("/", ".", "~")):
        return False
    return not Path(spec).expanduser().exists()


def offline_already() -> bool:
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and constants.HF_HUB_OFFLINE) or offline_in_environment()


def offline_in_environment() -> bool:
    """huggingface_hub's own reading of the environment, done once when it is imported."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds (name lookup included)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    if host is None:
        return True  # an endpoint we cannot read: let huggingface_hub decide
    result = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def hub_offline_unless_reachable(specs: list[str]) -> Iterator[bool]:
    """Run the block in Hugging Face offline mode when a spec is a hub id and the hub cannot be reached.

    Yields whether offline mode was switched on. Nothing changes when no spec is a hub id, when
    offline mode is already set, or behind a proxy (which the probe cannot judge).
    """
    if (not any(is_hub_id(s) for s in specs) or offline_already()
            or any(os.environ.get(name) for name in PROXY_VARIABLES) or hub_reachable()):
        yield False
        return
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    constants = sys.modules.get("huggingface_hub.constants")
    saved_constant = constants.HF_HUB_OFFLINE if constants is not None else None
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # already imported: its constant is what it reads
    try:
        yield True
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_constant if saved_constant is not None else offline_in_environment()
