"""The gist attention mask, in one place.

Everything about which token may attend to which lives here: finding the gist span in each row,
the boolean mask for the three conditions of the paper (with causal order and padding folded in),
the additive float mask that the stock attention consumes, and the position ids that the cache
path continues from.

For `a b c G G d e` (prompt `a b c`, two gist tokens, then `d e`), rows are queries, columns keys::

    condition=gist          pos_control           neg_control
    a  1 0 0 0 0 0 0        1 0 0 0 0 0 0         1 0 0 0 0 0 0
    b  1 1 0 0 0 0 0        1 1 0 0 0 0 0         1 1 0 0 0 0 0
    c  1 1 1 0 0 0 0        1 1 1 0 0 0 0         1 1 1 0 0 0 0
    G  1 1 1 1 0 0 0        1 1 1 1 0 0 0         1 1 1 1 0 0 0
    G  1 1 1 1 1 0 0        1 1 1 1 1 0 0         1 1 1 1 1 0 0
    d  0 0 0 1 1 1 0        1 1 1 1 1 1 0         0 0 0 0 0 1 0
    e  0 0 0 1 1 1 1        1 1 1 1 1 1 1         0 0 0 0 0 1 1

`gist`: tokens after the last gist see nothing before the first gist, so the prompt reaches them
only through the gist tokens' keys/values. Tokens up to the last gist are causal, hence see
nothing after it. `pos_control`: plain causal, nothing hidden. `neg_control`: tokens after the
gist see neither the prompt nor the gist.

Two mask variants say what "the prompt" is (`MASKS`, recorded in a run's config):

- `paper` (Mu et al.): everything before the first gist token is hidden, as drawn above.
- `prefix`: the first `num_prefix_tokens` real tokens of each row stay visible. They are the
  template's fixed prefix (BOS, the chat template's system prompt and user header: everything the
  template puts before the instruction text), the same for every instruction, so they carry
  nothing of it; they are the attention sink a pretrained model leans on. Their keys/values are
  computed once per run, never stored per cache. For `s a b G d e` (prefix `s`, prompt `a b`)::

    condition=gist, mask=prefix      neg_control, mask=prefix
    s  1 0 0 0 0 0                   1 0 0 0 0 0
    a  1 1 0 0 0 0                   1 1 0 0 0 0
    b  1 1 1 0 0 0                   1 1 1 0 0 0
    G  1 1 1 1 0 0                   1 1 1 1 0 0
    d  1 0 0 1 1 0                   1 0 0 0 1 0
    e  1 0 0 1 1 1                   1 0 0 0 1 1

Under the prefix mask, two position layouts say where the tokens after the gist find the prefix
(`POSITIONS`, recorded in a run's config; the paper's mask has no prefix, so they coincide):

- `compact` (default): the tokens after the gist see the prefix and the gist as if the instruction
  had never been there: prefix at 0..F-1, gist at F..F+N-1, input from F+N. Then a cache is a plain
  prefix of F+N positions and the instruction's length never counts against the context. One
  sequence cannot give the prefix two positions, so this forward runs in two passes
  (`gistcache.model.compact`): prefix + instruction + gist causally, then the rest after the
  prefix's and the gist's keys/values, the gist keys turned from P.. to F.. (what a cache does).
- `original`: one masked forward over the whole prompt: the input at P+N reads the prefix P+N
  positions back, so a cache keeps the prefix at F-P and uses P+N positions of the context.

Gist tokens at a ratio (`gist_every` K > 0, recorded in a run's config): the instruction (the
prompt after the fixed prefix) is cut into chunks of K tokens and N gist tokens follow each chunk,
so a prompt of P instruction tokens holds M = N * ceil(P / K) gist tokens (`count_gist_slots`,
`insert_gist_tokens`). Prompt and gist tokens stay causal (each gist reads the prefix, every earlier
chunk and every earlier gist); every token after the last gist reads only the fixed prefix and all
M gist tokens. `gist_every` = 0 is one chunk: the layout above. For `s a b G c G d e` (prefix `s`,
K = 2, N = 1, chunks `a b` and `c`)::

    condition=gist, mask=prefix, gist_every=2
    s  1 0 0 0 0 0 0 0
    a  1 1 0 0 0 0 0 0
    b  1 1 1 0 0 0 0 0
    G  1 1 1 1 0 0 0 0
    c  1 1 1 1 1 0 0 0
    G  1 1 1 1 1 1 0 0
    d  1 0 0 1 0 1 1 0
    e  1 0 0 1 0 1 1 1

Such a run computes in the compact positions (prefix 0..F-1, the M gist slots F..F+M-1, input from
F+M; under the paper's mask F = 0), in two passes as above (`gistcache.model.compact`), so its
cache is a plain F+M prefix too.

A raw tail (`raw_tail` W > 0, chunked runs only, recorded in a run's config): the last
t = min(W, P - K) instruction tokens are not compressed but kept as they are, right after the last
gist, where they read only the prefix, the gist tokens and each other, like the input after them
(`raw_tail_length`; none when P <= K, so a short instruction is cut as before). The gists cover the
rest, M = N * ceil((P - t) / K), and the cache holds M + t slots: the gist slots, then the tail's
own keys/values at F+M..F+M+t-1, read by the decoder. The last words of a long prompt (the last worked
example: its label, its format) then reach the input word for word. For `s a b G c d e` (K = 2, W = 1;
instruction `a b c`, tail `c`)::

    condition=gist, mask=prefix, gist_every=2, raw_tail=1
    s  1 0 0 0 0 0 0
    a  1 1 0 0 0 0 0
    b  1 1 1 0 0 0 0
    G  1 1 1 1 0 0 0
    c  1 0 0 1 1 0 0
    d  1 0 0 1 1 1 0
    e  1 0 0 1 1 1 1

Chunk-local attention (`chunk_attention` "local", chunked runs only, recorded in a run's config; "causal",
drawn above, is the default and every run before it), the structure of Activation Beacon: an instruction
token reads the fixed prefix, every earlier gist token and the earlier tokens of its own chunk, but no earlier
chunk's tokens, so each chunk reaches the next only through its gists; each gist reads the prefix, every
earlier gist and its own chunk. The tokens after the last gist read what they read above. Compressing a
prompt of P instruction tokens then attends over about K + M keys per query instead of up to P. For
`s a b G c G d e` (K = 2)::

    condition=gist, mask=prefix, gist_every=2, chunk_attention=local
    s  1 0 0 0 0 0 0 0
    a  1 1 0 0 0 0 0 0
    b  1 1 1 0 0 0 0 0
    G  1 1 1 1 0 0 0 0
    c  1 0 0 1 1 0 0 0
    G  1 0 0 1 1 1 0 0
    d  1 0 0 1 0 1 1 0
    e  1 0 0 1 0 1 1 1

Padding (left or right) is never attended to; a padding query attends to itself only, so no
softmax row is empty.
"""

