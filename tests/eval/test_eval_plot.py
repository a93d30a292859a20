"""`python -m gistcache.eval.plot`: one fidelity-vs-compression figure over gist eval folders written apart."""

import json

import pytest

from gistcache.eval import plot


def _eval_folder(path, run, held, rouge):
    """A gist eval folder of one run on one split of two examples: gist and truncate holding `held` positions."""
    path.mkdir()
    rows = [{"run": run, "split": "s", "condition": c, "label": f"{run}:{c}", "examples": 2, "compression_mean": 9.0,
             "rouge_l": {"mean": rouge[c], "ci_low": rouge[c] - 1, "ci_high": rouge[c] + 1}} for c in ("gist", "truncate")]
    (path / "results.json").write_text(json.dumps({"rows": rows}))
    preds = [{"split": "s", "instruction_tokens": n, "cached_positions": {f"{run}:gist": held, f"{run}:truncate": held}}
             for n in (100, 300)]
    (path / "predictions.jsonl").write_text("\n".join(json.dumps(p) for p in preds) + "\n")
    return path


def test_merged_rows_put_gist_and_truncate_of_one_state_at_one_compression(tmp_path):
    a = _eval_folder(tmp_path / "a", "k32", 20, {"gist": 30.0, "truncate": 10.0})
    b = _eval_folder(tmp_path / "b", "k64", 10, {"gist": 20.0, "truncate": 5.0})
    again = _eval_folder(tmp_path / "c", "k32", 50, {"gist": 1.0, "truncate": 1.0})  # an earlier folder's rows win
    rows = plot.merged_rows([a, b, again])
    x = {(r["run"], r["condition"]): r["state_compression_mean"] for r in rows}
    assert x == {("k32", "gist"): (100 / 20 + 300 / 20) / 2, ("k32", "truncate"): (100 / 20 + 300 / 20) / 2,
                 ("k64", "gist"): (100 / 10 + 300 / 10) / 2, ("k64", "truncate"): (100 / 10 + 300 / 10) / 2}
    out = tmp_path / "fig.png"
    plot.main([str(a), str(b), "--out", str(out)])
    assert out.stat().st_size > 0


def test_a_folder_that_is_no_eval_gets_one_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path), "--out", str(tmp_path / "fig.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gist eval" in err
    assert not (tmp_path / "fig.png").exists()


def test_rename_joins_one_run_evaluated_under_two_names(tmp_path, capsys):
    """`--rename OLD=NEW`: the shipped run evaluated as its training folder in one eval and by name in another is
    one run; its later rows are dropped like any repeated (run, split, condition). A rename without `=` is refused."""
    a = _eval_folder(tmp_path / "a", "every64", 10, {"gist": 20.0, "truncate": 5.0})
    b = _eval_folder(tmp_path / "b", "long-r4", 10, {"gist": 99.0, "truncate": 99.0})
    rows = plot.merged_rows([a, b], {"long-r4": "every64"})
    assert {(r["run"], r["condition"], r["rouge_l"]["mean"]) for r in rows} == {("every64", "gist", 20.0),
                                                                                ("every64", "truncate", 5.0)}
    twice = tmp_path / "twice.png"  # the same OLD given twice: the last NEW wins, as a dict has it
    plot.main([str(a), "--rename", "x=y", "--rename", "x=z", "--out", str(twice)])
    assert twice.stat().st_size > 0
    with pytest.raises(SystemExit) as exc:
        plot.main([str(a), "--rename", "long-r4", "--out", str(tmp_path / "fig.png")])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "fig.png").exists()


def test_the_echo_control_is_a_level_with_no_compression(tmp_path, monkeypatch):
    """An echo row (the input as the answer, no prompt state) has no x; the figure draws it as a level per split."""
    from matplotlib.axes import Axes

    a = _eval_folder(tmp_path / "a", "k32", 20, {"gist": 30.0, "truncate": 10.0})
    results = json.loads((a / "results.json").read_text())
    results["rows"].append({"run": "k32", "split": "s", "condition": "echo", "label": "k32:echo", "examples": 2,
                            "compression_mean": None, "rouge_l": {"mean": 42.0, "ci_low": 40.0, "ci_high": 44.0}})
    (a / "results.json").write_text(json.dumps(results))
    preds = [{**json.loads(line), "cached_positions": {"k32:gist": 20, "k32:truncate": 20, "k32:echo": 0}}
             for line in (a / "predictions.jsonl").read_text().splitlines()]
    (a / "predictions.jsonl").write_text("\n".join(json.dumps(p) for p in preds) + "\n")
    rows = plot.merged_rows([a])
    assert next(r for r in rows if r["condition"] == "echo")["state_compression_mean"] is None
    levels = []
    drawn = Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda self, y=0, *args, **kw: levels.append(y) or drawn(self, y, *args, **kw))
    out = tmp_path / "fig.png"
    plot.main([str(a), "--out", str(out)])
    assert levels == [42.0] and out.stat().st_size > 0
