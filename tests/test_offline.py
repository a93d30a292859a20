"""No network when a run loads or saves (issue 25): an adapter over a base named by a short name, and the shipped
run, with the network unreachable and Hugging Face's offline mode off."""

import errno
import os
import socket
import warnings

import pytest

from gistcache.inference.compression import compress
from gistcache.model import GistModel, attach_adapter, load_base_model, load_tokenizer, save_run_weights


@pytest.fixture
def no_network(monkeypatch):
    """The network unreachable and Hugging Face's offline mode off (as on a user's machine): every attempt to
    connect is recorded and refused."""
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


def test_an_adapter_named_by_a_short_name_loads_and_saves_offline(lora_runs, tiny_model_dir, tmp_path, no_network,
                                                                   caplog, capfd):
    """A run's adapter over a base named by a short name (the shipped run's `smollm2-135m`): attaching it and
    saving it again look nothing up on the hub: no connection tried, no "Unable to fetch" warning, and the
    offline setting is put back."""
    import huggingface_hub.constants

    base = load_base_model(str(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_adapter(base, lora_runs["base"], "smollm2-135m")
        gm = GistModel(model, load_tokenizer(str(tiny_model_dir)), 1, mask="prefix", decoder="base")
        save_run_weights(gm, tmp_path / "weights", "lora", "smollm2-135m")
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    out = capfd.readouterr()
    assert no_network == []
    assert not [s for s in said if "Unable to fetch" in s or "config.json" in s], said
    assert "Unable to fetch" not in out.err + out.out
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert (tmp_path / "weights" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_the_shipped_run_loads_and_saves_offline(tmp_path, no_network, caplog, capfd):
    """The shipped run, loaded unmerged and saved again with the network unreachable: no connection tried and no
    warning about a remote file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GistModel.from_pretrained(merge=False)
        model.save_pretrained(tmp_path / "copy")
        compress(model, "Name the capital city of the given country.")
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    out = capfd.readouterr()
    assert no_network == []
    assert not [s for s in said if "Unable to fetch" in s], said
    assert "Unable to fetch" not in out.err + out.out
