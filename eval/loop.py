"""`evaluate`: gist vs baselines on the same examples, with ROUGE-L, exact match, FLOPs and bytes.

For each run (its own trained condition), each split and each condition, every example is
generated greedily with the same `max_new_tokens` (see `gistcache.eval.conditions` for how each
condition is built; the echo control generates nothing: its answer is the input). Reported per
(run, split, condition):

- ROUGE-L F x100 with a 95% percentile-bootstrap interval (1000 resamples, fixed seed), and
  exact match x100 (stripped, lower-cased);
- compression: instruction tokens (`len(encode_instruction)`, template text included: what the
  gist replaces) / prompt-state positions (the gist slots M for gist: N, or N per chunk), mean and max;
- FLOPs per example on the first `flops_examples` examples of each split, batch size 1:
  prefill, generation, and for gist the one-time compress separately; prefill reduction against
  `full` (1 - prefill / full prefill);
- bytes of cached prompt state: positions x layers x 2 x kv_heads x head_dim x dtype bytes;
- wall seconds of the condition's batched generation (gist: compress included).

`runs.py` names the runs and tokenizes their examples; `report.py` formats and writes what this returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gistcache._version import __version__
from gistcache.cache.identity import model_kv_shape
from gistcache.config import torch_dtype
from gistcache.data.alpaca import Example, load_examples
from gistcache.errors import GistError
from gistcache.eval import flops as F
from gistcache.eval.conditions import (NO_MODEL, Prepared, condition_sequences, echo_answers, generate_gist,
                                       state_positions, template_only_ids)
from gistcache.eval.config import EvalConfig, resolve_config
from gistcache.eval.fidelity import fidelity_row
from gistcache.eval.length import length_records, length_rows
from gistcache.eval.report import write_outputs
from gistcache.eval.rouge import exact_match, rouge_l_scores, summarize
from gistcache.eval.runs import RunSpec, prepare_run, run_specs
from gistcache.inference.compression import compress
from gistcache.inference.generation import check_context, generate_causal
from gistcache.model import GistModel, load_run, load_untouched_base


@dataclass
class RunModels:
    """One loaded run and what every condition of it shares."""

    gm: GistModel
    base_gm: GistModel | None  # `base`: the untouched base model reading the full prompt
    gist_ids: list[int]
    template_ids: list[int]
    bytes_per_position: int


def evaluate(config: EvalConfig, *, show_progress: bool = True) -> dict:
    """Evaluate each run and baseline on each split; write the output folder; return the results.

    Returns {"config", "runs", "rows", "out", ...}; each row is one (run, split, condition).
    """
    config = resolve_config(config)
    started = time.perf_counter()
    examples = {label: load_examples(path)[:config.limit] for label, path in config.split_files.items()}
    specs = run_specs(config)
    prepared = {spec.name: prepare_run(config, spec, examples) for spec in specs}  # refusals before any model loads
    device = _resolve_device(config.device)
    dtype = torch_dtype(config.dtype)

    predictions = {split: [{} for _ in rows] for split, rows in examples.items()}
    rows: list[dict] = []
    fidelity: list[dict] = []
    length: list[dict] = []
    runs_info: list[dict] = []
    single = len(config.runs) == 1
    total = sum(len(r) for r in examples.values()) * sum(len(s.conditions) for s in specs)
    progress = _progress(show_progress)
    with progress:
        task = progress.add_task("eval", total=total)
        for spec in specs:
            models = _load_models(spec, device, dtype)
            runs_info.append(_run_info(spec, models))
            for split, exs in examples.items():
                items = prepared[spec.name][split]
                _check_contexts(config, spec, models, split, items)
                k = min(config.flops_examples, len(exs))
                full_ref = [F.causal_flops(models.gm, [*p.prompt, *models.gist_ids, *p.input], max_new_tokens=0).prefill
                            for p in items[:k]] if "full" not in spec.conditions else None
                for condition in spec.conditions:
                    label = _label(condition, spec, single)
                    progress.update(task, description=f"{spec.name} {split} {condition}")
                    advance = lambda n: progress.advance(task, n)  # noqa: E731
                    row, outputs, cached = _condition_row(config, spec, models, condition, label, split, exs, items,
                                                          k, full_ref, advance)
                    rows.append(row)
                    for pred, out, p, n in zip(predictions[split], outputs, items, cached):
                        pred[label] = out
                        pred.setdefault("cached_positions", {})[label] = n
                        pred.setdefault("instruction_only_tokens", p.instruction_tokens)
                        if condition == "truncate":
                            # one key per truncate row: runs with different N keep different counts
                            pred["truncate_kept_tokens" if label == "truncate" else f"{label}:kept_tokens"] = p.kept
                            pred["instruction_only_tokens"] = p.instruction_tokens
                        pred.setdefault("instruction_tokens", len(p.prompt))
            fidelity += [{"run": spec.name, "split": split, "examples": len(exs),
                          **fidelity_row({c: [predictions[split][i][_label(c, spec, single)] for i in range(len(exs))]
                                          for c in spec.conditions},
                                         [ex.output for ex in exs], resamples=config.bootstrap_resamples,
                                         seed=config.seed)}
                         for split, exs in examples.items() if spec.condition == "gist"]
            if spec.condition == "gist":
                length += _length_rows(config, spec, single, examples, prepared[spec.name], predictions)
            del models
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    F.add_reductions(rows)

    results = {
        "gistcache_version": __version__,
        "created": datetime.now().isoformat(timespec="seconds"),
        "config": {**config.to_dict(), "device_resolved": device},
        "runs": runs_info,
        "rows": rows,
        "fidelity": fidelity,
        "length": length,
        "wall_s_total": round(time.perf_counter() - started, 2),
        "out": str(config.out),
    }
    write_outputs(config.out, results, examples, predictions)
    return results


def _load_models(spec: RunSpec, device: str, dtype: torch.dtype) -> RunModels:
    gm = load_run(spec.path, device=device, dtype=dtype)
    base_gm = load_untouched_base(gm, dtype=dtype, device=device) if "base" in spec.conditions else None
    layers, kv_heads, head_dim = model_kv_shape(gm)
    bytes_per_position = layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    # the baselines keep the gist ids where the trained model reads them (conditions.py); not a --decoder base run
    gist_ids = [] if gm.decoder == "base" else [gm.gist_token_id] * gm.num_gist_tokens
    return RunModels(gm=gm, base_gm=base_gm, gist_ids=gist_ids,
                     template_ids=template_only_ids(gm.tokenizer, spec.template),
                     bytes_per_position=bytes_per_position)


def _run_info(spec: RunSpec, models: RunModels) -> dict:
    gm = models.gm
    return {"name": spec.name, "path": str(spec.path), "condition": spec.condition, "conditions": spec.conditions,
            "num_gist_tokens": gm.num_gist_tokens, "gist_every": spec.gist_every, "template": spec.template, "truncate_tokens": spec.truncate_tokens,
            "run_fingerprint": gm.run_fingerprint, "base_model": gm.gist_config.model,
            "kv_bytes_per_position": models.bytes_per_position, "template_tokens": len(models.template_ids)}


def _check_contexts(config: EvalConfig, spec: RunSpec, models: RunModels, split: str, items: list[Prepared]) -> None:
    """Check every causal condition's context before generating anything."""
    for condition in spec.conditions:
        if condition != "gist" and condition not in NO_MODEL:
            seqs, offsets = condition_sequences(condition, items, models.gist_ids, models.template_ids)
            check_context(models.gm, offsets or [0] * len(seqs), seqs, config.max_new_tokens, what=f"{split} example")


