"""--resume: a run killed at any moment ends bit-identical to the uninterrupted run, in every tuning mode;
damaged checkpoints are skipped, temporary folders cleaned, and a command line for another run refused
in one line with nothing on disk changed. `--overwrite` replaces only a complete run."""

import itertools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache import _io
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.train import checkpoint, loop
from gistcache.train.config import TrainConfig

# 24 rows in batches of 4: 6 steps an epoch, so 8 steps start a second epoch (a new order), and the
# checkpoints every 3 steps land mid-epoch (step 3) and on the epoch's last batch (step 6)
SETTINGS = dict(preset="smoke", max_examples=24, eval_examples=8, batch_size=4, max_steps=8, lr=1e-2, num_gist_tokens=2)
WEIGHTS = {"gist": ["gist_embedding.safetensors"], "lora": ["gist_embedding.safetensors", "adapter_model.safetensors"],
           "full": ["gist_embedding.safetensors", "model.safetensors"]}


class Killed(BaseException):
    """What SIGKILL does to a run: it stops at once, and no `except Exception` or cleanup sees it."""


def make_config(out, model_dir, tune, **kw) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, "out": str(out), "model": str(model_dir), "tune": tune, **kw})


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run of each tuning mode (without checkpoints: saving one must change nothing)."""
    runs = {}

    def get(tune):
        if tune not in runs:
            out = tmp_path_factory.mktemp(f"reference-{tune}") / "run"
            runs[tune] = (out, loop.train(make_config(out, tiny_model_dir, tune), show_progress=False))
        return runs[tune]

    return get


def kill_at_batch(m, n):
    """The n-th training batch (counted from 1) never finishes."""
    real, calls = loop.training_loss, itertools.count(1)

    def dying(*args, **kwargs):
        if next(calls) == n:
            raise Killed
        return real(*args, **kwargs)

    m.setattr(loop, "training_loss", dying)


def kill_in_checkpoint(m, step):
    """The kill lands while step-N's optimizer state is half written: its temporary folder stays behind."""
    real = checkpoint.save_file

    def dying(tensors, path, *args, **kwargs):
        if Path(path).name == checkpoint.OPTIMIZER_FILE and Path(path).parent.name.startswith(f".step-{step}.tmp-"):
            Path(path).write_bytes(b"\0" * 64)
            raise Killed
        return real(tensors, path, *args, **kwargs)

    m.setattr(checkpoint, "save_file", dying)
    m.setattr(_io, "_remove", lambda path: None)  # a killed process runs no `finally`


def assert_same_run(a: Path, b: Path, ma: dict, mb: dict, tune: str) -> None:
    """Every trainable tensor equal bit for bit, the same loss and gradient-norm curves, the same held-out loss."""
    for name in WEIGHTS[tune]:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key, (ta[key] - tb[key]).abs().max())
    for key in ("loss_curve", "grad_norm_curve", "heldout_loss", "heldout_loss_before", "tokens", "steps"):
        assert ma[key] == mb[key], key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("tune, kill", [("gist", "batch 5"), ("lora", "batch 8"), ("full", "checkpoint 6")])
def test_killed_run_resumes_bit_identical(tmp_path, tiny_model_dir, reference, monkeypatch, tune, kill):
    """Killed mid-step (gist: in step 5, after the step-3 checkpoint; lora: in step 8, the second epoch) or
    while writing the step-6 checkpoint (full), `--resume` ends exactly where the uninterrupted run ends."""
    ref_out, ref_metrics = reference(tune)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        what, n = kill.split()
        (kill_at_batch if what == "batch" else kill_in_checkpoint)(m, int(n))
        with pytest.raises(Killed):
            loop.train(make_config(out, tiny_model_dir, tune, save_every=3), show_progress=False)
    assert not (out / "config.json").exists()
    temps = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    if what == "checkpoint":
        assert len(temps) == 1 and temps[0].startswith(".step-6.tmp-"), temps
    else:
        assert temps == []
    metrics = loop.train(make_config(out, tiny_model_dir, tune, save_every=3, resume=True), show_progress=False)
    assert_same_run(ref_out, out, ref_metrics, metrics, tune)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]  # the stale temp is gone
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / ('step-6' if n == '8' else 'step-3')}" in log
    if tune == "lora":  # the dropout that makes the random generator's state matter is on
        assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] > 0


