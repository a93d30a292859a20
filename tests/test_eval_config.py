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
