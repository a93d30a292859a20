"""What training changes and how fast: the tuning modes, the optimizer groups, the schedule, the clip.

    --tune gist   only the gist embedding learns (the base model frozen)
    --tune lora   LoRA adapters on the run's target modules, plus the gist embedding
    --tune full   every weight, plus the gist embedding
"""

from __future__ import annotations

import torch

from gistcache.errors import GistError
from gistcache.model import GistModel, quiet_transformers
from gistcache.train.config import TrainConfig

MAX_GRAD_NORM = 1.0  # over all trainable parameters together, as Hugging Face's Trainer does by default


def wrap_for_tuning(base, config: TrainConfig):
    """Freeze or wrap the base model as --tune asks; the gist embedding always learns."""
    if config.tune == "gist":
        base.requires_grad_(False)
        return base
    if config.tune == "lora":
        from peft import LoraConfig, get_peft_model  # deferred: peft takes seconds to import

        gc = config.gist_config()
        targets = [m for m in gc.lora_target_modules if any(n.endswith(m) for n, _ in base.named_modules())]
        if not targets:
            raise GistError(f"--tune lora: the model has none of the modules {gc.lora_target_modules}")
        lora = LoraConfig(r=gc.lora_r, lora_alpha=gc.lora_alpha, lora_dropout=gc.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        with quiet_transformers():
            return get_peft_model(base, lora)
    base.requires_grad_(True)
    return base


def init_from_run(model: GistModel, run_dir: str, config: TrainConfig, base_fingerprint: str) -> None:
    """Start training from a finished run's gist embedding (and LoRA adapter): a second stage on other data, such
    as long prompts after the shipped recipe. "shipped" names the run shipped with the package. The run must be of
    the same base weights, --tune and LoRA shape; nothing else of it is taken (its ratio, mask and data may differ)."""
    from safetensors.torch import load_file

    from gistcache.config import GistConfig
    from gistcache.run import ADAPTER_FILE, GIST_FILE, read_run_config, resolve_run_dir

    folder = resolve_run_dir(None if run_dir == "shipped" else run_dir)
    data = read_run_config(folder)
    source = GistConfig.from_dict(data["gist"])
    if data.get("base_fingerprint") != base_fingerprint:
        raise GistError(f"--init-from {run_dir}: that run was trained on other base weights than --model "
                        f"{config.model}: start from a run of the same base model")
    wanted = config.gist_config()
    for name in ("tune", "lora_r", "lora_alpha", "lora_target_modules"):
        if name != "tune" and config.tune != "lora":
            break
        if getattr(source, name) != getattr(wanted, name):
            raise GistError(f"--init-from {run_dir}: that run has {name} {getattr(source, name)}, this one "
                            f"{getattr(wanted, name)}: give the same --{name.replace('_', '-')}")
    if config.tune == "full":
        raise GistError("--init-from takes a gist or LoRA run: a --tune full run is a whole model, give it as --model")
    gist = load_file(folder / GIST_FILE)["gist_embedding"]
    with torch.no_grad():
        model.gist_embedding.copy_(gist.to(model.gist_embedding.dtype))
    if config.tune == "lora":
        from peft import set_peft_model_state_dict  # deferred: peft takes seconds to import

        result = set_peft_model_state_dict(model.model, load_file(folder / ADAPTER_FILE))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise GistError(f"--init-from {run_dir}: its adapter does not fit this model (missing {missing[:2]}, "
                            f"unexpected {list(result.unexpected_keys)[:2]})")


def trainable_parameters(model: GistModel) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: GistModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the gist embedding in a group of its own (`--gist-lr`, no weight decay)."""
    # the gist embedding is one vector learned from scratch, like a soft prompt: it gets its own rate
    others = [p for p in trainable_parameters(model) if p is not model.gist_embedding]
    groups = [{"params": [model.gist_embedding], "lr": config.gist_lr or config.lr, "weight_decay": 0.0}]
    if others:
        groups.append({"params": others, "lr": config.lr, "weight_decay": config.weight_decay})
    return torch.optim.AdamW(groups)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then linear decay to 10% of the peak at `total`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return max(0.1, 1.0 - 0.9 * frac)


def norm_before_clip(param: torch.nn.Parameter, total_norm: float, max_norm: float = MAX_GRAD_NORM) -> float:
    """The norm `param.grad` had before a global clip to `max_norm` that found `total_norm`.

    Recorded for the gist embedding: one vector that every token after the gist reads, in every
    layer, whose gradient can outweigh all the model's weights together (docs/results.md, 1d).
    """
    if param.grad is None:
        return 0.0
    coef = min(1.0, max_norm / (total_norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s factor
    return float(param.grad.norm()) / coef
