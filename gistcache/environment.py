"""What besides flags and seed decides a run's numbers: the installed package versions and the CPU.

Training records both in metrics.json and the cache benchmark in its results: the same flags and
seed give the same run only with the same versions and the same kind of CPU or GPU.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RECORDED_PACKAGES = ("gistcache", "torch", "transformers", "peft", "accelerate", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of RECORDED_PACKAGES (None: not installed), for metrics and benchmarks."""
    versions: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU model (`/proc/cpuinfo`, else `platform`): float results of training differ across CPU kinds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
