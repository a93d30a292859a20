"""`python -m gistcache.eval.gpu_bench ...`, or the folder run as a script, as the GPU run starts it:
`PYTHONPATH=. python3 eval/gpu_bench ...` (then everything is imported from the repository root as the `eval`
package, never from eval/gpu_bench/ itself)."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: import from the repository root, never from eval/gpu_bench/ itself
    ROOT = Path(__file__).resolve().parents[2]
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(ROOT))
    from eval.gpu_bench.cli import main
else:
    from .cli import main

if __name__ == "__main__":
    sys.exit(main())
