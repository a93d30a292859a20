"""`gist train`: build a TrainConfig from flags and call gistcache.train.loop.train."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from gistcache.cli.common import check_writable_folder, console, friendly_errors, print_json
from gistcache.cli.options import JsonOut
from gistcache.model import quiet_transformers
from gistcache.train import loop
from gistcache.train.checkpoint import saved_run_config
from gistcache.train.config import DEFAULTS, TrainConfig


# CLI parameters whose TrainConfig field has another name
FIELD_OF_PARAM = {"num_gist": "num_gist_tokens", "json_out": None, "ctx": None}


def _default(field: str) -> str:
    """Help text for a flag whose default a preset may replace (TrainConfig.DEFAULTS holds the value)."""
    return f" Default: {DEFAULTS[field]} (or the preset's)."


@friendly_errors
@quiet_transformers()
def train(
    ctx: typer.Context,
    out: Annotated[str, typer.Option("--out", help="Run folder to write.")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Alpaca-format JSON/JSONL file (repeatable). Default: the built-in instruction set.")] = None,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Held-out file(s): held-out loss, and their instructions are dropped from training.")] = None,
    exclude_data: Annotated[Optional[list[str]], typer.Option("--exclude", help="File(s) whose instructions are dropped from training and not scored (e.g. the evaluation splits you will report).")] = None,
    preset: Annotated[str, typer.Option(help="Data size and steps: smoke | test | validate | full; or shipped: the whole recipe of the run shipped in the package (flags given still win).")] = "test",
    model: Annotated[str, typer.Option(help="Hugging Face id or folder, a .gguf file, or smollm2-135m.")] = "smollm2-135m",
    num_gist: Annotated[int, typer.Option("--num-gist", help="Gist tokens per prompt (per chunk with --gist-every).")] = 1,
    gist_every: Annotated[Optional[int], typer.Option("--gist-every", help=f"Cut the instruction into chunks of K tokens with --num-gist gist tokens after each, so the cache grows with the prompt (F + N*ceil(P/K) slots); 0: one chunk.{_default('gist_every')}")] = None,
    chunk_attention: Annotated[str, typer.Option("--chunk-attention", help="With --gist-every: causal (each chunk's tokens read every earlier chunk) | local (they read earlier chunks only through their gists, as in Activation Beacon).")] = "causal",
    raw_tail: Annotated[int, typer.Option("--raw-tail", help="With --gist-every: keep the instruction's last min(W, P - K) tokens raw after the last gist (the cache holds their keys/values too); 0: compress every token.")] = 0,
    condition: Annotated[str, typer.Option(help="gist | pos_control | neg_control.")] = "gist",
    mask: Annotated[Optional[str], typer.Option("--mask", help="prefix (tokens after the gist also see the template's fixed prefix; default for --condition gist) | paper (they see nothing before the gist).")] = None,
    positions: Annotated[Optional[str], typer.Option("--positions", help=f"compact (prefix mask: the input continues right after the prefix and the gist, so a cache is a plain prefix and the instruction never counts against the context) | original (the full prompt's positions).{_default('positions')}")] = None,
    tune: Annotated[str, typer.Option(help="gist (only the gist embedding) | lora | full.")] = "lora",
    decoder: Annotated[Optional[str], typer.Option("--decoder", help=f"tuned (the trained model reads the caches) | base (LoRA only where the gist is written: the untouched base model reads the caches, so an engine serving the stock weights serves them).{_default('decoder')}")] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help=f"labels (cross-entropy on the answers) | distill (KL from the base model reading the full prompt) | mix (both).{_default('objective')}")] = None,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature", help="Softmax temperature of the distillation KL.")] = 1.0,
    teacher_answers: Annotated[bool, typer.Option("--teacher-answers", help="Answer every --data row with the base model reading the full prompt first (greedy, cached in the run folder) and train on those answers.")] = False,
    teacher_max_new_tokens: Annotated[int, typer.Option("--teacher-max-new-tokens", help="Longest teacher answer, in tokens.")] = 96,
    template: Annotated[str, typer.Option(help="auto | chat | plain (the paper's).")] = "auto",
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate (linear warmup, then decay).{_default('lr')}")] = None,
    gist_lr: Annotated[Optional[float], typer.Option("--gist-lr", help="Learning rate of the gist embedding (default: --lr).")] = None,
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Share of the steps that warm the learning rate up linearly.")] = 0.1,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help=f"LoRA rank.{_default('lora_r')}")] = None,
    lora_alpha: Annotated[Optional[int], typer.Option("--lora-alpha", help=f"LoRA scale numerator (update scaled by alpha / r).{_default('lora_alpha')}")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Per device; default from the preset.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option("--batch-tokens", help=f"Batch rows of like length under this many padded tokens (rows x longest), at most --batch-size rows: long prompts fit in memory; 0: off.{_default('batch_tokens')}")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps")] = None,
    max_examples: Annotated[Optional[int], typer.Option("--max-examples")] = None,
    eval_examples: Annotated[Optional[int], typer.Option("--eval-examples")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help=f"Longer rows are dropped, never cut.{_default('max_length')}")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start from a finished run's gist embedding and LoRA adapter (a run folder, or 'shipped'): a second stage, e.g. long prompts after the shipped recipe.")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")] = False,
    mixed_precision: Annotated[Optional[str], typer.Option("--mixed-precision", help=f"auto (bf16 on GPU) | no | bf16 | fp16.{_default('mixed_precision')}")] = None,
    attn_implementation: Annotated[str, typer.Option("--attn", help="sdpa | eager.")] = "sdpa",
    json_out: JsonOut = False,
) -> None:
    """Train gist tokens through the masked forward and write a run folder."""
    given = dict(
        out=out, data=data or [], eval_data=eval_data or [], exclude_data=exclude_data or [], preset=preset, model=model, num_gist_tokens=num_gist,
        gist_every=gist_every, raw_tail=raw_tail, chunk_attention=chunk_attention, condition=condition, mask=mask, positions=positions, template=template, tune=tune, decoder=decoder, objective=objective,
        distill_temperature=distill_temperature, teacher_answers=teacher_answers,
        teacher_max_new_tokens=teacher_max_new_tokens, lora_r=lora_r, lora_alpha=lora_alpha, lr=lr, gist_lr=gist_lr,
        warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, batch_tokens=batch_tokens, epochs=epochs, max_steps=max_steps, max_examples=max_examples,
        eval_examples=eval_examples, max_length=max_length, seed=seed, init_from=init_from, save_every=save_every, resume=resume,
        overwrite=overwrite, mixed_precision=mixed_precision, attn_implementation=attn_implementation,
    )
    if resume:  # flags left out take the checkpoint's values: `gist train --out RUN --resume` is enough
        saved = saved_run_config(out)
        for param in ctx.params:
            name = FIELD_OF_PARAM.get(param, param)
            if name in saved and name in given and name not in ("out", "resume", "overwrite") \
                    and getattr(ctx.get_parameter_source(param), "name", "") == "DEFAULT":
                given[name] = saved[name]
    config = TrainConfig(**given)
    check_writable_folder(out, "--out")  # before the model loads, not after training
    metrics = loop.train(config, show_progress=not json_out)
    if json_out:
        print_json({k: v for k, v in metrics.items() if not k.endswith("_curve")})
        return
    table = Table(title=f"gist train -> {out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("condition", "mask", "positions", "decoder", "objective", "tune", "num_gist_tokens", "train_examples", "dropped_contaminated", "dropped_too_long",
                "steps", "final_train_loss", "heldout_loss_before", "heldout_loss", "tokens_per_second",
                "train_seconds", "wall_seconds", "device"):
        value = metrics.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for name, split in metrics.get("heldout_loss_by_split", {}).items():
        table.add_row(f"heldout_loss {name} (n={split['examples']})",
                      " -> ".join("—" if split[k] is None else f"{split[k]:.4f}" for k in ("before", "after")))
    console.print(table)
