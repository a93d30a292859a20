"""Side effects scoped to the call (issue 25): a run folder complete or absent after a failed save, the training
logger put back, stderr, torch's thread count and vLLM's environment variable left as the caller had them."""

import errno
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch

import tiny
from gistcache.model import load_base_model, load_gist_model
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_leaves_no_folder(lora_runs, tmp_path, monkeypatch):
    """save_pretrained into a new folder on a disk that fills up (the tokenizer half-written, or the weights):
    no folder, and nothing of the save left beside it."""
    model = load_gist_model(lora_runs["base"], merge=False)
    real = type(model.tokenizer).save_pretrained

    def half_written_tokenizer(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer_config.json").write_text("")
        disk_full()

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", half_written_tokenizer)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "copy")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", real)
    monkeypatch.setattr("gistcache.model.save.save_file", disk_full)  # where save_run_weights writes
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "copy")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "copy")
    assert load_gist_model(tmp_path / "copy").run_fingerprint == model.run_fingerprint


def test_training_that_fails_while_saving_leaves_no_run_and_no_log_handler(tiny_model_dir, tmp_path, monkeypatch):
    """`gist train` whose disk fills up while the run is written (here, its model card): the --out folder holds
    no run file (config.json, tokenizer/, weights, metrics.json), only its log; the training logger is left as
    it was (no file handler, same level and propagation)."""
    logger = logging.getLogger("gistcache.train")
    before = (list(logger.handlers), logger.level, logger.propagate)
    monkeypatch.setattr("gistcache.train.loop.write_model_card", disk_full)
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), model=str(tiny_model_dir), preset="smoke", max_examples=8, eval_examples=4,
                         batch_size=4, max_steps=1, num_gist_tokens=1)
    with pytest.raises(OSError):
        train(config, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder beside it
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_gguf_load_leaves_stderr_alone(tmp_path, monkeypatch, capfd):
    """Loading a GGUF hides transformers' own progress bar without swapping sys.stderr for the process (another
    thread's message still reaches it), and puts the loader's bar back afterwards."""
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    seen = {}
    original_bar = gguf_utils.tqdm

    def fake_load(source, *, gguf_file=None, **kwargs):
        seen["stderr"] = sys.stderr
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        print("a message of another thread", file=sys.stderr)
        return tiny.make_model("llama")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_load)
    load_base_model(str(gguf))
    err = capfd.readouterr().err
    assert seen["stderr"] is sys.stderr
    assert "a message of another thread" in err and "de-quantizing" not in err
    assert gguf_utils.tqdm is original_bar


def test_bench_restores_the_thread_count(tiny_model_dir):
    """`gist bench cache --threads N` sets torch's thread count for the call only, also when it is refused."""
    from gistcache.errors import GistError
    from gistcache.eval.bench import BenchCacheConfig, bench_cache

    threads = torch.get_num_threads()
    other = 1 if threads != 1 else 2
    config = BenchCacheConfig(model=str(tiny_model_dir), lengths=[8], repeats=1, new_tokens=2, threads=other)
    assert bench_cache(config)["machine"]["threads"] == other
    assert torch.get_num_threads() == threads
    with pytest.raises(GistError, match="exceed the model's context"):
        bench_cache(BenchCacheConfig(model=str(tiny_model_dir), lengths=[600], repeats=1, threads=other))
    assert torch.get_num_threads() == threads


def test_serve_bench_sets_the_kv_cache_size_for_the_call_only(monkeypatch):
    """The serving bench gives vLLM its CPU KV cache size while it runs and removes it afterwards, also when it
    raises; a size the caller set is left as it was."""
    from gistcache.eval import serve_bench

    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = fake_vllm.SamplingParams = None
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(serve_bench, "vllm_available", lambda: True)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    during = []

    def stop(*args, **kwargs):
        during.append(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve_bench.GistModel, "from_pretrained", stop)
    config = serve_bench.BenchServeConfig(kv_cache_gib=3)
    with pytest.raises(RuntimeError, match="stop here"):
        serve_bench.bench_serve(config)
    assert during == ["3"] and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    with pytest.raises(RuntimeError, match="stop here"):
        serve_bench.bench_serve(config)
    assert during == ["3", "7"] and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "7"
