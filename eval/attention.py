"""Where the tokens after the gist put their attention, under each condition's mask.

A diagnostic for the gist handicap. A pretrained causal LM parks much of its attention on the
first token it can see (the "attention sink"). Under `pos_control` that is the start of the
sequence; under `neg_control` it is the first token after the gist, which sees nothing before it
and so looks like a sequence start. Under `gist` the first visible key is the gist token, which
has read the whole prompt and does not look like a start: before training, the tokens after it
have no sink, and their loss pays for it.

For every example (batch size 1, no padding) and every query after the last gist token, this
measures, averaged over layers, heads and queries, then over examples:

- `first_visible_share`: attention on the query's first visible key (found from the mask itself);
- `gist_share`: attention on the gist tokens together;
- `answer_loss`: token-weighted cross-entropy on the answer tokens under the same mask.

Attention weights need the eager attention: load the model with `attn_implementation="eager"`
(`measure_attention` does). `gist attention` is the command over `measure_attention`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from gistcache.config import DEFAULT_MODEL, GistConfig
from gistcache.data.alpaca import builtin_examples, load_many, shuffled
from gistcache.errors import GistError
from gistcache.masks import CONDITIONS, find_gist_spans, make_gist_mask
from gistcache.model import GistModel, load_base_model, load_run, load_tokenizer
from gistcache.model.loss import answer_loss_sum
from gistcache.prompts import EncodedExample, encode_examples


@torch.no_grad()
def attention_after_gist(model: GistModel, encoded: list[EncodedExample], condition: str) -> dict:
    """{"condition", "first_visible_share", "gist_share", "answer_loss", "examples"} for `condition`."""
    if not encoded:
        raise GistError("no examples to measure attention on")
    was_training = model.training
    model.eval()
    first_shares, gist_shares = [], []
    loss_sum, loss_count = 0.0, 0
    for example in encoded:
        input_ids = torch.tensor([example.input_ids], device=model.device)  # (1, T)
        attention_mask = torch.ones_like(input_ids)
        out = model(input_ids, attention_mask, condition=condition, output_attentions=True)
        if not out.attentions or any(a is None for a in out.attentions):
            raise GistError("the model returned no attention weights: load it with attn_implementation='eager'")
        att = torch.stack(out.attentions)[:, 0].float()  # (L, H, T, T)
        start, end = (int(x) for x in find_gist_spans(input_ids, model.gist_token_id))
        T = input_ids.shape[1]
        if end >= T:
            raise GistError("an example has no token after the gist: give it an input or an answer")
        allowed = make_gist_mask(input_ids, attention_mask, model.gist_token_id, condition)[0, end:]  # (Q, T)
        first = allowed.int().argmax(dim=1)  # (Q,) first key each query may see
        after = att[:, :, end:, :]  # (L, H, Q, T)
        index = first.view(1, 1, -1, 1).expand(*after.shape[:3], 1)
        first_shares.append(float(after.gather(-1, index).mean()))
        gist_shares.append(float(after[..., start:end].sum(-1).mean()))
        total, count = answer_loss_sum(out.logits, torch.tensor([example.labels], device=model.device))
        loss_sum, loss_count = loss_sum + total, loss_count + count
    model.train(was_training)
    return {
        "condition": condition,
        "first_visible_share": sum(first_shares) / len(first_shares),
        "gist_share": sum(gist_shares) / len(gist_shares),
        "answer_loss": loss_sum / loss_count if loss_count else None,
        "examples": len(encoded),
    }


def attention_by_condition(model: GistModel, encoded: list[EncodedExample],
                           conditions: tuple[str, ...] = CONDITIONS) -> list[dict]:
    """`attention_after_gist` for each condition, on the same examples."""
    return [attention_after_gist(model, encoded, c) for c in conditions]


@dataclass
class AttentionConfig:
    """What `gist attention` measures: a trained run (`run`), or the untrained base model (`model`)
    with a fresh gist embedding; on `examples` built-in rows (half from training families, half from
    held-out ones) or on `examples` rows of Alpaca-format files (`data`), drawn by `seed`."""

    run: str | None = None
    model: str = DEFAULT_MODEL
    data: list[str] = field(default_factory=list)
    examples: int = 24
    seed: int = 1
    num_gist_tokens: int = 1
    template: str = "auto"

    def __post_init__(self) -> None:
        if self.examples < 1:
            raise GistError(f"--examples must be >= 1, got {self.examples}")
        GistConfig(model=self.model, num_gist_tokens=self.num_gist_tokens, template=self.template)  # checks


def measure_attention(config: AttentionConfig) -> dict:
    """Load the model named by `config` with eager attention and measure every condition."""
    if config.data:
        rows = shuffled(load_many(config.data), config.seed)[: config.examples]
    else:
        seen = config.examples // 2
        rows = (builtin_examples(seen, seed=config.seed, held_out=False)
                + builtin_examples(config.examples - seen, seed=config.seed, held_out=True))
    if config.run:
        model = load_run(config.run, attn_implementation="eager")
        num_gist, template = model.gist_config.num_gist_tokens, model.gist_config.template
    else:
        tokenizer = load_tokenizer(config.model)  # with <GIST>
        model = GistModel(load_base_model(config.model, attn_implementation="eager"), tokenizer,
                          config.num_gist_tokens)
        num_gist, template = config.num_gist_tokens, config.template
    context = model.max_context()
    encoded, too_long = encode_examples(model.tokenizer, rows, num_gist_tokens=num_gist,
                                        gist_token_id=model.gist_token_id, template=template, max_length=context)
    if not encoded:
        raise GistError(f"every example is longer than the model's context ({context} tokens)")
    return {"config": asdict(config), "source": config.run or f"{config.model} (untrained gist)",
            "dropped_too_long": too_long, "conditions": attention_by_condition(model, encoded)}