from __future__ import annotations

import torch

from gistcache.errors import GistError

CONDITIONS = ("gist", "pos_control", "neg_control")
MASKS = ("paper", "prefix")
POSITIONS = ("compact", "original")
CHUNK_ATTENTION = ("causal", "local")


def check_condition(condition: str) -> str:
    if condition not in CONDITIONS:
        raise GistError(f"unknown condition {condition!r}: use one of {', '.join(CONDITIONS)}")
    return condition


def check_mask(mask: str) -> str:
    if mask not in MASKS:
        raise GistError(f"unknown --mask {mask!r}: use one of {', '.join(MASKS)}")
    return mask


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise GistError(f"unknown --positions {positions!r}: use one of {', '.join(POSITIONS)}")
    return positions


def check_gist_every(gist_every: int, max_length: int | None = None) -> int:
    """`--gist-every` K: 0 (one chunk: the whole instruction) or a whole number of tokens per chunk."""
    if not isinstance(gist_every, int) or isinstance(gist_every, bool) or gist_every < 0:
        raise GistError(f"--gist-every must be a whole number of tokens >= 1 (or 0: one chunk), got {gist_every!r}")
    if max_length is not None and gist_every > max_length:
        raise GistError(f"--gist-every {gist_every} is longer than --max-length {max_length}: every prompt would be "
                        f"one chunk; give at most {max_length}, or 0 for one chunk")
    return gist_every


def check_chunk_attention(chunk_attention: str, gist_every: int) -> str:
    """`--chunk-attention`: "causal" (each chunk reads every earlier one) or "local" (each chunk reads the earlier
    ones only through their gists); "local" needs chunks (`--gist-every`)."""
    if chunk_attention not in CHUNK_ATTENTION:
        raise GistError(f"unknown --chunk-attention {chunk_attention!r}: use one of {', '.join(CHUNK_ATTENTION)}")
    if chunk_attention == "local" and not gist_every:
        raise GistError("--chunk-attention local needs --gist-every: with one chunk there is no earlier chunk to hide")
    return chunk_attention


