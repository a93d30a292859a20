"""The model card (train/card.py): its commands name the run's folder, except for the run shipped in the
package, which every command uses when no run is named (`make ship-run` evaluates the package's copy with
`gist eval --update-card`, which writes the card there)."""

import json
import shutil

import pytest

from gistcache.run import DEFAULT_RUN, LONG_RUN, PRETRAINED_DIR
from gistcache.train import card

SHIPPED = PRETRAINED_DIR / DEFAULT_RUN


def _run_folder(path):
    """A run folder with the shipped run's config and metrics (no weights: the card reads neither)."""
    path.mkdir(parents=True)
    for name in ("config.json", "metrics.json"):
        shutil.copy(SHIPPED / name, path / name)
    return path


def _use_section(text):
    return text.split("## Use", 1)[1]


def test_card_commands_name_the_run_folder_unless_it_is_the_shipped_one(tmp_path, monkeypatch):
    run = _run_folder(tmp_path / "runs" / "r1")
    use = _use_section(card.model_card(run))
    assert f"gist compress \"<instruction>\" --run {run} --out" in use and f"gist generate --run {run} --cache" in use

    monkeypatch.setattr(card, "PRETRAINED_DIR", tmp_path / "runs")
    monkeypatch.setattr(card, "DEFAULT_RUN", "r1")
    use = _use_section(card.model_card(run))
    assert "--run" not in use
    assert "gist compress \"<instruction>\" --out prompt.safetensors" in use


def test_shipped_card_tells_users_to_use_it_without_a_run_folder():
    text = (SHIPPED / "README.md").read_text()
    assert "--run" not in _use_section(text)
    assert "## Fidelity" in text and "retention" in text


def test_card_names_paths_by_file_name(tmp_path):
    """A card never carries the training machine's paths: --out, --data, --exclude, --eval-data and a model
    folder are named by file name; a hub id or alias stays as it is."""
    run = _run_folder(tmp_path / "r")
    config = json.loads((run / "config.json").read_text())
    config["train"].update(out="/home/someone/runs/r7", data=["/home/someone/data/a.json"],
                           eval_data=["/home/someone/data/e.json"], model="/home/someone/models/tiny")
    config["gist"]["model"] = "/home/someone/models/tiny"
    (run / "config.json").write_text(json.dumps(config))
    text = card.model_card(run)
    assert "/home/someone" not in text
    for shown in ("--out r7", "--data a.json", "--eval-data e.json", "--model tiny", "`tiny`"):
        assert shown in text, shown
    assert card.shown_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", [DEFAULT_RUN, LONG_RUN])
def test_shipped_card_is_what_the_renderer_writes(name):
    """Each shipped card equals the card rendered from its own run folder (with its measured sections): no path of
    the machine that trained it. The long-prompt run's card has its table by prompt length and names itself in
    its commands."""
    run = PRETRAINED_DIR / name
    text = (run / "README.md").read_text()
    measured = "## Fidelity" + text.split("## Fidelity", 1)[1].split("\n## Use", 1)[0]
    assert card.model_card(run, [measured]) == text
    assert "/work/" not in text and "/home/" not in text
    if name == LONG_RUN:
        assert "## By instruction length" in text and "| 1025-2048 |" in text
        assert f"gist compress \"<instruction>\" --run {LONG_RUN} --out" in _use_section(text)


def test_card_names_a_chunked_runs_ratio_and_trained_lengths(tmp_path):
    """A run with --gist-every says its cache grows with the prompt and the prompt lengths it trained on."""
    run = _run_folder(tmp_path / "r")
    config = json.loads((run / "config.json").read_text())
    config["gist"].update(gist_every=64, trained_prompt_tokens=[13, 1990])
    (run / "config.json").write_text(json.dumps(config))
    text = card.model_card(run)
    assert "1 gist token(s) after every 64 instruction tokens" in text
    assert "| trained prompt lengths | 13-1990 tokens" in text
