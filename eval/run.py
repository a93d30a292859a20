"""`evaluate`: gist vs baselines on the same examples, with ROUGE-L, exact match, FLOPs and bytes.

For each run (its own trained condition), each split and each condition, every example is
generated greedily with the same `max_new_tokens` (see `gistcache.eval.conditions` for how each
condition is built). Reported per (run, split, condition):

- ROUGE-L F x100 with a 95% percentile-bootstrap interval (1000 resamples, fixed seed), and
  exact match x100 (stripped, lower-cased);
- compression: instruction tokens (`len(encode_instruction)`, template text included: what the
  gist replaces) / prompt-state positions (N for gist, so P/N), mean and max;
- FLOPs per example on the first `flops_examples` examples of each split, batch size 1:
  prefill, generation, and for gist the one-time compress separately; prefill reduction against
  `full` (1 - prefill / full prefill);
- bytes of cached prompt state: positions x layers x 2 x kv_heads x head_dim x dtype bytes;
- wall seconds of the condition's batched generation (gist: compress included).

The output folder is written whole into a temporary folder beside it, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from gistcache.errors import GistError
from gistcache.eval.conditions import BASELINES, CONTROL_CONDITIONS

SPLITS = ("seen", "unseen", "human")
SPLIT_FILE = "alpaca_plus_validation_{}.json"
DATA_ENV = "GISTCACHE_DATA"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "alpaca_plus"
DTYPES = ("float32", "bfloat16", "float16")


def default_data_dir() -> Path | None:
    """`$GISTCACHE_DATA`, else `../shared/data/alpaca_plus` if it exists here, else None."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else None


def resolve_splits(splits: list[str], data_dir: str | None) -> dict[str, str]:
    """{label: file} for `seen|unseen|human` (under the data folder) or Alpaca-format file paths."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    if data_dir and not folder.is_dir():
        raise GistError(f"--data-dir {data_dir} is not a folder: give the folder holding "
                        f"{SPLIT_FILE.format('<split>')}")
    resolved: dict[str, str] = {}
    for split in splits:
        if split in SPLITS:
            if folder is None:
                raise GistError(f"split {split!r} needs the Alpaca+ files: pass --data-dir DIR (holding "
                                f"{SPLIT_FILE.format(split)}), set ${DATA_ENV}, or give a file path")
            path = folder / SPLIT_FILE.format(split)
            if not path.is_file():
                raise GistError(f"split {split!r}: {path} does not exist: pass --data-dir DIR holding "
                                f"{SPLIT_FILE.format(split)}, or give a file path")
            label = split
        elif Path(split).is_file():
            path, label = Path(split), Path(split).stem
        elif "/" in split or split.endswith((".json", ".jsonl")):
            raise GistError(f"data file {split} does not exist: give an Alpaca-format JSON/JSONL file")
        else:
            raise GistError(f"unknown split {split!r}: use {', '.join(SPLITS)} or an Alpaca-format JSON/JSONL file")
        base, i = label, 2
        while label in resolved:
            label, i = f"{base}-{i}", i + 1
        resolved[label] = str(path)
    return resolved


def parse_control_runs(spec: str | dict | None) -> dict[str, str]:
    """`"pos=RUN,neg=RUN"` (either or both) -> {"pos": RUN, "neg": RUN}."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in spec.split(",") if part.strip())
    out: dict[str, str] = {}
    for key, value in items:
        key, value = key.strip(), str(value).strip()
        if key not in CONTROL_CONDITIONS or not value:
            raise GistError(f"--control-runs {spec!r}: write pos=RUN,neg=RUN (either or both), got {key!r}")
        if key in out:
            raise GistError(f"--control-runs names {key!r} twice: give one run each")
        out[key] = value
    return out


