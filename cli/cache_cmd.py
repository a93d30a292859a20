"""`gist cache ls|rm|prune|adopt|verify|upgrade`: the stored gist caches, what can be proven about cache files, and
version 1 files made position-free."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from gistcache._io import format_bytes
from gistcache.cache.upgrade import upgrade_caches
from gistcache.cli.common import BAD_INPUT, console, friendly_errors, print_json
from gistcache.cli.options import Device, DType, JsonOut, RunDir, StoreDir
from gistcache.config import torch_dtype
from gistcache.errors import GistError
from gistcache.model import load_run, quiet_transformers
from gistcache.store import CacheStore
from gistcache.store.verify import OK, verify_caches

app = typer.Typer(help="List, remove, prune and verify gist caches; upgrade version 1 files.",
                  no_args_is_help=True)


def parse_bytes(text: str) -> int:
    """'1000', '500K', '64M', '2G' (powers of 1024) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise GistError(f"--max-bytes {text!r} is not a size: give bytes, or a number with K, M or G")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


@app.command("ls")
@friendly_errors
def cache_ls(store: StoreDir = None, json_out: JsonOut = False) -> None:
    """List stored caches, most recently used first."""
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
                      f"{e.num_prompt_tokens} -> {e.num_gist_tokens}", format_bytes(e.bytes), created,
                      short(datetime.fromtimestamp(e.last_used)))
    console.print(table, highlight=False)
    console.print(f"{len(entries)} cache{'s' if len(entries) != 1 else ''}, "
                  f"{format_bytes(sum(e.bytes for e in entries))}", style="dim")


@app.command("rm")
@friendly_errors
def cache_rm(
    keys: Annotated[list[str], typer.Argument(help="Keys or unique key prefixes, from `gist cache ls`.")],
    store: StoreDir = None,
) -> None:
    """Remove stored caches by key (a unique prefix is enough)."""
    for key in CacheStore(store).remove(keys):
        console.print(f"removed {key}")


@app.command("prune")
@friendly_errors
def cache_prune(
    max_bytes: Annotated[str, typer.Option("--max-bytes", help="Keep at most this much (e.g. 500000, 64M, 1G).")],
    store: StoreDir = None,
    json_out: JsonOut = False,
) -> None:
    """Remove least-recently-used caches until the store holds at most --max-bytes."""
    cache_store = CacheStore(store)
    removed = cache_store.prune(parse_bytes(max_bytes))
    left = cache_store.total_bytes()
    if json_out:
        print_json({"removed": [e.key for e in removed], "bytes_left": left})
        return
    for e in removed:
        console.print(f"removed {e.key[:16]}  {format_bytes(e.bytes)}  {e.prompt_preview}", highlight=False)
    console.print(f"removed {len(removed)}; {format_bytes(left)} left in {cache_store.root}", style="dim")


@app.command("adopt")
@friendly_errors
def cache_adopt(store: StoreDir = None) -> None:
    """Mark a store made by an older gistcache (no .gistcache-store file) as a store, so rm and prune act on it."""
    cache_store = CacheStore(store)
    if cache_store.adopt():
        console.print(f"adopted {cache_store.root}: rm and prune now act on it", highlight=False)
    else:
        console.print(f"{cache_store.root} is already a gist cache store", highlight=False)


@app.command("verify")
@friendly_errors
@quiet_transformers()
def cache_verify(
    files: Annotated[list[str], typer.Argument(help="Cache files (store entries are files too: see `gist cache ls`).")],
    run: Annotated[Optional[str], typer.Option("--run", help="Also check that each file fits this run and, when the "
                                               "store knows its prompt, compress it again and compare. Without it "
                                               "only the files themselves are checked.")] = None,
    store: StoreDir = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Largest absolute difference allowed (plus a "
                                                  "relative part) against the recompressed cache. Default: by dtype, "
                                                  "1e-4 for float32.")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    json_out: JsonOut = False,
) -> None:
    """Check cache files: header, seal, tensor bytes and values; with --run also the fit and the values against the
    prompt compressed again. Exit code 2 when any file fails."""
    if atol is not None and not atol >= 0:
        raise GistError(f"--atol must be a number >= 0, got {atol}")
    dtype_ = torch_dtype(dtype)
    model = load_run(run, device=device, dtype=dtype_) if run is not None else None
    verdicts = verify_caches(files, model, CacheStore(store), atol=atol)
    if json_out:
        print_json([v.to_dict() for v in verdicts])
    else:
        table = Table(title="gist cache verify", header_style="bold", show_lines=True)
        table.add_column("file", overflow="fold")
        table.add_column("header, seal, tensors", overflow="fold")
        table.add_column("fits the run", overflow="fold")
        table.add_column("compressed again", overflow="fold")
        table.add_column("verdict", no_wrap=True)

        def shown(result: str | None) -> str:
            if result is None:
                return "[dim]not checked (no --run)[/]"
            if result == OK:
                return "[green]ok[/]"
            if result.startswith("not run"):
                return f"[dim]{escape(result)}[/]"
            return f"[red]{escape(result)}[/]"

        for v in verdicts:
            again = shown(v.recompressed) if v.fits == OK else "[dim]—[/]"
            if v.recompressed == OK and v.max_abs_diff is not None:
                again = f"[green]ok[/] (max |difference| {v.max_abs_diff:.2g})"
            file_check = v.file.removeprefix(f"{v.path} ").removeprefix("is ")  # the row names the file already
            table.add_row(escape(str(v.path)), shown(file_check if v.file != OK else OK),
                          shown(v.fits) if v.file == OK else "[dim]—[/]", again,
                          "[green]ok[/]" if v.ok else "[bold red]FAILED[/]")
        console.print(table, highlight=False)
        failed = sum(not v.ok for v in verdicts)
        console.print(f"{len(verdicts) - failed} of {len(verdicts)} file{'s' if len(verdicts) != 1 else ''} ok",
                      style="dim")
    if any(not v.ok for v in verdicts):
        raise typer.Exit(code=BAD_INPUT)


@app.command("upgrade")
@friendly_errors
@quiet_transformers()
def cache_upgrade(
    files: Annotated[list[str], typer.Argument(help="Version 1 cache files, rewritten in place.")],
    run: RunDir = None,
    json_out: JsonOut = False,
) -> None:
    """Make version 1 cache files position-free (version 2): their keys are moved in place, atomically."""
    done = upgrade_caches(files, run)
    if json_out:
        print_json([u.to_dict() for u in done])
        return
    for u in done:
        if u.upgraded:
            console.print(f"upgraded {u.path}: keys moved from position {u.moved_from} to {u.moved_to}",
                          highlight=False)
        else:
            console.print(f"{u.path} is already version 2: left as it was", highlight=False)
