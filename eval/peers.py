"""KV-cache presses beside the gist cache, at the same memory (issue 24): `gist eval --baseline kvpress:PRESS`.

NVIDIA's kvpress (SnapKV, ExpectedAttention, Knorm, StreamingLLM, TOVA, ...) compresses a prompt's KV cache
during its prefill, with no training. It pins transformers < 5.3, so it lives in its own virtualenv
(`make peers-venv` builds .venv-peers) and `evaluate` here runs it there, as a subprocess that reads and writes
JSON files (`eval/peers_worker.py`): token ids in, token ids out.

`evaluate(config)`:

1. evaluates every other condition with `gistcache.eval.loop.evaluate`, into a staging folder in the system's
   temporary folder;
2. for each gist run and split, sends the worker each example's prompt P (`encode_instruction`: the ids the
   full prompt reads before the input) as the context, its input I (`encode_input`) as the question and K, the
   positions the press keeps (`conditions.press_kept_positions`: the gist cache's F + M for that prompt, or
   the ratio of `kvpress:PRESS@R`); the worker applies the press to the run's untouched base model;
3. decodes the answers with the run's tokenizer and merges them into the same rows (ROUGE-L, EM, compression
   P / K, prompt state K positions, FLOPs), predictions, results.md and plots, then writes `--out` whole.

A press that fails (it raises on this model, or the worker cannot start) gets no row: the other conditions are
written all the same and `results["failed"]` names it with the error's first line (`gist eval` then exits 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from gistcache.config import GIST_TOKEN, GistConfig
from gistcache.data.alpaca import load_examples
from gistcache.errors import GistError
from gistcache.eval import flops as F
from gistcache.eval import loop
from gistcache.eval.conditions import is_press, parse_press, press_kept_positions
from gistcache.eval.config import EvalConfig, peers_python, resolve_config
from gistcache.eval.report import write_outputs
from gistcache.eval.rouge import exact_match, rouge_l_scores, summarize
from gistcache.model import load_run_tokenizer, resolve_model
from gistcache.run import read_run_config

WORKER = Path(__file__).with_name("peers_worker.py")
_RECORD_KEYS = ("split", "index", "source", "instruction", "input", "reference", "outputs")


def has_presses(config: EvalConfig) -> bool:
    return any(is_press(b) for b in config.baselines or [])


def evaluate(config: EvalConfig, *, show_progress: bool = True) -> dict:
    """`loop.evaluate` with the `kvpress:` baselines run in the peers virtualenv and merged into its results."""
    config = resolve_config(config)
    presses = [b for b in config.baselines if is_press(b)]
    if not presses:
        return loop.evaluate(config, show_progress=show_progress)
    python = peers_python()
    out = Path(config.out)
    # in the system's temporary folder, not beside --out: a killed evaluation leaves nothing in the user's folders
    staging = Path(tempfile.mkdtemp(prefix="gist-eval-peers-")) / "out"
    inner = replace(config, baselines=[b for b in config.baselines if not is_press(b)], out=str(staging))
    started = time.perf_counter()
    try:
        results = loop.evaluate(inner, show_progress=show_progress)
        examples = {label: load_examples(path)[:config.limit] for label, path in config.split_files.items()}
        predictions = _read_predictions(staging / "predictions.jsonl", examples)
        failed = _run_presses(config, presses, python, results, examples, predictions, show_progress)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    F.add_reductions(results["rows"])
    results["config"] = {**config.to_dict(), "device_resolved": results["config"]["device_resolved"]}
    results["failed"] = failed
    results["out"] = str(out)
    results["wall_s_total"] = round(time.perf_counter() - started, 2)
    write_outputs(out, results, examples, predictions)
    return results


def failure_line(results: dict) -> str | None:
    """One line naming every press that failed, or None."""
    failed = results.get("failed") or []
    if not failed:
        return None
    seen = list(dict.fromkeys(f"{f['label']} ({f['error']})" for f in failed))
    return (f"{'; '.join(seen)} failed on this model: no row for {'it' if len(seen) == 1 else 'them'}; the other "
            f"conditions' results are written in {results['out']}")


def _read_predictions(path: Path, examples: dict) -> dict[str, list[dict]]:
    """predictions.jsonl of the staged evaluation back into {split: [{label: text, other keys...}]}."""
    predictions = {split: [{} for _ in rows] for split, rows in examples.items()}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            pred = predictions[record["split"]][record["index"]]
            pred.update(record["outputs"])
            pred.update({k: v for k, v in record.items() if k not in _RECORD_KEYS})
    return predictions


def _run_presses(config: EvalConfig, presses: list[str], python: Path, results: dict, examples: dict,
                 predictions: dict, show_progress: bool) -> list[dict]:
    """Run the presses of every gist run in the worker; add their rows and predictions; return the failures."""
    specs = [s for s in loop.run_specs(config) if s.condition == "gist"]  # each with the press baselines
    single = len(config.runs) == 1
    failed: list[dict] = []
    for spec in specs:
        prepared = loop.prepare_run(config, spec, examples)
        gist_config = GistConfig.from_dict(read_run_config(spec.path)["gist"])
        tok = load_run_tokenizer(spec.path)
        parsed = {name: parse_press(name) for name in presses}
        kept = {name: {split: [press_kept_positions(tok, gist_config, spec.template, len(p.prompt), parsed[name].ratio)
                               for p in items] for split, items in prepared.items()} for name in presses}
        source, gguf_file = resolve_model(gist_config.model)
        job = {
            "model": {"source": source, "gguf_file": gguf_file, "dtype": config.dtype,
                      "device": results["config"]["device_resolved"]},
            "max_new_tokens": config.max_new_tokens,
            "eos_token_ids": [tok.eos_token_id],
            "suppress_token_ids": [tok.convert_tokens_to_ids(GIST_TOKEN)],  # never generated, as generate_causal
            "flops_examples": config.flops_examples,
            "examples": {split: [{"context": p.prompt, "question": p.input} for p in items]
                         for split, items in prepared.items()},
            "tasks": [{"label": name, "press": parsed[name].press, "split": split, "kept": kept[name][split]}
                      for split in prepared for name in presses],
        }
        total = sum(len(items) for items in prepared.values()) * len(presses)
        answer = _call_worker(python, job, total, show_progress, f"{spec.name} kvpress")
        run_info = next(r for r in results["runs"] if r["name"] == spec.name)
        labels = {name: loop._label(name, spec, single) for name in presses}
        run_info["conditions"] = [*run_info["conditions"], *presses]
        run_info["peers"] = answer.get("versions", {})
        for task in answer.get("tasks") or [{"label": n, "split": s, "error": None} for s in prepared for n in presses]:
            name, split = task["label"], task["split"]
            error = answer.get("error") or task.get("error")
            if error:
                failed.append({"run": spec.name, "split": split, "label": labels[name], "error": error})
                continue
            outputs = [_decode(tok, ids) for ids in task["outputs"]]
            row = _press_row(config, spec.name, name, labels[name], split, examples[split], prepared[split],
                             kept[name][split], outputs, task, run_info)
            _insert_row(results["rows"], row)
            for pred, text, k in zip(predictions[split], outputs, kept[name][split]):
                pred[labels[name]] = text
                pred.setdefault("cached_positions", {})[labels[name]] = k
    return failed


def _call_worker(python: Path, job: dict, total: int, show_progress: bool, description: str) -> dict:
    """Run eval/peers_worker.py with the peers python on `job`; its answer, or {"error": ...} when it crashed."""
    with tempfile.TemporaryDirectory(prefix="gist-peers-") as tmp:
        job_path, out_path, err_path = Path(tmp, "job.json"), Path(tmp, "out.json"), Path(tmp, "stderr.txt")
        job_path.write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"), "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)  # the worker must not see the main virtualenv's packages
        progress = loop._progress(show_progress)
        with progress, open(err_path, "w", encoding="utf-8") as err:
            task = progress.add_task(description, total=total)
            try:
                proc = subprocess.Popen([str(python), str(WORKER), str(job_path), str(out_path)],
                                        stdout=subprocess.PIPE,
                                        stderr=err, text=True, env=env)
            except OSError as exc:
                return {"error": f"cannot start {python} ({exc.strerror or exc}): rebuild it with `make peers-venv`"}
            for line in proc.stdout:
                if line.startswith("progress "):
                    progress.advance(task, int(line.split()[1]))
            code = proc.wait()
        if code != 0 or not out_path.is_file():
            text = err_path.read_text(encoding="utf-8", errors="replace")
            tail = [line for line in text.splitlines() if line.strip()]
            return {"error": f"the peers worker exited with code {code}"
                             + (f" ({tail[-1].strip()[:200]})" if tail else "")}
        return json.loads(out_path.read_text(encoding="utf-8"))


def _decode(tok, ids: list[int]) -> str:
    """The answer's text up to its first EOS, as `generate_causal` decodes it, stripped as the loop strips it."""
    eos = tok.eos_token_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    return tok.decode(ids, skip_special_tokens=True).strip()


