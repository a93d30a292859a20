"""`gist compress`: instructions into gist caches, through the store (a second compress is a lookup)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from gistcache._io import format_bytes
from gistcache.cache import FORMAT_VERSION, check_cache_path, read_cache_metadata, save_cache
from gistcache.cli.common import (check_output_file, check_parent_not_file, check_writable_folder, console,
                                  err_console, friendly_errors, print_json)
from gistcache.cli.options import Device, DType, JsonOut, RunDir, StoreDir
from gistcache.config import check_batch_size, torch_dtype
from gistcache.data.alpaca import load_instructions
from gistcache.errors import GistError
from gistcache.inference.compression import untrained_length_warning
from gistcache.model import load_run, quiet_transformers
from gistcache.model.shipped import route_instructions
from gistcache.store import CacheStore, compress_cached

NOTE = "full KV = (prompt tokens + gist tokens) x layers x 2 x kv_heads x head_dim x dtype bytes"


@friendly_errors
@quiet_transformers()
def compress(
    prompt: Annotated[Optional[str], typer.Argument(help="The instruction to compress.")] = None,
    run: RunDir = None,
    file: Annotated[Optional[str], typer.Option("--file", help="JSONL of instructions, compressed in batches.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the cache here (a folder with "
                                               "--file).")] = None,
    store: StoreDir = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file that is not a gist "
                                            "cache (a gist cache there is always replaced).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per forward (left-padded).")] = 8,
    device: Device = "cpu",
    dtype: DType = "float32",
    json_out: JsonOut = False,
) -> None:
    """Compress instructions into gist KV caches (a second compress of the same prompt is a store hit)."""
    if (prompt is None) == (file is None):
        raise GistError("give one instruction as an argument or --file prompts.jsonl, not both or neither")
    check_batch_size(batch_size)
    dtype_ = torch_dtype(dtype)
    texts = [prompt] if file is None else load_instructions(file)
    if file is not None and out is not None and Path(out).is_file():
        raise GistError(f"--out {out} is a file: with --file, --out is a folder for one cache per line")
    if file is None and out is not None:
        check_replaceable(check_output_file(check_cache_path(out), "--out"), overwrite)
    elif out is not None:
        check_writable_folder(out, "--out")
    cache_store = CacheStore(store)
    check_parent_not_file(cache_store.root, "--store")
    # with no --run, each instruction goes to the shipped run for its length (gistcache/model/shipped.py)
    groups = route_instructions(texts) if run is None else {run: list(range(len(texts)))}
    results: list = [None] * len(texts)
    for name, indices in groups.items():
        model = load_run(name, device=device, dtype=dtype_)
        done = compress_cached(model, [texts[i] for i in indices], cache_store, batch_size=batch_size)
        for i, res in zip(indices, done):
            results[i] = res
        warning = untrained_length_warning(model, [res.cache.num_prompt_tokens for res in done])
        if warning:  # stderr, one line: --json output stays one JSON document
            prefix = f"{name}: " if len(groups) > 1 else ""
            err_console.print(prefix + warning, style="yellow", highlight=False, soft_wrap=True)
    run_of = {i: name for name, indices in groups.items() for i in indices}
    rows = []
    for i, res in enumerate(results):
        path = res.path
        if out is not None:  # one file, or with --file one file per line in the folder --out
            path = Path(out) if file is None else Path(out) / f"{i:04d}-{res.key[:12]}.safetensors"
            if file is not None:
                check_replaceable(path, overwrite)
            save_cache(res.cache, path)
        rows.append({"index": i, "run": str(run_of[i]), **res.summary(path)})
    if json_out:
        print_json(rows if file is not None else rows[0])
    elif file is None:
        print_one(rows[0], cache_store.root)
    else:
        print_many(rows)


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file that is not a gist cache (a run's config.json, say) unless --overwrite."""
    if overwrite or not path.exists():
        return
    try:
        read_cache_metadata(path, versions=(1, FORMAT_VERSION))
    except GistError:
        raise GistError(f"--out {path} exists and is not a gist cache: give another path, or add --overwrite to "
                        f"replace it") from None


def print_one(r: dict, store_root: Path) -> None:
    table = Table(title="gist compress", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in (
        ("prompt", r["prompt_preview"]),
        ("run", r["run"]),
        ("store", f"{r['store']} ({r['key'][:16]})"),
        ("tokens", f"{r['prompt_tokens']} prompt -> {r['gist_tokens']} gist ({r['compression_ratio']:.1f}x fewer)"),
        ("bytes", f"{format_bytes(r['bytes_on_disk'])} on disk vs {format_bytes(r['full_prompt_kv_bytes'])} full KV "
                  f"({r['bytes_ratio']:.1f}x smaller)"),
        ("input position", str(r["input_position"])),
    ):
        table.add_row(name, value)
    console.print(table, highlight=False)
    # paths on lines of their own: a table cell would break them at a narrow terminal
    console.print(f"file: {r['path']}", highlight=False)
    console.print(f"store: {store_root}", highlight=False)
    console.print(NOTE, style="dim")


def print_many(rows: list[dict]) -> None:
    title = f"gist compress: {len(rows)} prompts ({sum(r['store'] == 'hit' for r in rows)} hits)"
    # the table when every number fits whole beside the prompt cut to 20 characters, or down to 10 (each character
    # the prompt column gives up narrows the table by one); else one line a prompt
    narrowest = Console(width=10_000).measure(many_table(rows, title, prompt_width=10)).maximum
    if narrowest <= console.width:
        prompt_width = min(20, 10 + console.width - narrowest)
        console.print(many_table(rows, title, prompt_width=prompt_width), highlight=False)
    else:  # a narrow terminal: one whole line a prompt, wrapped by the terminal, no number cut
        console.print(title, highlight=False)
        for r in rows:
            console.print(f"{r['index']}: {'hit' if r['store'] == 'hit' else 'new'}, {r['prompt_tokens']} -> "
                          f"{r['gist_tokens']} tokens, {format_bytes(r['bytes_on_disk'])} on disk vs "
                          f"{format_bytes(r['full_prompt_kv_bytes'])} full KV ({r['bytes_ratio']:.1f}x smaller): "
                          f"{r['prompt_preview']}", highlight=False, soft_wrap=True, markup=False)
    runs = {r["run"]: sum(q["run"] == r["run"] for q in rows) for r in rows}
    if len(runs) > 1:  # no --run and prompts of both lengths: say which run made how many
        console.print("runs: " + ", ".join(f"{name} ({n})" for name, n in runs.items()), style="dim",
                      highlight=False)
    console.print(f"files in {Path(rows[0]['path']).parent}; {NOTE}", style="dim", highlight=False)


def many_table(rows: list[dict], title: str, *, prompt_width: int) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right", min_width=2)
    table.add_column("prompt", no_wrap=True, max_width=prompt_width, overflow="ellipsis")
    for col in ("store", "tokens", "on disk", "full KV", "smaller"):
        table.add_column(col, justify="left" if col == "store" else "right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["index"]), r["prompt_preview"], "hit" if r["store"] == "hit" else "new",
                      f"{r['prompt_tokens']} -> {r['gist_tokens']}",
                      format_bytes(r["bytes_on_disk"]), format_bytes(r["full_prompt_kv_bytes"]),
                      f"{r['bytes_ratio']:.1f}x")
    return table
