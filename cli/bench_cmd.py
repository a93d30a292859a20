"""`gist bench cache`: gist cache vs full prompt, timed on this machine (gistcache.eval.bench)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from gistcache._io import format_bytes
from gistcache.cli.common import check_output_file, console, err_console, friendly_errors, print_json
from gistcache.cli.options import Device, DType, JsonOut
from gistcache.errors import GistError
from gistcache.eval import bench
from gistcache.eval.bench import BenchCacheConfig
from gistcache.model import quiet_transformers

app = typer.Typer(help="Benchmarks (not tests): timings on this machine.", no_args_is_help=True)


@app.callback()
def _bench() -> None:
    """Benchmarks (not tests): timings on this machine."""


@app.command("cache", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@friendly_errors
@quiet_transformers()
def bench_cache(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Base model: HF folder, .gguf, or smollm2-135m.")] = (
        "smollm2-135m"),
    lengths: Annotated[Optional[list[str]], typer.Option("--lengths", help="Instruction lengths in tokens: "
                                                         "--lengths 128 512 2048 (or 128,512,2048).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per measurement (median).")] = 5,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 64,
    num_gist: Annotated[int, typer.Option("--num-gist", help="Gist tokens.")] = 1,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: torch's).")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    out: Annotated[Optional[str], typer.Option("--out", help="Write the results as JSON here.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Gist cache vs full prompt: bytes, compress time, time to first token and total time."""
    values = [*(lengths or []), *ctx.args]  # `--lengths 128 512 2048` leaves 512 2048 as extra args
    parsed = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            if not part.isdigit():
                raise GistError(f"--lengths takes token counts, got {part!r}: e.g. --lengths 128 512 2048")
            parsed.append(int(part))
    config = BenchCacheConfig(model=model, lengths=parsed or [128, 512, 2048], repeats=repeats,
                              new_tokens=new_tokens, num_gist_tokens=num_gist, threads=threads, device=device,
                              dtype=dtype, out=out)
    if out is not None:
        check_output_file(out, "--out")  # before the timings, not after them
    progress = None if json_out else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    result = bench.bench_cache(config, progress=progress)
    if json_out:
        print_json(result)
        return
    print_bench_table(result)
    if out:
        console.print(f"wrote {out}", style="dim")


def print_bench_table(result: dict) -> None:
    m, cfg = result["machine"], result["config"]
    where = f"{m['device']} ({m['cpu']}), {m['dtype']}, {m['threads']} threads, torch {m['torch']}"
    size = Table(title=f"gist bench cache: {cfg['model']} on {where}")
    for col in ("instruction tokens", "prompt tokens", "gist file", "full-prompt KV", "smaller", "compress"):
        size.add_column(col, justify="right")
    speed = Table(title="time to first token (TTFT) and total time, median; full = no cache, cached = prefilled "
                        "prompt, gist = gist cache loaded from disk")
    for col in ("instruction tokens", "TTFT full", "TTFT cached", "TTFT gist", "total full", "total cached",
                "total gist", "TTFT full/gist"):
        speed.add_column(col, justify="right")
    for r in result["results"]:
        size.add_row(str(r["instruction_tokens"]), str(r["prompt_tokens"]), format_bytes(r["gist_file_bytes"]),
                     format_bytes(r["full_prompt_kv_bytes"]), f"{r['bytes_ratio']:.0f}x", f"{r['compress_s']:.3f} s")
        f, c, g = r["full"], r["cached"], r["gist"]
        speed.add_row(str(r["instruction_tokens"]), f"{f['ttft_s']:.3f} s", f"{c['ttft_s']:.3f} s",
                      f"{g['ttft_s']:.3f} s", f"{f['total_s']:.2f} s", f"{c['total_s']:.2f} s", f"{g['total_s']:.2f} s",
                      f"{f['ttft_s'] / g['ttft_s']:.1f}x")
    console.print(size)
    console.print(speed)
    for note in result["notes"]:
        console.print(f"- {note}", style="dim", highlight=False)