def check_raw_tail(raw_tail: int, gist_every: int) -> int:
    """`--raw-tail` W: 0 (none) or the most instruction tokens kept raw after the last gist; chunked runs only."""
    if not isinstance(raw_tail, int) or isinstance(raw_tail, bool) or raw_tail < 0:
        raise GistError(f"--raw-tail must be a whole number of tokens >= 0, got {raw_tail!r}")
    if raw_tail and not gist_every:
        raise GistError("--raw-tail needs --gist-every: the tail is what is left of a prompt longer than one chunk")
    return raw_tail


def raw_tail_length(num_instruction_tokens: int, gist_every: int, raw_tail: int) -> int:
    """t: the instruction's last tokens kept raw, min(W, P - K) (0 without a tail or when P <= K)."""
    if not raw_tail or not gist_every:
        return 0
    return min(raw_tail, max(0, num_instruction_tokens - gist_every))


def count_gist_slots(num_prompt_tokens: int, num_gist_tokens: int, gist_every: int = 0,
                     num_prefix_tokens: int = 0, raw_tail: int = 0) -> int:
    """The slots a cache of a prompt of `num_prompt_tokens` (the fixed prefix's `num_prefix_tokens` included)
    holds: M gist tokens, N after each chunk of `gist_every` instruction tokens (N for one chunk when
    `gist_every` is 0), plus the t tokens of a raw tail (`raw_tail_length`), which the chunks do not cover."""
    if not gist_every:
        return num_gist_tokens
    instruction = max(num_prompt_tokens - num_prefix_tokens, 1)
    tail = raw_tail_length(instruction, gist_every, raw_tail)
    return num_gist_tokens * -(-(instruction - tail) // gist_every) + tail


def insert_gist_tokens(prompt_ids: list[int], gist_token_id: int, num_gist_tokens: int, gist_every: int = 0,
                       num_prefix_tokens: int = 0, raw_tail: int = 0) -> list[int]:
    """`prompt_ids` with N gist ids after each chunk of `gist_every` tokens past the fixed prefix (after the
    whole prompt when `gist_every` is 0): `a b c` with K = 2, N = 1 -> `a b G c G`; with a raw tail the last
    t tokens follow the last gist instead (W = 1: `a b G c`)."""
    gist = [gist_token_id] * num_gist_tokens
    if not gist_every:
        return [*prompt_ids, *gist]
    out = list(prompt_ids[:num_prefix_tokens])
    rest = prompt_ids[num_prefix_tokens:]
    tail = raw_tail_length(len(rest), gist_every, raw_tail)
    head = rest[:len(rest) - tail]
    for at in range(0, max(len(head), 1), gist_every):
        out += [*head[at:at + gist_every], *gist]
    return [*out, *rest[len(rest) - tail:]]


def find_gist_spans(input_ids: torch.Tensor, gist_token_id: int, *,
                    contiguous: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(start, end)`, each (B,) long: row b's gist tokens lie in `input_ids[b, start[b]:end[b]]`
    (the first gist token to one past the last).

    With `contiguous` (one chunk) every row must hold one unbroken run of gist tokens; the offending
    row is named otherwise. Chunked prompts (`gist_every`) interleave them with the instruction.
    """
    is_gist = input_ids == gist_token_id  # (B, T)
    count = is_gist.sum(dim=1)  # (B,)
    if bool((count == 0).any()):
        row = int((count == 0).nonzero()[0])
        raise GistError(f"row {row} has no gist token (id {gist_token_id}): format it with the gist template")
    T = input_ids.shape[1]
    idx = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    start = torch.where(is_gist, idx, T).min(dim=1).values
    end = torch.where(is_gist, idx, -1).max(dim=1).values + 1
    broken = (end - start) != count
    if contiguous and bool(broken.any()):
        row = int(broken.nonzero()[0])
        raise GistError(f"row {row} has gist tokens that are not contiguous: put all gist tokens in one run")
    return start, end


def first_real_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) each row's first real token (left padding before it; 0 without an attention mask)."""
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return attention_mask.long().argmax(dim=1)


def make_gist_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str = "gist",
    num_prefix_tokens: int = 0,
    chunked: bool = False,
) -> torch.Tensor:
    """Boolean mask (B, T, T), True where query t may attend to key s.

    input_ids: (B, T); attention_mask: (B, T) with 1 for real tokens, 0 for padding (or None).
    num_prefix_tokens: the `prefix` variant's fixed template prefix, counted from each row's first
    real token, which stays visible after the gist (0: the paper's mask).
    chunked: the gist tokens may stand in several runs (`gist_every`); after the last one, every gist
    token stays visible and nothing else before it but the prefix (the same mask for one run).
    """
    check_condition(condition)
    B, T = input_ids.shape
    device = input_ids.device
    q = torch.arange(T, device=device).view(1, T, 1)  # query positions
    k = torch.arange(T, device=device).view(1, 1, T)  # key positions
    mask = (k <= q).expand(B, T, T)  # causal

    if condition != "pos_control":
        start, end = find_gist_spans(input_ids, gist_token_id, contiguous=not chunked)
        after_gist = q >= end.view(B, 1, 1)  # (B, T, 1): queries past the last gist
        hidden = after_gist & (k < end.view(B, 1, 1))  # (B, T, T): everything up to the last gist ...
        if condition == "gist":  # ... but the gist tokens themselves
            hidden = hidden & ~(input_ids == gist_token_id).view(B, 1, T)
        if num_prefix_tokens:
            prefix_end = check_prefix_fits(first_real_index(input_ids, attention_mask), start, num_prefix_tokens)
            hidden = hidden & ~(k < prefix_end.view(B, 1, 1))
        mask = mask & ~hidden

    if attention_mask is not None:
        real = attention_mask.bool()
        mask = mask & real.view(B, 1, T)
        # a padding query attends only to itself, so its softmax row is never empty
        eye = torch.eye(T, dtype=torch.bool, device=device).view(1, T, T)
        mask = torch.where(real.view(B, T, 1), mask, eye)
    return mask


def chunk_local_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, gist_token_id: int,
                     num_prefix_tokens: int = 0) -> torch.Tensor:
    """Boolean mask (B, T, T) of chunk-local attention (drawn above): causal, and a query reads a key only when
    the key is in the fixed prefix (the first `num_prefix_tokens` real tokens), is a gist token, or stands in the
    query's own chunk. A chunk ends with its run of gist tokens; the tokens after the last gist form one more
    chunk, so over a whole sequence this is the gist mask with the chunks hidden from each other.

    input_ids: (B, T), left-padded; attention_mask: (B, T) with 1 for real tokens (or None). Padding is
    handled as in `make_gist_mask`.
    """
    B, T = input_ids.shape
    device = input_ids.device
    causal = make_gist_mask(input_ids, attention_mask, gist_token_id, "pos_control")  # padding sees itself only
    is_gist = input_ids == gist_token_id  # (B, T)
    run_ended = is_gist[:, :-1] & ~is_gist[:, 1:]  # (B, T-1): a run of gist tokens ends after column t
    chunk = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), run_ended.long().cumsum(dim=1)], dim=1)
    same_chunk = chunk.view(B, T, 1) == chunk.view(B, 1, T)
    k = torch.arange(T, device=device).view(1, 1, T)
    in_prefix = k < (first_real_index(input_ids, attention_mask) + num_prefix_tokens).view(B, 1, 1)
    return causal & (same_chunk | is_gist.view(B, 1, T) | in_prefix)


def check_prefix_fits(first_real: torch.Tensor, start: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B,) end of each row's fixed prefix; refuse a row whose prefix reaches into its gist tokens."""
    prefix_end = first_real + num_prefix_tokens
    if bool((prefix_end > start).any()):
        row = int((prefix_end > start).nonzero()[0])
        raise GistError(f"row {row}: the fixed prefix of {num_prefix_tokens} tokens reaches into the gist "
                        f"tokens: the prompt must hold the template's prefix and then the instruction")
    return prefix_end


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T, S) boolean -> (B, 1, T, S) additive float: 0 where allowed, finfo(dtype).min where not.

    This is the form the stock attention (eager and sdpa) takes unchanged; a boolean 4D mask is
    misread by eager attention.
    """
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zero, blocked).unsqueeze(1)


def make_position_ids(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids (B, T) counting real tokens only, starting at `offset` (int or (B,) tensor).

    With left padding, the first real token of every row gets position `offset`; padding gets
    `offset` too (it is never attended to). The cache path passes `offset` = the number of real
    tokens already in the cache, so positions continue where the compressed prompt stopped.
    """
    pos = attention_mask.long().cumsum(dim=1) - 1
    pos = pos.clamp(min=0)
    if isinstance(offset, torch.Tensor):
        offset = offset.view(-1, 1).to(pos.device)
    return pos + offset


def gist_attention_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    gist_token_id: int,
    condition: str,
    dtype: torch.dtype,
    num_prefix_tokens: int = 0,
    chunked: bool = False,
) -> torch.Tensor:
    """The 4D additive mask (B, 1, T, T) to pass as `attention_mask` to a stock causal LM."""
    return to_additive_mask(make_gist_mask(input_ids, attention_mask, gist_token_id, condition, num_prefix_tokens,
                                           chunked), dtype)
