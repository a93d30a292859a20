"""Load and faults against `gist serve` (issue 26 item 2): bounded, on 127.0.0.1, stopping by itself.

`run_load(LoadConfig(...))` starts `gist serve` of the shipped run (exported into a store of its own) and:

1. **load**: N requests at concurrency C, about 10% of them bad (an unknown cache key, a tampered store entry, a
   cache of another run, a file named by path, an input longer than the context, malformed JSON, a missing
   field), the good ones over /v1/completions (by key and by `gist_prompt`) and /v1/chat/completions. Every good
   one must be answered, the answers of a sample of (instruction, input) pairs must equal `gist generate`
   (greedy, the same instruction and input), every answer to one pair must be the same, every bad one must get a
   4xx whose reason is one line and says what is wrong, and the resident memory of the server's process tree
   after the load must be within `memory_slack` of what it was after a warmup;
2. **replace**: while requests for one key run, that key's store entry is replaced on disk over and over (by
   another prompt's sealed cache, by its own bytes again, and by its own bytes written in place in two halves
   over the other's, so a reader can see a file that is half of each): every answer must be the key's own
   cache's answer or a refusal, never the other prompt's or anything else (a mix), and after the file is put back
   the key answers as before. A refusal is a one-line 4xx from the API server's check, or, when the file changes
   between that check and the engine's read, a 500 from vLLM for a request the engine failed (its connector logs
   why; counted apart, and only as many as the log shows);
3. **kill**: the server (API process and engine, its process group) is killed with SIGKILL in the middle of a
   load that writes new entries into the store (`gist_prompt` requests of new instructions); every store entry is
   then verified as `gist cache verify --run` does (file, fit, compressed again; `gistcache.store.verify`), `gist serve`
   is started again on the same port and store, and requests after the restart must be answered (and equal
   `gist generate` on the sample).

The report (`LoadReport.to_dict()`, and `print_report` as a rich table) gives the counts: answered, equal to
gist generate, refused with a reason, crashed (5xx, a server that exits by itself, tracebacks in its log),
restarts survived, memory before/after.

    python -m gistcache.eval.serve_load --requests 500 --concurrency 32 --out load.json

Everything is bounded: request counts, a timeout per request, a deadline for the whole run; the server is
killed at the end, also on failure.

The package, a file a job: config.py (the scenario, `LoadConfig`, `Result`, `LoadReport`, `Deadline`,
`Fixtures`), server.py (`ServeProcess`), traffic.py (request bodies of each kind, sending them), checks.py
(counts, the store's verification), fixtures.py (the set-up), phases.py (replace, kill), runner.py (`run_load`),
report.py (the table), cli.py (`main`); __main__.py runs it.
"""

from __future__ import annotations

from .checks import MISSING, expected_ok, file_sha, one_line, tally, verify_store
from .cli import main
from .config import (BAD_KINDS, FOREIGN, GOOD_MODES, INPUTS, INSTRUCTIONS, MODEL_NAME, OTHER, TAMPERED, Deadline,
                     Fixtures, LoadConfig, LoadReport, Result)
from .fixtures import another_run, make_fixtures
from .phases import Replacer, kill_phase, replace_phase
from .report import print_report, report_rows
from .runner import run_load
from .server import ServeProcess, free_port, gist_command
from .traffic import answer_text, bad_body, good_body, good_specs, load_specs, run_requests, send_one

__all__ = ["BAD_KINDS", "Deadline", "FOREIGN", "Fixtures", "GOOD_MODES", "INPUTS", "INSTRUCTIONS", "LoadConfig",
           "LoadReport", "MISSING", "MODEL_NAME", "OTHER", "Replacer", "Result", "ServeProcess", "TAMPERED",
           "answer_text", "another_run", "bad_body", "expected_ok", "file_sha", "free_port", "gist_command",
           "good_body", "good_specs", "kill_phase", "load_specs", "main", "make_fixtures", "one_line",
           "print_report", "replace_phase", "report_rows", "run_load", "run_requests", "send_one", "tally",
           "verify_store"]
