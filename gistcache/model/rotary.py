"""Moving cached keys to other rotary positions: what makes a gist cache position-free.

With rotary position embeddings a key at position p is the raw key turned, per pair of dimensions
f, by the angle inv_freq[f] * p; an attention score depends only on the distance between query and
key. Keys computed at positions p .. p+N-1 therefore become the keys of positions q .. q+N-1 by
one more turn of inv_freq * (q - p) (kvpress's KeyRerotationPress does the same), and a model that
continues at q+N gives the same outputs::

    move(k) = k * cos(angle) + rotate_half(k) * sin(angle)      angle = inv_freq_to * q - inv_freq_from * p

cos/sin carry no `attention_scaling` factor: the keys already carry it once. This is exact only
when inv_freq depends on nothing but the config (`SHIFT_INVARIANT`); `dynamic` (NTK) and
`longrope` recompute it from the longest position seen, so a moved cache would read differently
there, and such models are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from gistcache.errors import GistError

SHIFT_INVARIANT = ("default", "linear", "llama3", "yarn")


def rope_type(config) -> str:
    """The rotary scaling type of a transformers config ("default" when it names none)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise GistError(f"model type {config.model_type!r} has one rotary embedding per layer type: gist caches "
                        f"support one rotary embedding for all layers (Llama, Mistral, Qwen2, ...)")
    return params.get("rope_type") or params.get("type") or "default"


def check_shift_invariant(config) -> str:
    """Refuse a model whose rotary frequencies change with the sequence length; return its rope type."""
    kind = rope_type(config)
    if kind not in SHIFT_INVARIANT:
        raise GistError(f"model type {config.model_type!r} uses {kind!r} rotary scaling, whose frequencies change "
                        f"with the sequence length, so a gist cache cannot be moved to other positions: use a model "
                        f"with {', '.join(SHIFT_INVARIANT)} rotary scaling")
    return kind


def config_inv_freq(config) -> torch.Tensor:
    """(head_dim / 2,) float32 rotary frequencies that a model built from `config` starts with."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # deferred: transformers is slow to import

    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = check_shift_invariant(config)
    if kind == "default":
        params = getattr(config, "rope_parameters", None) or {}
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(_head_dim(config) * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return _check_full_rotary(config, inv_freq.float())


def model_inv_freq(model: nn.Module) -> torch.Tensor:
    """The (head_dim / 2,) rotary frequencies `model` actually uses (its rotary module's buffer, as float32).

    Read from the model rather than recomputed from its config, so a model whose buffer was cast
    (`model.to(torch.bfloat16)` casts it too) is moved with the frequencies it turns its keys with.
    """
    check_shift_invariant(model.config)
    found = [m.inv_freq for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not found:
        raise GistError(f"model type {model.config.model_type!r} has no rotary embedding (no inv_freq): gist caches "
                        f"need a rotary model (Llama, Mistral, Qwen2, ...)")
    if any(f.shape != found[0].shape or not torch.equal(f, found[0]) for f in found[1:]):
        raise GistError(f"model type {model.config.model_type!r} has several different rotary embeddings: gist "
                        f"caches support one rotary embedding for all layers")
    return _check_full_rotary(model.config, found[0].detach().float().cpu())


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_full_rotary(config, inv_freq: torch.Tensor) -> torch.Tensor:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if 2 * inv_freq.numel() != _head_dim(config):
        raise GistError(f"model type {config.model_type!r} turns {2 * inv_freq.numel()} of {_head_dim(config)} "
                        f"head dimensions (partial rotary): gist caches need rotary over the whole head")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): (x1, x2) -> (-x2, x1), the halves transformers' Llama/Mistral/Qwen2 rotate."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def move_keys(keys: torch.Tensor, inv_freq_from: torch.Tensor, start_from: int | torch.Tensor, inv_freq_to: torch.Tensor,
              start_to: int | torch.Tensor) -> torch.Tensor:
    """Keys (B, kv_heads, N, D) turned at positions start_from.. with inv_freq_from -> start_to.. with inv_freq_to.

    A start is an int, or a (B,) tensor giving each row its own. The angles are computed in float64
    and the turn in float32 at least; the result keeps the keys' dtype (and autograd sees the turn).
    """
    n = keys.shape[2]
    pos = torch.arange(n, dtype=torch.float64).view(1, n)

    def positions(start):  # (B or 1, N)
        return torch.as_tensor(start, dtype=torch.float64).detach().cpu().reshape(-1, 1) + pos

    return turn_keys(keys, inv_freq_from, positions(start_from), inv_freq_to, positions(start_to))


def turn_keys(keys: torch.Tensor, inv_freq_from: torch.Tensor, positions_from: torch.Tensor,
              inv_freq_to: torch.Tensor, positions_to: torch.Tensor) -> torch.Tensor:
    """Keys (B, kv_heads, N, D), key j of row b at positions_from[b, j] (with inv_freq_from), turned to
    positions_to[b, j] (with inv_freq_to); positions are (B or 1, N) tensors. Chunked gists sit at scattered
    positions in the prompt and move to F..F+M-1; `move_keys` is the case of consecutive positions."""
    def angles(inv_freq, positions):  # (B|1, N, D/2)
        return inv_freq.double().cpu().view(1, 1, -1) * positions.detach().to("cpu", torch.float64).unsqueeze(-1)

    angle = angles(inv_freq_to, positions_to) - angles(inv_freq_from, positions_from)
    angle = torch.cat((angle, angle), dim=-1).unsqueeze(1)  # (B|1, 1, N, D): the layout rotate_half pairs
    work = torch.promote_types(keys.dtype, torch.float32)
    cos, sin = angle.cos().to(keys.device, work), angle.sin().to(keys.device, work)
    k = keys.to(work)
    return (k * cos + rotate_half(k) * sin).to(keys.dtype)
