"""Two processes under `accelerate launch` train the run one process trains at the same global batch.

accelerate's `--cpu` starts a single process unless MPI is installed, so the two CPU processes are
started by its torchrun launcher (`--multi_gpu`) with ACCELERATE_USE_CPU=true (gloo). One process at
batch 4 with --grad-accum 2 and two processes at batch 4 take each optimizer step from the same 8
rows (process r gets batches r, r + 2, ... of the epoch's order) and average the same two batch
means, so the curves and weights agree; here they are bit-identical, and the test allows 1e-5
relative (a machine whose kernels depend on the thread count may differ in the last bits). --tune
full: LoRA dropout would draw other masks in each process than one process does in a row. All three
runs are subprocesses on the CPU, so a machine with a GPU runs the same comparison.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

FLAGS = ["--preset", "smoke", "--max-examples", "24", "--eval-examples", "8", "--batch-size", "4", "--max-steps", "6",
         "--lr", "1e-2", "--num-gist", "2", "--tune", "full", "--save-every", "3", "--json"]


def launch(processes, out, model_dir, *extra):
    """`gist train` in CPU processes: one (`python -m`), or two under `accelerate launch`; return its metrics.json."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m"]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m"]
    cmd += ["gistcache.cli.main", "train", "--out", str(out), "--model", str(model_dir), *FLAGS, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def assert_close_runs(a, b, ma, mb):
    for key in ("loss_curve", "grad_norm_curve"):
        assert [row[0] for row in ma[key]] == [row[0] for row in mb[key]]
        for ra, rb in zip(ma[key], mb[key]):
            assert ra[1:] == pytest.approx(rb[1:], rel=1e-5, abs=1e-5), key
    assert ma["heldout_loss"] == pytest.approx(mb["heldout_loss"], rel=1e-5)
    assert ma["tokens"] == mb["tokens"]
    for name in ("gist_embedding.safetensors", "model.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_and_resume(tmp_path, tiny_model_dir):
    """Two processes match one process with --grad-accum 2 (loss curve, gradient norms, every weight); the
    two-process run killed after its step-3 checkpoint and resumed by two processes ends where it ended."""
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = launch(1, one, tiny_model_dir, "--grad-accum", "2")
    m2 = launch(2, two, tiny_model_dir)
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert_close_runs(one, two, m1, m2)
    rng = load_file(two / "checkpoints" / "step-3" / "rng.safetensors")
    assert rng["torch_cpu"].shape[0] == 2  # each process's generators

    resumed = tmp_path / "resumed"  # what a kill right after the step-3 checkpoint leaves
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    m3 = launch(2, resumed, tiny_model_dir, "--resume")
    assert "resumed from" in (resumed / "train.log").read_text()
    assert_close_runs(two, resumed, m2, m3)
