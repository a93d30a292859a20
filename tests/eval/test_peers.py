"""KV-cache presses as `gist eval` baselines (issue 24).

Two halves:
- in the peers virtualenv (`make test-peers`; skipped where kvpress is not installed): with a tiny random Llama,
  each press's cache holds exactly the stated number of positions in every layer, a press at ratio 0 answers
  token for token as the full prompt does, and a worker job runs from JSON with a failing task beside good ones;
- in the main virtualenv (skipped in the peers one, whose transformers gistcache does not support): the press
  baselines' names and bad input (one line, exit 2, at 40 columns), the kept positions = the gist cache's, and
  `gist eval` merging a worker's answers (a stand-in worker: the real one needs kvpress) into the same table,
  JSON and predictions, writing the other conditions when a press fails.
"""

import importlib.util
import json
import os
import stat
import subprocess
import sys
import tempfile

import pytest
import torch

import tiny
from gistcache.eval import peers_worker as W

HAS_KVPRESS = importlib.util.find_spec("kvpress") is not None
needs_kvpress = pytest.mark.skipif(not HAS_KVPRESS, reason="kvpress lives in .venv-peers: make test-peers")
main_venv = pytest.mark.skipif(HAS_KVPRESS, reason="gist eval runs in .venv; the peers venv runs the press tests")
EOS = 3  # tiny.make_model's eos_token_id
PRESS_NAMES = sorted(W.PRESSES)


# --- in the peers virtualenv: the presses themselves ------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny.make_model("llama", seed=1)


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, tiny.vocab_size(), (n,), generator=g).tolist()


@needs_kvpress
@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_keeps_the_stated_positions(model, name):
    """Every layer's cache holds exactly K positions after the press's prefill, for several K (the gist's
    F + M budget is one such K; 1 and len - 1 are the edges)."""
    context, question = _ids(40, 0), _ids(6, 1)
    for kept in (1, 7, 25, 39):
        new, layers = W.press_generate(model, name, context, question, kept, max_new_tokens=3, eos_token_ids=[EOS])
        assert layers == [kept] * model.config.num_hidden_layers, (name, kept, layers)
        assert 1 <= len(new) <= 3


@needs_kvpress
@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_at_ratio_zero_is_the_full_prompt(model, name):
    """K = len(P) (ratio 0): the press's answer equals greedy `generate` over P + I, token for token."""
    for seed in range(3):
        context, question = _ids(30 + seed, 10 + seed), _ids(5, 20 + seed)
        new, layers = W.press_generate(model, name, context, question, len(context), max_new_tokens=12,
                                       eos_token_ids=[EOS])
        assert layers == [len(context)] * model.config.num_hidden_layers
        with torch.no_grad():
            ref = model.generate(input_ids=torch.tensor([context + question]), attention_mask=None,
                                 max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=1)
        assert new == ref[0, len(context) + len(question):].tolist(), (name, seed)


@needs_kvpress
@pytest.mark.parametrize("name", PRESS_NAMES)
def test_press_answers_as_kvpress_pipeline(model, name):
    """With a real compression (20 of 40 positions), the worker answers what kvpress's own
    `kv-press-text-generation` pipeline answers from the same context and question ids."""
    from kvpress import KVPressTextGenerationPipeline

    tok = tiny.make_tokenizer()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    context, question = _ids(40, 5), _ids(6, 6)
    new, _ = W.press_generate(model, name, context, question, 20, max_new_tokens=8, eos_token_ids=[EOS])
    (answer,) = pipe._forward({"context_ids": torch.tensor([context]), "questions_ids": [torch.tensor([question])]},
                              max_new_tokens=8, press=W.make_press(name, 40, 20))
    assert tok.decode(new, skip_special_tokens=True) == answer


@needs_kvpress
def test_ratio_for_keeps_exactly_k():
    """The compression ratio handed to kvpress keeps exactly K of L by kvpress's own count."""
    from kvpress.utils import compute_n_kept

    for length in range(2, 300, 7):
        for kept in range(1, length + 1):
            assert compute_n_kept(length, W.ratio_for(length, kept)) == kept, (length, kept)