def _condition_row(config: EvalConfig, spec: RunSpec, models: RunModels, condition: str, label: str, split: str,
                   exs: list[Example], items: list[Prepared], k: int, full_ref: list[int] | None,
                   advance) -> tuple[dict, list[str]]:
    """Generate one condition on one split: (its row of the results, the stripped answers)."""
    gm = models.base_gm if condition == "base" else models.gm
    t0 = time.perf_counter()
    context_used: list[int] = []
    if condition == "gist":
        outputs = generate_gist(gm, [ex.instruction for ex in exs], [ex.input for ex in exs],
                                max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, on_batch=advance,
                                context_used=context_used)
    elif condition == "echo":
        outputs = echo_answers([ex.input for ex in exs])
        advance(len(exs))
    else:
        seqs, offsets = condition_sequences(condition, items, models.gist_ids, models.template_ids)
        outputs = generate_causal(gm, seqs, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                  position_offsets=offsets, on_batch=advance)
    wall = time.perf_counter() - t0
    outputs = [o.strip() for o in outputs]
    counts = _count_flops(gm, condition, exs[:k], items[:k], models, config.max_new_tokens)
    refs = [ex.output for ex in exs]
    em = [exact_match(o, r) for o, r in zip(outputs, refs)]
    positions = [state_positions(condition, p, models.gm.num_gist_tokens, models.template_ids) for p in items]
    if condition == "gist" and len(context_used) == len(items):  # each cache's own M (N * chunks for gist_every)
        positions = [n - models.gm.num_prefix_tokens for n in context_used]
    ratios = [len(p.prompt) / n for p, n in zip(items, positions) if n]
    held = context_used if condition == "gist" else positions  # positions held before the input, template included
    state_ratios = [len(p.prompt) / n for p, n in zip(items, held) if n]
    row = {
        "run": spec.name, "split": split, "condition": condition, "label": label,
        "examples": len(exs),
        "rouge_l": summarize(rouge_l_scores(outputs, refs), resamples=config.bootstrap_resamples, seed=config.seed),
        "exact_match": summarize(em, resamples=config.bootstrap_resamples, seed=config.seed),
        "instruction_tokens_mean": _mean([len(p.prompt) for p in items]),
        "compression_mean": _mean(ratios) if len(ratios) == len(items) else None,
        "compression_max": max(ratios) if len(ratios) == len(items) else None,
        # prompt positions / positions held before the input, template included for every condition alike
        "state_compression_mean": _mean(state_ratios) if len(state_ratios) == len(items) else None,
        "prompt_state_positions_mean": _mean(positions),
        "prompt_state_bytes_mean": _mean([n * models.bytes_per_position for n in positions]),
        "wall_s": round(wall, 3),
        "flops_examples": k,
        **counts,
    }
    if condition in ("truncate", "truncate-end"):
        row["truncate_tokens"] = spec.truncate_tokens
        row["truncate_kept_mean"] = _mean([p.kept for p in items])
    row["full_prefill_flops"] = (counts["prefill_flops"] if condition == "full"
                                 else _mean(full_ref) if full_ref else None)
    # positions held before the input, per example: the gist cache's own count (F + its gist slots)
    return row, outputs, held


