"""vLLM serves the caches of a chunked run (gist tokens after every K instruction tokens): each request fills its
own F + M slots, so prompts of different lengths, hence different M, are answered in one batch as `gist generate`
answers them. A tiny random Llama run; skipped where vLLM is not installed (`make test-vllm` runs it)."""

import json
import os

import pytest

pytest.importorskip("vllm")

import tiny  # noqa: E402
from gistcache.inference.generation import GREEDY, generate_ids  # noqa: E402
from gistcache.model import GistModel  # noqa: E402
from gistcache.serving.export import export_model  # noqa: E402
from gistcache.store import CacheStore, compress_cached  # noqa: E402
from gistcache.vllm import GistRequests, kv_transfer_config  # noqa: E402

pytestmark = pytest.mark.slow
INSTRUCTIONS = ["Say it twice.", "Write the given word backwards, letter by letter, and then say how many letters "
                "it has.", "Name the capital city of the given country. Answer with the city name only, nothing "
                "else, and no punctuation at all after it."]
INPUTS = ["France", "apple"]
NEW = 12


@pytest.mark.parametrize("raw_tail", [0, 5])
def test_vllm_answers_chunked_caches_as_gist_generate(tmp_path, raw_tail):
    """Caches of 3 prompts with 3 different M (N = 1 after every 16 tokens), 2 inputs each, in one vLLM batch:
    greedy tokens equal gist generate's; with a raw tail (`gist train --raw-tail`) the cache's last slots are the
    instruction's last raw tokens, read as plain slots."""
    from vllm import LLM, SamplingParams

    run = tiny.save_vllm_run(tmp_path)  # head size 32: vLLM's CPU attention takes it
    config = json.loads((run / "config.json").read_text())
    config["gist"]["gist_every"] = 16
    config["gist"]["raw_tail"] = raw_tail
    (run / "config.json").write_text(json.dumps(config))
    model = GistModel.from_pretrained(run)
    export_model(model, tmp_path / "hf")
    results = compress_cached(model, INSTRUCTIONS, CacheStore(tmp_path / "store"))
    assert len({r.cache.num_gist_tokens for r in results}) == 3
    assert [r.cache.raw_tail for r in results] == [raw_tail] * 3
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(model=str(tmp_path / "hf"), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15,
              max_model_len=512, generation_config="vllm", seed=0, distributed_executor_backend="uni",
              kv_transfer_config=kv_transfer_config(tmp_path / "hf", tmp_path / "store"))
    try:
        requests = GistRequests(tmp_path / "hf", tmp_path / "store")
        pairs = [(r, text) for r in results for text in INPUTS]
        params = [SamplingParams(temperature=0.0, max_tokens=NEW, repetition_penalty=1.0,
                                 extra_args={"kv_transfer_params": GistRequests.params(r.key)}) for r, _ in pairs]
        outs = llm.generate([requests.prompt(r.key, text) for r, text in pairs], params, use_tqdm=False)
        eos = model.tokenizer.eos_token_id
        for (r, text), out in zip(pairs, outs):
            got = list(out.outputs[0].token_ids)
            got = got[:got.index(eos) + 1] if eos in got else got
            assert got == generate_ids(model, r.cache, text, max_new_tokens=NEW, **GREEDY)[0], (r.cache.prompt_preview,
                                                                                                text)
    finally:
        del llm
