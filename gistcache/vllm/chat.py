"""The chat side of `gist serve`: which conversations a gist cache can answer (`chat_turns`: an optional system
message, the instruction, then one user message, the input), and `ChatReply`, which turns the /v1/completions
answer the request became (JSON, or the events of a stream) back into OpenAI's chat format. The request side is
`server.GistRequestBuilder.chat`."""

from __future__ import annotations

import json

from gistcache.errors import GistError

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
INSTRUCTION_ROLES = ("system", "developer")  # the instruction's message ("developer": OpenAI's newer name)
# chat fields that shape vLLM's chat template, which a gist chat does not use: refused unless at their default
TEMPLATE_FIELDS = {"chat_template": None, "chat_template_kwargs": None, "documents": None, "reasoning_effort": None,
                   "add_generation_prompt": True, "continue_final_message": False}
TOOL_FIELDS = ("tools", "functions", "function_call")
# chat fields with no meaning once the request is a completion (no tools or media: nothing to do), dropped
DROPPED_FIELDS = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "echo", "tool_choice",
                  "parallel_tool_calls", "include_reasoning", "mm_processor_kwargs", "media_io_kwargs",
                  *TEMPLATE_FIELDS, *TOOL_FIELDS}


def shown(value: object, limit: int = 60) -> str:
    """`value` for a one-line message: its repr (newlines escaped), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def chat_turns(messages: object) -> tuple[str | None, str]:
    """(the instruction or None, the input) of a chat conversation a gist cache can answer: an optional system
    message first, then one user message, all plain text. Anything else is refused in one line."""
    if not isinstance(messages, list) or not messages:
        raise GistError(f"`messages` must hold the input as one user message, after the instruction as the system "
                        f"message (or send the input as `prompt` to {COMPLETIONS}); got {shown(messages)}")
    instruction, inputs = None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GistError(f"messages[{i}] must be an object with a `role` and a `content`, got {shown(message)}")
        role = message["role"]
        if role == "assistant":
            raise GistError(f"messages[{i}] is an assistant turn: a gist cache answers one input after the "
                            f"instruction, with no history; send the system message and one user message")
        if role not in (*INSTRUCTION_ROLES, "user"):
            raise GistError(f"messages[{i}] has role {shown(role)}: a gist chat takes the instruction as the system "
                            f"message and the input as one user message")
        extra = sorted(k for k, v in message.items() if k not in ("role", "content") and v not in (None, "", [], {}))
        if extra:
            raise GistError(f"messages[{i}].{shown(extra[0], 30)[1:-1]} is not served from a gist cache: give `role` "
                            f"and `content` only")
        content = message.get("content")
        if not isinstance(content, str):
            raise GistError(f"messages[{i}].content must be text (a string), got {type(content).__name__}: a gist "
                            f"chat takes plain text, no parts or media")
        if role in INSTRUCTION_ROLES:
            if i != 0:
                raise GistError(f"messages[{i}] is a {role} message after the first: a gist cache holds one "
                                f"instruction, the first message; join them into one")
            if not content.strip():
                raise GistError(f"messages[0], the {role} message, is empty: give the instruction there")
            instruction = content
        else:
            inputs.append(i)
    if len(inputs) != 1:
        raise GistError("no user message: the input is the last message, with role user" if not inputs else
                        f"{len(inputs)} user turns (messages {', '.join(map(str, inputs))}): a gist cache answers one "
                        f"input after the instruction, with no history; send one user message")
    if inputs[0] != len(messages) - 1:
        raise GistError(f"messages[{inputs[0]}], the input, must be the last message")
    return instruction, messages[inputs[0]]["content"]


def chat_id(completion_id: object) -> object:
    """vLLM's completion id `cmpl-X` as its chat id `chatcmpl-X`."""
    if isinstance(completion_id, str) and completion_id.startswith("cmpl-"):
        return "chat" + completion_id
    return completion_id


