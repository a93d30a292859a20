"""The rows a run trains on and its held-out rows, tokenized: the held-out ones per split, too-long rows
dropped and counted."""

from __future__ import annotations

from gistcache.data.alpaca import Example, heldout_split
from gistcache.errors import GistError
from gistcache.model import GistModel
from gistcache.prompts import EncodedExample, encode_examples
from gistcache.train.config import TrainConfig


def encode_rows(model: GistModel, train_rows: list[Example], eval_rows: list[Example], config: TrainConfig,
                stats: dict) -> tuple[list[EncodedExample], dict[str, list[EncodedExample]]]:
    """Tokenize the training rows, and the held-out rows per split (the built-in set is scored per split:
    seen task families and held-out ones); too-long rows are dropped and counted into `stats`."""
    context = min(config.max_length, model.max_context())
    settings = dict(num_gist_tokens=config.num_gist_tokens, gist_token_id=model.gist_token_id,
                    template=config.template, max_length=context, gist_every=config.gist_every,
                    raw_tail=config.raw_tail, num_prefix_tokens=model.num_prefix_tokens)
    encoded, too_long = encode_examples(model.tokenizer, train_rows, **settings)
    eval_groups: dict[str, list] = {}
    for row in eval_rows:
        eval_groups.setdefault(heldout_split(row), []).append(row)
    for name, rows in eval_groups.items():
        eval_groups[name], dropped = encode_examples(model.tokenizer, rows, **settings)
        too_long += dropped
    if not encoded:
        raise GistError(f"every training example is longer than {context} tokens: raise --max-length")
    prompt_tokens = [ex.num_prompt_tokens for ex in encoded]
    stats.update(train_examples=len(encoded), eval_examples=sum(len(g) for g in eval_groups.values()),
                 dropped_too_long=too_long, trained_prompt_tokens=[min(prompt_tokens), max(prompt_tokens)])
    return encoded, eval_groups
