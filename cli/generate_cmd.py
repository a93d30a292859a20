"""`gist generate`: answer inputs from a gist cache (a file, or a prompt compressed through the store)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from gistcache._io import format_bytes, sha256_text
from gistcache.cache import GistCache, load_cache
from gistcache.cli.common import console, friendly_errors, print_json
from gistcache.cli.options import Device, DType, JsonOut, RunDir, StoreDir
from gistcache.config import torch_dtype
from gistcache.errors import GistError
from gistcache.inference.generation import GREEDY, GenerateConfig, generate_full_prompt
from gistcache.inference.generation import generate as run_generate
from gistcache.model import GistModel, load_run, load_untouched_base, quiet_transformers
from gistcache.model.shipped import instruction_length, shipped_run_for, shipped_run_of, shipped_tokenizer
from gistcache.store import CacheStore, compress_cached


@friendly_errors
@quiet_transformers()
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
    if (cache is None) == (prompt is None):
        raise GistError("give --cache FILE or --prompt TEXT, not both or neither")
    if stream and json_out:
        raise GistError("--stream prints text as it comes; drop --json or --stream")
    if stream and compare_full is not None:
        raise GistError("--stream prints one answer as it comes; drop --compare-full or --stream")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed)
    GenerateConfig(**settings)  # refuse bad settings before loading anything
    settings = {**GREEDY, **settings}  # the flags decide, not the model's generation_config
    dtype_ = torch_dtype(dtype)
    gist_cache = load_cache(cache) if cache is not None else None  # the file is checked before the model loads
    if run is None:  # the shipped run that made the cache, or the one for the prompt's length
        run = (shipped_run_of(gist_cache.run_fingerprint) if gist_cache is not None
               else shipped_run_for(instruction_length(shipped_tokenizer(), prompt)))
    model = load_run(run, device=device, dtype=dtype_)
    if gist_cache is None:
        gist_cache = compress_cached(model, prompt, CacheStore(store))[0].cache
    if stream:
        stream_answers(model, gist_cache, input, settings)
        return
    texts = run_generate(model, gist_cache, list(input), **settings)
    if compare_full is not None:
        full = full_prompt_answers(model, gist_cache, compare_full, list(input), max_new_tokens, device, dtype_)
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


def stream_answers(model: GistModel, gist_cache: GistCache, inputs: list[str], settings: dict) -> None:
    """Print each input's answer token by token, one input at a time."""
    from transformers import TextStreamer  # deferred: transformers takes seconds to import

    for text in inputs:
        if len(inputs) > 1:
            console.print(f"[bold]{text}[/] ->", highlight=False)
        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        run_generate(model, gist_cache, text, streamer=streamer, **settings)


def full_prompt_answers(model: GistModel, gist_cache: GistCache, instruction: str, inputs: list[str],
                        max_new_tokens: int, device, dtype) -> list[str]:
    """The untouched base model's greedy answers to the whole instruction and each input."""
    if sha256_text(instruction) != gist_cache.prompt_sha256:
        raise GistError("--compare-full is not the instruction this cache holds (its SHA-256 differs): give the "
                        "exact text that was compressed")
    base = load_untouched_base(model, dtype=dtype, device=device)
    return generate_full_prompt(base, instruction, inputs, max_new_tokens=max_new_tokens)


def print_side_by_side(gist_cache: GistCache, inputs: list[str], gist_answers: list[str],
                       full_answers: list[str]) -> None:
    c = gist_cache
    table = Table(title=f"{c.num_prompt_tokens} prompt tokens -> {c.num_gist_tokens} gist token(s) "
                        f"({c.compression_ratio:.0f}x fewer); cache {format_bytes(c.nbytes)} vs "
                        f"{format_bytes(c.full_prompt_kv_bytes)} of full-prompt KV")
    table.add_column("input", overflow="fold")
    table.add_column("answer from the gist cache", overflow="fold")
    table.add_column("answer from the full prompt (base model)", overflow="fold")
    for text, gist_answer, full_answer in zip(inputs, gist_answers, full_answers):
        table.add_row(escape(text), escape(gist_answer.strip()), escape(full_answer.strip()))
    console.print(table, highlight=False)
