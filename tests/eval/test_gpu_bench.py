"""eval/gpu_bench/, the GPU run of issue 26 item 4, on the CPU with a tiny shape: the same code path as the
8B run on a GPU (compress, TTFT, the generate engine, the static-cache decode loop), in seconds.

Checked: the table and the JSON have every row and every number; the gist answer path gives the same tokens
as its references where that is a real check (the masked reference, the batch vs each cache alone, the decode
loop vs generate, rows that differ from each other, in float32); a failed compile falls back to the eager loop
and the table says so; a failed or stopped stage leaves the table whole, its rows saying why; every message
is one line at any COLUMNS, and the table's rows too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

import tiny
from gistcache.eval import gpu_bench

ROOT = tiny.ROOT
TINY = ["--shape", "tiny", "--device", "cpu", "--prompt-tokens", "96", "--batch", "3", "--new-tokens", "8",
        "--check-tokens", "8", "--repeats", "1", "--batch-repeats", "1", "--threads", "1"]
LABELS = ["machine", "software", "model", "prompt (tokens)", "prompt KV per request", "compress 1 instruction",
          "compress 3 instructions", "TTFT, generate call", "TTFT, prefill forward", "x3 generate: tokens/s",
          "x3 static cache, eager: tokens/s", "x3 static cache, eager: decode tokens/s",
          "check: cached = full (first token)", "check: gist forward = gist generate (first token)",
          "check: gist = masked reference", "check: gist batched = each cache alone",
          "check: decode loop = generate (gist)", "check: decode loop = generate (full)", "run"]


def bench(*extra: str) -> tuple[int, str, str]:
    """Run the script in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gpu_bench.main([*TINY, *extra])
    return code, out.getvalue(), err.getvalue()


def parse(stdout: str) -> tuple[dict, list[str]]:
    """The JSON line and the table's lines of one run's stdout."""
    first, *table = stdout.splitlines()
    return json.loads(first), table