@app.command("serve")
@friendly_errors
@quiet_transformers()
def bench_serve(
    run: Annotated[Optional[str], typer.Option("--run", help="A run folder (default: the shipped run).")] = None,
    instructions: Annotated[int, typer.Option("--instructions", help="Distinct instructions (burst: one request "
                                              "each; oversubscribed: the pool the stream draws from).")] = 64,
    instruction_tokens: Annotated[int, typer.Option("--instruction-tokens")] = 512,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Tokens generated per request (EOS ignored).")] = 32,
    kv_cache_gib: Annotated[Optional[int], typer.Option("--kv-cache-gib", help="vLLM CPU KV cache space (burst "
                                                        "default 1; oversubscribed default: sized from the "
                                                        "prompts).")] = None,
    scenario: Annotated[str, typer.Option("--scenario", help="burst (each instruction once, all at once) | "
                                          "oversubscribed (a stream over more instructions than the KV cache holds "
                                          "as full prompts).")] = "burst",
    requests: Annotated[Optional[int], typer.Option("--requests", help="Oversubscribed: the stream's length "
                                                    "(default 2 x --instructions).")] = None,
    rate: Annotated[Optional[str], typer.Option("--rate", help="Oversubscribed: arrivals in requests/s, one pass "
                                                "each; 0 is one burst (default), R Poisson: --rate 0,2.")] = None,
    block_size: Annotated[Optional[str], typer.Option("--block-size", help="Oversubscribed: vLLM KV block sizes, "
                                                      "one engine each (default 16,128; 32,128 on the CPU).")] = None,
    oversubscription: Annotated[int, typer.Option("--oversubscription", help="Oversubscribed: the KV cache holds "
                                                  "--instructions / this many full prompts.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Oversubscribed: seed of the draws and arrivals.")] = 0,
    out: Annotated[Optional[str], typer.Option("--out", help="Write the results as JSON here.")] = None,
    json_out: JsonOut = False,
) -> None:
    """vLLM serving from gist caches vs full prompts (prefix cache warm and cold): req/s, TTFT, KV blocks."""
    from gistcache.eval.serve_bench import BenchServeConfig, bench_serve as run_bench
    from gistcache.eval.serve_report import render_lines
    from gistcache.eval.serve_scenarios import parse_list

    rates = parse_list(rate, "--rate", float, "0,2")
    config = BenchServeConfig(run=run, instructions=instructions, instruction_tokens=instruction_tokens,
                              new_tokens=new_tokens, kv_cache_gib=kv_cache_gib, out=out, scenario=scenario,
                              requests=requests, rates=[0.0] if rates is None else rates,
                              block_sizes=parse_list(block_size, "--block-size", int, "32,128"),
                              oversubscription=oversubscription, seed=seed)
    if out is not None:
        check_output_file(out, "--out")  # before the engine starts, not after the passes
    progress = None if json_out else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    result = run_bench(config, progress=progress)
    if json_out:
        print_json(result)
        return
    if config.scenario == "oversubscribed":
        for line in render_lines(result):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        if out:
            console.print(f"wrote {out}", style="dim", highlight=False)
        return
    m, c = result["machine"], result["config"]
    table = Table(title=f"gist bench serve: {c['instructions']} instructions x {c['instruction_tokens']} tokens, "
                        f"{c['new_tokens']} new tokens each, vLLM {m['vllm']} on {m['cpu']} (load {m['load_before']:.1f})")
    for col in ("pass", "prompt tokens", "req/s", "TTFT median", "TTFT p90", "prompt tokens computed", "KV blocks"):
        table.add_column(col, justify="right")
    for name, p in result["passes"].items():
        prompt = result["prompt_tokens"]["gist" if name == "gist" else "full"]
        table.add_row(name, f"{prompt:.0f}", f"{p['requests_per_s']:.2f}", f"{p['ttft_median_s']:.2f} s",
                      f"{p['ttft_p90_s']:.2f} s", str(p["prompt_tokens_computed"]), str(p["kv_blocks"]))
    console.print(table)
    if out:
        console.print(f"wrote {out}", style="dim")
