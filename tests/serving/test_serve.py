"""`gist serve`'s request building and refusals (issue 14), without vLLM: the middleware on a stub app."""

import asyncio
import json
import socket

import pytest
from typer.testing import CliRunner

import tiny
from clitools import one_line_error
from gistcache.cli.main import app
from gistcache.errors import GistError
from gistcache.model import GistModel
from gistcache.serving.export import export_run, request_ids
from gistcache.store import CacheStore, compress_cached
from gistcache.vllm import vllm_available
from gistcache.vllm.server import GistMiddleware, check_port

PROMPT = "Reverse the word"
runner = CliRunner()


@pytest.fixture(scope="module")
def served(make_tiny_run, tmp_path_factory):
    """(a folder holding the LoRA run exported as `hf` and its `store` of one cache, the run's model, that key)."""
    root = tmp_path_factory.mktemp("serve")
    run = make_tiny_run(tune="lora", **tiny.NUDGED)
    export_run(run, root / "hf")
    model = GistModel.from_pretrained(run)
    key = compress_cached(model, PROMPT, CacheStore(root / "store"))[0].key
    return root, model, key


def call(middleware: GistMiddleware, path: str, body) -> tuple[int, dict]:
    """POST `body` through the middleware; returns (status, JSON the stub app or the middleware answered)."""
    seen = {}

    async def app(scope, receive, send):
        seen["body"] = json.loads((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware.app = app
    raw = json.dumps(body).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send))
    if "body" in seen:
        return 200, seen["body"]
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_middleware_builds_gist_requests(served):
    """Text input + a store key become placeholder ids + the templated input, cache_salt = key; a gist_prompt is
    compressed once into the store and served the same way; other requests pass untouched."""
    root, model, key = served
    mw = GistMiddleware(None, root / "hf", root / "store")
    cache = CacheStore(root / "store").get(key)
    status, body = call(mw, "/v1/completions", {"model": "gist", "prompt": "stone", "max_tokens": 4,
                                                "kv_transfer_params": {"gist_cache": key[:12]}})
    assert status == 200 and body["cache_salt"] == key and body["kv_transfer_params"] == {"gist_cache": key}
    assert body["prompt"] == request_ids(model.tokenizer, model.template, cache, "stone")
    status, body = call(mw, "/v1/completions", {"prompt": ["stone", "ab"],
                                                "kv_transfer_params": {"gist_prompt": "Uppercase every letter"}})
    assert status == 200 and len(body["prompt"]) == 2 and CacheStore(root / "store").get(body["cache_salt"])
    plain = {"model": "gist", "prompt": "hello", "max_tokens": 3}
    assert call(mw, "/v1/completions", plain) == (200, plain)


def test_middleware_refuses_bad_requests_with_400(served, make_tiny_run, tmp_path):
    """Unknown key, a file path, a malformed entry, a chat request, a token-id prompt: HTTP 400 with one line."""
    root, model, key = served
    mw = GistMiddleware(None, root / "hf", root / "store")
    other = GistModel.from_pretrained(make_tiny_run(**tiny.NUDGED))
    foreign = compress_cached(other, PROMPT, CacheStore(root / "store"))[0].key
    cases = [("/v1/completions", {"prompt": "a", "kv_transfer_params": {"gist_cache": "f" * 64}}, "no cache in"),
             ("/v1/completions", {"prompt": "a", "kv_transfer_params": {"gist_cache": "/etc/passwd"}},
              "store keys only"),
             ("/v1/completions", {"prompt": "a", "kv_transfer_params": {"gist_cache": 7}}, "must be a cache key"),
             ("/v1/completions", {"prompt": "a", "kv_transfer_params": {"gist_cache": foreign}}, "was made"),
             ("/v1/completions", {"prompt": [1, 2], "kv_transfer_params": {"gist_cache": key}}, "input text"),
             ("/v1/completions", {"prompt": "a", "kv_transfer_params": "x"}, "must be an object"),
             ("/v1/chat/completions", {"messages": [], "kv_transfer_params": {"gist_cache": key}}, "/v1/completions")]
    for path, body, message in cases:
        status, answer = call(mw, path, body)
        assert status == 400 and message in answer["error"]["message"], (body, answer)


def test_port_in_use_and_missing_vllm_are_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(GistError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
    if not vllm_available():
        one_line_error(runner.invoke(app, ["serve", "--store", str(tmp_path)]), "gist serve needs vLLM")
        assert not any(tmp_path.iterdir())
