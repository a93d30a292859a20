"""Load and faults against `gist serve` (issue 26 item 2): bounded, on 127.0.0.1, stopping by itself.

The command line of the load run (`python -m gistcache.eval.serve_load`): options into a `LoadConfig`, the run,
the report as JSON or a table, the exit code. (The first paragraph above is --help's description.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import LoadConfig
from .report import print_report
from .runner import run_load


def main(argv: list[str] | None = None) -> int:
    from gistcache.errors import GistError

    p = argparse.ArgumentParser(prog="python -m gistcache.eval.serve_load", description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction)
    p.add_argument("--instructions", type=int, default=d.instructions)
    p.add_argument("--sample", type=int, default=d.sample, help="(instruction, input) pairs checked against gist "
                   "generate")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--replace-requests", type=int, default=d.replace_requests)
    p.add_argument("--kill-requests", type=int, default=d.kill_requests)
    p.add_argument("--after-requests", type=int, default=d.after_requests)
    p.add_argument("--deadline", type=float, default=d.deadline_s, help="seconds for the whole run")
    p.add_argument("--workdir", default=None, help="keep the store and the server log here")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    a = p.parse_args(argv)
    config = LoadConfig(requests=a.requests, concurrency=a.concurrency, bad_fraction=a.bad_fraction,
                        instructions=a.instructions, sample=a.sample, max_tokens=a.max_tokens,
                        replace_requests=a.replace_requests, kill_requests=a.kill_requests,
                        after_requests=a.after_requests, deadline_s=a.deadline, workdir=a.workdir, port=a.port)
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    try:
        report = run_load(config, progress=lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)).to_dict()
    except GistError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ok"] else 1
