"""The OpenAI chat-completions request, validated just enough to route it and fail early.

The body the client sent is kept as it is and forwarded faithfully; validation only rejects what no
backend could serve (wrong types, no messages, absurd numbers), with a 400 that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import Required, TypedDict

from gateway.errors import ApiError

CONTENT_REQUIRED = {"system", "developer", "user", "tool"}
REASONING_EFFORTS = {"none", "minimal", "low", "medium", "high", "xhigh"}
MAX_DEPTH = 254  # levels of JSON nesting orjson can write (it refuses 255)


# Strict types: the body is forwarded as sent, so `"n": "2"` or `"stream": "yes"` must be refused
# here, not coerced for routing and then sent upstream as a string.
class _Message(TypedDict, total=False):
    # A TypedDict, not a model: pydantic-core checks it without building an object per message, so a
    # body of 100,000 tiny messages (under 4 MB) holds the event loop ~50 ms here, not ~250 ms.
    # What it cannot say (which roles need content, text parts) is _check_messages' job.
    __pydantic_config__ = ConfigDict(extra="allow", strict=True)  # type: ignore[misc]

    role: Required[Literal["system", "developer", "user", "assistant", "tool", "function"]]
    content: str | list[dict[str, Any]] | None


class _ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's; the effort knob is written into it (gateway.effort)

    @field_validator("reasoning_effort")
    @classmethod
    def _known_effort(cls, effort: str | None) -> str | None:
        if effort is not None and effort not in REASONING_EFFORTS:
            raise ValueError(f"expected one of {sorted(REASONING_EFFORTS)}")
        return effort

    @field_validator("response_format")
    @classmethod
    def _json_schema_object(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        # as OpenAI requires; what a basic backend is sent is built from it (Backend._adapt)
        if response_format is not None and response_format.get("type") == "json_schema" and \
                not isinstance(response_format.get("json_schema"), dict):
            raise ValueError("a json_schema response_format needs its 'json_schema' object")
        return response_format

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


@dataclass(slots=True)
class ChatRequest:
    """A validated request: the client's body untouched, plus the fields the gateway reads."""

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    n: int
    stream: bool
    include_usage: bool
    max_output_tokens: int | None
    reasoning_effort: str | None

    @property
    def exact_output(self) -> str | None:
        """Why the answer must be the model's own, from one call (no vote, no rewritten text), or None."""
        body = self.body
        if body.get("tools") or body.get("functions"):
            return "tools"
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
            return f"response_format {response_format.get('type')}"
        if body.get("logprobs"):
            return "logprobs"
        modalities = body.get("modalities")
        if isinstance(modalities, list) and "audio" in modalities:
            # a spoken answer's text is its audio's transcript, not `content` (null): a vote counted
            # every sample as the same empty answer, and the reasoning instruction was spoken
            return "audio output"
        last = self.messages[-1].get("role") if self.messages else None
        if last == "assistant":
            # a prefill: the answer continues that text; a sample's reasoning instruction would come
            # before it, and a vote would pick among continuations of one given start
            return "an assistant turn to continue"
        if last in ("tool", "function"):
            # an agent loop's next step, even with the tools left out of this request: the reasoning
            # instruction would go into a user turn far back, before the calls it led to
            return "a tool result to answer"
        return None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object.", code="invalid_json")
    # orjson reads 1,024 levels of nesting but writes only MAX_DEPTH: a deeper body would fail as it
    # is forwarded (a 500 after the budget hold). Only a body with that many brackets can be so deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise ApiError(400, f"Request body is nested more than {MAX_DEPTH} levels deep.",
                           code="invalid_json") from None
    return body


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """What the message schema cannot say: a message of a role that needs content has some (only an
    assistant turn that called a tool may come without), and a text part's text is a string (the
    router, the token estimate and the judge read it)."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if content is None and message["role"] in CONTENT_REQUIRED:
            raise ApiError(400, f"Invalid value for 'messages.{i}': a {message['role']} message needs 'content'",
                           param=f"messages.{i}", code="invalid_value")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.get("type") == "text" and not isinstance(part.get("text"), str):
                    param = f"messages.{i}.content.{j}.text"
                    raise ApiError(400, f"Invalid value for '{param}': a text part's 'text' must be a string",
                                   param=param, code="invalid_value")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def is_type_tag(part: Any) -> bool:
    """A union member pydantic names in an error's location ("stop.str", "content.list[...]"): not a
    field, so not part of OpenAI's `param`."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def parse_chat_request(body: dict[str, Any], *, max_n: int) -> ChatRequest:
    # A parameter sent as null is the API's default, as if left out (the openai SDK sends `n=None` so);
    # left out it is: basic servers (llama.cpp's) fail on `"temperature": null` with a 500.
    body = {key: value for key, value in body.items() if value is not None}
    try:
        parsed = _ChatBody.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not is_type_tag(p)) or None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param,
                       code="invalid_value") from None
    _check_messages(body["messages"])
    if parsed.n > max_n:
        raise ApiError(400, f"'n' must be at most {max_n}.", param="n", code="invalid_value")
    stream_options = parsed.stream_options or {}
    return ChatRequest(
        body=body,
        model=parsed.model,
        messages=body["messages"],
        n=parsed.n,
        stream=parsed.stream,
        include_usage=bool(stream_options.get("include_usage")),
        max_output_tokens=parsed.max_completion_tokens or parsed.max_tokens,
        reasoning_effort=parsed.reasoning_effort,
    )
