"""Typer option aliases shared by several verbs."""

from __future__ import annotations

from typing import Annotated

import typer

RunDir = Annotated[str, typer.Option("--run", help="A run folder written by `gist train`.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of a table.")]
