"""What every verb shares: the console, and turning a GistError into one red line and exit code 2."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import typer
from rich.console import Console

from gistcache.errors import GistError

console = Console(stderr=False)
err_console = Console(stderr=True)


def friendly_errors(fn: Callable) -> Callable:
    """Run a verb; a GistError (or a bad file) becomes one red line on stderr and exit code 2.

    GISTCACHE_DEBUG=1 re-raises with the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except (GistError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            if os.environ.get("GISTCACHE_DEBUG") == "1":
                raise
            msg = str(exc) if isinstance(exc, GistError) else f"{exc.strerror}: {exc.filename}"
            err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))
