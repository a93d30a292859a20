"""Load and faults against `gist serve` (issue 26 item 2), the small version: `make test-serve-load`.

60 requests at concurrency 8 with one bad request of each kind mixed in, a store entry replaced on disk while its
key is asked for, and a SIGKILL of the server in the middle of a load, then a restart (gistcache.eval.serve_load).
Starts `gist serve` twice (~1 min each on a 2-core CPU); skipped where vLLM, httpx, psutil or the default model's
weights package is not installed (.venv-vllm has them). The report's pieces that need no server run everywhere.
"""

import importlib.util
import json

import pytest

import tiny
from gistcache.errors import GistError
from gistcache.eval.serve_load import (BAD_KINDS, Fixtures, LoadConfig, Result, load_specs, one_line, print_report,
                                       report_rows, run_load, tally)
from gistcache.serving.export import read_export
from test_serve import served  # noqa: F401  (a fixture: a tiny run exported, one cache in its store)

NO_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here: make "
                             "test-serve-load runs this in .venv-vllm")
SMALL = LoadConfig(requests=60, concurrency=8, instructions=3, sample=6, max_tokens=12, replace_requests=16,
                   kill_requests=16, after_requests=6, deadline_s=900)


def fixtures() -> Fixtures:
    return Fixtures(keys=["a" * 64, "b" * 64, "c" * 64], tampered_key="d" * 64, foreign_key="e" * 64,
                    other_key="f" * 64, file_path="/x.safetensors", references={(0, 0): "Paris", (0, 1): "Tokyo"},
                    other_references={0: "FRANCE", 1: "JAPAN"},
                    expected={"unknown_key": "no cache in", "tampered": "tensor bytes", "foreign_run": "another run",
                              "file_path": "store keys only", "too_long": "maximum context length",
                              "malformed_json": "JSON", "missing_field": "x"}, protected={})


def test_specs_mix_every_bad_kind_and_tally_counts_them():
    """Every bad kind appears; a wrong answer, a 500, a multi-line refusal and a lost request are failures."""
    import random

    specs = load_specs(SMALL, fixtures(), random.Random(0))
    kinds = [s[0] for s in specs]
    assert len(specs) == 60 and set(BAD_KINDS) <= set(kinds) and sum(k in BAD_KINDS for k in kinds) == 7
    results = [Result("load", "key", (0, 0), 200, "Paris"), Result("load", "chat", (0, 0), 200, "Paris"),
               Result("load", "prompt", (0, 1), 200, "Kyoto"), Result("load", "key", (1, 1), 500, None, "boom"),
               Result("load", "unknown_key", None, 400, None, "no cache in /s has a key starting with 'ab'"),
               Result("load", "malformed_json", None, 400, None, "1 validation error:\n  {'type': 'json_invalid'}"),
               Result("load", "tampered", None, None, None, "ReadError: lost")]
    failures = []
    counts = tally(results, fixtures(), failures, "load")
    assert (counts["answered"], counts["compared"], counts["equal"], counts["refused_with_reason"],
            counts["server_errors"], counts["lost"]) == (3, 3, 2, 1, 1, 1)
    assert len(failures) == 4 and all(one_line(f) for f in failures)
    assert not one_line("a\nb") and one_line("no cache in")


def test_report_is_one_line_per_message_at_40_columns():
    from rich.console import Console

    report = {"ok": False, "failures": ["load: bad request tampered got 500 " + "x" * 200], "memory": {
        "before_mib": 2000, "after_mib": 2100, "change": 0.05}, "server": {"crashed": 0, "tracebacks_in_log": 0,
                                                                              "restarts_survived": 1},
              "config": {"concurrency": 8}, "phases": {"load": {
                  "sent": 60, "bad": 7, "wall_s": 10.0, "requests_per_s": 6.0, "answered": 53, "good": 53,
                  "equal": 20, "compared": 20, "pairs": 20, "inconsistent_pairs": 0, "refused_with_reason": 7,
                  "reasons": {"unknown_key": "400 no cache in /a/very/long/path/" + "y" * 100}}}}
    assert ("good answered", "53 / 53") in report_rows(report)
    console = Console(width=40, record=True, soft_wrap=True)
    print_report(report, console)
    lines = console.export_text().splitlines()
    assert any(line.startswith("refused unknown_key: 400 no cache in") and line.endswith("y" * 20) for line in lines)
    assert any(line.startswith("failed: load: bad request tampered") and line.endswith("x" * 20) for line in lines)


def test_config_is_checked():
    with pytest.raises(GistError):
        LoadConfig(requests=0).check()
    with pytest.raises(GistError):
        LoadConfig(bad_fraction=1.5).check()


@NO_VLLM
@pytest.mark.slow
def test_serve_under_load_and_faults(tmp_path):
    """The small run: every good request answered (the sample equal to gist generate), every bad one refused with
    a one-line 4xx, no 5xx, no mix while a cache file is replaced, the store intact after SIGKILL, answers after
    the restart, memory within 20%."""
    pytest.importorskip("vllm")
    pytest.importorskip("httpx")
    pytest.importorskip("psutil")
    tiny.skip_without_default_model()
    config = LoadConfig(**{**SMALL.__dict__, "workdir": str(tmp_path)})
    report = run_load(config).to_dict()
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("phases", "memory", "server", "wall_s")}, indent=1))
    assert report["ok"], "\n".join(report["failures"])
    load = report["phases"]["load"]
    assert load["answered"] == load["good"] and load["equal"] == load["compared"] > 0
    assert load["refused_with_reason"] == load["bad"] == 7
    assert report["phases"]["replace"]["mixed"] == 0
    assert report["phases"]["kill"]["store"]["failed"] == [] and report["server"]["restarts_survived"] == 1
    assert report["server"]["crashed"] == 0


@NO_VLLM
def test_connector_refuses_a_file_replaced_after_its_check(served, tmp_path):  # noqa: F811
    """The mix the load run found: the engine checks a request's cache file, then reads it again to fill its KV
    blocks; a file replaced in between by another prompt's (sealed, valid) cache must fail that request, never
    fill its blocks with the other prompt's keys and values."""
    import os

    from gistcache.store import CacheStore, compress_cached
    from gistcache.vllm.connector import GistConnector

    root, model, key = served
    store = CacheStore(root / "store")
    other = compress_cached(model, "Uppercase every letter", store)[0].key
    connector = GistConnector.__new__(GistConnector)  # the worker side alone: no engine
    connector.export_dir, connector.info = root / "hf", read_export(root / "hf")
    connector._slots, connector._prefix = None, None
    path = store.path_for(key)
    own = path.read_bytes()
    assert len(connector._served(str(path), key)) == connector.info.num_layers
    (tmp_path / "other").write_bytes(store.path_for(other).read_bytes())
    os.replace(tmp_path / "other", path)  # another prompt's cache under this key's name, after the check
    try:
        with pytest.raises(GistError, match="was replaced after it was checked"):
            connector._served(str(path), key)
        assert len(connector._served(str(path), other)) == connector.info.num_layers  # its own key: its slots
    finally:
        path.write_bytes(own)