@needs_kvpress
def test_worker_job_from_json(tmp_path):
    """main(JOB, OUT): a saved tiny model, two splits, every press; a press that raises on a context too short
    for it (ExpectedAttention keeps 4 sink positions) fails alone, with one line, and the others answer."""
    folder = tiny.save_model_folder(tmp_path / "model")
    job = {"model": {"source": str(folder), "gguf_file": None, "dtype": "float32", "device": "cpu"},
           "max_new_tokens": 4, "eos_token_ids": [EOS], "suppress_token_ids": [tiny.vocab_size()], "flops_examples": 1,
           "examples": {"a": [{"context": _ids(20, 1), "question": _ids(4, 2)},
                              {"context": _ids(33, 3), "question": _ids(5, 4)}],
                        "short": [{"context": _ids(3, 5), "question": _ids(4, 6)}]},
           "tasks": [*({"label": f"kvpress:{n}", "press": n, "split": "a", "kept": [9, 12]} for n in PRESS_NAMES),
                     {"label": "kvpress:expected_attention", "press": "expected_attention", "split": "short",
                      "kept": [2]}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert W.main([str(tmp_path / "job.json"), str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["error"] is None and out["versions"]["kvpress"]
    good, bad = out["tasks"][:-1], out["tasks"][-1]
    for task in good:
        assert task["error"] is None, task
        assert [set(layers) for layers in task["kept"]] == [{9}, {12}]
        assert len(task["outputs"]) == 2 and all(1 <= len(ids) <= 4 for ids in task["outputs"])
        assert task["flops"]["examples"] == 1 and task["flops"]["compress"] > 0 and task["flops"]["prefill"] > 0
    assert bad["error"] and "\n" not in bad["error"] and bad["outputs"] == []


# --- in the main virtualenv: names, budgets, bad input and the merge --------------------------------

def test_press_names_parse():
    from gistcache.eval.conditions import PressBaseline, is_press, parse_press

    assert parse_press("kvpress:snapkv") == PressBaseline("snapkv")
    assert parse_press("kvpress:Expected-Attention@0.5") == PressBaseline("expected_attention", 0.5)
    assert parse_press("kvpress:knorm@0").name == "kvpress:knorm@0"
    assert is_press("KVPRESS:tova") and not is_press("truncate")
    from gistcache.eval.config import EvalConfig

    config = EvalConfig(runs=["r"], baselines=["full", "kvpress:SnapKV", "kvpress:snapkv"])
    assert config.baselines == ["full", "kvpress:snapkv"]
    config = EvalConfig(runs=["r"], baselines=["kvpress:knorm"])  # presses alone: beside the default baselines
    assert config.baselines == ["full", "none", "truncate", "base", "kvpress:knorm"]


@main_venv
@pytest.mark.parametrize("mask,every,positions", [("prefix", 0, "compact"), ("paper", 0, "compact"),
                                                  ("prefix", 8, "compact"), ("prefix", 0, "original")])
def test_kept_positions_are_the_gist_caches(mask, every, positions):
    """K (what a press keeps) = the positions held before the input with the gist cache of the same prompt: the
    run's fixed prefix F (computed once per loaded run) + the cache's M gist slots."""
    from gistcache.config import GistConfig
    from gistcache.eval.conditions import press_kept_positions
    from gistcache.inference.compression import compress
    from gistcache.model import GistModel
    from gistcache.prompts import encode_instruction

    tok = tiny.make_tokenizer()
    gm = GistModel(tiny.make_model(), tok, 2, mask=mask, gist_every=every, positions=positions).eval()
    cfg = GistConfig(model="tiny", num_gist_tokens=2, mask=mask, gist_every=every, positions=positions, tune="gist")
    for instruction in ("Say hi.", "Reverse the letters of every word you are given, then sort them."):
        cache = compress(gm, instruction)
        p = len(encode_instruction(tok, instruction, gm.template))
        held = gm.num_prefix_tokens + cache.keys[0].shape[-2]  # keys: (B?, kv_heads, M, head_dim) per layer
        assert press_kept_positions(tok, cfg, gm.template, p) == held, (instruction, held)
    assert press_kept_positions(tok, cfg, gm.template, 40, 0.0) == 40
    assert press_kept_positions(tok, cfg, gm.template, 40, 0.25) == 30


@pytest.fixture(scope="module")
def run(make_tiny_run):
    """A tiny gist run (prefix mask: F > 0) saved as a run folder."""
    return str(make_tiny_run(1, mask="prefix"))


ROWS = [{"instruction": "Repeat the word you are given twice.", "input": "cat", "output": "cat cat"},
        {"instruction": "Write the word you are given in capital letters.", "input": "dog", "output": "DOG"},
        {"instruction": "Say hello.", "input": "", "output": "hello"}]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    return str(path)


@pytest.fixture
def narrow(monkeypatch):
    from gistcache.cli import common

    for console in (common.console, common.err_console):
        monkeypatch.setattr(console, "width", 40)
    monkeypatch.setenv("COLUMNS", "40")


def _eval(*args):
    from typer.testing import CliRunner

    from gistcache.cli.main import app

    return CliRunner().invoke(app, ["eval", *map(str, args)])


@main_venv
def test_bad_press_input_is_one_line(run, data, tmp_path, narrow, monkeypatch):
    """An unknown press, `kvpress:` alone, a ratio outside [0, 1) or not a number, and no peers virtualenv:
    one line each at 40 columns, exit 2, nothing written."""
    from clitools import one_line_error

    out = tmp_path / "out"
    ok = ["--run", run, "--split", data, "--out", out, "--max-new-tokens", 2]
    for baseline, text in [("kvpress:oracle", "unknown press 'oracle'"), ("kvpress:", "names no press"),
                           ("kvpress:snapkv@1", "must be in [0, 1)"), ("kvpress:knorm@-0.1", "must be in [0, 1)"),
                           ("kvpress:tova@half", "got 'half'"), ("oracle", "or kvpress:PRESS")]:
        line = one_line_error(_eval(*ok, "--baseline", baseline), text)
        if baseline != "oracle":
            assert "snapkv, expected_attention, knorm, streaming_llm, tova" in line or "[0, 1)" in line
    monkeypatch.setenv("GISTCACHE_PEERS_PYTHON", str(tmp_path / "no-such-venv" / "bin" / "python"))
    one_line_error(_eval(*ok, "--baseline", "kvpress:snapkv"), "make peers-venv")
    from gistcache.eval import config as config_module  # no variable, no .venv-peers here nor in the checkout

    monkeypatch.delenv("GISTCACHE_PEERS_PYTHON")
    monkeypatch.setattr(config_module, "__file__", str(tmp_path / "checkout" / "eval" / "config.py"))
    monkeypatch.chdir(tmp_path)
    one_line_error(_eval(*ok, "--baseline", "kvpress:snapkv"), "build it with `make peers-venv`")
    assert not out.exists()


FAKE_WORKER = """
import json, sys
job = json.load(open(sys.argv[1]))
tasks = []
for t in job["tasks"]:
    if t["press"] == "tova":
        tasks.append({"label": t["label"], "split": t["split"], "outputs": [], "kept": [], "wall_s": 0.1,
                      "flops": None, "error": "AssertionError: Query length 3 should be greater than the window size"})
        continue
    rows = job["examples"][t["split"]]
    outs = [r["question"][:2] + [job["eos_token_ids"][0], 70] for r in rows]
    tasks.append({"label": t["label"], "split": t["split"], "outputs": outs, "kept": [[k, k] for k in t["kept"]],
                  "wall_s": 0.5, "flops": {"examples": 1, "compress": 900, "prefill": 300, "decode": 100,
                  "new_tokens": 3}, "error": None})
    print("progress", len(rows), flush=True)
json.dump({"versions": {"kvpress": "fake"}, "error": None, "tasks": tasks}, open(sys.argv[2], "w"))
"""


def _fake_python(tmp_path, script):
    """An executable that stands for the peers python: runs `script` (not eval/peers_worker.py) on JOB and OUT."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(script)
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{worker}" "$2" "$3"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


@main_venv
def test_press_rows_merge_and_a_failing_press_still_writes(run, data, tmp_path, narrow, monkeypatch):
    """`gist eval` sends the worker P as the context, I as the question and K = F + M per example, merges the
    answers into rows, results.json, results.md and predictions.jsonl beside gist and full; a press that fails
    (tova here) gets no row, the rest is written, and the verb ends with one error line, exit 2."""
    from gistcache.model import load_run_tokenizer

    monkeypatch.setenv("GISTCACHE_PEERS_PYTHON", str(_fake_python(tmp_path, FAKE_WORKER)))
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    out = tmp_path / "out"
    result = _eval("--run", run, "--split", data, "--out", out, "--max-new-tokens", 2, "--flops-examples", 1,
                   "--baseline", "full", "--baseline", "kvpress:knorm", "--baseline", "kvpress:tova",
                   "--baseline", "kvpress:snapkv@0.5")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kvpress:tova (AssertionError: Query length 3" in errors[0], result.output
    assert str(out) in errors[0]
    saved = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in saved["rows"]] == ["gist", "full", "kvpress:knorm", "kvpress:snapkv@0.5"]
    assert saved["failed"] == [{"run": "run", "split": "rows", "label": "kvpress:tova",
                                "error": "AssertionError: Query length 3 should be greater than the window size"}]
    assert saved["config"]["baselines"] == ["full", "kvpress:knorm", "kvpress:tova", "kvpress:snapkv@0.5"]
    by = {r["condition"]: r for r in saved["rows"]}
    knorm, gist, full = by["kvpress:knorm"], by["gist"], by["full"]
    tok = load_run_tokenizer(run)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    from gistcache.prompts import encode_input, encode_instruction

    for line, row in zip(lines, ROWS):
        p = encode_instruction(tok, row["instruction"], "auto")
        i = encode_input(tok, row["input"], "auto")
        assert line["cached_positions"]["kvpress:knorm"] == line["cached_positions"]["gist"]  # F + M: same memory
        assert line["cached_positions"]["kvpress:snapkv@0.5"] == len(p) // 2
        assert line["outputs"]["kvpress:knorm"] == tok.decode(i[:2], skip_special_tokens=True).strip()  # cut at EOS
        assert "kvpress:tova" not in line["outputs"]
    assert knorm["prompt_state_positions_mean"] == pytest.approx(
        sum(line["cached_positions"]["gist"] for line in lines) / len(lines), abs=1e-3)
    assert knorm["compress_flops"] == 900 and knorm["prefill_flops"] == 300 and knorm["generation_flops"] == 100
    assert knorm["full_prefill_flops"] == full["prefill_flops"] and 0 < knorm["prefill_reduction_vs_full"] < 1
    assert gist["prompt_state_positions_mean"] == 1  # the gist row counts its M slots (its F is shared)
    md = (out / "results.md").read_text()
    assert "| rows | kvpress:knorm | 3 |" in md and "kvpress:tova" not in md
    assert (out / "rouge_by_condition.png").stat().st_size > 0
    # the staging folder was in the system's temporary folder (where a killed run would leave it), and is gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and list(system_tmp.iterdir()) == []


KILLING_WORKER = """
import os, signal
os.kill(os.getppid(), signal.SIGKILL)  # the gist eval that started this worker, killed mid-evaluation
"""


@main_venv
def test_a_killed_evaluation_leaves_nothing_beside_out(run, data, tmp_path):
    """`gist eval` with a press, killed (SIGKILL) while the press runs: nothing of it beside `--out`; its staging
    folder is in the system's temporary folder, which is the operating system's to clean."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "GISTCACHE_PEERS_PYTHON": str(_fake_python(tmp_path, KILLING_WORKER)),
           "TMPDIR": str(system_tmp), "COLUMNS": "40"}
    folder = tmp_path / "evals"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "gistcache.cli.main", "eval", "--run", run, "--split", data,
                           "--out", str(folder / "out"), "--max-new-tokens", "2", "--flops-examples", "0",
                           "--baseline", "kvpress:knorm"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(folder.iterdir()) == []
    staged = sorted(p.name.split("-")[1] for p in system_tmp.iterdir())  # gist-eval-peers-*, the worker's gist-peers-*
    assert staged == ["eval", "peers"], staged


@main_venv
def test_worker_that_cannot_start_fails_every_press_in_one_line(run, data, tmp_path, narrow, monkeypatch):
    """A peers python that crashes (here: one without kvpress, the main venv's own) fails each press with the
    reason, and the gist and full rows are still written."""
    monkeypatch.setenv("GISTCACHE_PEERS_PYTHON", sys.executable)
    out = tmp_path / "out"
    result = _eval("--run", run, "--split", data, "--out", out, "--max-new-tokens", 2, "--flops-examples", 0,
                   "--baseline", "full", "--baseline", "kvpress:knorm", "--json")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "kvpress:knorm (ModuleNotFoundError: No module named 'kvpress')" in errors[0]
    saved = json.loads((out / "results.json").read_text())
    assert [r["condition"] for r in saved["rows"]] == ["gist", "full"]
