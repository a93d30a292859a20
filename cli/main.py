"""The `gist` command: each verb is one short function in a module of its own, registered here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gist",
    help="Compress long prompts into the KV cache of a few trained gist tokens, and generate from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def main() -> None:
    """Compress long prompts into the KV cache of a few trained gist tokens, and generate from it."""


from gistcache.cli import train_cmd  # noqa: E402

train_cmd.register(app)

from gistcache.cli import eval_cmd  # noqa: E402

eval_cmd.register(app)

from gistcache.cli import cache_cmd  # noqa: E402

cache_cmd.register(app)

if __name__ == "__main__":
    app()