def completion_choices(body: dict) -> list[dict] | None:
    """The choices of a /v1/completions response or stream chunk; None for anything else (an error)."""
    choices = body.get("choices")
    if body.get("object") != "text_completion" or not isinstance(choices, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text", ""), str) for c in choices):
        return None
    return choices


PROMPT_FIELDS = ("prompt_token_ids", "prompt_logprobs")  # per choice in a completion, once per response in a chat


def chat_head(body: dict, choices: list[dict], kind: str) -> dict:
    """The response's fields as a chat response of `kind`: the chat id, and the prompt's fields that a completion
    gives in each choice at the top, where vLLM's chat gives them."""
    prompt = {name: c[name] for name in PROMPT_FIELDS for c in choices[:1] if c.get(name) is not None}
    return {**body, **prompt, "id": chat_id(body.get("id")), "object": kind}


def chat_choice(choice: dict, field: str, value: dict) -> dict:
    return {**{k: v for k, v in choice.items() if k != "text" and k not in PROMPT_FIELDS}, field: value}


def chat_completion(body: object) -> object:
    """A /v1/completions response as a chat.completion (anything else, an error, as it is)."""
    choices = completion_choices(body) if isinstance(body, dict) else None
    if choices is None:
        return body
    return {**chat_head(body, choices, "chat.completion"),
            "choices": [chat_choice(c, "message", {"role": "assistant", "content": c.get("text", "")})
                        for c in choices]}


def chat_chunks(chunk: object, started: set[int]) -> list:
    """One streamed completion chunk as chat.completion.chunk events: before a choice's first text, a chunk with
    its role (as vLLM's chat stream sends); `started` holds the choices that had theirs. Errors pass as they are."""
    completion = completion_choices(chunk) if isinstance(chunk, dict) else None
    if completion is None:
        return [chunk]
    head = chat_head(chunk, completion, "chat.completion.chunk")
    out, choices = [], []
    for c in completion:
        index = c.get("index", 0)
        if index not in started:
            started.add(index)
            role = {k: v for k, v in head.items() if k != "usage"}
            out.append({**role, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
            head = {k: v for k, v in head.items() if k not in PROMPT_FIELDS}  # sent once, with the role
        choices.append(chat_choice(c, "delta", {"content": c.get("text", "")}))
    return [*out, {**head, "choices": choices}]


class ChatReply:
    """The ASGI `send` of a chat request answered by /v1/completions: a 200 JSON body becomes a chat.completion,
    the server-sent events of a stream become chat.completion.chunk events (an event may arrive in pieces);
    any other response passes as it is."""

    def __init__(self, send):
        self.send, self.mode, self.start, self.buffer, self.started = send, "pass", None, b"", set()

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            kind = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"")
            self.mode = "pass" if message.get("status") != 200 else (
                "stream" if kind.startswith(b"text/event-stream") else "json")
            if self.mode == "json":
                self.start = message  # sent with the body, whose length changes
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(message)
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if more:
                return
            try:
                body = json.dumps(chat_completion(json.loads(self.buffer))).encode()
            except ValueError:
                body = self.buffer
            headers = [(k, v) for k, v in self.start.get("headers", []) if bytes(k).lower() != b"content-length"]
            await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            return await self.send({"type": "http.response.body", "body": body, "more_body": False})
        done, _, self.buffer = self.buffer.rpartition(b"\n\n")
        if not more and self.buffer:
            done, self.buffer = done + b"\n\n" + self.buffer if done else self.buffer, b""
        body = b"".join(self.event(e) for e in done.split(b"\n\n") if e)
        if body or not more:
            await self.send({**message, "body": body, "more_body": more})

    def event(self, event: bytes) -> bytes:
        """One server-sent event, turned into chat chunks (several events when a role chunk comes first)."""
        if not event.startswith(b"data: ") or event[6:].strip() == b"[DONE]":
            return event + b"\n\n"
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            return event + b"\n\n"
        return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chat_chunks(chunk, self.started))
