"""`TrainConfig`: everything `gist train` needs, checked in `__post_init__`.

Order for values: dataclass defaults, then the preset, then the user's flags (a field left at
None takes the preset's value). The resolved config is saved in the run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gistcache.config import GistConfig
from gistcache.errors import GistError

# Data size and steps per preset. smoke: plumbing check that finishes on a 2-core CPU in under
# 3 minutes with model load; test: ~100 examples; validate: ~2K; full: everything given.
PRESETS: dict[str, dict] = {
    "smoke": dict(max_examples=160, epochs=1, batch_size=4, grad_accum=1, eval_examples=16, max_steps=40),
    "test": dict(max_examples=100, epochs=3, batch_size=4, grad_accum=1, eval_examples=96, max_steps=None),
    "validate": dict(max_examples=2000, epochs=1, batch_size=8, grad_accum=1, eval_examples=100, max_steps=None),
    "full": dict(max_examples=None, epochs=3, batch_size=8, grad_accum=2, eval_examples=200, max_steps=None),
}
PRESET_FIELDS = ("max_examples", "epochs", "batch_size", "grad_accum", "eval_examples", "max_steps")


@dataclass
class TrainConfig:
    out: str
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    preset: str = "test"
    # what the run is (saved as GistConfig, whose defaults these take)
    model: str = GistConfig.model
    num_gist_tokens: int = GistConfig.num_gist_tokens
    condition: str = GistConfig.condition
    template: str = GistConfig.template
    tune: str = GistConfig.tune
    lora_r: int = GistConfig.lora_r
    lora_alpha: int = GistConfig.lora_alpha
    # optimisation
    lr: float = 1e-4
    gist_lr: float | None = None  # None: same as lr
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_length: int = 512
    seed: int = 0
    # sizes: None takes the preset's value
    max_examples: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    eval_examples: int | None = None
    max_steps: int | None = None
    # run folder
    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    mixed_precision: str = "auto"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise GistError(f"unknown --preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        for name in PRESET_FIELDS:
            if getattr(self, name) is None and name in PRESETS[self.preset]:
                setattr(self, name, PRESETS[self.preset][name])
        self.gist_config()  # checks num_gist_tokens, condition, template, tune
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise GistError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_examples", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GistError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.eval_examples < 0:
            raise GistError(f"--eval-examples must be >= 0, got {self.eval_examples}")
        if not self.lr > 0:
            raise GistError(f"--lr must be > 0, got {self.lr}")
        if self.gist_lr is not None and not self.gist_lr > 0:
            raise GistError(f"--gist-lr must be > 0, got {self.gist_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise GistError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 16:
            raise GistError(f"--max-length must be >= 16, got {self.max_length}")
        if self.save_every < 0:
            raise GistError(f"--save-every must be >= 0, got {self.save_every}")
        if self.resume and self.overwrite:
            raise GistError("--resume and --overwrite contradict each other: pick one")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise GistError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise GistError(f"--attn-implementation must be sdpa or eager, got {self.attn_implementation!r}")
        for path in [*self.data, *self.eval_data]:
            if not Path(path).is_file():
                raise GistError(f"data file {path} does not exist")

    def gist_config(self) -> GistConfig:
        return GistConfig(model=self.model, num_gist_tokens=self.num_gist_tokens, condition=self.condition,
                          template=self.template, tune=self.tune, lora_r=self.lora_r, lora_alpha=self.lora_alpha)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