@dataclass
class EvalConfig:
    """What `gist eval` evaluates; checked here so the library refuses what the CLI does."""

    runs: list[str] | str
    baselines: list[str] | None = None  # default: full, none, truncate
    splits: list[str] | None = None  # default: seen, unseen, human
    limit: int | None = None  # first N examples of each split
    truncate_tokens: int | None = None  # default: each run's num_gist_tokens
    control_runs: dict[str, str] | str | None = None  # {"pos": RUN, "neg": RUN} or "pos=RUN,neg=RUN"
    out: str | None = None  # default: <first run>/eval-<timestamp>
    max_new_tokens: int = 64
    batch_size: int = 8
    data_dir: str | None = None
    flops_examples: int = 8  # FLOPs counted on the first K examples of each split (0: none)
    bootstrap_resamples: int = 1000
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "float32"
    split_files: dict[str, str] = field(default_factory=dict)  # resolved: {label: file}

    def __post_init__(self) -> None:
        from gistcache.run import read_run_config

        self.runs = [self.runs] if isinstance(self.runs, str) else list(self.runs or [])
        if not self.runs:
            raise GistError("no run to evaluate: pass --run RUN (a folder written by `gist train`)")
        for run in self.runs:
            read_run_config(run)
        self.control_runs = parse_control_runs(self.control_runs)
        for key, run in self.control_runs.items():
            trained = read_run_config(run)["gist"].get("condition", "gist")
            if trained != CONTROL_CONDITIONS[key]:
                raise GistError(f"--control-runs {key}={run}: that run was trained with condition {trained!r}, not "
                                f"{CONTROL_CONDITIONS[key]!r}: give a run trained with --condition "
                                f"{CONTROL_CONDITIONS[key]}")
        baselines = list(BASELINES) if self.baselines is None else list(self.baselines)
        for name in baselines:
            if name not in BASELINES:
                raise GistError(f"unknown baseline {name!r}: use {', '.join(BASELINES)}")
        self.baselines = list(dict.fromkeys(baselines))
        splits = list(SPLITS) if not self.splits else list(self.splits)
        self.split_files = resolve_splits(splits, self.data_dir)
        self.splits = splits
        for name, value, low in (("--limit", self.limit, 1), ("--truncate-tokens", self.truncate_tokens, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise GistError(f"{name} must be a whole number >= {low}, got {value!r}")
        for name, value, low in (("--max-new-tokens", self.max_new_tokens, 1), ("--batch-size", self.batch_size, 1),
                                 ("--flops-examples", self.flops_examples, 0),
                                 ("bootstrap_resamples", self.bootstrap_resamples, 1)):
            if not isinstance(value, int) or value < low:
                raise GistError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.dtype not in DTYPES:
            raise GistError(f"unknown --dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise GistError(f"unknown --device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.out is None:
            self.out = str(Path(self.runs[0]) / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise GistError(f"--out {out} already exists and is not an empty folder: choose another --out")

    def to_dict(self) -> dict:
        return asdict(self)


# --- evaluation ------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    path: str
    name: str
    condition: str  # the condition it was trained under
    conditions: list[str]  # what is evaluated with it
    num_gist_tokens: int
    template: str = ""
    truncate_tokens: int | None = None


@dataclass
class Prepared:
    """One example's token ids for one run (see conditions.py for how each condition uses them)."""

    prompt: list[int]  # P: encode_instruction
    input: list[int]  # I: encode_input
    truncated: list[int] | None = None
    kept: int | None = None
    instruction_tokens: int | None = None


def _run_specs(config: EvalConfig) -> list[RunSpec]:
    from gistcache.run import read_run_config

    specs, names = [], set()
    entries = [(run, None) for run in config.runs] + [(run, key) for key, run in config.control_runs.items()]
    for run, key in entries:
        gist = read_run_config(run)["gist"]
        trained = gist.get("condition", "gist")
        conditions = ["gist", *config.baselines] if trained == "gist" else [trained]
        name, i = Path(run).resolve().name, 2
        while name in names:
            name, i = f"{Path(run).resolve().name}-{i}", i + 1
        names.add(name)
        specs.append(RunSpec(path=run, name=name, condition=trained, conditions=conditions,
                             num_gist_tokens=int(gist["num_gist_tokens"])))
    return specs


def _prepare(config: EvalConfig, spec: RunSpec, examples: dict[str, list]) -> dict[str, list[Prepared]]:
    """Tokenize every example for one run and refuse a truncation budget that truncates nothing."""
    from gistcache.config import GistConfig
    from gistcache.eval.conditions import truncate_prompt
    from gistcache.prompts import encode_input, encode_instruction, resolve_template
    from gistcache.run import load_run_tokenizer, read_run_config

    tok = load_run_tokenizer(spec.path)
    gist_config = GistConfig.from_dict(read_run_config(spec.path)["gist"])
    spec.template = resolve_template(tok, gist_config.template)
    truncate = "truncate" in spec.conditions
    if truncate:
        spec.truncate_tokens = config.truncate_tokens or spec.num_gist_tokens
    prepared: dict[str, list[Prepared]] = {}
    for split, rows in examples.items():
        prepared[split] = []
        for ex in rows:
            item = Prepared(prompt=encode_instruction(tok, ex.instruction, spec.template),
                            input=encode_input(tok, ex.input, spec.template))
            if truncate:
                cut = truncate_prompt(tok, ex.instruction, spec.template, spec.truncate_tokens)
                item.truncated, item.kept, item.instruction_tokens = cut.ids, cut.kept, cut.instruction_tokens
            prepared[split].append(item)
    if truncate:
        longest = max(p.instruction_tokens for rows in prepared.values() for p in rows)
        if spec.truncate_tokens >= longest:
            source = "--truncate-tokens" if config.truncate_tokens else f"the run's num_gist_tokens (run {spec.name})"
            raise GistError(f"truncation budget {spec.truncate_tokens} ({source}) is larger than the prompt: the "
                            f"longest evaluated instruction has {longest} tokens, so nothing would be cut; "
                            f"give --truncate-tokens below {longest}")
    return prepared


def _sequences(condition: str, items: list[Prepared], gist_ids: list[int], template_ids: list[int]):
    """(token-id sequences, rotary position offsets) for a causal condition."""
    if condition == "base":
        return [[*p.prompt, *p.input] for p in items], None
    if condition in ("full", "pos_control"):
        return [[*p.prompt, *gist_ids, *p.input] for p in items], None
    if condition == "truncate":
        return [[*p.truncated, *gist_ids, *p.input] for p in items], None
    if condition == "none":
        return [[*template_ids, *gist_ids, *p.input] for p in items], None
    if condition == "neg_control":
        return [list(p.input) for p in items], [len(p.prompt) + len(gist_ids) for p in items]
    raise AssertionError(condition)


def _state_positions(condition: str, p: Prepared, num_gist: int, template_ids: list[int]) -> int:
    """Positions of prompt state kept before the input (the baselines' gist ids not counted)."""
    return {"gist": num_gist, "full": len(p.prompt), "base": len(p.prompt), "pos_control": len(p.prompt),
            "truncate": len(p.truncated or []), "none": len(template_ids), "neg_control": 0}[condition]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GistError(f"--device {device}: no CUDA device here; use --device cpu")
    return device


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("left"), TimeRemainingColumn(), disable=not enabled)


def evaluate(config: EvalConfig, *, show_progress: bool = True) -> dict:
    """Evaluate each run and baseline on each split; write the output folder; return the results.

    Returns {"config", "runs", "rows", "out", ...}; each row is one (run, split, condition).
    """
    import torch

    from gistcache import __version__ as gistcache_version
    from gistcache.cache import model_kv_shape
    from gistcache.eval import flops as F
    from gistcache.eval.conditions import generate_gist, template_only_ids
    from gistcache.generation import check_context, generate_causal
    from gistcache.eval.rouge import exact_match, rouge_l_scores, summarize
    from gistcache.eval.fidelity import fidelity_row
    from gistcache.model import GistModel, load_base_model
    from gistcache.run import load_run
    from gistcache.train.data import load_examples

    started = time.perf_counter()
    examples = {label: load_examples(path)[:config.limit] for label, path in config.split_files.items()}
    specs = _run_specs(config)
    prepared = {spec.name: _prepare(config, spec, examples) for spec in specs}  # refusals before any model loads
    device = _resolve_device(config.device)
    dtype = getattr(torch, config.dtype)

    predictions = {split: [{} for _ in rows] for split, rows in examples.items()}
    rows: list[dict] = []
    fidelity: list[dict] = []
    runs_info: list[dict] = []
    single = len(config.runs) == 1
    total = sum(len(r) for r in examples.values()) * sum(len(s.conditions) for s in specs)
    progress = _progress(show_progress)
    with progress:
        task = progress.add_task("eval", total=total)
        for spec in specs:
            gm = load_run(spec.path, device=device, dtype=dtype)
            N, tok = gm.num_gist_tokens, gm.tokenizer
            # `base`: the untouched base model reading the full prompt (no adapter, no gist token)
            base_gm = (GistModel(load_base_model(gm.gist_config.model, dtype=dtype, device=device), tok, N,
                                 template=spec.template).eval() if "base" in spec.conditions else None)
            gist_ids = [gm.gist_token_id] * N
            template_ids = template_only_ids(tok, spec.template)
            layers, kv_heads, head_dim = model_kv_shape(gm)
            bytes_per_position = layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
            runs_info.append({"name": spec.name, "path": str(spec.path), "condition": spec.condition,
                              "conditions": spec.conditions, "num_gist_tokens": N, "template": spec.template,
                              "truncate_tokens": spec.truncate_tokens, "run_fingerprint": gm.run_fingerprint,
                              "base_model": gm.gist_config.model, "kv_bytes_per_position": bytes_per_position,
                              "template_tokens": len(template_ids)})
            for split, exs in examples.items():
                items = prepared[spec.name][split]
                instructions = [ex.instruction for ex in exs]
                inputs = [ex.input for ex in exs]
                for condition in spec.conditions:  # check every context before generating anything
                    if condition != "gist":
                        seqs, offsets = _sequences(condition, items, gist_ids, template_ids)
                        check_context(gm, offsets or [0] * len(seqs), seqs, config.max_new_tokens,
                                      what=f"{split} example")
                k = min(config.flops_examples, len(exs))
                full_ref = [F.causal_flops(gm, [*p.prompt, *gist_ids, *p.input], max_new_tokens=0).prefill
                            for p in items[:k]] if "full" not in spec.conditions else None
                for condition in spec.conditions:
                    label = _label(condition, spec, single)
                    progress.update(task, description=f"{spec.name} {split} {condition}")
                    t0 = time.perf_counter()
                    advance = lambda n: progress.advance(task, n)  # noqa: E731
                    if condition == "gist":
                        outputs = generate_gist(gm, instructions, inputs, max_new_tokens=config.max_new_tokens,
                                                batch_size=config.batch_size, on_batch=advance)
                    else:
                        seqs, offsets = _sequences(condition, items, gist_ids, template_ids)
                        outputs = generate_causal(base_gm if condition == "base" else gm, seqs,
                                                  max_new_tokens=config.max_new_tokens,
                                                  batch_size=config.batch_size, position_offsets=offsets,
                                                  on_batch=advance)
                    wall = time.perf_counter() - t0
                    outputs = [o.strip() for o in outputs]
                    counts = _count_flops(F, base_gm if condition == "base" else gm, condition, exs[:k], items[:k],
                                          gist_ids, template_ids, config.max_new_tokens)
                    refs = [ex.output for ex in exs]
                    scores = rouge_l_scores(outputs, refs)
                    em = [exact_match(o, r) for o, r in zip(outputs, refs)]
                    positions = [_state_positions(condition, p, N, template_ids) for p in items]
                    ratios = [len(p.prompt) / n for p, n in zip(items, positions) if n]
                    row = {
                        "run": spec.name, "split": split, "condition": condition, "label": label,
                        "examples": len(exs),
                        "rouge_l": summarize(scores, resamples=config.bootstrap_resamples, seed=config.seed),
                        "exact_match": summarize(em, resamples=config.bootstrap_resamples, seed=config.seed),
                        "instruction_tokens_mean": _mean([len(p.prompt) for p in items]),
                        "compression_mean": _mean(ratios) if len(ratios) == len(items) else None,
                        "compression_max": max(ratios) if len(ratios) == len(items) else None,
                        "prompt_state_positions_mean": _mean(positions),
                        "prompt_state_bytes_mean": _mean([n * bytes_per_position for n in positions]),
                        "wall_s": round(wall, 3),
                        "flops_examples": k,
                        **counts,
                    }
                    if condition == "truncate":
                        row["truncate_tokens"] = spec.truncate_tokens
                        row["truncate_kept_mean"] = _mean([p.kept for p in items])
                    row["full_prefill_flops"] = (counts["prefill_flops"] if condition == "full"
                                                 else _mean(full_ref) if full_ref else None)
                    rows.append(row)
                    for pred, out, p in zip(predictions[split], outputs, items):
                        pred[label] = out
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
            del gm, base_gm
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    _reductions(rows)

    results = {
        "gistcache_version": gistcache_version,
        "created": datetime.now().isoformat(timespec="seconds"),
        "config": {**config.to_dict(), "device_resolved": device},
        "runs": runs_info,
        "rows": rows,
        "fidelity": fidelity,
        "wall_s_total": round(time.perf_counter() - started, 2),
        "out": str(config.out),
    }
    _write_outputs(config, results, examples, predictions)
    return results


def _label(condition: str, spec: RunSpec, single: bool) -> str:
    """The name of a (run, condition) in predictions, plots and tables."""
    return condition if single or spec.condition != "gist" else f"{spec.name}:{condition}"


def _count_flops(F, gm, condition, exs, items, gist_ids, template_ids, max_new_tokens) -> dict:
    """Mean FLOPs per example on the subset, batch size 1."""
    from gistcache.cache import compress as compress_one

    if not items:
        return {"prefill_flops": None, "generation_flops": None, "compress_flops": None}
    counts = []
    compress = []
    for ex, p in zip(exs, items):
        if condition == "gist":
            cache, flops = F.count_flops(compress_one, gm, ex.instruction, batch_size=1)
            compress.append(flops)
            counts.append(F.gist_flops(gm, cache, ex.input, max_new_tokens=max_new_tokens))
        else:
            (seq,), offsets = _sequences(condition, [p], gist_ids, template_ids)
            counts.append(F.causal_flops(gm, seq, max_new_tokens=max_new_tokens,
                                         position_offset=offsets[0] if offsets else 0))
    return {"prefill_flops": _mean([c.prefill for c in counts]),
            "generation_flops": _mean([c.decode for c in counts]),
            "generated_tokens_mean": _mean([c.new_tokens for c in counts]),
            "compress_flops": _mean(compress) if compress else None}


def _reductions(rows: list[dict]) -> None:
    """FLOP reductions against `full` on the same split: prefill against the same run's full prompt
    (its `full` row, or the full-prompt prefill counted for runs without one), prefill + generation
    against the same run's `full` row, else the first run's."""
    for row in rows:
        same = [r for r in rows if r["split"] == row["split"] and r["condition"] == "full"]
        full = next((r for r in same if r["run"] == row["run"]), None) or (same[0] if same else None)
        if row["full_prefill_flops"] is None and full is not None and full["run"] == row["run"]:
            row["full_prefill_flops"] = full["prefill_flops"]
        ref = row["full_prefill_flops"]
        row["prefill_reduction_vs_full"] = (round(1 - row["prefill_flops"] / ref, 6)
                                            if ref and row["prefill_flops"] is not None else None)
        total, ref_total = _total(row), _total(full) if full else None
        row["total_flops"] = total
        row["total_reduction_vs_full"] = round(1 - total / ref_total, 6) if total is not None and ref_total else None


def _total(row: dict) -> float | None:
    if row.get("prefill_flops") is None:
        return None
    return row["prefill_flops"] + (row.get("generation_flops") or 0)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# --- output ---------------------------------------------------------------------------------------

def format_count(x: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes), None -> '—'."""
    if x is None:
        return "—"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def format_bytes(x: float | None) -> str:
    if x is None:
        return "—"
    for factor, prefix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if x >= factor:
            return f"{x / factor:.3g} {prefix}"
    return f"{x:.0f} B"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text): the summary table shared by the screen and results.md."""
    multi = len({r["run"] for r in results["rows"]}) > 1
    headers = (["run"] if multi else []) + ["split", "condition", "n", "ROUGE-L [95% CI]", "EM", "compression",
                                            "prefill FLOPs", "vs full", "gen FLOPs", "compress FLOPs",
                                            "prompt state", "wall s"]
    out = []
    for r in results["rows"]:
        rl = r["rouge_l"]
        comp = "—" if r["compression_mean"] is None else f"{r['compression_mean']:.1f}x (max {r['compression_max']:.0f}x)"
        red = r["prefill_reduction_vs_full"]
        out.append(([r["run"]] if multi else []) + [
            r["split"], r["condition"], str(r["examples"]),
            f"{rl['mean']:.1f} [{rl['ci_low']:.1f}, {rl['ci_high']:.1f}]", f"{r['exact_match']['mean']:.1f}", comp,
            format_count(r["prefill_flops"]), _format_change(red),
            format_count(r["generation_flops"]), format_count(r.get("compress_flops")),
            format_bytes(r["prompt_state_bytes_mean"]), f"{r['wall_s']:.1f}",
        ])
    return headers, out


def _format_change(reduction: float | None) -> str:
    """0.74 (a 74% reduction) -> '-74%'; None -> '—'."""
    if reduction is None:
        return "—"
    change = round(-reduction * 100)
    return f"{change:+d}%" if change else "0%"


def markdown_table(results: dict) -> str:
    headers, rows = table_rows(results)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(results: dict) -> str:
    from gistcache.eval.fidelity import fidelity_markdown

    cfg = results["config"]
    k = cfg["flops_examples"]
    runs = ", ".join(f"{r['name']} ({r['condition']}, N={r['num_gist_tokens']})" for r in results["runs"])
    return "\n".join([
        "# gist eval", "",
        f"Runs: {runs}. Greedy, max_new_tokens={cfg['max_new_tokens']}, device {cfg['device_resolved']}.", "",
        markdown_table(results), "",
        fidelity_markdown(results),
        f"ROUGE-L: F x100, 95% bootstrap interval ({cfg['bootstrap_resamples']} resamples, seed {cfg['seed']}). "
        "EM: exact match x100 after strip + lower-case. Compression: instruction tokens (template included) / "
        "prompt-state positions. FLOPs: mean per example over the first "
        f"{k} examples of each split, batch size 1 (FlopCounterMode); gist prefill is the forward over the input "
        "given the gist cache, its compress FLOPs are one-time per instruction. vs full: change of prefill FLOPs "
        "against the full prompt. Prompt state: positions x layers x 2 x kv_heads x head_dim x dtype bytes.", "",
    ])


def _write_outputs(config: EvalConfig, results: dict, examples: dict, predictions: dict) -> None:
    from gistcache.eval.plot import plot_results

    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GistError(f"--out {out} appeared while evaluating and is not empty: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        results["plots"] = [p.name for p in plot_results(results, tmp)]
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(_markdown(results))
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for split, exs in examples.items():
                for i, (ex, pred) in enumerate(zip(exs, predictions[split])):
                    record = {"split": split, "index": i, "source": ex.source, "instruction": ex.instruction,
                              "input": ex.input, "reference": ex.output,
                              "outputs": {k: v for k, v in pred.items() if isinstance(v, str)},
                              **{k: v for k, v in pred.items() if not isinstance(v, str)}}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