def _press_row(config: EvalConfig, run: str, name: str, label: str, split: str, exs: list, items: list,
               kept: list[int], outputs: list[str], task: dict, run_info: dict) -> dict:
    """The results row of one press on one split, with the keys of `loop._condition_row`'s rows."""
    refs = [ex.output for ex in exs]
    ratios = [len(p.prompt) / k for p, k in zip(items, kept)]
    counts = task.get("flops") or {}
    k = counts.get("examples") or 0
    mean = loop._mean
    press = parse_press(name)
    return {
        "run": run, "split": split, "condition": name, "label": label, "examples": len(exs),
        "rouge_l": summarize(rouge_l_scores(outputs, refs), resamples=config.bootstrap_resamples, seed=config.seed),
        "exact_match": summarize([exact_match(o, r) for o, r in zip(outputs, refs)],
                                 resamples=config.bootstrap_resamples, seed=config.seed),
        "instruction_tokens_mean": mean([len(p.prompt) for p in items]),
        "compression_mean": mean(ratios) if ratios else None,
        "compression_max": max(ratios) if ratios else None,
        "state_compression_mean": mean(ratios) if ratios else None,  # the press keeps F + M, template included
        "prompt_state_positions_mean": mean(kept),
        "prompt_state_bytes_mean": mean([n * run_info["kv_bytes_per_position"] for n in kept]),
        "wall_s": task.get("wall_s", 0.0),
        "flops_examples": k,
        "prefill_flops": round(counts["prefill"] / k, 4) if k else None,
        "generation_flops": round(counts["decode"] / k, 4) if k else None,
        "generated_tokens_mean": round(counts["new_tokens"] / k, 4) if k else None,
        "compress_flops": round(counts["compress"] / k, 4) if k else None,
        "full_prefill_flops": None,  # add_reductions takes the run's full row
        "press": press.press, "press_ratio": press.ratio,  # None: the gist cache's positions per prompt
    }


def _insert_row(rows: list[dict], row: dict) -> None:
    """Put a press row after the last row of its run and split (the table reads run, split, condition)."""
    at = max((i for i, r in enumerate(rows) if r["run"] == row["run"] and r["split"] == row["split"]), default=None)
    if at is None:
        rows.append(row)
    else:
        rows.insert(at + 1, row)
    if row["full_prefill_flops"] is None:  # the same run's full-prompt prefill, as the gist row has it
        gist = next((r for r in rows if r["run"] == row["run"] and r["split"] == row["split"]
                     and r["condition"] == "gist"), None)
        row["full_prefill_flops"] = gist.get("full_prefill_flops") if gist else None
