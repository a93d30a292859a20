"""Every process's random generators (Python's, numpy's, torch's CPU and CUDA ones) as tensors, and putting
them back: what a checkpoint keeps so that a resumed run draws what the killed one would have."""

from __future__ import annotations

import math
import random

import torch


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators as tensors: Python's, numpy's, torch's CPU one and each CUDA device's."""
    import numpy as np  # deferred with the rest of training's imports

    _, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),  # 625 words of 32 bits
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (devices, 16)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Put back what `rng_state` returned (one process's row of a checkpoint's rng.safetensors)."""
    import numpy as np

    gauss = float(state["python_gauss"][0])
    random.setstate((3, tuple(int(v) for v in state["python_mt"]), None if math.isnan(gauss) else gauss))
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch_cpu"].cpu())
    if "torch_cuda" in state and torch.cuda.is_available():
        for device, value in enumerate(state["torch_cuda"].cpu()[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, device)


def gather_rng_state(accelerator) -> dict[str, torch.Tensor]:
    """Every process's `rng_state`, stacked: {name: (processes, ...)}. A collective: call it on every process."""
    state = rng_state()
    return {name: accelerator.gather(value.unsqueeze(0).to(accelerator.device)).cpu() for name, value in state.items()}