def _length_rows(config: EvalConfig, spec: RunSpec, single: bool, examples: dict[str, list[Example]],
                 items: dict[str, list[Prepared]], predictions: dict[str, list[dict]]) -> list[dict]:
    """The by-length table of one gist run (eval/length.py): one row per (split, instruction-length bucket)."""
    out = []
    for split, exs in examples.items():
        labels = {c: _label(c, spec, single) for c in spec.conditions}
        preds = predictions[split]
        records = length_records([p.instruction_tokens for p in items[split]], [len(p.prompt) for p in items[split]],
                                 [ex.output for ex in exs],
                                 {c: [pred[label] for pred in preds] for c, label in labels.items()},
                                 {c: [pred["cached_positions"][label] for pred in preds]
                                  for c, label in labels.items()})
        out += [{"run": spec.name, "split": split, **row}
                for row in length_rows(records, resamples=config.bootstrap_resamples, seed=config.seed)]
    return out


def _label(condition: str, spec: RunSpec, single: bool) -> str:
    """The name of a (run, condition) in predictions, plots and tables."""
    return condition if single or spec.condition != "gist" else f"{spec.name}:{condition}"


def _count_flops(gm: GistModel, condition: str, exs: list[Example], items: list[Prepared], models: RunModels,
                 max_new_tokens: int) -> dict:
    """Mean FLOPs per example on the subset, batch size 1; None for a condition that runs no model (echo)."""
    if not items or condition in NO_MODEL:
        return {"prefill_flops": None, "generation_flops": None, "compress_flops": None}
    counts = []
    compress_counts = []
    for ex, p in zip(exs, items):
        if condition == "gist":
            cache, flops = F.count_flops(compress, gm, ex.instruction, batch_size=1)
            compress_counts.append(flops)
            counts.append(F.gist_flops(gm, cache, ex.input, max_new_tokens=max_new_tokens))
        else:
            (seq,), offsets = condition_sequences(condition, [p], models.gist_ids, models.template_ids)
            counts.append(F.causal_flops(gm, seq, max_new_tokens=max_new_tokens,
                                         position_offset=offsets[0] if offsets else 0))
    return {"prefill_flops": _mean([c.prefill for c in counts]),
            "generation_flops": _mean([c.decode for c in counts]),
            "generated_tokens_mean": _mean([c.new_tokens for c in counts]),
            "compress_flops": _mean(compress_counts) if compress_counts else None}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GistError(f"--device {device}: no CUDA device here; use --device cpu")
    return device


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), disable=not enabled)
