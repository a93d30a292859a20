"""Chat completions from gist caches (issue 26 item 3): `gist serve` answers /v1/chat/completions.

The system message (or kv_transfer_params.gist_cache / .gist_prompt) is the instruction, the user message the
input. Greedy chat answers of the shipped run, through the `openai` client, plain and streamed, equal `gist
generate`'s; a conversation a gist cache cannot hold gets HTTP 400 with one line and the server keeps serving.
The server tests start `gist serve` once (slow; skipped where vLLM, the openai client or the default model's
weights package is not installed: `make test-vllm` runs them in .venv-vllm). The request and stream translation
tests need none of them and run everywhere.
"""

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tiny
from gistcache.errors import GistError
from gistcache.eval.serve_load import Deadline, LoadConfig, ServeProcess, free_port
from gistcache.inference.generation import GREEDY, generate, generate_ids
from gistcache.model import GistModel
from gistcache.serving.export import request_ids
from gistcache.store import CacheStore, compress_cached
from gistcache.vllm.chat import ChatReply
from gistcache.vllm.server import GistMiddleware
from test_serve import PROMPT, call, served  # noqa: F401  (served is a fixture)

CAPITAL = "Name the capital city of the given country. Answer with the city name only."
FRENCH = "Translate the word into French."
PAIRS = [(CAPITAL, "France"), (CAPITAL, "Japan"), (FRENCH, "apple")]
NEW = 24
START_S = 900


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


def replay(messages: list[dict]) -> list[dict]:
    """What ChatReply sends for the completion response `messages` (ASGI messages)."""
    sent = []

    async def send(message):
        sent.append(message)

    async def run():
        reply = ChatReply(send)
        for message in messages:
            await reply(message)

    asyncio.run(run())
    return sent


