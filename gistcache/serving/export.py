"""`gist export`: a run as a Hugging Face model folder that serving engines and `AutoModelForCausalLM` load.

    DIR/config.json, model.safetensors, generation_config.json   the base model, the run's LoRA merged (or its
                                                                  full weights), in one dtype; a GGUF base is
                                                                  dequantized on the way. A run trained with
                                                                  --decoder base: the untouched base weights
    DIR/tokenizer.json, tokenizer_config.json, ...               the run's tokenizer (its <GIST> token included)
    DIR/gistcache.json                                           what the folder serves: the run's identity
                                                                  (fingerprints, template, mask), N, F, shapes,
                                                                  dtype and a fingerprint of the exported weights
    DIR/gistcache/gist_embedding.safetensors                     the trained gist embedding (1, H): prompts can
                                                                  still be compressed from the folder alone
    DIR/gistcache/prefix_kv.safetensors                          the run's fixed-prefix keys/values (prefix mask
                                                                  only, F > 0) at positions 0..F-1, and inv_freq
    DIR/gistcache/adapter/                                       --decoder base only: the LoRA adapter, which
                                                                  compresses (the served weights never use it)

(The gist tensors sit in a subfolder: engines load every *.safetensors file at the top as weights.)

A server (`gistcache.vllm`) serves gist caches from that folder without transformers' model code:
`served_kv` lays out the first F+N slots of a request with `gistcache.cache.cached_slots`, as
`generate` does (the prefix keys turned to the cache's `prefix_start`, then the gist), and
`request_ids` gives the request's token ids: `GistCache.input_ids()` placeholders, then the
templated input, as in the README's stock `generate` snippet. `check_served_cache` refuses a cache
the folder does not serve, naming the field. Tensors are read only from safetensors.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gistcache._io import atomic_path, atomic_write_text
from gistcache._version import __version__
from gistcache.cache import GistCache, cached_slots
from gistcache.cache.identity import FIX, ModelIdentity, check_identity, model_identity, model_kv_shape
from gistcache.config import DTYPES, GistConfig, dtype_name
from gistcache.errors import GistError
from gistcache.model import GistModel, add_gist_token, attach_adapter, fingerprint_model, quiet_transformers
from gistcache.model.rotary import model_inv_freq
from gistcache.prompts import encode_input
from gistcache.run import ADAPTER_FILE, GIST_FILE

EXPORT_FILE = "gistcache.json"
GIST_DIR = "gistcache"
PREFIX_FILE = "prefix_kv.safetensors"
ADAPTER_DIR = "adapter"
EXPORT_FORMAT = "gistcache-export"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class ExportInfo:
    """What an exported folder serves (its gistcache.json)."""

    identity: ModelIdentity  # the run's: a cache must match it field by field
    gist: dict  # the run's GistConfig, as its config.json holds it
    num_gist_tokens: int
    num_prefix_tokens: int  # F: the run's fixed prefix kept visible after the gist (prefix mask), else 0
    gist_token_id: int
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int
    max_context: int
    exported_fingerprint: str  # fingerprint_model of the exported weights
    source_run: str

    @property
    def num_cached(self) -> int:
        """F + N: the slots a gist cache fills at the start of every request."""
        return self.num_prefix_tokens + self.num_gist_tokens

    def to_dict(self) -> dict:
        return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "gistcache_version": __version__,
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "identity"},
                "identity": asdict(self.identity)}


def export_run(run_dir: str | Path | None, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> ExportInfo:
    """Write the run as a Hugging Face folder at `out_dir` (atomically: an earlier export there is replaced whole).

    The LoRA adapter is merged (`GistModel.from_pretrained` does it), so the folder holds plain
    weights of the base architecture that any engine loads; a run trained with `--decoder base`
    exports the untouched base weights (what reads its caches) and keeps the adapter beside them.
    """
    check_export_dir(out_dir)
    return export_model(GistModel.from_pretrained(run_dir, dtype=dtype), out_dir)


def check_export_dir(out_dir: str | Path) -> Path:
    """Refuse an --out that is a file or a folder holding anything but an earlier export (before any loading)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GistError(f"--out {out_dir} is a file: give a folder to write the exported model into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_FILE).is_file():
        raise GistError(f"--out {out_dir} holds files that are not a gist export: give an empty or new folder")
    return out_dir


def export_model(model: GistModel, out_dir: str | Path) -> ExportInfo:
    """Write a GistModel loaded from a run (LoRA merged, or unmerged for --decoder base) as an exported folder;
    see `export_run`."""
    out_dir = check_export_dir(out_dir)
    if model.gist_config is None:
        raise GistError("export needs a model that knows its run: load it with GistModel.from_pretrained(RUN)")
    num_layers, kv_heads, head_dim = model_kv_shape(model)
    weights = model.decoder_state_dict()  # the weights that read the caches: what the engine serves
    info = ExportInfo(identity=model_identity(model), gist=model.gist_config.to_dict(),
                      num_gist_tokens=model.num_gist_tokens, num_prefix_tokens=model.num_prefix_tokens,
                      gist_token_id=model.gist_token_id, dtype=dtype_name(model.model.dtype), num_layers=num_layers,
                      kv_heads=kv_heads, head_dim=head_dim, max_context=model.max_context(),
                      exported_fingerprint=fingerprint_model(model.stock_model, state_dict=weights),
                      source_run=str(model.run_dir))
    with atomic_path(out_dir, folder=True) as tmp, quiet_transformers(), dequantized(model.stock_model):
        model.stock_model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        model.tokenizer.save_pretrained(tmp)
        (tmp / GIST_DIR).mkdir()
        if model.decoder == "base":
            model.model.save_pretrained(tmp / GIST_DIR / ADAPTER_DIR, safe_serialization=True)
        save_file({"gist_embedding": model.gist_embedding.detach().float().cpu().contiguous()},
                  tmp / GIST_DIR / GIST_FILE)
        prefix = model.prefix_kv()  # [(keys, values)] at positions 0..F-1, (1, kv_heads, F, head_dim); [] if F = 0
        if prefix:
            tensors = {"inv_freq": model_inv_freq(model.stock_model).contiguous()}
            for i, (k, v) in enumerate(prefix):
                tensors[f"layers.{i}.keys"] = k.detach().cpu().contiguous()
                tensors[f"layers.{i}.values"] = v.detach().cpu().contiguous()
            save_file(tensors, tmp / GIST_DIR / PREFIX_FILE)
        atomic_write_text(tmp / EXPORT_FILE, json.dumps(info.to_dict(), indent=2) + "\n")
    return info


@contextlib.contextmanager
def dequantized(model) -> Iterator[None]:
    """Inside the block `model` saves as the plain weights it holds: a GGUF base is dequantized on load, but
    transformers keeps its GGUF quantizer and config entry, refuses to save it and would tell engines to
    load GGUF. Both are put back when the block ends."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) not in ("gguf", None):
        raise GistError(f"the run's base model is quantized ({quantizer.quantization_config.quant_method}): "
                        f"export needs plain weights; train the run on an unquantized base")
    model.hf_quantizer = None
    if config is not None:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


def read_export(export_dir: str | Path) -> ExportInfo:
    """The gistcache.json of an exported folder; refuse a folder that is not one."""
    path = Path(export_dir) / EXPORT_FILE
    if not path.is_file():
        raise GistError(f"{export_dir} is not a gist export (no {EXPORT_FILE}): make one with "
                        f"`gist export --run RUN --out {export_dir}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != EXPORT_FORMAT or data.get("format_version") != EXPORT_VERSION:
            raise GistError(f"{path} is not a version {EXPORT_VERSION} {EXPORT_FORMAT} file: export the run again")
        known = {f.name for f in fields(ModelIdentity)}
        identity = ModelIdentity(**{k: v for k, v in data["identity"].items() if k in known})
        return ExportInfo(identity=identity, **{f.name: data[f.name] for f in fields(ExportInfo)
                                                if f.name != "identity"})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GistError(f"{path} is damaged ({type(exc).__name__}: {exc}): export the run again") from exc


def read_prefix_kv(export_dir: str | Path, info: ExportInfo) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                                      torch.Tensor | None]:
    """([(keys, values)] per layer at positions 0..F-1, inv_freq) of an export; ([], None) when F = 0."""
    if not info.num_prefix_tokens:
        return [], None
    tensors = load_file(Path(export_dir) / GIST_DIR / PREFIX_FILE)
    prefix = [(tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]) for i in range(info.num_layers)]
    return prefix, tensors["inv_freq"]


def check_served_cache(info: ExportInfo, cache: GistCache, *, source: str = "the cache") -> None:
    """Refuse a cache the exported folder does not serve, naming the first field that differs (cache/identity.py)."""
    check_identity(cache, info.identity, info.num_gist_tokens, source=source)
    if cache.key_start != info.num_prefix_tokens:
        raise GistError(f"{source} has its keys from position key_start {cache.key_start}, the served run's fixed "
                        f"prefix has {info.num_prefix_tokens} tokens: {FIX}")
    want = (1, info.kv_heads, cache.num_gist_tokens, info.head_dim)  # M slots: N, or N per chunk of a chunked run
    if cache.num_layers != info.num_layers or any(tuple(t.shape) != want for t in [*cache.keys, *cache.values]):
        raise GistError(f"{source} has {cache.num_layers} layers of shape {tuple(cache.keys[0].shape)}, the served "
                        f"model {info.num_layers} of {want}: {FIX}")
    if dtype_name(cache.dtype) != info.dtype:
        raise GistError(f"{source} has dtype {dtype_name(cache.dtype)}, the served model runs in {info.dtype}: "
                        f"compress it with --dtype {info.dtype}")
    if cache.context_used >= info.max_context:
        raise GistError(f"{source} uses {cache.context_used} positions of the model's context of {info.max_context}: "
                        f"compress a shorter prompt")


def served_kv(cache: GistCache, prefix: list[tuple[torch.Tensor, torch.Tensor]],
              inv_freq: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer, each (1, kv_heads, F+N, head_dim): `gistcache.cache.cached_slots` of one cache
    with the exported prefix, on the CPU (the layout `generate` uses, built without the model)."""
    return cached_slots([cache], prefix, inv_freq, "cpu")


def request_ids(tokenizer, template: str, cache: GistCache, text: str) -> list[int]:
    """Token ids of one serving request: F+N placeholders (`cache.input_ids()`), then the templated input."""
    return [*cache.input_ids()[0].tolist(), *encode_input(tokenizer, text, template)]


def load_exported(export_dir: str | Path) -> GistModel:
    """The GistModel of an exported folder (its merged weights, tokenizer and gist embedding), identified as the
    run it was exported from, so caches it compresses fit that run. Refuses weights that were changed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers takes seconds to import

    info = read_export(export_dir)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=DTYPES[info.dtype])
        tokenizer = add_gist_token(AutoTokenizer.from_pretrained(export_dir))
    if fingerprint_model(model) != info.exported_fingerprint:
        raise GistError(f"the weights in {export_dir} are not the ones exported (fingerprint differs): export the "
                        f"run again")
    gist = load_file(Path(export_dir) / GIST_DIR / GIST_FILE)["gist_embedding"]
    config = GistConfig.from_dict(info.gist)
    if config.decoder == "base":  # the served weights are the base's; the adapter that compresses sits beside them
        adapter_dir = Path(export_dir) / GIST_DIR / ADAPTER_DIR
        if not (adapter_dir / ADAPTER_FILE).is_file():
            raise GistError(f"{export_dir} serves a --decoder base run but has no {GIST_DIR}/{ADAPTER_DIR}: export "
                            f"the run again")
        model = attach_adapter(model, adapter_dir, config.model)
    return GistModel(model.eval(), tokenizer, info.num_gist_tokens, gist_embedding=gist,
                     base_fingerprint=info.identity.base_fingerprint, template=info.identity.template,
                     mask=info.identity.mask, gist_config=config, run_fingerprint=info.identity.run_fingerprint,
                     positions=config.positions, decoder=config.decoder, gist_every=config.gist_every,
                     raw_tail=config.raw_tail, chunk_attention=config.chunk_attention).eval()
