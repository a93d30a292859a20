"""Self-distillation from the full prompt: aligned teacher batches, the KL, the teacher per tuning mode,
answers written by the teacher, and the refusals."""

import json
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.masks import make_position_ids
from gistcache.model import GistModel
from gistcache.prompts import IGNORE_INDEX
from gistcache.train import distill
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train

runner = CliRunner()
G, PAD = 9, 1


def test_teacher_batch_drops_the_gist_and_keeps_answer_columns():
    """Each row loses its gist tokens and gains as many pads on the left: every later column is unchanged."""
    ids = torch.tensor([[PAD, 5, 6, G, G, 7, 8], [5, 6, 6, G, G, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    t_ids, t_mask = distill.teacher_batch(ids, mask, G, PAD)
    assert t_ids.tolist() == [[PAD, PAD, PAD, 5, 6, 7, 8], [PAD, PAD, 5, 6, 6, 7, 8]]
    assert t_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]


def test_distill_loss_is_kl_over_answer_tokens():
    """Zero for identical logits; KL(teacher || student) on answer positions only, scaled by T^2."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 3:] = 4  # columns 3 and 4 are answers, predicted from columns 2 and 3
    assert distill.distill_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.log_softmax(teacher[:, 2:4] / 2.0, -1)
    q = torch.log_softmax(student[:, 2:4] / 2.0, -1)
    expected = (p.exp() * (p - q)).sum(-1).mean() * 4.0
    assert distill.distill_loss(student, teacher, labels, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    changed = student.clone()
    changed[:, :2] += 5.0  # prompt columns do not count
    assert distill.distill_loss(changed, teacher, labels, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_logits_are_the_base_reading_the_full_prompt():
    """With the adapter disabled, the teacher's answer logits equal the untouched base model's on prompt + input."""
    from peft import LoraConfig, get_peft_model

    base = tiny.make_model("llama")
    reference = tiny.make_model("llama")  # same seed: the untouched base
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    student = GistModel(peft, tiny.make_tokenizer(), 2, mask="prefix")
    gid = student.gist_token_id
    rows = [[5, 6, 7, gid, gid, 8, 9, 10], [5, 6, gid, gid, 8, 9]]
    T = max(map(len, rows))
    ids = torch.tensor([[PAD] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    teacher = distill.Teacher(module=peft, disable_adapter=True)
    got = distill.teacher_logits(teacher, student, ids, mask, PAD)
    for b, row in enumerate(rows):
        plain = torch.tensor([[t for t in row if t != gid]])
        with torch.no_grad():
            ref = reference(plain, position_ids=make_position_ids(torch.ones_like(plain))).logits[0]
        torch.testing.assert_close(got[b, -3:], ref[-3:], atol=1e-5, rtol=0)
    with torch.no_grad():  # and the adapter is really on outside the teacher's context
        on = peft(torch.tensor([[5, 6, 8]])).logits
        off = reference(torch.tensor([[5, 6, 8]])).logits
    assert (on - off).abs().max() > 1e-4


def config(tmp_path, model_dir, **kw):
    base = dict(out=str(tmp_path / "run"), model=str(model_dir), preset="smoke", max_examples=16, eval_examples=8,
                batch_size=4, max_steps=4, lr=1e-2, num_gist_tokens=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("tune,objective", [("lora", "distill"), ("gist", "mix"), ("full", "distill")])
def test_distill_training_runs_each_mode(tmp_path, tiny_model_dir, tune, objective):
    """Each tuning mode trains under distill or mix, with the prefix mask, and records what it did."""
    metrics = train(config(tmp_path, tiny_model_dir, tune=tune, objective=objective), show_progress=False)
    assert metrics["objective"] == objective and metrics["mask"] == "prefix"
    assert all(loss >= 0 and loss == loss for _, loss in metrics["loss_curve"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["gist"]["mask"] == "prefix" and saved["train"]["objective"] == objective
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"--objective {objective}" in card and "prefix" in card


def test_distill_objective_starts_from_the_teacher_gap(tmp_path, tiny_model_dir):
    """Under distill the first loss is the KL of the untrained gist against the full prompt: > 0, finite."""
    metrics = train(config(tmp_path, tiny_model_dir, tune="lora", objective="distill", max_steps=2),
                    show_progress=False)
    assert 0 < metrics["loss_curve"][0][1] < 50


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


ROWS = [{"instruction": f"Repeat the word {i % 3}", "input": w} for i, w in enumerate(["ab", "cd", "ef", "gh", "ij",
                                                                                        "kl", "mn", "op"])]


def test_teacher_answers_replace_outputs_and_are_cached(tmp_path, tiny_model_dir):
    """--teacher-answers: rows need no output; the teacher's answers are written once and reused."""
    data = write_rows(tmp_path / "d.jsonl", ROWS)
    cfg = dict(data=[data], teacher_answers=True, teacher_max_new_tokens=3, eval_examples=0, tune="gist",
               objective="labels")
    train(config(tmp_path, tiny_model_dir, **cfg), show_progress=False)
    path = tmp_path / "run" / distill.TEACHER_ANSWERS_FILE
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(answers) == len(ROWS) and all(set(a) == {"key", "output"} for a in answers)
    written = path.stat().st_ino
    train(config(tmp_path, tiny_model_dir, overwrite=True, **cfg), show_progress=False)
    assert path.stat().st_ino == written  # every answer came from the cache: the file was not written again


def test_bad_distill_input_one_line_exit_2(tmp_path, tiny_model_dir):
    """Unknown objective, --teacher-answers on a file with no inputs or without --data, a teacher copy that
    does not fit: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    no_inputs = write_rows(tmp_path / "n.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}] * 4)
    base = ["train", "--out", str(out), "--model", str(tiny_model_dir), "--preset", "smoke", "--max-steps", "1"]
    for args, text in [
        (["--objective", "teach"], "unknown --objective 'teach'"),
        (["--teacher-answers"], "--teacher-answers needs --data FILE"),
        (["--teacher-answers", "--data", no_inputs], "has no row with an input"),
        (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
        (["--condition", "neg_control", "--mask", "prefix"], "--mask paper only"),
        (["--mask", "wide"], "unknown --mask 'wide'"),
    ]:
        one_line_error(runner.invoke(app, [*base, *args]), text)
    with mock.patch.object(distill, "free_memory_bytes", return_value=1000):
        one_line_error(runner.invoke(app, [*base, "--tune", "full", "--objective", "distill"]),
                       "keeps a frozen copy of the model as teacher: it needs about")
    assert not out.exists()
    with pytest.raises(GistError, match="unknown --objective"):
        TrainConfig(out=str(out), objective="kl")
