"""The GPU run's table (eval/gpu_bench/): one row a measurement, always all of them (a failed or skipped stage's
rows say why), drawn as markdown at its natural width."""

from __future__ import annotations

import io


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f} ms"


def _s(s: float | None) -> str:
    return "-" if s is None else f"{s:,.2f} s"


def _tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} tok/s"


def _x(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


COLUMNS = ("measurement", "full prompt", "cached prefix", "gist cache", "gist vs full", "gist vs cached", "note")


def table_rows(res: dict) -> list[list[str]]:
    """The table: one row a measurement, always all of them; a row whose stage failed or was skipped says why."""
    cfg, errors, skipped = res["config"], res["errors"], res["skipped"]
    B, T = cfg["batch"], cfg["new_tokens"]

    def why(*stages: str) -> str:
        for s in stages:
            if s in errors:
                return f"failed ({s}): {errors[s]}"
            if s in skipped:
                return f"{s} {skipped[s]}"
        return ""

    m, model, prompt, kv = res["machine"], res["model"], res["prompt"], res["kv_bytes"]
    rows = []
    cpu = f"{m.get('cpu', '-')} x{m.get('cpu_count', '-')}"
    if m.get("gpu"):
        peak = f"; peak {_bytes(res['peak_gpu_memory_bytes'])} allocated" if res.get("peak_gpu_memory_bytes") else ""
        where = f"{m['gpu']} ({m['device']}, {_bytes(m['gpu_memory_bytes'])}, CUDA {m.get('cuda')}){peak}; CPU {cpu}"
    else:
        where = f"CPU {cpu} ({m.get('device', cfg['device'])}, torch threads: {m.get('torch_threads')})"
    rows.append(["machine", "", "", "", "", "", where if m else why("setup")])
    rows.append(["software", "", "", "", "", "", f"torch {m.get('torch')}, transformers {m.get('transformers')}, "
                 f"python {m.get('python')}, gistcache {m.get('gistcache')}" if m else why("setup")])
    rows.append(["model", "", "", "", "", "", (
        f"{model['arch']} {model['shape']}-shaped, random weights: {_count(model['parameters'])} parameters, "
        f"{model['layers']} layers, {model['kv_heads']} KV heads x {model['head_dim']}, vocab {model['vocab_size']:,}, "
        f"{model['dtype']}, sdpa; {model['gist_tokens']} gist token{'s' if model['gist_tokens'] > 1 else ''}, "
        f"{model['mask']} mask")
        if model else why("setup")])
    if prompt:
        slots = prompt.get("gist_slots")
        rows.append(["prompt (tokens)", f"{prompt['prompt_tokens']:,} + {prompt['input_tokens']}",
                     f"{prompt['prompt_tokens']:,} cached + {prompt['input_tokens']}",
                     f"{slots} slots + {prompt['input_tokens']}" if slots else "-", "", "",
                     f"{prompt['instruction_tokens']:,} instruction tokens + {prompt['template_tokens']} of the "
                     f"template; input {prompt['input_tokens']} tokens" + (
                         f"; gist slots = {kv.get('fixed_prefix_tokens')} fixed-prefix + {kv.get('gist_tokens')} "
                         f"gist" if kv else "")])
    else:
        rows.append(["prompt (tokens)", "-", "-", "-", "", "", why("setup", "prompts")])
    if kv:
        rows.append(["prompt KV per request", _bytes(kv["full_per_request"]), _bytes(kv["full_per_request"]),
                     _bytes(kv["gist_per_request"]), _x(kv["full_per_request"] / kv["gist_per_request"]) + " less",
                     _x(kv["full_per_request"] / kv["gist_per_request"]) + " less",
                     f"x{B}: {_bytes(B * kv['full_per_request'])} vs {_bytes(B * kv['gist_per_request'])}; cache file "
                     f"tensors {_bytes(kv['gist_file_tensors'])}"])
    else:
        rows.append(["prompt KV per request", "-", "-", "-", "", "", why("setup", "prompts", "compress")])
    c = res["compress"]
    rows.append(["compress 1 instruction", "", "", _ms(c.get("one_s")), "", "",
                 "median; the cost of one prefill of the prompt, paid once per instruction" if c
                 else why("setup", "prompts", "compress")])
    rows.append([f"compress {B} instructions", "", "", _s(c.get("batch_s")), "", "",
                 f"one call, batch size {c['batch_size']}" if c else why("setup", "prompts", "compress")])
    for how, label, note in (
            ("generate", "TTFT, generate call",
             "a call returning 1 token: transformers generate (full, cached), gistcache generate_ids (gist)"),
            ("forward", "TTFT, prefill forward", "the forward over what is not cached, and its argmax")):
        r = _get(res, "ttft", how)
        if r:
            rows.append([label, _ms(r["full"]["median_s"]), _ms(r["cached"]["median_s"]),
                         _ms(r["gist"]["median_s"]), _x(r["speedup_vs_full"]), _x(r["speedup_vs_cached"]),
                         f"batch 1, median of {cfg['repeats']}; {note}"])
        else:
            rows.append([label, "-", "-", "-", "-", "-", why("setup", "prompts", "compress", "ttft")])
    g = _get(res, "throughput", "generate")
    label = f"x{B} generate: tokens/s"
    if g:
        rows.append([label, _tps(g["full"]["tokens_per_s"]), "", _tps(g["gist"]["tokens_per_s"]), _x(g["speedup"]),
                     "", f"{B} distinct requests x {T} new tokens, prefill included (full {_s(g['full']['total_s'])}, "
                         f"gist {_s(g['gist']['total_s'])}); DynamicCache, eager; median of {cfg['batch_repeats']}"])
    else:
        rows.append([label, "-", "", "-", "-", "", why("setup", "prompts", "compress", "throughput generate")])
    lp = _get(res, "throughput", "loop") or {}
    engine = {"compile": "static cache + compiled step", "static": "static cache, eager"}.get(lp.get("engine"))
    notes = "; ".join(lp.get("notes") or [])
    if engine:
        how = (f"torch.compile {lp['compile_config'].get('mode')} (transformers' CompileConfig)"
               if lp.get("compile_config") else "eager")
        rows.append([f"x{B} {engine}: tokens/s", _tps(lp["full"]["tokens_per_s"]), "",
                     _tps(lp["gist"]["tokens_per_s"]), _x(lp["speedup"]), "",
                     f"prefill included (full {_s(lp['full']['total_s'])}, gist {_s(lp['gist']['total_s'])}); "
                     f"decode step {how}" + (f"; {notes}" if notes else "")])
        rows.append([f"x{B} {engine}: decode tokens/s", _tps(lp["full"]["decode_tokens_per_s"]),
                     _tps(lp["full"]["decode_tokens_per_s"]), _tps(lp["gist"]["decode_tokens_per_s"]),
                     _x(lp["decode_speedup"]), _x(lp["decode_speedup"]),
                     f"after the first token ({T - 1} steps): what {B} prefixes cached beforehand would decode at"])
    else:
        reason = why("setup", "prompts", "compress", "decode loop") or notes
        rows.append([f"x{B} decode loop: tokens/s", "-", "", "-", "-", "", reason])
        rows.append([f"x{B} decode loop: decode tokens/s", "-", "-", "-", "-", "-", reason])
    check_stage = {"cached = full (first token)": "ttft", "gist forward = gist generate (first token)": "ttft",
                   "gist = masked reference": "checks", "gist batched = each cache alone": "checks",
                   "decode loop = generate (gist)": "decode loop", "decode loop = generate (full)": "decode loop"}
    for name, stage in check_stage.items():
        ch = res["checks"].get(name)
        if ch:
            rows.append([f"check: {name}", "", "", "", "", "", f"{'ok' if ch['ok'] else 'DIFFERS'}: {ch['detail']}"])
        else:
            rows.append([f"check: {name}", "", "", "", "", "",
                         why("setup", "prompts", "compress", stage, "throughput generate") or "not run"])
    for stage, reason in res["errors"].items():
        rows.append([f"failed: {stage}", "", "", "", "", "", reason])
    for stage, reason in res["skipped"].items():
        rows.append([f"skipped: {stage}", "", "", "", "", "", reason])
    n_err, n_skip = len(res["errors"]), len(res["skipped"])
    rows.append(["run", "", "", "", "", "", f"{res.get('elapsed_s', 0):.0f} s of the {cfg['time_budget']:g} s "
                 f"budget; " + ("all measured" if not n_err + n_skip else f"{n_err} stages failed, {n_skip} skipped")])
    return rows


def render_table(rows: list[list[str]]) -> str:
    """The rows as a markdown table drawn by rich at its natural width (every row one line, whatever COLUMNS)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.MARKDOWN, show_edge=True)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if 0 < i < len(COLUMNS) - 1 else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip())
