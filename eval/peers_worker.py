"""The KV-press baselines of `gist eval`, run inside the peers virtualenv (`make peers-venv`, issue 24).

NVIDIA's kvpress pins transformers < 5.3 while gistcache needs >= 5.17, so `gist eval` (in .venv) runs this
file with the python of .venv-peers and talks to it through two JSON files (no pickle):

    .venv-peers/bin/python eval/peers_worker.py JOB.json OUT.json

The module imports only the standard library at its top (the main virtualenv imports `PRESSES` from it);
torch, transformers and kvpress are imported when a job runs. Everything is token ids: the main process
tokenizes with the run's tokenizer and decodes the answers, so the press reads exactly the tokens of the
other conditions.

For one example the press compresses the **context** (the prompt P: template prefix + instruction, the ids
the full-prompt condition reads before the input) during the prefill, as kvpress's `kv-press-text-generation`
pipeline does (the decoder stack without the output head, the press's hooks on every attention layer), so
that every layer's cache holds exactly `kept` positions per KV head; then the **question** (the input I and
the answer cue) is fed at rotary positions len(P).. (kvpress's own layout), and the answer is greedy, up to
`max_new_tokens`, stopping at an end-of-sequence id (kept in the returned ids, as `generate` keeps it).
`kept` >= len(P) removes nothing (ratio 0: this is the full prompt).

JOB.json:
    {"model": {"source": DIR, "gguf_file": NAME|null, "dtype": "float32", "device": "cpu"},
     "max_new_tokens": 64, "eos_token_ids": [..], "suppress_token_ids": [..], "flops_examples": 8,
     "examples": {SPLIT: [{"context": [ids], "question": [ids]}, ...]},
     "tasks": [{"label": "kvpress:snapkv", "press": "snapkv", "split": SPLIT, "kept": [K per example]}]}
OUT.json:
    {"versions": {...}, "error": null | "one line",
     "tasks": [{"label", "split", "outputs": [[new ids]], "kept": [positions per layer, per example],
                "wall_s", "flops": {"examples", "compress", "prefill", "decode", "new_tokens"} | null,
                "error": null | "one line"}]}
A task that fails (the press raises, or keeps another number of positions) gets its `error` and the other
tasks still run; stdout carries `progress N` lines (N examples done) for the caller's progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

# name in `gist eval --baseline kvpress:NAME` -> (kvpress class, keyword arguments besides the ratio)
PRESSES: dict[str, tuple[str, dict]] = {
    "snapkv": ("SnapKVPress", {}),  # window_size: see press_kwargs
    "expected_attention": ("ExpectedAttentionPress", {}),
    "knorm": ("KnormPress", {}),
    "streaming_llm": ("StreamingLLMPress", {}),
    "tova": ("TOVAPress", {}),
    "random": ("RandomPress", {"seed": 0}),  # a floor: which positions are kept does not depend on the prompt
}
SNAPKV_WINDOW = 64  # kvpress's default observation window


def press_kwargs(name: str, context_len: int, kept: int) -> dict:
    """The press's arguments for one example besides the ratio. SnapKV votes with the attention of its last
    `window_size` context queries and always keeps that window; kvpress's default window (64) refuses a context
    of 64 tokens or fewer (an assertion), and a window as large as the budget leaves no position to vote for,
    so the window here is min(64, kept // 2) (at least 1): half the budget for the window, half for the votes."""
    kwargs = dict(PRESSES[name][1])
    if name == "snapkv":
        kwargs["window_size"] = max(1, min(SNAPKV_WINDOW, kept // 2))
    return kwargs


def ratio_for(context_len: int, kept: int) -> float:
    """kvpress's `compression_ratio` that keeps exactly `kept` of `context_len` positions (kvpress keeps
    max(1, int(len * (1 - ratio)))); 0.0 when `kept` >= `context_len`."""
    if kept >= context_len:
        return 0.0
    if kept < 1:
        raise ValueError(f"cannot keep {kept} positions: at least 1")
    ratio = (context_len - kept) / context_len
    while int(context_len * (1 - ratio)) < kept:
        ratio = math.nextafter(ratio, 0.0)
    while int(context_len * (1 - ratio)) > kept:
        ratio = math.nextafter(ratio, 1.0)
    return ratio


def make_press(name: str, context_len: int, kept: int):
    """The kvpress press object that keeps `kept` of `context_len` positions in every layer and KV head."""
    import kvpress

    cls, _ = PRESSES[name]
    ratio = ratio_for(context_len, kept)
    return getattr(kvpress, cls)(compression_ratio=ratio, **press_kwargs(name, context_len, kept))


def _flop_counter():
    """A silent FlopCounterMode that also counts torch's CPU fused attention kernel (dense, as gistcache's
    eval/flops.py counts it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={op: cpu_sdpa} if op is not None else {})


def press_generate(model, name: str | None, context: list[int], question: list[int], kept: int, *,
                   max_new_tokens: int, eos_token_ids: list[int], suppress_token_ids: list[int] = (),
                   flops: dict | None = None) -> tuple[list[int], list[int]]:
    """(new token ids, positions each layer's cache holds after the prefill) for one example.

    `name` None runs no press (the plain two-step prefill). `flops`, when given, gets the FLOPs of the
    compressing prefill (`compress`), the question's forward (`prefill`) and the one-token steps (`decode`) added.
    """
    import torch
    from transformers import DynamicCache

    if not context or not question:
        raise ValueError("the context and the question each need at least one token")
    device = model.device
    press = make_press(name, len(context), kept) if name is not None else None  # ratio 0 still hooks the layers

    def counted(key):
        if flops is None:
            return contextlib.nullcontext()
        counter = _flop_counter()

        @contextlib.contextmanager
        def block():
            with counter:
                yield
            flops[key] = flops.get(key, 0) + int(counter.get_total_flops())
        return block()

    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press is not None else contextlib.nullcontext(), counted("compress"):
            model.model(input_ids=torch.tensor([context], device=device), past_key_values=cache)
        layers = [layer.keys.shape[-2] for layer in cache.layers]
        offset = len(context)  # kvpress's layout: the question continues at the context's original positions
        ids = torch.tensor([question], device=device)
        positions = torch.arange(offset, offset + len(question), device=device).unsqueeze(0)
        with counted("prefill"):
            out = model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1)
        new: list[int] = []
        while True:
            logits = out.logits[0, -1].float()  # (V,)
            suppressed = [t for t in suppress_token_ids if t < logits.shape[0]]
            if suppressed:
                logits[suppressed] = float("-inf")
            new.append(int(logits.argmax()))
            if new[-1] in eos_token_ids or len(new) >= max_new_tokens:
                break
            step = torch.tensor([[new[-1]]], device=device)
            position = torch.tensor([[offset + len(question) + len(new) - 1]], device=device)
            with counted("decode"):
                out = model(input_ids=step, past_key_values=cache, position_ids=position)
    return new, layers


def load_model(spec: dict):
    """The causal LM named in the job (a folder, or a folder and its GGUF file), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(spec["source"], gguf_file=spec.get("gguf_file"), dtype=dtype)
    return model.to(spec.get("device", "cpu")).eval()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def run_job(job: dict, model=None, progress=None) -> dict:
    """Run every task of `job` (see the module docstring); `model` given skips loading it."""
    out: dict = {"versions": versions(), "error": None, "tasks": []}
    try:
        import kvpress  # noqa: F401  (its import patches transformers' attention functions)

        if model is None:
            model = load_model(job["model"])
    except Exception as exc:  # no kvpress here, or the model does not load: every task fails with it
        out["error"] = first_line(exc)
        return out
    examples = job["examples"]
    for task in job["tasks"]:
        rows = examples[task["split"]]
        result = {"label": task["label"], "split": task["split"], "outputs": [], "kept": [], "wall_s": 0.0,
                  "flops": None, "error": None}
        k = min(int(job.get("flops_examples", 0)), len(rows))
        counts = {"examples": k, "compress": 0, "prefill": 0, "decode": 0, "new_tokens": 0}
        t0 = time.perf_counter()
        try:
            for i, (row, kept) in enumerate(zip(rows, task["kept"])):
                flops = {} if i < k else None
                new, layers = press_generate(model, task["press"], row["context"], row["question"], kept,
                                             max_new_tokens=int(job["max_new_tokens"]),
                                             eos_token_ids=list(job["eos_token_ids"]),
                                             suppress_token_ids=list(job.get("suppress_token_ids", [])), flops=flops)
                want = min(kept, len(row["context"]))
                if any(n != want for n in layers):
                    raise RuntimeError(f"the press kept {sorted(set(layers))} positions per layer, not {want}")
                result["outputs"].append(new)
                result["kept"].append(layers)
                if flops is not None:
                    for key in ("compress", "prefill", "decode"):
                        counts[key] += flops.get(key, 0)
                    counts["new_tokens"] += len(new)
                if progress is not None:
                    progress(1)
        except Exception as exc:
            result["error"] = first_line(exc)
            if progress is not None:
                progress(len(rows) - len(result["outputs"]))
        result["wall_s"] = round(time.perf_counter() - t0, 3)
        result["flops"] = counts if k and result["error"] is None else None
        out["tasks"].append(result)
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("kvpress", "transformers", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: peers_worker.py JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)

    def progress(n: int) -> None:
        print(f"progress {n}", flush=True)

    result = run_job(job, progress=progress)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
