"""vLLM serves gist caches (issue 14): greedy vLLM answers from gist caches equal `gist generate`'s.

The engine runs the exported default-model run (the shipped gist run, LoRA merged, float32), or a
tiny random Llama run when the default model's weights package is not installed. Skipped where
vLLM is not installed (`make test`); `make test-vllm` runs it in .venv-vllm.
"""

import os
import subprocess
import sys

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import tiny  # noqa: E402
from gistcache.cache import GistCache, save_cache  # noqa: E402
from gistcache.errors import GistError  # noqa: E402
from gistcache.inference.generation import GREEDY, generate_ids  # noqa: E402
from gistcache.model import GistModel, cache_kwarg, resolve_model  # noqa: E402
from gistcache.prompts import encode_input  # noqa: E402
from gistcache.serving.export import export_model  # noqa: E402
from gistcache.store import CacheStore, compress_cached, key_of  # noqa: E402
from gistcache.vllm import GistRequests, kv_transfer_config  # noqa: E402

INSTRUCTIONS = [
    "Name the capital city of the given country. Answer with the city name only.",
    "Translate the word into French.",
    "Write the given word backwards, letter by letter.",
    "Say whether the number is even or odd.",
    "Give one word that rhymes with the given word.",
]
INPUTS = ["France", "Japan", "seven", "apple"]
NEW = 24
pytestmark = pytest.mark.slow


class Served:
    def __init__(self, root):
        from vllm import LLM

        try:
            resolve_model("smollm2-135m")
            self.model = GistModel.from_pretrained(None)
        except GistError:
            self.model = GistModel.from_pretrained(tiny.save_vllm_run(root))  # head size 32, as vLLM's CPU takes
        self.export, self.store = root / "hf", root / "store"
        export_model(self.model, self.export)
        self.results = compress_cached(self.model, INSTRUCTIONS, CacheStore(self.store))
        self.llm = LLM(model=str(self.export), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15,
                       max_model_len=1024, generation_config="vllm", logprobs_mode="raw_logits", seed=0,
                       distributed_executor_backend="uni",
                       kv_transfer_config=kv_transfer_config(self.export, self.store))
        self.requests = GistRequests(self.export, self.store)

    def params(self, ref=None, logprobs=5):
        from vllm import SamplingParams

        extra = {"kv_transfer_params": GistRequests.params(ref) if isinstance(ref, str) else ref} if ref else None
        return SamplingParams(temperature=0.0, max_tokens=NEW, logprobs=logprobs, repetition_penalty=1.0,
                              extra_args=extra)

    def reference(self, cache: GistCache, text: str) -> list[int]:
        return generate_ids(self.model, cache, text, max_new_tokens=NEW, **GREEDY)[0]

    def hf_logits(self, cache: GistCache, text: str, tokens: list[int]) -> torch.Tensor:
        """The stock model's (V,) logits after the cache, the input and `tokens` (the README's path)."""
        m = self.model
        ids = torch.tensor([[*cache.input_ids()[0].tolist(), *encode_input(m.tokenizer, text, m.template), *tokens]])
        with torch.no_grad():
            return m.model(input_ids=ids[:, cache.offset:], **{cache_kwarg(m.model): cache.to_dynamic_cache(m)}
                           ).logits[0, -1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    s = Served(tmp_path_factory.mktemp("vllm"))
    yield s
    del s.llm


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def test_vllm_answers_equal_gist_generate(served):
    """>= 20 (cache, input) pairs, greedy, float32: vLLM from gist caches gives gist generate's tokens; a pair that
    differs is reported with its first differing token and both sides' logits of both tokens."""
    pairs = [(r, text) for r in served.results for text in INPUTS]
    assert len(pairs) >= 20
    prompts = [served.requests.prompt(r.key, text) for r, text in pairs]
    outs = served.llm.generate(prompts, [served.params(r.key) for r, _ in pairs], use_tqdm=False)
    eos = served.model.tokenizer.eos_token_id
    report = []
    for (r, text), out in zip(pairs, outs):
        want = served.reference(r.cache, text)
        got = until_eos(list(out.outputs[0].token_ids), eos)
        if got == want:
            continue
        i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        hf = served.hf_logits(r.cache, text, want[:i])
        ours, theirs = (want[i] if i < len(want) else eos), (got[i] if i < len(got) else eos)
        vl = out.outputs[0].logprobs[i] if i < len(out.outputs[0].logprobs or []) else {}
        report.append(f"{r.cache.prompt_preview!r} + {text!r}: token {i} gist generate {ours} vs vLLM {theirs}; "
                      f"HF logits {hf[ours].item():.5f} / {hf[theirs].item():.5f}, vLLM logits "
                      f"{getattr(vl.get(ours), 'logprob', None)} / {getattr(vl.get(theirs), 'logprob', None)}")
    assert not report, f"{len(report)} of {len(pairs)} pairs differ:\n" + "\n".join(report)


def test_placeholders_without_the_cache_are_not_the_answer(served):
    """Teeth: the same token ids with no gist cache (the placeholders run as real tokens) answer differently."""
    pairs = [(r, text) for r in served.results for text in INPUTS[:2]]
    prompts = [{"prompt_token_ids": served.requests.prompt(r.key, text)["prompt_token_ids"]} for r, text in pairs]
    outs = served.llm.generate(prompts, [served.params(None) for _ in pairs], use_tqdm=False)
    eos = served.model.tokenizer.eos_token_id
    same = [until_eos(list(o.outputs[0].token_ids), eos) == served.reference(r.cache, t)
            for (r, t), o in zip(pairs, outs)]
    assert not all(same)


def test_bad_requests_fail_alone(served, tmp_path):
    """An unknown key, a cache of another run, a cache_salt that is not the key and a malformed entry each fail
    their own request with an error; the good request in the same batch is answered as before."""
    good = served.results[0]
    foreign = GistCache(**{**vars(good.cache), "run_fingerprint": "0" * 64})
    save_cache(foreign, tmp_path / "foreign.safetensors")
    ids = served.requests.prompt(good.key, INPUTS[0])["prompt_token_ids"]
    cases = [
        ({"prompt_token_ids": ids, "cache_salt": good.key}, good.key),
        ({"prompt_token_ids": ids, "cache_salt": "f" * 64}, "f" * 64),  # unknown key
        ({"prompt_token_ids": ids, "cache_salt": key_of(foreign)}, str(tmp_path / "foreign.safetensors")),
        ({"prompt_token_ids": ids, "cache_salt": "not-the-key"}, good.key),
        ({"prompt_token_ids": ids, "cache_salt": good.key}, {"gist_cache": 5}),
    ]
    outs = served.llm.generate([p for p, _ in cases], [served.params(ref) for _, ref in cases], use_tqdm=False)
    eos = served.model.tokenizer.eos_token_id
    assert until_eos(list(outs[0].outputs[0].token_ids), eos) == served.reference(good.cache, INPUTS[0])
    assert [o.outputs[0].finish_reason for o in outs[1:]] == ["error"] * 4, [o.outputs[0] for o in outs[1:]]
    again = served.llm.generate([cases[0][0]], [served.params(good.key)], use_tqdm=False)  # the engine lives on
    assert until_eos(list(again[0].outputs[0].token_ids), eos) == served.reference(good.cache, INPUTS[0])


def test_importing_gistcache_does_not_import_vllm():
    code = ("import sys, gistcache, gistcache.vllm, gistcache.serving.export, gistcache.cli.main; "
            "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))")
    subprocess.run([sys.executable, "-c", code], check=True)
