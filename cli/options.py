"""Typer option aliases shared by several verbs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

RunDir = Annotated[Optional[str], typer.Option("--run", help="A run folder written by `gist train`. Default: the run "
                                                "shipped for smollm2-135m (one gist token).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
