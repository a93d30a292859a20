"""`gist attention`: attention shares after the gist, checked against the raw attention weights."""

import json

import pytest
import torch
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.eval.attention import AttentionConfig, attention_after_gist, attention_by_condition
from gistcache.model import GistModel
from gistcache.prompts import format_prompt, encode_example

runner = CliRunner()


def encoded_rows(tokenizer, gist_id, num_gist):
    rows = [("Reverse the word.", "stone", "enots"), ("Add the numbers.", "12, 7", "19"), ("Name a day.", "", "Monday")]
    return [encode_example(tokenizer, format_prompt(tokenizer, i, x, "chat"), num_gist, gist_id, "chat", output=o)
            for i, x, o in rows]


@pytest.mark.parametrize("num_gist", [1, 3])
def test_shares_equal_the_raw_attention_weights(tokenizer, num_gist):
    """Each share is the mean, over layers, heads and queries after the gist, of the weight on the named keys:
    key 0 for pos_control, the first gist for gist, the first token after the gist for neg_control."""
    gm = GistModel(tiny.make_model("llama", attn_implementation="eager"), tokenizer, num_gist)
    encoded = encoded_rows(tokenizer, gm.gist_token_id, num_gist)
    for row in attention_by_condition(gm, encoded):
        firsts, gists = [], []
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            with torch.no_grad():
                att = torch.stack(gm(ids, torch.ones_like(ids), condition=row["condition"],
                                     output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
            start = e.input_ids.index(gm.gist_token_id)
            end = start + num_gist
            first_key = {"pos_control": 0, "gist": start, "neg_control": end}[row["condition"]]
            firsts.append(att[:, :, end:, first_key].mean().item())
            gists.append(att[:, :, end:, start:end].sum(-1).mean().item())
        assert row["first_visible_share"] == pytest.approx(sum(firsts) / len(firsts), abs=1e-6)
        assert row["gist_share"] == pytest.approx(sum(gists) / len(gists), abs=1e-6)
        assert row["examples"] == 3 and row["answer_loss"] > 0
        if row["condition"] == "neg_control":
            assert row["gist_share"] == 0.0  # the mask hides the gist from what follows it
        if row["condition"] == "gist" and num_gist == 1:
            assert row["first_visible_share"] == pytest.approx(row["gist_share"])


def test_answer_loss_is_the_masked_forward_loss(tokenizer):
    """answer_loss is the token-weighted cross-entropy of the answers under the condition's mask."""
    gm = GistModel(tiny.make_model("llama", attn_implementation="eager"), tokenizer, 1)
    encoded = encoded_rows(tokenizer, gm.gist_token_id, 1)
    total, count = 0.0, 0
    for e in encoded:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        with torch.no_grad():
            out = gm(ids, torch.ones_like(ids), labels=labels, condition="gist")
        n = int((labels[0, 1:] != -100).sum())
        total, count = total + out.loss.item() * n, count + n
    assert attention_after_gist(gm, encoded, "gist")["answer_loss"] == pytest.approx(total / count, rel=1e-5)


def test_sdpa_model_is_refused_with_a_fix(tokenizer):
    gm = GistModel(tiny.make_model("llama", attn_implementation="sdpa"), tokenizer, 1)
    with pytest.raises(GistError, match="eager"):
        attention_after_gist(gm, encoded_rows(tokenizer, gm.gist_token_id, 1), "gist")


def test_config_checks():
    with pytest.raises(GistError, match="--examples"):
        AttentionConfig(examples=0)
    with pytest.raises(GistError, match="--num-gist"):
        AttentionConfig(num_gist_tokens=0)


def test_cli_measures_every_condition(tiny_model_dir, monkeypatch):
    from gistcache.cli import common

    monkeypatch.setattr(common.console, "width", 200)  # a table fits the terminal: its headers wrap at COLUMNS=40
    result = runner.invoke(app, ["attention", "--model", str(tiny_model_dir), "--examples", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["condition"] for r in data["conditions"]] == ["gist", "pos_control", "neg_control"]
    assert all(0.0 <= r["first_visible_share"] <= 1.0 and r["examples"] == 4 for r in data["conditions"])
    table = runner.invoke(app, ["attention", "--model", str(tiny_model_dir), "--examples", "2"])
    assert table.exit_code == 0 and "attention on gist" in table.output


def test_cli_bad_input_one_line_exit_2(tiny_model_dir, tmp_path):
    one_line_error(runner.invoke(app, ["attention", "--model", str(tiny_model_dir), "--examples", "0"]), "--examples")
    one_line_error(runner.invoke(app, ["attention", "--run", str(tmp_path)]), str(tmp_path))
