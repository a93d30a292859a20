"""`gist eval`'s config: a shipped run named by its name is read from its folder, and nothing is written there."""

import json

from gistcache.eval.config import EvalConfig, resolve_config
from gistcache.run import PRETRAINED_DIR


def test_a_shipped_run_named_by_its_name_resolves_to_its_folder(tmp_path, monkeypatch):
    split = tmp_path / "s.json"
    split.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    monkeypatch.chdir(tmp_path)
    config = resolve_config(EvalConfig(runs="smollm2-135m-gist1", splits=[str(split)]))
    assert config.runs == [str(PRETRAINED_DIR / "smollm2-135m-gist1")]
    assert config.out.startswith("runs/smollm2-135m-gist1-eval-")


def test_gist_eval_without_run_evaluates_the_shipped_run(tmp_path, monkeypatch):
    """`gist eval --baseline truncate` (the design card's line) needs no --run: the shipped run is evaluated."""
    from unittest import mock

    from typer.testing import CliRunner

    from gistcache.cli.main import app
    from gistcache.run import DEFAULT_RUN

    split = tmp_path / "s.json"
    split.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    monkeypatch.chdir(tmp_path)
    fake = {"out": "o", "runs": [], "rows": []}
    with mock.patch("gistcache.eval.loop.evaluate", return_value=fake) as evaluate:
        result = CliRunner().invoke(app, ["eval", "--baseline", "truncate", "--split", str(split), "--json"])
    assert result.exit_code == 0, result.output
    assert evaluate.call_args[0][0].runs == [str(PRETRAINED_DIR / DEFAULT_RUN)]
