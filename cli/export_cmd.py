"""`gist export`: a run as a Hugging Face model folder (LoRA merged) for vLLM and AutoModelForCausalLM."""

from __future__ import annotations

from typing import Annotated

import typer

from gistcache.cli.common import console, friendly_errors, print_json
from gistcache.cli.options import DType, JsonOut, RunDir
from gistcache.config import torch_dtype
from gistcache.model import quiet_transformers
from gistcache.serving.export import export_run


@friendly_errors
@quiet_transformers()
def export(
    out: Annotated[str, typer.Option("--out", help="Folder to write (replaced whole if it is an earlier export).")],
    run: RunDir = None,
    dtype: DType = "float32",
    json_out: JsonOut = False,
) -> None:
    """Write the run's model, LoRA merged, as a Hugging Face folder with its tokenizer, gist embedding and fingerprints."""
    info = export_run(run, out, dtype=torch_dtype(dtype))
    if json_out:
        print_json({"out": out, **info.to_dict()})
        return
    console.print(f"exported {info.source_run} to {out} ({info.dtype}, {info.num_layers} layers, "
                  f"{info.num_gist_tokens} gist token(s) after a fixed prefix of {info.num_prefix_tokens})",
                  highlight=False)
    console.print(f"serve it: gist serve --export {out}   (or any engine: it is a plain {out}/config.json folder)",
                  style="dim", highlight=False)
