"""The GPU run of issue 26 item 4 as one prepared command: time to first token (TTFT) and batched throughput of
gist caches against full prompts, measured side by side in one process, printed as one table (and JSON).

    PYTHONPATH=. python3 eval/gpu_bench                      # 8B-shaped Llama, bfloat16, cuda: ~5 min on an H200
    python3 eval/gpu_bench --shape tiny --device cpu --prompt-tokens 128 --batch 4 --new-tokens 4   # seconds

Nothing is downloaded and no weights are needed: the model is a Llama (or Qwen2, `--arch`) of the chosen shape
built from a config with random weights, initialized directly on the device (speed does not depend on the
weights), and the tokenizer is a byte-level one built in memory (one token a byte), so an instruction of
`--prompt-tokens` 2048 is exactly 2,048 tokens. Around it sits an untrained `GistModel` in the shipped run's
layout (`--mask prefix`, compact positions, `--gist-tokens` 1), and every gist cache comes from the library's
own `gistcache.compress`. The script imports only this repository and what it already needs (torch,
transformers with its tokenizers, safetensors, rich): nothing to install on a bare GPU machine.

Measured, all on the device, timed between `torch.cuda.synchronize()` calls, medians after warm-up runs:

* compress: one instruction (median of up to 3), and the `--batch` distinct instructions in one call;
* TTFT at batch 1, one instruction + one input (the three modes interleaved in every repeat):
  - full:   the whole prompt and the input, no cache;
  - cached: the prompt's own KV prefilled once beforehand (a copy per repeat, made outside the timed region);
  - gist:   the gist cache (its few slots: the run's fixed prefix + the gist), from its `GistCache`;
  each two ways: "generate call" (a whole call that returns 1 new token: transformers' `generate` for full and
  cached, `gistcache.generate_ids` for gist, so the gist's checks, the copy of its slots to the device and the
  layout of the batch count) and "prefill forward" (the forward over what is not cached, and the argmax);
* throughput of `--batch` distinct requests at once, `--new-tokens` new tokens each (EOS held off), gist caches
  against full prompts (tokens/s = batch x new tokens / seconds, prefill included):
  - "generate": `gistcache.generate_ids` on the batch of caches vs transformers' `generate` on the full
    prompts: DynamicCache, eager, as the library answers today;
  - the decode loop: prefill (eager, as above), then greedy decoding over a transformers `StaticCache`, the
    decode step compiled the way transformers' `generate` compiles it (`get_compiled_call` with its
    `CompileConfig`: torch.compile, mode reduce-overhead); if compiling fails, or on a CPU, the same loop
    eager; the table says which engine ran and why. It also reports decode-only tokens/s (after the first
    token), which is what the full prompts would get with their prefixes already cached.

Checks, reported in the table (on a GPU in bfloat16 kernels of different shapes round differently, so a
differing near-tie is possible there; tests/eval/test_gpu_bench.py requires every check on the CPU in float32):
the gist answer equals the masked reference (`generate_masked_ids`, the definition, no cache); the batched
gist answers (`--check-tokens` tokens) equal each cache decoded alone; the cached prefix gives the full prompt's
first token; the decode loop's tokens equal the generate engine's, for gist and for full.

Output: progress on stderr, one line a message at any terminal width (`gpu_bench: ...`); then on stdout the
result as one line of JSON and the table, in markdown, drawn at its natural width whatever COLUMNS says, so
every row is one line. A measurement that fails leaves its row saying why and the rest still runs; the table
is printed at the end in every case. `--time-budget` (default 480 s) stops the run in time to print it: a stage
still running then is stopped, later ones are skipped, each row saying so. Exit code 0, 1 when a stage failed
or was skipped, 2 for bad options.

The package, a file a job: shapes.py (model shapes, constants, the synthetic prompts), options.py (the options),
timing.py (messages, synchronization, the time budget), bench.py (`Bench`: stages, checks, set-up),
ttft.py and throughput.py (the measurements), decode.py (prefills, the static-cache decode loop), table.py (the
table), cli.py (`run`, `main`); __main__.py runs it (`python -m gistcache.eval.gpu_bench`, or the folder as a
script).
"""

from __future__ import annotations

from .bench import Bench
from .cli import main, run
from .decode import DecodeLoop, banned_ids, compiled_step, full_prefill, gist_prefill, pick
from .options import _Parser, parse_args
from .shapes import (COMMON, DTYPES, FAILED, MODES, PREFIX, SHAPES, USAGE, WORDS, model_config,
                     synth_instruction)
from .table import COLUMNS, _bytes, _count, _get, _ms, _s, _tps, _x, render_table, table_rows
from .timing import OutOfTime, deadline, first_line, free_memory, median, say, sync

__all__ = ["Bench", "COLUMNS", "COMMON", "DTYPES", "DecodeLoop", "FAILED", "MODES", "OutOfTime", "PREFIX", "SHAPES",
           "USAGE", "WORDS", "banned_ids", "compiled_step", "deadline", "first_line", "free_memory", "full_prefill",
           "gist_prefill", "main", "median", "model_config", "parse_args", "pick", "render_table", "run", "say",
           "sync", "synth_instruction", "table_rows"]
