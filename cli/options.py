"""Typer option aliases shared by several verbs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

RunDir = Annotated[Optional[str], typer.Option("--run", help="A run folder written by `gist train`, or a shipped "
                                                "run's name. Default: the run shipped for smollm2-135m (one gist "
                                                "token per 64 instruction tokens); `gist compress` and `gist "
                                                "generate` take the shipped long-prompt run for an instruction of "
                                                "more than 128 tokens, and `gist generate --cache` the shipped run "
                                                "that made the cache.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
StoreDir = Annotated[Optional[str], typer.Option("--store", help="Cache store folder. Default: $GISTCACHE_HOME, "
                                                 "else $XDG_CACHE_HOME/gistcache, else ~/.cache/gistcache.")]
Device = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N.")]
DType = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 (a cache fits only its dtype).")]
