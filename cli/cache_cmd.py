"""`gist compress`, `gist generate`, `gist cache ls|rm|prune` and `gist bench cache`: thin verbs over the library."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from gistcache.cli.common import console, err_console, friendly_errors, print_json
from gistcache.cli.options import JsonOut, RunDir
from gistcache.errors import GistError

StoreDir = Annotated[Optional[str], typer.Option("--store", help="Cache store folder. Default: $GISTCACHE_HOME, "
                                                 "else $XDG_CACHE_HOME/gistcache, else ~/.cache/gistcache.")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N.")]
DType = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 (a cache fits only its dtype).")]

cache_app = typer.Typer(help="List, remove and prune the stored gist caches.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (not tests): timings on this machine.", no_args_is_help=True)


@bench_app.callback()
def _bench() -> None:
    """Benchmarks (not tests): timings on this machine."""


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
    app.command("generate")(generate)
    cache_app.command("ls")(cache_ls)
    cache_app.command("rm")(cache_rm)
    cache_app.command("prune")(cache_prune)
    app.add_typer(cache_app, name="cache")
    bench_app.command("cache", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(
        bench_cache)
    app.add_typer(bench_app, name="bench")


def torch_dtype(name: str):
    from gistcache.cache import DTYPES

    if name not in DTYPES:
        raise GistError(f"--dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_prompts_file(path: str) -> list[str]:
    """Instructions from a JSONL file: one JSON object with "instruction" per line, or a JSON string."""
    p = Path(path)
    if not p.is_file():
        raise GistError(f"--file {path} does not exist: give a JSONL file, one {{\"instruction\": ...}} per line")
    texts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GistError(f"--file {path} line {n} is not JSON ({exc.msg}): write one JSON object per line") from None
        if isinstance(item, dict) and isinstance(item.get("instruction"), str):
            texts.append(item["instruction"])
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise GistError(f"--file {path} line {n} has no \"instruction\" text: write {{\"instruction\": \"...\"}} "
                            f"or a JSON string")
    if not texts:
        raise GistError(f"--file {path} holds no instructions")
    return texts


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_bytes(text: str) -> int:
    """'1000', '500K', '64M', '2G' (powers of 1024) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise GistError(f"--max-bytes {text!r} is not a size: give bytes, or a number with K, M or G")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


