"""The CLI is thin: flags become a TrainConfig, refusals become one line and exit code 2."""

from unittest import mock

import torch
from typer.testing import CliRunner

from gistcache.cli.main import app
from clitools import one_line_error

runner = CliRunner()


def test_train_flags_reach_the_config(tmp_path):
    """`gist train` builds the TrainConfig from its flags and calls the library once."""
    fake = {"condition": "neg_control", "steps": 3, "heldout_loss": 1.0, "loss_curve": []}
    with mock.patch("gistcache.train.loop.train", return_value=fake) as train:
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--preset", "smoke", "--num-gist", "5",
                                     "--condition", "neg_control", "--tune", "gist", "--batch-size", "2",
                                     "--lora-r", "64", "--lora-alpha", "8", "--warmup-ratio", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    (config,), kwargs = train.call_args
    assert (config.num_gist_tokens, config.condition, config.tune, config.batch_size) == (5, "neg_control", "gist", 2)
    assert (config.lora_r, config.lora_alpha) == (64, 8) and config.max_steps == 40  # max_steps: the smoke preset
    assert config.warmup_ratio == 0.25
    assert '"steps": 3' in result.output


def test_train_flag_defaults_match_the_config():
    """Every `gist train` flag with a default has TrainConfig's default, so --help tells the truth."""
    import inspect
    from dataclasses import MISSING, fields

    from gistcache.cli.train_cmd import train
    from gistcache.train.config import TrainConfig

    renamed = {"num_gist": "num_gist_tokens"}
    config_defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    checked = 0
    for name, param in inspect.signature(train).parameters.items():
        field_name = renamed.get(name, name)
        if param.default is inspect.Parameter.empty or param.default is None or field_name not in config_defaults:
            continue  # required, "take the preset's / config's value", or CLI-only (--json)
        assert param.default == config_defaults[field_name], name
        checked += 1
    assert checked >= 15


def test_train_help_names_the_defaults_a_preset_may_replace():
    """A flag a preset may set defaults to None (not given); its help names TrainConfig.DEFAULTS' value."""
    import inspect
    import typing

    from gistcache.cli.train_cmd import train
    from gistcache.train.config import DEFAULTS

    params, hints = inspect.signature(train).parameters, typing.get_type_hints(train, include_extras=True)
    for field_name, value in DEFAULTS.items():
        assert params[field_name].default is None, field_name
        help_text = hints[field_name].__metadata__[0].help
        assert f"Default: {value} (or the preset's)." in help_text, field_name


def _config_of(tmp_path, *flags):
    fake = {"condition": "gist", "steps": 3, "heldout_loss": 1.0, "loss_curve": []}
    with mock.patch("gistcache.train.loop.train", return_value=fake) as train:
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), *flags, "--json"])
    assert result.exit_code == 0, result.output
    return train.call_args[0][0]


def test_shipped_preset_is_the_whole_recipe_and_given_flags_win(tmp_path):
    """`--preset shipped` sets the shipped run's recipe (mask, decoder, objective, LoRA, rates, sizes); a
    flag given wins over it even when its value is the plain default (--lr 1e-4, --decoder tuned)."""
    from gistcache.train.card import train_command
    from gistcache.train.config import PRESETS

    config = _config_of(tmp_path, "--preset", "shipped")
    for name, value in PRESETS["shipped"].items():
        assert getattr(config, name) == value, name
    assert (config.decoder, config.objective, config.lr, config.gist_lr, config.max_steps) == ("base", "distill", 1e-3, 1e-4, 160)
    assert (config.gist_every, config.batch_tokens, config.max_length) == (64, 3072, 2300)
    assert train_command(config.to_dict()).split(" \\\n  ")[2:] == ["--preset shipped"]  # the card's command: out, preset

    config = _config_of(tmp_path, "--preset", "shipped", "--lr", "1e-4", "--decoder", "tuned", "--max-steps", "7",
                        "--gist-every", "0")
    assert (config.lr, config.decoder, config.max_steps, config.gist_every) == (1e-4, "tuned", 7, 0)
    assert (config.objective, config.lora_r, config.max_length) == ("distill", 8, 2300)  # the rest: the preset's
    assert "--gist-every 0" in train_command(config.to_dict())
    assert "--lr 0.0001" in train_command(config.to_dict()) and "--decoder tuned" in train_command(config.to_dict())

    config = _config_of(tmp_path, "--preset", "smoke")  # a size preset leaves the recipe at its defaults
    assert (config.lr, config.decoder, config.objective, config.lora_r, config.max_length) == (1e-4, "tuned", "labels", 16, 512)
    assert (config.gist_every, config.batch_tokens) == (0, 0)


def test_train_table_shows_each_heldout_split(tmp_path, monkeypatch):
    """Without --json the train table lists the held-out loss of each split, before -> after."""
    from gistcache.cli import common

    monkeypatch.setattr(common.console, "width", 200)  # a table fits the terminal: its cells wrap at COLUMNS=40
    fake = {"condition": "gist", "steps": 3, "heldout_loss": 1.5, "heldout_loss_before": 6.5, "loss_curve": [],
            "heldout_loss_by_split": {"seen_tasks": {"before": 7.398, "after": 1.346, "examples": 48},
                                      "unseen_tasks": {"before": 6.253, "after": 2.111, "examples": 48}}}
    with mock.patch("gistcache.train.loop.train", return_value=fake):
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    assert "seen_tasks (n=48)" in result.output and "7.3980 -> 1.3460" in result.output
    assert "unseen_tasks (n=48)" in result.output and "6.2530 -> 2.1110" in result.output


def test_bad_flags_one_line_exit_2(tmp_path):
    """--num-gist 0, an unknown preset, a missing data file: one line each, exit 2, nothing written."""
    out = tmp_path / "r"
    for args, text in [
        (["--num-gist", "0"], "--num-gist must be a whole number >= 1"),
        (["--lora-alpha", "0"], "--lora-alpha must be >= 1"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
        (["--preset", "huge"], "unknown --preset"),
        (["--data", str(tmp_path / "none.json")], "does not exist"),
        (["--model", str(tmp_path / "missing.gguf")], "does not exist"),
    ]:
        result = runner.invoke(app, ["train", "--out", str(out), *args])
        assert text in one_line_error(result)
    assert not out.exists()


def test_unloadable_model_one_line(tmp_path):
    """A model folder that cannot load is refused in one line naming it."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--model", str(folder), "--preset", "smoke"])
    assert "cannot load" in one_line_error(result)


def test_out_of_accelerator_memory_is_one_line_with_the_setting_to_lower():
    """torch's OutOfMemoryError (seen with nine jobs on one GPU) is a setting to change, not a bug report."""
    from gistcache.cli.common import BAD_INPUT, describe_error

    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 86.00 MiB. GPU 0 has a total capacity of "
                                 "139.80 GiB of which 36.44 MiB is free.\nmore detail")
    code, line = describe_error(exc)
    assert code == BAD_INPUT == 2
    assert line.startswith("out of accelerator memory (CUDA out of memory. Tried to allocate 86.00 MiB.")
    assert "--batch-size" in line and "\n" not in line and "bug" not in line
