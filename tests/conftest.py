"""The fixtures the test files share: the tiny model folder, the tiny in-memory GistModel and tiny run folders,
each built once a session (tests/tiny.py builds them) and read by many files, so no test may change them: each is
checked at the end of the session, and a test that edits a run asks `make_tiny_run` for a folder of its own."""

import hashlib
import json
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
from tiny import folder_digest  # noqa: E402


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of `model` (names, dtypes, shapes, bytes) and its train/eval mode."""
    h = hashlib.sha256(str(model.training).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(params=sorted(tiny.ARCHS))
def arch(request):
    return request.param


@pytest.fixture
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama (seed 0) saved as a model folder, for training, CLI and run tests; the session's, read-only."""
    path = tiny.save_model_folder(tmp_path_factory.mktemp("tiny-llama"), "llama")
    before = folder_digest(path)
    yield path
    assert folder_digest(path) == before, f"a test wrote into the session's tiny model folder {path}"


@pytest.fixture(scope="session")
def gm():
    """A tiny Llama GistModel in memory: 2 gist tokens, the paper mask, its gist embedding moved off the mean
    (`tiny.make_gist_model`). The session's: tests compress and generate with it, never change it."""
    model = tiny.make_gist_model("llama", 2)
    before = model_digest(model)
    yield model
    assert model_digest(model) == before, "a test changed the session's GistModel `gm`: give it a model of its own"


@pytest.fixture(scope="session")
def make_tiny_run(tmp_path_factory, tiny_model_dir):
    """make_tiny_run(num_gist, **fields) -> the folder of a tiny run: `tiny.save_run_folder`'s arguments (gist
    fields, shift, lora_b, dtype_prints), on the `tiny_model_dir` base (base_seed=1: a base of other weights).

    Without `path`, the session's folder of that run, built the first time it is asked for and shared by every
    test asking for the same run: read it, never write into it (checked at the end of the session). With
    path=FOLDER, a new run written there, the test's own to edit."""
    bases = {0: tiny_model_dir}  # tiny_model_dir checks itself
    shared: dict[str, tuple[Path, dict]] = {}

    def make(num_gist: int = 1, *, path=None, base_seed: int = 0, shift: float = 0.0, lora_b: float = 0.0,
             dtype_prints: bool = False, **gist_fields) -> Path:
        if base_seed not in bases:
            folder = tmp_path_factory.mktemp(f"tiny-llama-seed{base_seed}")
            bases[base_seed] = tiny.save_model_folder(folder, "llama", seed=base_seed)
            shared[f"base {base_seed}"] = (folder, folder_digest(folder))
        build = dict(shift=shift, lora_b=lora_b, dtype_prints=dtype_prints, **gist_fields)
        if path is not None:
            tiny.save_run_folder(bases[base_seed], path, num_gist, **build)
            return Path(path)
        # one folder per run written: the same GistConfig (mask="prefix" is the default's) and the same weights
        config = tiny.run_config(bases[base_seed], num_gist, **gist_fields).to_dict()
        key = json.dumps([config, shift, lora_b, dtype_prints], sort_keys=True)
        if key not in shared:
            run = tmp_path_factory.mktemp("tiny-run") / "run"
            tiny.save_run_folder(bases[base_seed], run, num_gist, **build)
            shared[key] = (run, folder_digest(run))
        return shared[key][0]

    yield make
    changed = [str(folder) for folder, before in shared.values() if folder_digest(folder) != before]
    assert not changed, f"tests wrote into the session's shared tiny runs: {changed}"


@pytest.fixture(scope="session")
def lora_runs(tmp_path_factory, tiny_model_dir):
    """{"base": run, "tuned": run}: tiny LoRA runs of both decoders whose adapter moves the logits a lot
    (`tiny.save_lora_run`); the session's, read-only."""
    root = tmp_path_factory.mktemp("decoders")
    runs = {decoder: tiny.save_lora_run(tiny_model_dir, root / f"run-{decoder}", decoder)
            for decoder in ("base", "tuned")}
    before = folder_digest(root)
    yield runs
    assert folder_digest(root) == before, f"a test wrote into the session's LoRA runs {root}"
