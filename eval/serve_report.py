"""The oversubscribed scenario's numbers from what vLLM reports, without vLLM: one pass's statistics, the
"where the gain comes from" lines, and the table (one line a row at any terminal width).

A request's record (`RequestRecord`) holds what vLLM reported for it. Its instruction counts as served from a
cache when vLLM reports at least the instruction's whole blocks as cached or loaded (for a gist prompt, the
connector loads the F+N cached slots, fewer than a block, so any cached token counts); an instruction that this
engine had already been asked for (since the prefix cache was last emptied) and that was not served from a
cache was evicted and computed again.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass

from gistcache.eval.serve_scenarios import blocks_for, percentile, rate_label


@dataclass
class RequestRecord:
    prompt_tokens: int
    instruction_tokens: int  # the prompt's tokens before the input: the templated instruction, or the F+N slots
    generated_tokens: int
    cached_tokens: int  # vLLM's num_cached_tokens: prefix cache hits and connector loads
    ttft_s: float | None  # vLLM's first_token_latency, from the request's arrival time (queueing included)
    seen_before: bool  # this engine was asked for this instruction before (since the prefix cache was emptied)
    preemptions: int = 0

    def instruction_cached(self, block_size: int) -> bool:
        return self.cached_tokens >= max(1, self.instruction_tokens // block_size * block_size)


def pass_stats(records: list[RequestRecord], wall_s: float, block_size: int, peak_blocks: int | None) -> dict:
    """One pass: requests/s, TTFT p50/p90/p99, prompt tokens computed, KV blocks, where instructions came from."""
    ttft = [r.ttft_s for r in records if r.ttft_s is not None]
    cached = [r.instruction_cached(block_size) for r in records]
    blocks = [blocks_for(r.prompt_tokens + r.generated_tokens, block_size) for r in records]
    return {"requests": len(records), "wall_s": wall_s, "requests_per_s": len(records) / wall_s,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90), "ttft_p99_s": percentile(ttft, 99),
            "prompt_tokens": sum(r.prompt_tokens for r in records),
            "prompt_tokens_computed": sum(r.prompt_tokens - r.cached_tokens for r in records),
            "kv_blocks_per_request": statistics.mean(blocks) if blocks else 0.0,
            "kv_blocks_peak": peak_blocks,
            "instructions_cached": sum(cached),
            "instructions_recomputed": sum(r.seen_before and not c for r, c in zip(records, cached)),
            "preemptions": sum(r.preemptions for r in records),
            "generated_tokens": sum(r.generated_tokens for r in records)}


def _best(passes: list[dict], kind: str, rate: float) -> dict | None:
    """The pass of `kind` at `rate` with the block size that suits it: the most requests/s."""
    mine = [p for p in passes if p["kind"] == kind and p["rate"] == rate]
    return max(mine, key=lambda p: p["requests_per_s"]) if mine else None


def _x(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def _vs(gist: float | None, full: float | None, less: str, more: str) -> str:
    """"5.0x fewer" where the gist's number is the smaller, "1.3x more" where it is the larger."""
    return f"{_x(full, gist)} {less}" if (gist or 0) <= (full or 0) else f"{_x(gist, full)} {more}"


