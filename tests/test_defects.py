"""The seven defects a new user met (issue 25): the stock snippet on both decoders, a run folder complete or absent
after a failed save, side effects scoped to the call, no network when a run loads or saves. (The CLI at any
terminal width: test_cli_width.py; the dtype in the store key: test_store.py; paths in cards: test_card.py.)"""

import errno
import logging
import os
import socket
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import tiny
from gistcache.config import GistConfig
from gistcache.inference.compression import compress
from gistcache.inference.generation import GREEDY, generate, generate_ids
from gistcache.model import (GistModel, attach_adapter, fingerprint_model, load_base_model, load_gist_model,
                             load_tokenizer, save_run, save_run_weights)
from gistcache.prompts import encode_input
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train

README = Path(__file__).parent.parent / "README.md"
INSTRUCTIONS = ["Reverse the word you are given", "Add one to the number", "Name the capital of the country",
                "Uppercase every letter"]
INPUTS = ["stone", "41", "France", "abc"]


def readme_snippet() -> str:
    """The README's stock-transformers snippet (the Python block that calls `to_dynamic_cache`)."""
    blocks = [b.split("\n", 1)[1] for b in README.read_text().split("```python")[1:]]
    (snippet,) = [b.split("```")[0] for b in blocks if "to_dynamic_cache" in b]
    return snippet


def run_snippet(run, instruction: str, text: str) -> dict:
    """The snippet's namespace after it ran on `run` (None: the shipped run) for one instruction and input."""
    code = readme_snippet()
    for old, new in (('"runs/r1"', repr(None if run is None else str(run))),
                     ('"Rewrite the text in the passive voice."', repr(instruction)),
                     ('"The cat ate the fish."', repr(text))):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - our own README
    return namespace


def make_lora_run(path: Path, base_dir: Path, decoder: str) -> Path:
    """A tiny LoRA run (prefix mask, compact positions) whose adapter moves the logits a lot."""
    base, tok = load_base_model(str(base_dir)), load_tokenizer(str(base_dir))
    fp = fingerprint_model(base)
    config = GistConfig(model=str(base_dir), num_gist_tokens=1, tune="lora", mask="prefix", decoder=decoder,
                        lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    gm = GistModel(peft, tok, 1, base_fingerprint=fp, mask="prefix", decoder=decoder)
    with torch.no_grad():
        gm.gist_embedding.add_(1.0)
    save_run(gm, path, config, base_fingerprint=fp)
    return path


# its own builder: an adapter drawn large (B ~ N(0, 1)) and a decoder, not tiny.NUDGED's small nudge
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("decoders")
    return {decoder: make_lora_run(root / f"run-{decoder}", tiny_model_dir, decoder) for decoder in ("base", "tuned")}


# --- 1. the README's stock snippet, right for both decoders ------------------------------------------------

@pytest.mark.parametrize("decoder", ["base", "tuned"])
def test_readme_snippet_answers_what_generate_does_for_both_decoders(lora_runs, decoder):
    """The snippet (stock `generate` inside `model.cache_reader()`) gives `gist generate`'s greedy tokens on a
    --decoder base run and on a tuned run; on the base run the model with its adapter on answers otherwise."""
    differs = 0
    for instruction, text in zip(INSTRUCTIONS, INPUTS):
        ns = run_snippet(lora_runs[decoder], instruction, text)
        model, cache, ids = ns["model"], ns["cache"], ns["ids"]
        new = ns["out"][0, cache.offset + ids.shape[1]:].tolist()
        eos = model.tokenizer.eos_token_id
        new = new[:new.index(eos) + 1] if eos in new else new
        assert new == generate_ids(model, cache, text, max_new_tokens=32, **GREEDY)[0]
        assert ns["answer"] == generate(model, cache, text, max_new_tokens=32, **GREEDY)[0]
        with torch.no_grad():  # teeth: the adapter left on (the snippet before issue 25)
            adapter_on = model.model.generate(input_ids=torch.cat([cache.input_ids(), ids], dim=1),
                                              cache=cache.to_dynamic_cache(model), max_new_tokens=32,
                                              eos_token_id=eos, **GREEDY)
        differs += not torch.equal(adapter_on, ns["out"])
    assert model.decoder == decoder
    assert (differs > 0) == (decoder == "base"), differs


def test_cache_reader_switches_the_adapter_off_only_inside():
    """`cache_reader` yields the model with the adapter off for a --decoder base run, and puts it back."""
    peft = get_peft_model(tiny.make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    model = GistModel(peft, tiny.make_tokenizer(), 1, mask="prefix", decoder="base")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        on = model.model(input_ids=ids).logits
        with model.cache_reader() as lm:
            off = lm(input_ids=ids).logits
        with model.model.disable_adapter():
            bare = model.model(input_ids=ids).logits
        again = model.model(input_ids=ids).logits
    assert torch.equal(off, bare) and torch.equal(again, on) and not torch.equal(on, off)


@pytest.mark.slow
def test_readme_snippet_on_the_shipped_run():
    """On the shipped run (--decoder base, the real default model): the snippet answers what `gist generate`
    does, for the README's demo instruction too."""
    demo = "Name the capital city of the given country."
    for instruction, text in ((demo, "France"), (demo, "Japan"), ("Rewrite the text in the passive voice.",
                                                                   "The cat ate the fish.")):
        ns = run_snippet(None, instruction, text)
        assert ns["model"].decoder == "base"
        assert ns["answer"] == generate(ns["model"], ns["cache"], text, max_new_tokens=32, **GREEDY)[0]


# --- 5. a run folder complete or absent after a failed save ------------------------------------------------

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


# --- 6. side effects scoped to the call ----------------------------------------------------------------

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


# --- 7. no network when a run loads or saves -----------------------------------------------------------

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