@friendly_errors
def compress(
    prompt: Annotated[Optional[str], typer.Argument(help="The instruction to compress.")] = None,
    run: RunDir = None,
    file: Annotated[Optional[str], typer.Option("--file", help="JSONL of instructions, compressed in batches.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the cache here (a folder with "
                                               "--file).")] = None,
    store: StoreDir = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward (left-padded).")] = 8,
    device: Device = "cpu",
    dtype: DType = "float32",
    json_out: JsonOut = False,
) -> None:
    """Compress instructions into gist KV caches (a second compress of the same prompt is a store hit)."""
    from gistcache.cache import save_cache
    from gistcache.run import load_run
    from gistcache.store import CacheStore, compress_cached

    if (prompt is None) == (file is None):
        raise GistError("give one instruction as an argument or --file prompts.jsonl, not both or neither")
    if batch_size < 1:
        raise GistError(f"--batch-size must be a whole number >= 1, got {batch_size}")
    torch_dtype_ = torch_dtype(dtype)
    texts = [prompt] if file is None else read_prompts_file(file)
    if file is not None and out is not None and Path(out).is_file():
        raise GistError(f"--out {out} is a file: with --file, --out is a folder for one cache per line")
    if file is None and out is not None and Path(out).is_dir():
        raise GistError(f"--out {out} is a folder: give a file name such as {Path(out) / 'prompt.safetensors'}")
    cache_store = CacheStore(store)
    model = load_run(run, device=device, dtype=torch_dtype_)
    results = compress_cached(model, texts, cache_store, batch_size=batch_size)
    rows = []
    for i, res in enumerate(results):
        path = res.path
        if out is not None:
            path = Path(out) if file is None else Path(out) / f"{i:04d}-{res.key[:12]}.safetensors"
            save_cache(res.cache, path)
        c = res.cache
        size = path.stat().st_size
        rows.append({"index": i, "key": res.key, "store": "hit" if res.hit else "compressed", "path": str(path),
                     "prompt_preview": c.prompt_preview, "prompt_tokens": c.num_prompt_tokens,
                     "gist_tokens": c.num_gist_tokens, "compression_ratio": round(c.compression_ratio, 2),
                     "bytes_on_disk": size, "full_prompt_kv_bytes": c.full_prompt_kv_bytes,
                     "bytes_ratio": round(c.full_prompt_kv_bytes / size, 2), "input_position": c.offset})
    if json_out:
        print_json(rows if file is not None else rows[0])
        return
    note = "full KV = (prompt tokens + gist tokens) x layers x 2 x kv_heads x head_dim x dtype bytes"
    if file is None:
        r = rows[0]
        table = Table(title="gist compress", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for name, value in (
            ("prompt", r["prompt_preview"]),
            ("store", f"{r['store']} ({r['key'][:16]} in {cache_store.root})"),
            ("tokens", f"{r['prompt_tokens']} prompt -> {r['gist_tokens']} gist ({r['compression_ratio']:.1f}x fewer)"),
            ("bytes", f"{human_bytes(r['bytes_on_disk'])} on disk vs {human_bytes(r['full_prompt_kv_bytes'])} full KV "
                      f"({r['bytes_ratio']:.1f}x smaller)"),
            ("input position", str(r["input_position"])),
            ("file", r["path"]),
        ):
            table.add_row(name, value)
        console.print(table, highlight=False)
        console.print(note, style="dim")
        return
    table = Table(title=f"gist compress: {len(rows)} prompts ({sum(r['store'] == 'hit' for r in rows)} hits)")
    table.add_column("#", justify="right", min_width=2)
    table.add_column("prompt", no_wrap=True, max_width=20, overflow="ellipsis")
    for col in ("store", "tokens", "on disk", "full KV", "smaller"):
        table.add_column(col, justify="left" if col == "store" else "right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["index"]), r["prompt_preview"], "hit" if r["store"] == "hit" else "new",
                      f"{r['prompt_tokens']} -> {r['gist_tokens']}",
                      human_bytes(r["bytes_on_disk"]), human_bytes(r["full_prompt_kv_bytes"]),
                      f"{r['bytes_ratio']:.1f}x")
    console.print(table, highlight=False)
    console.print(f"files in {Path(rows[0]['path']).parent}; {note}", style="dim", highlight=False)


@friendly_errors
def generate(
    input: Annotated[list[str], typer.Option("--input", help="Text after the gist (repeatable; one batch).")],
    run: RunDir = None,
    cache: Annotated[Optional[str], typer.Option("--cache", help="A cache file from `gist compress --out`.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="An instruction: compressed (or found in the "
                                                  "store) first.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0: off.")] = 0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Repeatable sampling.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come (inputs one by one).")] = False,
    compare_full: Annotated[Optional[str], typer.Option("--compare-full", help="The instruction the cache holds: "
                                                        "also answer each input with the untouched base model reading "
                                                        "it in full, side by side.")] = None,
    store: StoreDir = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    json_out: JsonOut = False,
) -> None:
    """Answer each --input from a gist cache: the prompt itself is never run again."""
    from gistcache.cache import load_cache
    from gistcache.generation import GenerateConfig
    from gistcache.generation import generate as run_generate
    from gistcache.run import load_run
    from gistcache.store import CacheStore, compress_cached

    if (cache is None) == (prompt is None):
        raise GistError("give --cache FILE or --prompt TEXT, not both or neither")
    if stream and json_out:
        raise GistError("--stream prints text as it comes; drop --json or --stream")
    if stream and compare_full is not None:
        raise GistError("--stream prints one answer as it comes; drop --compare-full or --stream")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed)
    GenerateConfig(**settings)  # refuse bad settings before loading anything
    torch_dtype_ = torch_dtype(dtype)
    gist_cache = load_cache(cache) if cache is not None else None  # the file is checked before the model loads
    model = load_run(run, device=device, dtype=torch_dtype_)
    if gist_cache is None:
        gist_cache = compress_cached(model, prompt, CacheStore(store))[0].cache
    if stream:
        from transformers import TextStreamer

        texts = []
        for text in input:
            if len(input) > 1:
                console.print(f"[bold]{text}[/] ->", highlight=False)
            streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            texts += run_generate(model, gist_cache, text, streamer=streamer, **settings)
        return
    texts = run_generate(model, gist_cache, list(input), **settings)
    if compare_full is not None:
        full = full_prompt_answers(model, gist_cache, compare_full, list(input), max_new_tokens, device,
                                   torch_dtype_)
        if json_out:
            print_json({"prompt_tokens": gist_cache.num_prompt_tokens, "gist_tokens": gist_cache.num_gist_tokens,
                        "cache_bytes": gist_cache.nbytes, "full_prompt_kv_bytes": gist_cache.full_prompt_kv_bytes,
                        "answers": [{"input": i, "gist": o, "full_prompt": f}
                                    for i, o, f in zip(input, texts, full)]})
            return
        print_side_by_side(gist_cache, list(input), texts, full)
        return
    if json_out:
        print_json([{"input": i, "output": o} for i, o in zip(input, texts)])
        return
    for text, output in zip(input, texts):
        console.print(f"[bold]input:[/]  {escape(text)}", highlight=False)
        if output.strip():
            console.print(f"[bold]answer:[/] {escape(output)}", highlight=False)
        else:
            console.print("[bold]answer:[/] [dim](no text: the model ended its answer at once)[/]", highlight=False)


def full_prompt_answers(model, gist_cache, instruction: str, inputs: list[str], max_new_tokens: int, device,
                        dtype) -> list[str]:
    """The untouched base model's greedy answers to the whole instruction and each input."""
    from gistcache.cache import sha256_text
    from gistcache.generation import generate_full_prompt
    from gistcache.model import GistModel, load_base_model

    if sha256_text(instruction) != gist_cache.prompt_sha256:
        raise GistError("--compare-full is not the instruction this cache holds (its SHA-256 differs): give the "
                        "exact text that was compressed")
    base = GistModel(load_base_model(model.gist_config.model, dtype=dtype, device=device), model.tokenizer,
                     model.num_gist_tokens, template=model.template).eval()
    return generate_full_prompt(base, instruction, inputs, max_new_tokens=max_new_tokens)


def print_side_by_side(gist_cache, inputs: list[str], gist_answers: list[str], full_answers: list[str]) -> None:
    c = gist_cache
    table = Table(title=f"{c.num_prompt_tokens} prompt tokens -> {c.num_gist_tokens} gist token(s) "
                        f"({c.compression_ratio:.0f}x fewer); cache {human_bytes(c.nbytes)} vs "
                        f"{human_bytes(c.full_prompt_kv_bytes)} of full-prompt KV")
    table.add_column("input", overflow="fold")
    table.add_column("answer from the gist cache", overflow="fold")
    table.add_column("answer from the full prompt (base model)", overflow="fold")
    for text, gist_answer, full_answer in zip(inputs, gist_answers, full_answers):
        table.add_row(escape(text), escape(gist_answer.strip()), escape(full_answer.strip()))
    console.print(table, highlight=False)


@friendly_errors
def cache_ls(store: StoreDir = None, json_out: JsonOut = False) -> None:
    """List stored caches, most recently used first."""
    from datetime import datetime

    from gistcache.store import CacheStore

    cache_store = CacheStore(store)
    entries = cache_store.entries()
    if json_out:
        print_json([e.to_dict() for e in entries])
        return
    def short(when: datetime) -> str:
        return when.strftime("%m-%d %H:%M")

    table = Table(title=f"gist caches in {cache_store.root} (most recently used first)", box=None, pad_edge=False,
                  header_style="bold")
    table.add_column("key", no_wrap=True, min_width=12)
    table.add_column("prompt", no_wrap=True, max_width=18, overflow="ellipsis")
    for col, width in (("tokens", 7), ("bytes", 9), ("created", 11), ("last used", 11)):
        table.add_column(col, justify="right", no_wrap=True, min_width=width)
    for e in entries:
        try:
            created = short(datetime.fromisoformat(e.created).astimezone())
        except ValueError:
            created = e.created
        table.add_row(e.key[:12], e.prompt_preview or f"sha256 {e.prompt_sha256[:12]}",
                      f"{e.num_prompt_tokens} -> {e.num_gist_tokens}", human_bytes(e.bytes), created,
                      short(datetime.fromtimestamp(e.last_used)))
    console.print(table, highlight=False)
    console.print(f"{len(entries)} cache{'s' if len(entries) != 1 else ''}, "
                  f"{human_bytes(sum(e.bytes for e in entries))}", style="dim")


@friendly_errors
def cache_rm(
    keys: Annotated[list[str], typer.Argument(help="Keys or unique key prefixes, from `gist cache ls`.")],
    store: StoreDir = None,
) -> None:
    """Remove stored caches by key (a unique prefix is enough)."""
    from gistcache.store import CacheStore

    for key in CacheStore(store).remove(keys):
        console.print(f"removed {key}")


@friendly_errors
def cache_prune(
    max_bytes: Annotated[str, typer.Option("--max-bytes", help="Keep at most this much (e.g. 500000, 64M, 1G).")],
    store: StoreDir = None,
    json_out: JsonOut = False,
) -> None:
    """Remove least-recently-used caches until the store holds at most --max-bytes."""
    from gistcache.store import CacheStore

    cache_store = CacheStore(store)
    removed = cache_store.prune(parse_bytes(max_bytes))
    left = cache_store.total_bytes()
    if json_out:
        print_json({"removed": [e.key for e in removed], "bytes_left": left})
        return
    for e in removed:
        console.print(f"removed {e.key[:16]}  {human_bytes(e.bytes)}  {e.prompt_preview}", highlight=False)
    console.print(f"removed {len(removed)}; {human_bytes(left)} left in {cache_store.root}", style="dim")


@friendly_errors
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
    from gistcache.eval.bench import BenchCacheConfig, bench_cache as run_bench

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
    progress = None if json_out else (lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
    result = run_bench(config, progress=progress)
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
        size.add_row(str(r["instruction_tokens"]), str(r["prompt_tokens"]), human_bytes(r["gist_file_bytes"]),
                     human_bytes(r["full_prompt_kv_bytes"]), f"{r['bytes_ratio']:.0f}x", f"{r['compress_s']:.3f} s")
        f, c, g = r["full"], r["cached"], r["gist"]
        speed.add_row(str(r["instruction_tokens"]), f"{f['ttft_s']:.3f} s", f"{c['ttft_s']:.3f} s",
                      f"{g['ttft_s']:.3f} s", f"{f['total_s']:.2f} s", f"{c['total_s']:.2f} s", f"{g['total_s']:.2f} s",
                      f"{f['ttft_s'] / g['ttft_s']:.1f}x")
    console.print(size)
    console.print(speed)
    for note in result["notes"]:
        console.print(f"- {note}", style="dim", highlight=False)