def gains(passes: list[dict]) -> list[dict]:
    """Per arrival rate, the gist pass against the warm full-prompt pass, each at its best block size, and where
    the difference comes from, all from the measured numbers."""
    out = []
    for rate in dict.fromkeys(p["rate"] for p in passes):
        g, f = _best(passes, "gist", rate), _best(passes, "full", rate)
        if g is None or f is None:
            continue
        line = (f"{rate_label(rate)}: gist (block {g['block_size']}) vs full prompts, prefix cache warm (block "
                f"{f['block_size']}): {_x(g['requests_per_s'], f['requests_per_s'])} the requests/s, TTFT p50 "
                f"{_vs(g['ttft_p50_s'], f['ttft_p50_s'], 'lower', 'higher')} ({g['ttft_p50_s']:.2f} s vs "
                f"{f['ttft_p50_s']:.2f} s); it computes "
                f"{_vs(g['prompt_tokens_computed'], f['prompt_tokens_computed'], 'fewer', 'more')} prompt tokens "
                f"({g['prompt_tokens_computed']:,} vs {f['prompt_tokens_computed']:,}: the full prompts found "
                f"{f['instructions_cached']} of {f['requests']} instructions in the prefix cache and computed "
                f"{f['instructions_recomputed']} again that the cache had evicted) and holds "
                f"{_vs(g['kv_blocks_per_request'], f['kv_blocks_per_request'], 'fewer', 'more')} KV blocks a request "
                f"({g['kv_blocks_per_request']:.1f} vs {f['kv_blocks_per_request']:.1f}; peak held "
                f"{g['kv_blocks_peak']} vs {f['kv_blocks_peak']}); preemptions {g['preemptions']} vs "
                f"{f['preemptions']}")
        out.append({"rate": rate, "gist_block_size": g["block_size"], "full_block_size": f["block_size"],
                    "line": line})
    return out


HEADERS = ("pass", "block", "arrivals", "req/s", "TTFT p50", "TTFT p90", "TTFT p99", "prompt tokens computed",
           "KV blocks held (peak)", "blocks/request", "instructions cached", "recomputed", "preempted")


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for p in result["passes"]:
        usable = result["engines"][str(p["block_size"])]["kv_blocks_total"] - 1  # less vLLM's null block
        peak = "-" if p["kv_blocks_peak"] is None else f"{p['kv_blocks_peak']:,}"
        rows.append(["gist" if p["kind"] == "gist" else "full warm", str(p["block_size"]), rate_label(p["rate"]),
                     f"{p['requests_per_s']:.2f}", _s(p["ttft_p50_s"]), _s(p["ttft_p90_s"]), _s(p["ttft_p99_s"]),
                     f"{p['prompt_tokens_computed']:,}", f"{peak} of {usable:,}",
                     f"{p['kv_blocks_per_request']:.1f}", f"{p['instructions_cached']}/{p['requests']}",
                     str(p["instructions_recomputed"]), str(p["preemptions"])])
    return rows


def header_lines(result: dict) -> list[str]:
    """What the table is of: the stream, the prompts, each engine's KV cache, the machine."""
    c, m, pool = result["config"], result["machine"], result["pool"]
    lines = [f"gist bench serve, oversubscribed: {pool['requests']} requests over {c['instructions']} instructions "
             f"of {c['instruction_tokens']} tokens ({pool['distinct']} distinct drawn, seed {c['seed']}), "
             f"{c['new_tokens']} new tokens each; full prompt {result['prompt_tokens']['full']:.0f} tokens, gist "
             f"prompt {result['prompt_tokens']['gist']:.0f}; vLLM {m['vllm']} on {m['cpu']} (load "
             f"{m['load_before']:.1f} before, {m['load_after']:.1f} after)"]
    for bs, e in result["engines"].items():
        usable = e["kv_blocks_total"] - 1
        lines.append(f"block {bs}: KV cache {usable:,} blocks ({usable * int(bs):,} tokens) holds "
                     f"{e['full_prompts_held']} full prompts of {e['blocks_per_full_prompt']} blocks (the pool has "
                     f"{c['instructions']} instructions); a gist request takes {e['blocks_per_gist_prompt']}; "
                     f"warm-up {e['warmup_s']['full']:.1f} s (full), {e['warmup_s']['gist']:.1f} s (gist)")
    return lines


def render_lines(result: dict) -> list[str]:
    """The header lines, the table as markdown at its natural width (one line a row whatever COLUMNS), and the
    "where the gain comes from" lines."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.MARKDOWN, show_edge=True)
    for i, name in enumerate(HEADERS):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    for row in table_rows(result):
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, force_terminal=False, soft_wrap=False).print(table)
    rows = [line.rstrip() for line in buf.getvalue().splitlines() if line.strip()]
    gain = [f"where the gain comes from, {g['line']}" for g in result["gains"]]
    return [*header_lines(result), *rows, *gain]