def test_resume_without_the_generators_departs(tmp_path, tiny_model_dir, reference, monkeypatch):
    """Teeth: with LoRA dropout, a resume that does not restore the random generators ends elsewhere."""
    ref_out, ref_metrics = reference("lora")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_at_batch(m, 5)
        with pytest.raises(Killed):
            loop.train(make_config(out, tiny_model_dir, "lora", save_every=3), show_progress=False)
    monkeypatch.setattr(loop, "set_rng_state", lambda state: None)
    metrics = loop.train(make_config(out, tiny_model_dir, "lora", save_every=3, resume=True), show_progress=False)
    assert metrics["loss_curve"][:3] == ref_metrics["loss_curve"][:3]
    assert metrics["loss_curve"][3:] != ref_metrics["loss_curve"][3:]
    a, b = load_file(ref_out / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_damaged_checkpoint_falls_back_to_the_newest_intact(tmp_path, tiny_model_dir, reference):
    """A damaged latest checkpoint is skipped (named in train.log); none intact: one line, nothing changed."""
    ref_out, ref_metrics = reference("gist")
    out = tmp_path / "run"
    loop.train(make_config(out, tiny_model_dir, "gist", save_every=3), show_progress=False)
    damaged = out / "checkpoints" / "step-6" / "gist_embedding.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    (out / ".metrics.json.tmp-4242").write_text("{")  # what a kill inside atomic_write_text leaves
    metrics = loop.train(make_config(out, tiny_model_dir, "gist", save_every=3, resume=True), show_progress=False)
    assert_same_run(ref_out, out, ref_metrics, metrics, "gist")
    log = (out / "train.log").read_text()
    assert "skipped damaged checkpoint step-6 (gist_embedding.safetensors does not match its hash)" in log
    assert f"resumed from {out / 'checkpoints' / 'step-3'}" in log
    assert not (out / ".metrics.json.tmp-4242").exists() and ".metrics.json.tmp-4242" in log
    for step in (3, 6):
        (out / "checkpoints" / f"step-{step}" / "optimizer.safetensors").write_bytes(b"\0")
    (out / "checkpoints" / "step-9").mkdir()
    (out / "checkpoints" / "step-9" / "state.json").write_text("{not json")
    before = snapshot(out)
    with pytest.raises(GistError) as info:
        loop.train(make_config(out, tiny_model_dir, "gist", save_every=3, resume=True), show_progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--resume: no intact checkpoint in")
    assert "step-9 (state.json unreadable: JSONDecodeError)" in message
    assert "step-3 (optimizer.safetensors does not match its hash)" in message
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A gist run with a step-3 checkpoint, on a data file and a base model folder of its own (a test rewrites its
    weights, so not the session's tiny_model_dir)."""
    root = tmp_path_factory.mktemp("stopped")
    model = tiny.save_model_folder(root / "model", "llama")
    data = root / "train.json"
    data.write_text(json.dumps([{"instruction": f"Repeat {i}", "input": "", "output": str(i)} for i in range(24)]))
    out = root / "run"
    loop.train(make_config(out, model, "gist", data=[str(data)], max_steps=3, save_every=3), show_progress=False)
    return out, model, data


def resume_config(stopped_run, **kw) -> TrainConfig:
    out, model, data = stopped_run
    settings = {"tune": "gist", "data": [str(data)], "max_steps": 3, "save_every": 3, "resume": True, **kw}
    return make_config(out, model, settings.pop("tune"), **settings)


@pytest.mark.parametrize("kw, expected", [
    (dict(num_gist_tokens=3, template="plain", lr=0.5),
     ["--num-gist 3 (checkpoint: 2)", "--template plain (checkpoint: auto)", "--lr 0.5 (checkpoint: 0.01)"]),
    (dict(tune="lora"), ["--tune lora (checkpoint: gist)"]),
    (dict(seed=1, batch_size=2), ["--seed 1 (checkpoint: 0)", "--batch-size 2 (checkpoint: 4)"]),
    (dict(data=[]), ["--data [] (checkpoint: ["]),
])
def test_resume_refuses_another_runs_flags(stopped_run, kw, expected):
    """Flags that change what the run is are named, with the checkpoint's value, in one line; nothing changes."""
    before = snapshot(stopped_run[0])
    with pytest.raises(GistError) as info:
        loop.train(resume_config(stopped_run, **kw), show_progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--resume: the command line describes another run than")
    for part in expected:
        assert part in message
    assert "only --max-steps, --epochs, --save-every, --mixed-precision, --attn may change" in message
    assert snapshot(stopped_run[0]) == before


@contextmanager
def edited(path: Path, old: str, new: str):
    """`path` with `old` replaced by `new` inside the block (which must find it there), its text put back after."""
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))
    try:
        yield
    finally:
        path.write_text(text)


def test_resume_refuses_another_model_or_data(stopped_run, tmp_path):
    """Another model folder is named as a flag; the same folder with other weights, an edited data file and
    another number of processes are refused by what the checkpoint recorded. Nothing on disk changes."""
    out, model, data = stopped_run
    other = tiny.save_model_folder(tmp_path / "qwen", "qwen2", seed=1)
    before = snapshot(out)
    with pytest.raises(GistError, match=r"--model \S+qwen \(checkpoint: \S+model\)"):
        loop.train(resume_config(stopped_run, model=str(other)), show_progress=False)

    weights = (model / "model.safetensors").read_bytes()
    tiny.make_model("llama", seed=7).save_pretrained(model)
    try:
        with pytest.raises(GistError, match="--resume: the base model is not the one .*step-3 was trained from"):
            loop.train(resume_config(stopped_run), show_progress=False)
    finally:
        (model / "model.safetensors").write_bytes(weights)

    with edited(data, "Repeat 5", "Repeat five"):
        with pytest.raises(GistError, match="--resume: the training rows differ from those of .*step-3"):
            loop.train(resume_config(stopped_run), show_progress=False)

    with edited(out / "checkpoints" / "step-3" / "state.json", '"processes": 1', '"processes": 2'):
        with pytest.raises(GistError, match="written by 2 processes, this run has 1: resume with `accelerate launch"):
            loop.train(resume_config(stopped_run), show_progress=False)
    assert snapshot(out) == before


def test_resume_cli_refusal_is_one_line(stopped_run):
    """At the command line the refusal is one `error:` line and exit code 2."""
    out, model, data = stopped_run
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--model", str(model), "--data", str(data),
                                      "--preset", "smoke", "--resume", "--num-gist", "3"])
    one_line_error(result, "--num-gist 3 (checkpoint: 2)")


def test_resume_accepts_the_safe_flags(stopped_run, tmp_path):
    """--max-steps and --save-every may change: a run stopped at 3 of 3 steps continues to 5."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    metrics = loop.train(resume_config((out, *stopped_run[1:]), max_steps=5, save_every=5), show_progress=False)
    assert metrics["steps"] == 5 and len(metrics["loss_curve"]) == 5
    assert metrics["loss_curve"][:3] == json.loads((stopped_run[0] / "metrics.json").read_text())["loss_curve"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-5"]


def test_resume_cli_takes_the_checkpoints_flags(stopped_run, tmp_path):
    """`gist train --out RUN --resume` needs no other flag: those left out take the checkpoint's values
    (--max-steps given: the run continues from 3 to 5 steps); a flag given still counts and is compared."""
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 5
    refused = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--max-steps", "6", "--lr", "0.5"])
    one_line_error(refused, "--lr 0.5 (checkpoint: 0.01)")


def test_overwrite_replaces_only_a_complete_run(stopped_run, tmp_path, tiny_model_dir):
    """A folder that merely holds a config.json is refused, even with --overwrite, and left byte for byte;
    a complete run is replaced, and files that are not the run's stay."""
    folder = tmp_path / "project"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "README.md").write_text("my notes")
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(GistError, match=r"is not a complete gist run \(.*\): --overwrite replaces only"):
            loop.train(make_config(folder, tiny_model_dir, "gist", overwrite=overwrite), show_progress=False)
    (folder / "checkpoints" / "keep.txt").write_text("mine")
    with pytest.raises(GistError, match="checkpoints holds files that `gist train` did not write"):
        loop.train(make_config(folder, tiny_model_dir, "gist", overwrite=True), show_progress=False)
    (folder / "checkpoints" / "keep.txt").unlink()
    (folder / "config.json").unlink()
    (folder / "checkpoints").rmdir()
    with pytest.raises(GistError, match=r"holds tokenizer, README\.md but no gist run: training would replace them"):
        loop.train(make_config(folder, tiny_model_dir, "gist", overwrite=True), show_progress=False)
    assert snapshot(folder) == {k: v for k, v in before.items() if k != "config.json"}

    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    (run / "notes.txt").write_text("not the run's")
    with pytest.raises(GistError, match="holds another run: pass --overwrite"):
        loop.train(make_config(run, tiny_model_dir, "gist", max_steps=2), show_progress=False)
    loop.train(make_config(run, tiny_model_dir, "gist", max_steps=2, overwrite=True), show_progress=False)
    assert (run / "notes.txt").read_text() == "not the run's"
    assert not (run / "checkpoints").exists()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
