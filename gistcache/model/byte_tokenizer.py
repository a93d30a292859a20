"""A byte-level tokenizer built in memory (one token a byte, plus the chat specials and <GIST>): what the tiny
random test models and the GPU benchmark's random-weight models read, with nothing to download. An
instruction of n bytes of ASCII text is exactly n tokens."""

from __future__ import annotations

from gistcache.model import add_gist_token

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..3: bos, pad, chat start, eos
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = len(SPECIALS) + 256  # before <GIST>


def byte_tokenizer(chat: bool = True):
    """The tokenizer, with the ChatML-style template above when `chat`, and the <GIST> token added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # deferred: transformers brings them
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                  pad_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return add_gist_token(tok)
