"""What every verb shares: the console, every refusal as one red line and exit code 2, output paths
checked before any work.

Bad input of any kind ends in one line naming the value or the path, and exit code 2: the
library's `GistError`, an OS error (missing, read-only, full, not a folder, no permission), a file
that is not readable safetensors, JSON or UTF-8, and typer's own usage errors (`OneLineUsage`).
Anything else is a bug: one line saying so, exit code 1. `GISTCACHE_DEBUG=1` re-raises with the
traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from gistcache._io import file_in_the_way
from gistcache.cli.offline import hub_offline_unless_reachable, model_specs
from gistcache.errors import GistError

# one message is one line, at any terminal width or none: rich never wraps what these print (soft_wrap); tables
# still fit the width
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
# click's base exception, whether typer vendors click (>= 0.26) or uses it
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

BAD_INPUT = 2  # the exit code of every refusal
BUG = 1


def friendly_errors(fn: Callable) -> Callable:
    """Run a verb; any refusal becomes one red line on stderr and exit code 2 (see the module docstring).

    A Hugging Face id is looked up offline when the hub cannot be reached, so it fails at once.
    GISTCACHE_DEBUG=1 re-raises with the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            with hub_offline_unless_reachable(model_specs(kwargs)) as offline:
                try:
                    return fn(*args, **kwargs)
                except GistError as exc:
                    if offline and "cannot load" in str(exc):
                        raise GistError(f"{exc} (offline: the Hugging Face hub cannot be reached, so only models "
                                        f"already in its local cache load)") from exc
                    raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except Exception as exc:
            if os.environ.get("GISTCACHE_DEBUG") == "1":
                raise
            code, msg = describe_error(exc)
            if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: say where
                msg += "".join(f" (writing {flag} {kwargs[name]})" for name, flag in (("out", "--out"),
                               ("store", "--store")) if isinstance(kwargs.get(name), str))
            print_error(msg)
            raise typer.Exit(code=code) from None

    return wrapper


def print_error(msg: str) -> None:
    """One red `error:` line on stderr, however long and whatever it holds."""
    line = " ".join(str(msg).split())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def describe_error(exc: Exception) -> tuple[int, str]:
    """(exit code, one line) for an exception that ends a verb."""
    if isinstance(exc, GistError):
        return BAD_INPUT, str(exc)
    if isinstance(exc, OSError):
        return BAD_INPUT, os_error_line(exc)
    if isinstance(exc, UnicodeDecodeError):
        return BAD_INPUT, f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return BAD_INPUT, f"a file is not valid JSON ({exc.msg}, line {exc.lineno})"
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, on any accelerator: a setting, not a bug
        return BAD_INPUT, (f"out of accelerator memory ({first_line(exc)[:120]}): lower --batch-size (--batch-tokens "
                           f"when training) or free the device")
    if type(exc).__name__ == "SafetensorError":
        return BAD_INPUT, (f"a file is not readable safetensors ({first_line(exc)}): it is truncated or damaged; "
                           f"write it again")
    return BUG, (f"unexpected {type(exc).__name__}: {first_line(exc)} (a bug: GISTCACHE_DEBUG=1 shows the "
                 f"traceback to report)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """An OS error as one line that names its path and says what to do."""
    path = exc.filename
    if path is None:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return "no space left on the disk: free some space or write somewhere else" if full else first_line(exc)
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    code = exc.errno
    if code == errno.EROFS:
        return f"{path} is on a read-only file system: write somewhere else"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk of {path}: free some space or write somewhere else"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}"
    if code == errno.ENOTDIR:
        blocking = file_in_the_way(exc.filename)
        return f"{path}: {blocking or 'part of it'} is a file, not a folder"
    if code == errno.EEXIST:
        return f"{path} is a file where a folder is needed" if Path(path).is_file() else f"{path} already exists"
    if code == errno.EISDIR:
        return f"{path} is a folder, not a file"
    if code == errno.ENOENT:
        return f"{path} does not exist"
    return f"{exc.strerror or first_line(exc)}: {path}"


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, a file path that cannot be written: a folder there, a file in the way of
    its folder, a folder that is read-only or not ours."""
    path = Path(path)
    if path.is_dir():
        raise GistError(f"{flag} {path} is a folder: give the name of a file to write in it")
    check_writable_folder(path.parent, flag, shown=path)
    return path


def check_writable_folder(folder: str | Path, flag: str, *, shown: str | Path | None = None) -> Path:
    """Refuse, before any work, a folder that cannot be created or written in."""
    folder = Path(folder)
    shown = folder if shown is None else shown
    blocking = file_in_the_way(folder / "x")
    if blocking is not None:
        raise GistError(f"{flag} {shown}: {blocking} is a file, not a folder")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GistError(f"{flag} {shown}: {existing} is not writable (a read-only disk or no permission): "
                        f"write somewhere else")
    return folder


def check_parent_not_file(path: str | Path, flag: str) -> None:
    """Refuse a path under a file (it can never be created), before any work."""
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise GistError(f"{flag} {path}: {blocking} is a file, not a folder")


class OneLineUsage(TyperGroup):
    """The root command: a usage error (`--lr fast`, a missing option, an unknown verb) is one red line and
    exit code 2, not typer's usage box. A bare `gist` or `gist cache` still prints its help."""

    def make_context(self, info_name, args, parent=None, **extra):
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """A click usage error raised inside the block becomes one red line and click's exit code (2)."""
    try:
        yield
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise  # typer prints the help of a bare group
        where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "gist"
        print_error(f"{exc.format_message().rstrip('.')} (see `{where} --help`)")
        raise typer.Exit(exc.exit_code) from None


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))