# not a run folder: one run of the script (minutes at one thread), whose output this file's tests read
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The script run as the GPU run starts it (`PYTHONPATH=. python3 eval/gpu_bench ...`), on a 40-column
    terminal, with a long --out path: (exit code, stdout, stderr, the JSON it wrote, the --out path)."""
    out = tmp_path_factory.mktemp("gpu-bench") / "a-folder-with-a-rather-long-name" / "and-another-one" / "b.json"
    out.parent.mkdir(parents=True)
    env = {**os.environ, "COLUMNS": "40", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "eval/gpu_bench", *TINY, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    written = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, proc.stdout, proc.stderr, written, out


def test_every_row_and_number(tiny_run):
    code, stdout, stderr, written, _ = tiny_run
    assert code == 0, stderr
    result, table = parse(stdout)
    assert result == written  # the JSON line is the file --out wrote
    assert [row[0] for row in result["table"]] == LABELS
    assert not result["errors"] and not result["skipped"]
    for how in ("generate", "forward"):
        assert all(result["ttft"][how][mode]["median_s"] > 0 for mode in ("full", "cached", "gist"))
        assert result["ttft"][how]["speedup_vs_full"] > 0 and result["ttft"][how]["speedup_vs_cached"] > 0
    loop = result["throughput"]["loop"]
    assert loop["engine"] == "static" and "compile not tried on cpu" in loop["notes"][0]
    for engine in (result["throughput"]["generate"], loop):
        assert engine["full"]["tokens_per_s"] > 0 and engine["gist"]["tokens_per_s"] > 0
    assert loop["gist"]["decode_tokens_per_s"] > 0 and loop["full"]["decode_tokens_per_s"] > 0
    p, kv = result["prompt"], result["kv_bytes"]
    assert p["instruction_tokens"] == 96 and p["gist_slots"] == kv["fixed_prefix_tokens"] + 1
    assert kv["full_per_request"] == p["prompt_tokens"] * kv["per_token"]
    assert result["machine"]["cpu"] and result["machine"]["torch"]
    # the table: a markdown header, its rule, one line a row, every cell filled or "" where a mode has no value
    assert len(table) == len(LABELS) + 2 and all(line.startswith("|") and line.endswith("|") for line in table)
    for label in LABELS:
        assert sum(line.startswith(f"| {label} ") for line in table) == 1, label
    assert "| - " not in stdout and "ok: 3/3" in stdout


def test_gist_path_gives_the_reference_tokens(tiny_run):
    """Each check is a real one: equal token rows, rows that differ from each other (a batch that mixed its
    requests up, or a loop that read another cache, would fail it)."""
    result = tiny_run[3]
    checks = result["checks"]
    assert set(checks) == {label[len("check: "):] for label in LABELS if label.startswith("check: ")}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["gist batched = each cache alone"]["rows"] == 3
    assert checks["gist = masked reference"]["rows"] == 2
    for name in ("gist batched = each cache alone", "decode loop = generate (gist)", "decode loop = generate (full)",
                 "gist = masked reference"):
        assert checks[name]["distinct"] > 1, (name, checks[name])
    sample = result["throughput"]["loop"]["tokens_sample"]
    assert len(sample["gist"]) == 2 and len(sample["gist"][0]) == 8


def test_a_differing_check_is_reported():
    bench_ = gpu_bench.Bench(gpu_bench.parse_args(TINY))
    bench_.check("gist batched = each cache alone", [[1, 2], [3, 4]], [[1, 2], [3, 5]], "rows of 2 tokens")
    assert bench_.result["checks"]["gist batched = each cache alone"]["ok"] is False
    bench_.result["elapsed_s"] = 0.0
    row = next(r for r in gpu_bench.table_rows(bench_.result) if r[0] == "check: gist batched = each cache alone")
    assert row[-1].startswith("DIFFERS: 1/2 rows of 2 tokens equal") and "row 1: [3, 4] vs [3, 5]" in row[-1]


def test_failed_compile_falls_back_and_a_failed_stage_keeps_the_table(monkeypatch):
    """--decode compile whose compile fails runs the eager loop and says why; a stage that raises leaves its
    rows saying why, the others measured, exit code 1."""
    def no_compile(lm):
        raise RuntimeError("inductor is missing\nsecond line")

    def broken_checks(self):
        raise ValueError("boom")

    monkeypatch.setattr(gpu_bench.decode, "compiled_step", no_compile)  # where DecodeLoop looks it up
    monkeypatch.setattr(gpu_bench.Bench, "checks", broken_checks)
    code, stdout, stderr = bench("--decode", "compile", "--compile-reserve", "0")
    assert code == 1
    result, table = parse(stdout)
    loop = result["throughput"]["loop"]
    assert loop["engine"] == "static" and loop["notes"] == ["compile failed: RuntimeError: inductor is missing"]
    assert result["errors"] == {"checks": "ValueError: boom"}
    rows = {row[0]: row for row in result["table"]}
    assert "compile failed: RuntimeError: inductor is missing" in rows["x3 static cache, eager: tokens/s"][-1]
    assert rows["check: gist = masked reference"][-1] == "failed (checks): ValueError: boom"
    assert rows["check: decode loop = generate (gist)"][-1].startswith("ok: 3/3")  # the later stages still ran
    assert rows["failed: checks"][-1] == "ValueError: boom"
    assert rows["TTFT, generate call"][1].endswith(" ms")
    assert len(table) == len(result["table"]) + 2
    assert "gpu_bench: decode loop: compile failed: RuntimeError: inductor is missing" in stderr.splitlines()


def test_the_time_budget_stops_a_stage_and_the_table_is_printed(monkeypatch):
    def slow_setup(self):
        time.sleep(30)

    monkeypatch.setattr(gpu_bench.Bench, "setup", slow_setup)
    start = time.perf_counter()
    code, stdout, stderr = bench("--time-budget", "0.5")
    assert time.perf_counter() - start < 10
    assert code == 1
    result, table = parse(stdout)
    assert re.match(r"stopped after \d+ s: the time budget ran out", result["errors"]["setup"])  # 0 s, or 1 under load
    assert result["skipped"]["ttft"] == "skipped: the run was stopped (the time budget ran out)"
    rows = {row[0]: row for row in result["table"]}
    assert rows["TTFT, generate call"][-1].startswith("failed (setup): stopped after")
    assert rows["machine"][-1].startswith("CPU ")  # the machine is named whatever fails
    assert len(table) == len(result["table"]) + 2


def test_bad_options_are_one_line(capsys):
    for argv, words in ((["--batch", "0"], "--batch must be >= 1, got 0"),
                        (["--shape", "huge"], "invalid choice: 'huge'"),
                        (["--device", "tpu"], "--device 'tpu' is not a device")):
        with pytest.raises(SystemExit) as exc:
            gpu_bench.main(argv)
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
        assert captured.err.startswith("gpu_bench: error: ") and words in captured.err


def test_one_line_a_message_at_40_columns(tiny_run):
    """Every message is one `gpu_bench:` line (the long --out path included), then one JSON line, then the
    table, a row a line, as wide as it needs (not wrapped to the terminal's 40 columns)."""
    code, stdout, stderr, written, out = tiny_run
    lines = stderr.splitlines()
    assert lines and all(line.startswith("gpu_bench: ") for line in lines), stderr
    assert f"gpu_bench: wrote {out}" in lines
    result, table = parse(stdout)
    assert [line.split("|")[1].strip() for line in table[2:]] == LABELS
    assert min(len(line) for line in table) > 100
