"""The runs an evaluation reads: each with a unique name and the conditions evaluated with it (`run_specs`),
and every example tokenized for it (`prepare_run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gistcache.config import GistConfig
from gistcache.data.alpaca import Example
from gistcache.errors import GistError
from gistcache.eval.conditions import (TRUNCATIONS, Prepared, instruction_token_count, truncate_budget,
                                       truncate_prompt)
from gistcache.eval.config import EvalConfig
from gistcache.model import load_run_tokenizer
from gistcache.prompts import encode_input, encode_instruction, resolve_template
from gistcache.run import read_run_config


@dataclass
class RunSpec:
    path: str
    name: str
    condition: str  # the condition it was trained under
    conditions: list[str]  # what is evaluated with it
    num_gist_tokens: int
    gist_every: int = 0  # 0: one chunk; else N gist tokens per chunk of this many instruction tokens
    template: str = ""
    truncate_tokens: int | None = None  # None for a chunked run: its budget is each prompt's own M


def run_specs(config: EvalConfig) -> list[RunSpec]:
    """The runs to evaluate, each with a unique name and the conditions evaluated with it."""
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
                             num_gist_tokens=int(gist["num_gist_tokens"]), gist_every=int(gist.get("gist_every", 0))))
    return specs


def prepare_run(config: EvalConfig, spec: RunSpec, examples: dict[str, list[Example]]) -> dict[str, list[Prepared]]:
    """Tokenize every example for one run and refuse a truncation budget that truncates nothing."""
    tok = load_run_tokenizer(spec.path)
    gist_config = GistConfig.from_dict(read_run_config(spec.path)["gist"])
    spec.template = resolve_template(tok, gist_config.template)
    truncations = [c for c in spec.conditions if c in TRUNCATIONS]
    truncate = bool(truncations)
    if truncate:
        spec.truncate_tokens = config.truncate_tokens or (None if gist_config.gist_every else spec.num_gist_tokens)
    prepared: dict[str, list[Prepared]] = {}
    for split, rows in examples.items():
        prepared[split] = []
        for ex in rows:
            item = Prepared(prompt=encode_instruction(tok, ex.instruction, spec.template),
                            input=encode_input(tok, ex.input, spec.template))
            if truncate:  # as many instruction tokens as this prompt's gist cache has gist slots (conditions.py)
                budget = truncate_budget(tok, gist_config, spec.template, len(item.prompt), config.truncate_tokens)
                for condition in truncations:
                    cut = truncate_prompt(tok, ex.instruction, spec.template, budget, TRUNCATIONS[condition])
                    setattr(item, "truncated_end" if condition == "truncate-end" else "truncated", cut.ids)
                    item.kept, item.instruction_tokens = cut.kept, cut.instruction_tokens
            else:
                item.instruction_tokens = instruction_token_count(tok, ex.instruction, spec.template)
            prepared[split].append(item)
    if truncate and (config.truncate_tokens or not gist_config.gist_every):  # a chunked run's budget grows with P
        longest = max(p.instruction_tokens for rows in prepared.values() for p in rows)
        if spec.truncate_tokens >= longest:
            source = "--truncate-tokens" if config.truncate_tokens else f"the run's num_gist_tokens (run {spec.name})"
            raise GistError(f"truncation budget {spec.truncate_tokens} ({source}) is larger than the prompt: the "
                            f"longest evaluated instruction has {longest} tokens, so nothing would be cut; "
                            f"give --truncate-tokens below {longest}")
    return prepared
