"""The model card (train/card.py): its commands name the run's folder, except for the run shipped in the
package, which every command uses when no run is named (`make ship-run` evaluates the package's copy with
`gist eval --update-card`, which writes the card there)."""

import shutil

from gistcache.run import DEFAULT_RUN, PRETRAINED_DIR
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
