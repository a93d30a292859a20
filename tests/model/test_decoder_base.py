"""Runs whose caches the untouched base model reads (`--decoder base`): the LoRA adapter works only where the gist
is written (prefix, instruction, gist), and the tokens after the gist run with it switched off."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

import tiny
from gistcache.cache import load_cache, save_cache
from gistcache.config import GistConfig
from gistcache.errors import GistError
from gistcache.inference.compression import compress
from gistcache.inference.generation import generate_full_prompt, generate_ids, generate_masked_ids
from gistcache.model import GistModel, load_base_model, load_run, load_tokenizer
from gistcache.train.config import TrainConfig
from gistcache.train.loop import train
from test_compact import left_padded, rows
from tiny import INPUTS, INSTRUCTIONS


@pytest.fixture(scope="module")
def decoder_runs(tmp_path_factory, tiny_model_dir):
    """Two tiny LoRA runs from the same seed, one per decoder, trained with a large step size so the adapter
    moves the logits (trained: not make_tiny_run's)."""
    base = tmp_path_factory.mktemp("decoder")
    out = {"model_dir": tiny_model_dir}
    for decoder in ("base", "tuned"):
        config = TrainConfig(out=str(base / f"run-{decoder}"), model=str(tiny_model_dir), preset="smoke", max_steps=3,
                             num_gist_tokens=2, decoder=decoder, max_examples=16, eval_examples=4, batch_size=4,
                             lr=5e-2)
        assert train(config, show_progress=False)["decoder"] == decoder
        out[decoder] = base / f"run-{decoder}"
    return out


def test_config_records_the_decoder_and_refuses_what_cannot_separate_it(decoder_runs):
    assert GistConfig().decoder == "tuned" and GistConfig.from_dict({"mask": "prefix"}).decoder == "tuned"
    saved = json.loads((decoder_runs["base"] / "config.json").read_text())["gist"]
    assert saved["decoder"] == "base"
    for bad in ({"tune": "gist"}, {"tune": "full"}, {"mask": "paper"}, {"positions": "original"},
                {"condition": "pos_control", "mask": "paper"}):
        with pytest.raises(GistError, match="--decoder base needs"):
            GistConfig(decoder="base", **bad)
    with pytest.raises(GistError, match="unknown --decoder 'frozen'"):
        GistConfig(decoder="frozen")
    with pytest.raises(GistError, match="unknown --decoder 'frozen'"):
        GistModel(tiny.make_model("llama"), tiny.make_tokenizer(), 1, mask="prefix", decoder="frozen")


def test_the_adapter_is_off_after_the_gist_and_on_before_it(decoder_runs):
    """The same trained adapter: logits up to the gist are the adapter's (they equal the tuned reading there),
    logits after it equal a forward whose adapter is switched off everywhere but in pass 1 (computed here by
    hand: the compress pass with the adapter, the rest through the bare base weights), and they differ from the
    adapter's own reading after the gist (teeth)."""
    model = load_run(decoder_runs["base"])
    assert model.decoder == "base" and hasattr(model.model, "disable_adapter")  # kept unmerged
    r = rows(model)[0]
    ids = torch.tensor([r])
    end = r.index(model.gist_token_id) + model.num_gist_tokens
    with torch.no_grad():
        base_after = model(ids, torch.ones_like(ids)).logits[0]
        model.decoder = "tuned"
        tuned_after = model(ids, torch.ones_like(ids)).logits[0]
        model.decoder = "base"
    torch.testing.assert_close(base_after[:end], tuned_after[:end], atol=1e-5, rtol=0)
    assert (base_after[end:] - tuned_after[end:]).abs().max() > 1e-3


def test_cache_path_equals_the_masked_definition_token_for_token(decoder_runs, tmp_path):
    """compress -> save -> load -> generate from the file gives the masked forward's greedy tokens, for every
    (instruction, input) pair in one batch; the decoder's full-prompt reading is the untouched base model's."""
    model = load_run(decoder_runs["base"])
    caches = [load_cache(save_cache(compress(model, text), tmp_path / f"c{i}.safetensors"), model)
              for i, text in enumerate(INSTRUCTIONS)]
    got = generate_ids(model, caches, INPUTS, max_new_tokens=6, do_sample=False)
    want = generate_masked_ids(model, INSTRUCTIONS, INPUTS, max_new_tokens=6)
    assert got == want
    tokenizer = load_tokenizer(str(decoder_runs["model_dir"]))
    untouched = GistModel(load_base_model(str(decoder_runs["model_dir"])), tokenizer, 2, mask="prefix").eval()
    assert generate_full_prompt(model, INSTRUCTIONS, INPUTS, max_new_tokens=6) == \
        generate_full_prompt(untouched, INSTRUCTIONS, INPUTS, max_new_tokens=6)


def test_training_reaches_the_adapter_through_the_kept_slots(decoder_runs):
    """With the adapter off after the gist, the answer's loss still reaches the LoRA weights: through the keys and
    values pass 1 keeps (the prefix and the gist), which is all that trains them."""
    model = load_run(decoder_runs["base"]).train()  # unmerged: the adapter is there to train
    ids, mask = left_padded(rows(model))
    labels = ids.masked_fill((mask == 0) | (ids == model.gist_token_id), -100)
    for _, p in model.model.named_parameters():
        p.requires_grad_(False)
    lora = [p for n, p in model.model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    model(ids, mask, labels=labels).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_cli_takes_and_refuses_the_decoder(tmp_path):
    from gistcache.cli.main import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--decoder", "frozen"])
    assert result.exit_code == 2 and "unknown --decoder 'frozen'" in result.output
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--decoder", "base", "--tune", "gist"])
    assert result.exit_code == 2 and "--decoder base needs" in result.output
    assert not (tmp_path / "r").exists()


def test_export_serves_the_untouched_base_weights(decoder_runs, tmp_path):
    """`gist export` of a --decoder base run writes the base weights themselves (logits equal the untouched model's,
    exactly; the fingerprint is the run's base fingerprint), keeps the adapter beside them for compressing, and
    a stock model over the served slots answers as `gist generate` does."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from gistcache.inference.generation import GREEDY
    from gistcache.model import cache_kwarg
    from gistcache.serving.export import (GIST_DIR, export_run, load_exported, read_export, read_prefix_kv, request_ids,
                                          served_kv)

    run = decoder_runs["base"]
    info = export_run(run, tmp_path / "hf")
    model = load_run(run)
    assert info.exported_fingerprint == model.base_fingerprint
    assert [p.name for p in (tmp_path / "hf").glob("*.safetensors")] == ["model.safetensors"]
    assert (tmp_path / "hf" / GIST_DIR / "adapter" / "adapter_model.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    untouched = load_base_model(str(decoder_runs["model_dir"]))
    ids = torch.randint(0, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, untouched(ids).logits, atol=0, rtol=0)
    served = load_exported(tmp_path / "hf")
    prefix, inv_freq = read_prefix_kv(tmp_path / "hf", read_export(tmp_path / "hf"))
    for ours, theirs in zip(compress(model, INSTRUCTIONS), compress(served, INSTRUCTIONS)):
        for x, y in zip([*ours.keys, *ours.values], [*theirs.keys, *theirs.values]):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        expected = generate_ids(model, ours, INPUTS[0], max_new_tokens=6, **GREEDY)[0]
        request = torch.tensor([request_ids(model.tokenizer, info.identity.template, ours, INPUTS[0])])
        past = DynamicCache(ddp_cache_data=served_kv(ours, prefix, inv_freq), config=hf.config)
        out = hf.generate(input_ids=request, max_new_tokens=6, eos_token_id=model.tokenizer.eos_token_id,
                          suppress_tokens=[model.gist_token_id] if model.gist_token_id < 260 else None,
                          **{cache_kwarg(hf): past}, **GREEDY)
        got = out[0, request.shape[1]:].tolist()
        eos = model.tokenizer.eos_token_id
        assert (got[:got.index(eos) + 1] if eos in got else got) == expected


def test_eval_of_a_base_decoder_run(decoder_runs, tmp_path):
    """`gist eval` on a --decoder base run: its full-prompt reading is the untouched base model, so the `base`
    baseline (the same model, not loaded twice) answers exactly as `full`, and retention vs base is retention."""
    from gistcache.eval.config import EvalConfig
    from gistcache.eval.loop import evaluate

    rows = [{"instruction": text, "input": given, "output": "ok"} for text, given in zip(INSTRUCTIONS, INPUTS)]
    (tmp_path / "mine.json").write_text(json.dumps(rows))
    results = evaluate(EvalConfig(runs=[str(decoder_runs["base"])], baselines=["full", "base"],
                                  splits=[str(tmp_path / "mine.json")], out=str(tmp_path / "e"), max_new_tokens=4,
                                  flops_examples=1), show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == len(rows) and all(line["outputs"]["base"] == line["outputs"]["full"] for line in lines)
    fidelity = results["fidelity"][0]  # (NaN when every answer scores 0 against "ok": compared as text)
    assert fidelity["retention_vs_base"] is not None
    assert json.dumps(fidelity["retention_vs_base"]) == json.dumps(fidelity["retention"])


def test_the_untouched_base_of_a_base_decoder_run_is_the_run(decoder_runs):
    """--compare-full and the `base` baseline need no second copy of the weights for a --decoder base run."""
    from gistcache.model import load_untouched_base

    model = load_run(decoder_runs["base"])
    assert load_untouched_base(model, dtype=torch.float32, device="cpu") is model
    tuned = load_run(decoder_runs["tuned"])
    assert load_untouched_base(tuned, dtype=torch.float32, device="cpu") is not tuned


def test_cache_reader_switches_the_adapter_off_only_inside():
    """`cache_reader` yields the model with the adapter off for a --decoder base run, and puts it back."""
    peft = get_peft_model(tiny.make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    model = GistModel(peft, tiny.make_tokenizer(), 1, mask="prefix", decoder="base")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        on = model.model(input_ids=ids).logits
        with model.cache_reader() as lm:
            off = lm(input_ids=ids).logits
        with model.model.disable_adapter():
            bare = model.model(input_ids=ids).logits
        again = model.model(input_ids=ids).logits
    assert torch.equal(off, bare) and torch.equal(again, on) and not torch.equal(on, off)
