"""Training end to end on a tiny model folder: the run folder, the tuning modes, resume, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gistcache.errors import GistError
from gistcache.model import load_run
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train


def config(tmp_path, model_dir, **kw):
    base = dict(out=str(tmp_path / "run"), model=str(model_dir), preset="smoke", max_examples=24, eval_examples=8,
                batch_size=4, max_steps=6, lr=1e-2, num_gist_tokens=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("tune", ["gist", "lora", "full"])
def test_train_writes_a_loadable_run(tmp_path, tiny_model_dir, tune):
    """Each tuning mode writes its files, learns (train loss falls) and loads back for inference."""
    cfg = config(tmp_path, tiny_model_dir, tune=tune, max_steps=10, lr=0.3 if tune == "gist" else 1e-2)
    metrics = train(cfg, show_progress=False)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "gist_embedding.safetensors", "tokenizer", "metrics.json", "train.log"} <= names
    assert ("adapter_model.safetensors" in names) == (tune == "lora")
    assert ("model.safetensors" in names) == (tune == "full")
    curve = [loss for _, loss in metrics["loss_curve"]]
    assert len(curve) == 10 and sum(curve[-3:]) < sum(curve[:3])
    # the gradient norm before clipping, all and the gist embedding's part, one per optimizer step
    assert [s for s, _, _ in metrics["grad_norm_curve"]] == list(range(1, 11))
    assert all(0 < gist <= total * (1 + 1e-3) for _, total, gist in metrics["grad_norm_curve"])
    if tune == "gist":  # the gist embedding is all there is
        assert all(gist == pytest.approx(total, rel=1e-3) for _, total, gist in metrics["grad_norm_curve"])
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]
    # the built-in held-out set is scored per split too; "all" is their token-weighted mean, so it lies between
    splits = metrics["heldout_loss_by_split"]
    assert set(splits) == {"seen_tasks", "unseen_tasks"}
    assert sum(s["examples"] for s in splits.values()) == metrics["eval_examples"] == 8
    for when, overall in (("before", metrics["heldout_loss_before"]), ("after", metrics["heldout_loss"])):
        values = [s[when] for s in splits.values()]
        assert min(values) - 1e-9 <= overall <= max(values) + 1e-9 and min(values) < max(values)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["steps"] == 10 and saved["tokens_per_second"] > 0
    # the versions that decide the numbers are recorded with them
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["transformers"] and saved["versions"]["peft"] and saved["versions"]["gistcache"]
    assert saved["cpu"] and saved["threads"] >= 1
    gm = load_run(run)
    trained = load_file(run / "gist_embedding.safetensors")["gist_embedding"]
    assert torch.equal(gm.gist_embedding.detach(), trained)
    mean = gm.model.get_input_embeddings().weight.mean(0, keepdim=True)
    assert not torch.allclose(trained, mean)  # the gist embedding moved from its start


def test_gist_tuning_leaves_base_frozen(tmp_path, tiny_model_dir):
    """--tune gist changes only the gist embedding."""
    train(config(tmp_path, tiny_model_dir, tune="gist"), show_progress=False)
    gm = load_run(tmp_path / "run")
    from gistcache.model import load_base_model

    base = load_base_model(str(tiny_model_dir))
    for (name, p), (_, q) in zip(gm.model.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), name


def test_resume_continues_where_a_killed_run_stopped(tmp_path, tiny_model_dir):
    """A run killed after its step-4 checkpoint and resumed ends where an uninterrupted run ends."""
    ref = config(tmp_path, tiny_model_dir, tune="full", out=str(tmp_path / "ref"))
    ref_metrics = train(ref, show_progress=False)
    cfg = config(tmp_path, tiny_model_dir, tune="full", save_every=2)
    train(cfg, show_progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    # what a kill right after the step-4 checkpoint leaves behind
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-6")
    for name in ("config.json", "gist_embedding.safetensors", "model.safetensors", "metrics.json"):
        (run / name).unlink()
    metrics = train(config(tmp_path, tiny_model_dir, tune="full", save_every=2, resume=True), show_progress=False)
    assert metrics["steps"] == 6 and len(metrics["loss_curve"]) == 6
    norms, ref_norms = ([n for _, n, _ in m["grad_norm_curve"]] for m in (metrics, ref_metrics))
    assert norms == pytest.approx(ref_norms, rel=1e-3)  # the same steps as the uninterrupted run
    a = load_file(tmp_path / "ref" / "gist_embedding.safetensors")["gist_embedding"]
    b = load_file(run / "gist_embedding.safetensors")["gist_embedding"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_refuses_to_overwrite_another_run(tmp_path, tiny_model_dir):
    """An output folder holding a run is refused without --overwrite, and left untouched."""
    train(config(tmp_path, tiny_model_dir, tune="gist", max_steps=2), show_progress=False)
    before = (tmp_path / "run" / "gist_embedding.safetensors").read_bytes()
    with pytest.raises(GistError, match="holds another run: pass --overwrite"):
        train(config(tmp_path, tiny_model_dir, tune="gist", max_steps=2, seed=3), show_progress=False)
    assert (tmp_path / "run" / "gist_embedding.safetensors").read_bytes() == before
    train(config(tmp_path, tiny_model_dir, tune="gist", max_steps=2, seed=3, overwrite=True), show_progress=False)
    assert (tmp_path / "run" / "gist_embedding.safetensors").read_bytes() != before


@pytest.mark.parametrize("kw, message", [
    (dict(num_gist_tokens=0), "--num-gist must be a whole number >= 1"),
    (dict(preset="huge"), "unknown --preset"),
    (dict(condition="both"), "unknown condition"),
    (dict(tune="half"), "unknown --tune"),
    (dict(data=["/nonexistent.json"]), "data file /nonexistent.json does not exist"),
    (dict(resume=True, overwrite=True), "contradict"),
])
def test_config_refusals(tmp_path, tiny_model_dir, kw, message):
    """Bad settings are refused by the config itself, before anything is written."""
    with pytest.raises(GistError, match=message):
        config(tmp_path, tiny_model_dir, **kw)
    assert not (tmp_path / "run").exists()


def test_bad_data_file_refused_before_writing(tmp_path, tiny_model_dir):
    """A data file that is not Alpaca-shaped is refused with its line, and no run folder appears."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"question": "x"}\n')
    with pytest.raises(GistError, match=r"bad\.jsonl:2: not Alpaca-shaped"):
        train(config(tmp_path, tiny_model_dir, data=[str(bad)]), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_user_data_with_eval_filter(tmp_path, tiny_model_dir):
    """User files train the run; instructions found in --eval-data are dropped and counted."""
    rows = [{"instruction": f"Say the number {i}", "input": "", "output": str(i)} for i in range(12)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    held = tmp_path / "eval.json"
    held.write_text(json.dumps([{"instruction": "say the number 3", "input": "", "output": "3"}]))
    metrics = train(config(tmp_path, tiny_model_dir, data=[str(data)], eval_data=[str(held)], tune="gist",
                           max_steps=2, max_examples=None), show_progress=False)
    assert metrics["dropped_contaminated"] == 1 and metrics["train_examples"] == 11
    assert metrics["eval_examples"] == 1 and metrics["heldout_loss_by_split"] == {}


def test_run_loads_in_bfloat16_and_fingerprint_covers_config(tmp_path, tiny_model_dir):
    """A run loads in bfloat16 (fingerprinted before the cast); its fingerprint covers N and the template."""
    import json as _json

    from gistcache.run import run_fingerprint

    train(config(tmp_path, tiny_model_dir, tune="lora", max_steps=2), show_progress=False)
    run = tmp_path / "run"
    gm = load_run(run, dtype=torch.bfloat16)
    assert next(gm.model.parameters()).dtype == torch.bfloat16
    before = run_fingerprint(run)
    data = _json.loads((run / "config.json").read_text())
    data["gist"]["template"] = "plain"
    (run / "config.json").write_text(_json.dumps(data))
    assert run_fingerprint(run) != before


def test_norm_before_clip_undoes_the_global_clip():
    """The gist embedding's gradient norm is recovered after clip_grad_norm_ scaled it down."""
    from gistcache.train.tuning import norm_before_clip

    gist, rest = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    gist.grad, rest.grad = torch.full((4,), 50.0), torch.tensor([3.0, 0.0, 4.0])  # norms 100 and 5
    total = float(torch.nn.utils.clip_grad_norm_([gist, rest], 1.0))
    assert float(gist.grad.norm()) < 1.0
    assert norm_before_clip(gist, total, 1.0) == pytest.approx(100.0, rel=1e-5)
    small = torch.nn.Parameter(torch.zeros(2))
    small.grad = torch.tensor([0.3, 0.4])  # under the limit: not clipped, reported as it is
    assert norm_before_clip(small, float(torch.nn.utils.clip_grad_norm_([small], 1.0)), 1.0) == pytest.approx(0.5)


def test_trim_hands_freed_heap_pages_back():
    """trim_freed_memory (what the training loop calls every TRIM_EVERY batches on the CPU, train/heap.py) gives
    the OS back the pages of freed heap blocks: 32 MiB freed in 64 KiB blocks, each held in place by a block still
    in use after it, stay resident after free() and leave with the trim."""
    import ctypes
    import os

    from gistcache.train import heap

    if heap._malloc_trim() is None or not os.path.exists("/proc/self/statm"):
        pytest.skip("no glibc malloc_trim here: trim_freed_memory does nothing")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, mib = 64 * 1024, 1 << 20  # under the mmap threshold: heap blocks
    pairs = [(libc.malloc(size), libc.malloc(size)) for _ in range(512)]  # (freed, kept): the heap cannot shrink
    try:
        for block in [b for pair in pairs for b in pair]:
            ctypes.memset(block, 1, size)  # resident
        filled = resident()
        for freed_block, _ in pairs:
            libc.free(freed_block)
        freed = resident()
        assert filled - freed < 8 * mib, "free() gave the pages back by itself: the check has no teeth"
        assert heap.trim_freed_memory() is True
        assert freed - resident() >= 24 * mib, (filled, freed, resident())
    finally:
        for _, kept in pairs:
            libc.free(kept)
