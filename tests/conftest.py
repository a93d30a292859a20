import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import tiny  # noqa: E402


@pytest.fixture(params=sorted(tiny.ARCHS))
def arch(request):
    return request.param


@pytest.fixture
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved as a model folder, for end-to-end training and CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return tiny.save_model_folder(path, "llama")
