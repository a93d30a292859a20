"""The `gist` command: each verb is one short function in a module of its own, registered here."""

from __future__ import annotations

import typer

from gistcache.cli import (attention_cmd, bench_cmd, cache_cmd, compare_cmd, compress_cmd, eval_cmd, export_cmd,
                           generate_cmd, serve_cmd, train_cmd)
from gistcache.cli import data_cmd
from gistcache.cli.common import OneLineUsage

app = typer.Typer(
    name="gist",
    cls=OneLineUsage,  # a usage error is one line and exit code 2, like every other refusal
    help="Compress long prompts into the KV cache of a few trained gist tokens, and generate from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Compress long prompts into the KV cache of a few trained gist tokens, and generate from it."""


app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command("compare")(compare_cmd.compare)
app.command("attention")(attention_cmd.attention)
app.command("compress")(compress_cmd.compress)
app.command("generate")(generate_cmd.generate)
app.command("export")(export_cmd.export)
app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_cmd.serve)
app.add_typer(cache_cmd.app, name="cache")
app.add_typer(bench_cmd.app, name="bench")
app.add_typer(data_cmd.app, name="data")

if __name__ == "__main__":
    app()