def test_chat_reply_turns_completions_into_chat_format():
    """A stream cut mid-event and with two events in one piece becomes role + content + usage chat chunks; a JSON
    completion in two pieces becomes one chat.completion with its new length; an error passes as it is."""
    head = {"id": "cmpl-7", "created": 1, "model": "gist", "object": "text_completion"}
    first = {**head, "choices": [{"index": 0, "text": "Par", "logprobs": None, "finish_reason": None}]}
    last = {**head, "choices": [{"index": 0, "text": "is", "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": None}]}
    usage = {**head, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33}}
    stream = sse(first, last, usage, b"[DONE]")
    cut = stream.index(b"Par") + 1  # inside the first event
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    sent = replay([start, {"type": "http.response.body", "body": stream[:cut], "more_body": True},
                   {"type": "http.response.body", "body": stream[cut:], "more_body": True},
                   {"type": "http.response.body", "body": b"", "more_body": False}])
    assert sent[0] == start and not sent[-1]["more_body"]
    text = b"".join(m["body"] for m in sent[1:])
    assert text.endswith(b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in text.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert [e["object"] for e in events] == ["chat.completion.chunk"] * 4
    assert {e["id"] for e in events} == {"chatcmpl-7"}
    assert [c["delta"] for e in events for c in e["choices"]] == [
        {"role": "assistant", "content": ""}, {"content": "Par"}, {"content": "is"}]
    assert [c["finish_reason"] for e in events for c in e["choices"]] == [None, None, "stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3

    body = json.dumps({**head, "choices": [{"index": 0, "text": "Paris", "finish_reason": "stop"}],
                       "usage": usage["usage"]}).encode()
    sent = replay([{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]},
                   {"type": "http.response.body", "body": body[:10], "more_body": True},
                   {"type": "http.response.body", "body": body[10:], "more_body": False}])
    assert len(sent) == 2
    answer = json.loads(sent[1]["body"])
    assert answer["object"] == "chat.completion" and answer["id"] == "chatcmpl-7"
    assert answer["choices"] == [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Paris"}}]
    assert (b"content-length", b"%d" % len(sent[1]["body"])) in sent[0]["headers"]

    error = [{"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]},
             {"type": "http.response.body", "body": b'{"error": {"message": "no"}}', "more_body": False}]
    assert replay(error) == error


def test_chat_requests_become_the_completion_request(served):  # noqa: F811
    """Without vLLM (the middleware on a stub app): a chat request reaches the engine as the /v1/completions request
    of its user message with its system message as gist_prompt, token for token; max_completion_tokens is
    max_tokens; with no limit, the model's context (as vLLM's chat); a key in kv_transfer_params names the
    instruction instead. The chat fields are gone."""
    root, model, key = served
    mw = GistMiddleware(None, root / "hf", root / "store")
    chat = {"model": "gist", "messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": "stone"}],
            "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    completion = {"model": "gist", "prompt": "stone", "max_tokens": 4, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}, "kv_transfer_params": {"gist_prompt": PROMPT}}
    want = call(mw, "/v1/completions", completion)
    assert want[0] == 200 and want[1]["cache_salt"] == key
    assert call(mw, "/v1/chat/completions", chat) == want
    no_max = {k: v for k, v in chat.items() if k != "max_tokens"}
    assert call(mw, "/v1/chat/completions", {**no_max, "max_completion_tokens": 4}) == want
    context = json.loads((root / "hf" / "config.json").read_text())["max_position_embeddings"]
    assert call(mw, "/v1/chat/completions", no_max) == (200, {**want[1], "max_tokens": context})
    by_key = {**chat, "messages": chat["messages"][1:], "kv_transfer_params": {"gist_cache": key[:12]}}
    assert call(mw, "/v1/chat/completions", by_key) == want


class Server:
    """`gist serve` of the shipped run on a free port, with its own store (eval.serve_load.ServeProcess: its own
    process group, /health waited for, stopped with the engine it started); the reference model beside it."""

    def __init__(self, root: Path):
        self.root, self.store = root, root / "store"
        self.log = root / "serve.log"
        self.process = ServeProcess(self.store, free_port(), self.log, LoadConfig(start_timeout_s=START_S))
        self.url = f"{self.process.url}/v1"
        self.model = GistModel.from_pretrained(None)
        try:
            self.process.start(Deadline(START_S))
        except GistError as exc:
            self.stop()
            pytest.fail(str(exc))

    def stop(self) -> None:
        self.process.stop()

    def reference(self, instruction: str, text: str, max_new_tokens: int = NEW) -> tuple[str, list[int]]:
        """What `gist generate --prompt INSTRUCTION --input TEXT` prints (greedy), and its token ids (EOS kept)."""
        cache = compress_cached(self.model, instruction, CacheStore(self.root / "reference-store"))[0].cache
        return (generate(self.model, cache, [text], max_new_tokens=max_new_tokens, **GREEDY)[0],
                generate_ids(self.model, cache, text, max_new_tokens=max_new_tokens, **GREEDY)[0])

    def prompt_tokens(self, instruction: str, text: str) -> int:
        cache = compress_cached(self.model, instruction, CacheStore(self.root / "reference-store"))[0].cache
        return len(request_ids(self.model.tokenizer, self.model.template, cache, text))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    tiny.skip_without_default_model()
    s = Server(tmp_path_factory.mktemp("chat"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)


def messages(instruction: str | None, text: str) -> list[dict]:
    return [*([{"role": "system", "content": instruction}] if instruction else []), {"role": "user", "content": text}]


@pytest.mark.slow
def test_chat_answers_equal_gist_generate(server, client):
    """The openai client's chat.completions.create, plain and streamed, greedy: each answer is gist generate's text
    for the same instruction (the system message) and input; usage counts the placeholders + templated input and
    the answer's tokens; the stream starts with the assistant role. The instruction named by its cache key instead
    answers the same; each instruction is compressed once into the server's store."""
    for instruction, text in PAIRS:
        want, ids = server.reference(instruction, text)
        out = client.chat.completions.create(model="gist", messages=messages(instruction, text), max_tokens=NEW,
                                             temperature=0)
        choice = out.choices[0]
        assert (out.object, choice.message.role, choice.message.content) == ("chat.completion", "assistant", want)
        assert choice.finish_reason == ("stop" if ids[-1] == server.model.tokenizer.eos_token_id else "length")
        assert out.usage.prompt_tokens == server.prompt_tokens(instruction, text)
        assert out.usage.completion_tokens == len(ids)

        chunks = list(client.chat.completions.create(model="gist", messages=messages(instruction, text),
                                                     max_completion_tokens=NEW, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            choice.finish_reason]
        assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices

    key = compress_cached(server.model, FRENCH, CacheStore(server.store))[0].key
    out = client.chat.completions.create(model="gist", messages=messages(None, "apple"), max_tokens=NEW,
                                         temperature=0, extra_body={"kv_transfer_params": {"gist_cache": key[:16]}})
    assert out.choices[0].message.content == server.reference(FRENCH, "apple")[0]
    # no length limit: the answer runs to EOS, as gist generate's (128 new tokens) does
    out = client.chat.completions.create(model="gist", messages=messages(CAPITAL, "Italy"), temperature=0)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == server.reference(CAPITAL, "Italy", 128)[0]
    store = CacheStore(server.store)
    assert sorted(store.prompt_path(e.key).read_text() for e in store.entries()) == sorted([CAPITAL, FRENCH])


@pytest.mark.slow
def test_chats_a_gist_cache_cannot_hold_get_400(server, client):
    """History, several user turns, no instruction, non-text content, tools, an unknown key, a lone surrogate and a
    body that is not JSON: HTTP 400 with one line saying why (never a 500); the server answers after them."""
    import openai

    user = {"role": "user", "content": "France"}
    system = {"role": "system", "content": CAPITAL}
    cases = [
        ([system, user, {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "Japan"}], {},
         "assistant turn"),
        ([system, user, {"role": "user", "content": "Japan"}], {}, "2 user turns"),
        ([user], {}, "no instruction"),
        ([system], {}, "no user message"),
        ([system, {"role": "user", "content": [{"type": "text", "text": "France"}]}], {}, "must be text"),
        ([{"role": "system", "content": " "}, user], {}, "is empty"),
        ([system, user], {"extra_body": {"kv_transfer_params": {"gist_cache": "f" * 64}}}, "give the instruction once"),
        ([user], {"extra_body": {"kv_transfer_params": {"gist_cache": "f" * 64}}}, "no cache in"),
        ([system, user], {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ([system, user], {"logprobs": True}, "logprobs"),
    ]
    for conversation, extra, message in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="gist", messages=conversation, max_tokens=4, **extra)
        error = err.value.body
        assert err.value.status_code == 400 and message in error["message"], (conversation, extra, error)
        assert "\n" not in error["message"] and len(error["message"]) < 250, error["message"]
    surrogate = json.dumps({"model": "gist", "messages": [system, {"role": "user", "content": "Fr\ud800"}]})
    for raw, message in [(b"{not json", "a chat request is a JSON object"), (surrogate.encode(), "lone surrogate")]:
        request = urllib.request.Request(f"{server.url}/chat/completions", data=raw,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == 400 and message in json.load(err.value)["error"]["message"], raw
    out = client.chat.completions.create(model="gist", messages=[system, user], max_tokens=NEW, temperature=0)
    assert out.choices[0].message.content == server.reference(CAPITAL, "France")[0]
    assert "Traceback" not in server.log.read_text(errors="replace")
