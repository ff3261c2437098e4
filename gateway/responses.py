"""The OpenAI Responses API (`POST /v1/responses`), stateless, at the edge of the chat request path.

A Responses body is translated into the internal chat request (`parse_responses_request`), served
exactly as a chat completion is (gateway/request_path.py), and the chat answer translated back: whole, or as
the Responses event stream (`ResponseBuilder`, fed the chat chunks as they arrive). Nothing is stored:
what needs a stored response or OpenAI's own servers (previous_response_id, conversation, background,
built-in tools, uploaded files) is refused with a 400 that names the parameter.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.backends import UpstreamError
from gateway.calls import Caller
from gateway.errors import ApiError
from gateway.schemas import ChatRequest, is_type_tag, parse_chat_request
from gateway.streaming import REASONING_FIELDS, PassThrough, completion_to_chunks, usage_block
from router.estimates import estimate_prompt_tokens, prompt_tokens_bound

# What needs state or OpenAI's servers, and why it is refused (each one's 400 says so).
STATEFUL = {
    "previous_response_id": "responses are not stored; send the whole conversation as `input`",
    "conversation": "conversations are not stored; send the whole conversation as `input`",
    "prompt": "stored prompt templates live on OpenAI's servers; send the text as `instructions`",
    "context_management": "the conversation is not kept, so there is nothing to compact",
}
# The Responses fields that become chat fields of the same name and meaning.
SAME_IN_CHAT = ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                "service_tier")


# What `include` may ask for: the output text's logprobs, and data of what only OpenAI's servers make
# (built-in tools' results, encrypted reasoning, a stored input image's URL), which no answer here has.
Includable = Literal["message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
                     "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
                     "computer_call_output.output.image_url", "code_interpreter_call.outputs"]


class _ResponsesBody(BaseModel):
    """The supported subset, typed strictly (a parameter not here is refused by name)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    # optional, as OpenAI's is: `instructions` alone is a conversation of a system prompt (as chat takes
    # one); neither is the chat path's 400 about `messages`, named `input`
    input: str | list[dict[str, Any]] = []
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    reasoning: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None  # "in_memory" | "24h", a caching hint as chat's
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # accepted; nothing is stored either way
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate, ignored
    include: list[Includable] | None = None  # logprobs are asked of the backend; the rest is none of ours
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tool_calls: int | None = Field(default=None, ge=1)  # bounds built-in tools, which are refused
    truncation: Literal["disabled"] | None = None
    background: Literal[False] | None = None


class _InputTokensBody(BaseModel):
    """`POST /v1/responses/input_tokens`: what of a Responses body makes its prompt (`model` and `input` optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | list[dict[str, Any]] = []  # optional, as OpenAI's is: `instructions` alone can be counted
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None


_Body = TypeVar("_Body", bound=BaseModel)


def refuse(param: str, message: str, code: str = "unsupported_parameter") -> ApiError:
    return ApiError(400, f"Unsupported value for '{param}': {message}.", param=param, code=code)


def parse_responses_request(body: dict[str, Any], *, max_n: int) -> tuple[ChatRequest, dict[str, Any]]:
    """The chat request a Responses body asks for, validated as chat requests are, and the request
    fields a Response echoes back. Raises ApiError 400 naming the Responses parameter."""
    body = {key: value for key, value in body.items() if value is not None}  # null: the default, as in chat
    _refuse_what_needs_state(body)
    if body.get("background") is True:
        raise refuse("background", "Ponder's Responses API is stateless: a background response would have to be "
                                   "stored to be fetched; stream it instead")
    parsed = _validated(_ResponsesBody, body)
    chat: dict[str, Any] = {"model": parsed.model, "messages": chat_messages(parsed.input, parsed.instructions)}
    chat.update({key: body[key] for key in SAME_IN_CHAT if key in body})
    if parsed.stream:
        chat["stream"] = True
    if parsed.max_output_tokens is not None:
        chat["max_completion_tokens"] = parsed.max_output_tokens
    if "message.output_text.logprobs" in (parsed.include or ()) or parsed.top_logprobs is not None:
        chat["logprobs"] = True  # chat takes top_logprobs only with logprobs
        if parsed.top_logprobs is not None:
            chat["top_logprobs"] = parsed.top_logprobs
    reasoning = parsed.reasoning or {}
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]  # `summary`: no reasoning summaries are made
    if parsed.tools:
        chat["tools"] = [chat_tool(tool, i) for i, tool in enumerate(parsed.tools)]
        if parsed.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = parsed.parallel_tool_calls
    if parsed.tool_choice is not None:
        tool_choice = chat_tool_choice(parsed.tool_choice)  # checked either way
        if parsed.tools:  # chat APIs refuse a tool_choice with no tools (OpenAI, vLLM: a 400)
            chat["tool_choice"] = tool_choice
    text = parsed.text or {}
    response_format = chat_response_format(text.get("format"))
    if response_format is not None:
        chat["response_format"] = response_format
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    try:
        req = parse_chat_request(chat, max_n=max_n)
    except ApiError as exc:
        raise responses_error(exc) from None
    echo = {
        "instructions": parsed.instructions,
        "max_output_tokens": parsed.max_output_tokens,
        "max_tool_calls": parsed.max_tool_calls,
        "metadata": parsed.metadata or {},
        "parallel_tool_calls": parsed.parallel_tool_calls if parsed.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": False,  # whatever was asked: nothing is stored
        "temperature": parsed.temperature,
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": parsed.tool_choice if parsed.tool_choice is not None else "auto",
        "tools": parsed.tools or [],
        "top_p": parsed.top_p,
        "top_logprobs": parsed.top_logprobs,
        "truncation": "disabled",
        "background": False,
        "user": parsed.user,
        "safety_identifier": parsed.safety_identifier,
    }
    return req, echo


def _refuse_what_needs_state(body: dict[str, Any]) -> None:
    """The 400 for what a stateless gateway cannot do, with why (a response, and the count of its input)."""
    for param, why in STATEFUL.items():
        if param in body:
            raise refuse(param, f"Ponder's Responses API is stateless: {why}")
    if body.get("truncation") == "auto":
        raise refuse("truncation", "`auto` drops context the gateway cannot see the model's window of; trim `input`")


def _validated(model: type[_Body], body: dict[str, Any]) -> _Body:
    """The body as `model` types it, with its fields' defaults for nulls; or a 400 naming the parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # of a union's (`input`: a string or a list of items) errors, the one deepest in what was sent:
        # `input: [{...}, "hi"]` is about item 1, not about `input` not being a string
        err = max(exc.errors(), key=lambda error: len(error["loc"]))
        param = ".".join(str(p) for p in err["loc"] if not is_type_tag(p))
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unsupported parameter: '{param}' is not supported by Ponder's stateless Responses "
                                "API (docs/api.md lists what is).", param=param, code="unsupported_parameter") from None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value") from None


def count_input_tokens(body: dict[str, Any]) -> dict[str, Any]:
    """`POST /v1/responses/input_tokens`: the prompt a Responses body makes (its messages, tool
    definitions and JSON format), counted as the gateway estimates a prompt it has no count of (about
    4 characters a token): the backends' tokenizers are not known here, so `ponder.estimated` says so,
    and `ponder.input_tokens_bound` is the most tokens it can be (its UTF-8 bytes), what a budget holds."""
    body = {key: value for key, value in body.items() if value is not None}
    _refuse_what_needs_state(body)
    parsed = _validated(_InputTokensBody, body)
    messages = chat_messages(parsed.input, parsed.instructions)
    prompt: dict[str, Any] = {}
    if parsed.tools:
        prompt["tools"] = [chat_tool(tool, i) for i, tool in enumerate(parsed.tools)]
    if (response_format := chat_response_format((parsed.text or {}).get("format"))) is not None:
        prompt["response_format"] = response_format
    return {"object": "response.input_tokens", "input_tokens": estimate_prompt_tokens(messages, prompt),
            "ponder": {"estimated": True, "input_tokens_bound": prompt_tokens_bound(messages, prompt)}}


# A chat field's name as the Responses field it is made from (`max_tokens`: what a backend may be sent).
_RESPONSES_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                    "max_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort",
                    "response_format": "text.format", "logprobs": "include", "verbosity": "text.verbosity"}
# The output limit as the gateway's own messages (budget advice) and upstreams' name it in a message.
_CHAT_OUTPUT_LIMIT = re.compile(r"\bmax_(?:completion_)?tokens\b")


def responses_error(exc: ApiError) -> ApiError:
    """An error of the chat request path (the gateway's own, or an upstream's passed on) about a field
    made from a Responses one, naming it as the client sent it: `param` (`messages` -> `input`) and
    the output limit in the message (advice to send a lower `max_tokens` is `max_output_tokens` here)."""
    if exc.param is not None:
        ours = _responses_param(exc.param)
        exc.message, exc.param = exc.message.replace(f"'{exc.param}'", f"'{ours}'"), ours
    exc.message = _CHAT_OUTPUT_LIMIT.sub("max_output_tokens", exc.message)
    return exc


def failure_code(error: ApiError) -> str:
    """A `response.failed` error's `code`, one of the few OpenAI's schema allows there (it has no `type`
    beside it, and typed SDKs reject other codes): a rate limit (which a client waits out) as
    `rate_limit_exceeded`, any other failure as `server_error`; the message says which."""
    return "rate_limit_exceeded" if error.status == 429 else "server_error"


def _responses_param(param: str) -> str:
    """A chat parameter as the Responses parameter it was made from. Upstreams write an index either
    way (`messages.2.content`, OpenAI's `messages[2].content`); a chat tool's fields are under
    `function`, a Responses tool's are flat (`tools[0].function.parameters` -> `tools[0].parameters`)."""
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    rest = param[len(head):]
    if head in ("tools", "tool_choice"):
        return head + re.sub(r"^((?:\.\d+|\[\d+\])?)\.function\b", r"\1", rest)
    return _RESPONSES_NAMES[head] if head in _RESPONSES_NAMES else param


# -- request: input items -> chat messages ---------------------------------------------------------


def chat_messages(input: str | list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(input, str):
        return [*messages, {"role": "user", "content": input}]
    for i, item in enumerate(input):
        kind = item.get("type", "message")  # an easy input message has no type
        if kind == "message":
            messages.append(_chat_message(item, f"input.{i}"))
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", f"input.{i}"), "type": "function",
                    "function": {"name": _string(item, "name", f"input.{i}"),
                                 "arguments": _string(item, "arguments", f"input.{i}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # one turn's calls go in one assistant message
                last["tool_calls"] = [*(last.get("tool_calls") or []), call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _text_of(output, f"input.{i}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", f"input.{i}"),
                             "content": content})
        elif kind == "reasoning":
            continue  # an earlier answer's thought, sent back with its other output items: chat takes none back
        elif kind == "item_reference":
            raise refuse(f"input.{i}", "Ponder's Responses API is stateless: items are not stored to be referenced; "
                                       "send the item itself")
        else:
            raise refuse(f"input.{i}.type", f"an input item of type {kind!r} is not supported (messages, "
                                            "function_call, function_call_output and reasoning items are)")
    return messages


def _chat_message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise ApiError(400, f"Invalid value for '{param}.role': expected user, system, developer or assistant",
                       param=f"{param}.role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if role == "assistant":  # an earlier answer: its text (and refusal) parts as one string
        return {"role": role, "content": _text_of(content, f"{param}.content")}
    return {"role": role, "content": [_chat_part(part, f"{param}.content.{j}")
                                      for j, part in enumerate(_list(content, f"{param}.content"))]}


def _chat_part(part: Any, param: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": _string(part, "text", param)}
    if kind == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise refuse(param, "an image is taken by `image_url` (a URL or a data URL); a `file_id` names a file "
                                "stored on OpenAI's servers, which a gateway in front of other backends cannot read")
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail") or "auto"}}
    if kind == "input_file":
        if "file_data" not in part:
            raise refuse(param, "a file is taken inline, by `file_data` (a base64 data URL) and its `filename`; a "
                                "`file_id` names a file stored on OpenAI's servers, and a `file_url` one the chat "
                                "backends behind this gateway would have to fetch")
        file = {"file_data": _string(part, "file_data", param)}
        if part.get("filename") is not None:
            file["filename"] = _string(part, "filename", param)
        return {"type": "file", "file": file}  # chat's document part (OpenAI; litellm: Claude, Gemini)
    raise refuse(f"{param}.type", f"a content part of type {kind!r} is not supported (input_text, output_text, "
                                  "input_image with an image_url and input_file with its file_data are)")


def _text_of(content: Any, param: str) -> str:
    """The text of text parts (`input_text`, `output_text`, `refusal`), joined; any other part refused."""
    texts = []
    for j, part in enumerate(_list(content, param)):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(_string(part, "text", f"{param}.{j}"))
        elif kind == "refusal":
            texts.append(_string(part, "refusal", f"{param}.{j}"))
        else:
            raise refuse(f"{param}.{j}.type", f"only text parts are supported here, not {kind!r}")
    return "".join(texts)


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"Invalid value for '{param}': expected a string or a list of content parts",
                       param=param, code="invalid_value")
    return value


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid value for '{param}.{key}': expected a string", param=f"{param}.{key}",
                       code="invalid_value")
    return value


# -- request: tools and formats -----------------------------------------------------------------------


def chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool (flat: type, name, description, parameters, strict) in chat's nested shape."""
    if tool.get("type") != "function":
        kind = tool.get("type")
        why = ("custom (freeform) tools are not translated to chat backends yet" if kind == "custom" else
               f"{kind!r} is a tool OpenAI's servers run, which the backends behind this gateway cannot")
        raise refuse(f"tools.{i}.type", f"only function tools are supported; {why}")
    function = {"name": _string(tool, "name", f"tools.{i}")}
    function.update({key: tool[key] for key in ("description", "parameters", "strict") if tool.get(key) is not None})
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ApiError(400, "Invalid value for 'tool_choice': expected auto, none, required or a function",
                           param="tool_choice", code="invalid_value")
        return choice
    if choice.get("type") == "function":
        return {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    if choice.get("type") == "allowed_tools":  # chat has it too, its tools nested as chat nests a tool
        if choice.get("mode") not in ("auto", "required"):
            raise ApiError(400, "Invalid value for 'tool_choice.mode': expected auto or required",
                           param="tool_choice.mode", code="invalid_value")
        allowed = []
        for i, tool in enumerate(_list(choice.get("tools"), "tool_choice.tools")):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise refuse(f"tool_choice.tools.{i}.type", "only function tools can be allowed; built-in tools run "
                                                          "on OpenAI's servers")
            allowed.append({"type": "function", "function": {"name": _string(tool, "name", f"tool_choice.tools.{i}")}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"], "tools": allowed}}
    raise refuse("tool_choice", f"a tool_choice of type {choice.get('type')!r} is not supported (a function or "
                                "allowed_tools is)")


def chat_response_format(fmt: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None: plain text, chat's default)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise ApiError(400, "Invalid value for 'text.format.schema': a json_schema format needs its schema",
                           param="text.format.schema", code="invalid_value")
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": {"name": "response", **schema}}
    raise ApiError(400, "Invalid value for 'text.format.type': expected text, json_object or json_schema",
                   param="text.format.type", code="invalid_value")


# -- response: chat chunks -> Response and its events ----------------------------------------------


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat `usage` block (every call of the request, summed: streaming.usage_block) in Responses' names."""
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": prompt_details.get("cached_tokens", 0),
                                 "cache_write_tokens": prompt_details.get("cache_write_tokens", 0)},
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": completion_details.get("reasoning_tokens", 0)},
        "total_tokens": usage.get("total_tokens", 0),
    }


# How a chat finish_reason that cut the answer short reads as a Response's incomplete_details.reason.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_DONE_TEXT = {"output_text": ("response.output_text.done", "text"), "refusal": ("response.refusal.done", "refusal"),
              "reasoning_text": ("response.reasoning_text.done", "text")}


class ResponseBuilder:
    """Chat-completion chunks in, a Response out: the output items built as the chunks come, and (with
    `stream`) the Responses events that tell a streaming client so, each with its sequence number."""

    def __init__(self, response_id: str, echo: dict[str, Any], *, stream: bool) -> None:
        self.id = response_id
        self.echo = echo
        self.created_at = int(time.time())
        self.model = ""
        self.output: list[dict[str, Any]] = []
        self.calls: dict[int, dict[str, Any]] = {}  # a chat tool call's index -> its function_call item
        self.finish_reason: str | None = None
        self.frames: list[bytes] | None = [] if stream else None
        self.sequence = 0

    # -- events
    def _emit(self, kind: str, **fields: Any) -> None:
        if self.frames is None:
            return
        event = orjson.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        self.frames.append(b"event: " + kind.encode() + b"\ndata: " + event + b"\n\n")

    def take(self) -> bytes:
        """The events emitted since the last take, as one write."""
        assert self.frames is not None
        frames, self.frames = self.frames, []
        return b"".join(frames)

    def response(self, status: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "model": self.model, "output": self.output if status != "in_progress" else [], "error": None,
                "incomplete_details": None, "usage": None, **self.echo, **fields}

    def start(self) -> None:
        self._emit("response.created", response=self.response("in_progress"))
        self._emit("response.in_progress", response=self.response("in_progress"))

    # -- chunks
    def feed(self, chunk: dict[str, Any]) -> None:
        self.model = self.model or chunk.get("model") or ""
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # a Response has one answer (no `n`)
            delta = choice.get("delta") or {}
            # one thought: a server that writes it under both names (vLLM during the rename) says it once
            thought = next((delta[key] for key in REASONING_FIELDS if isinstance(delta.get(key), str)), "")
            if thought:
                self._reasoning(thought)
            logprobs = (choice.get("logprobs") or {}).get("content") or []  # asked for: `include`
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                if delta.get(key):
                    self._text(kind, delta[key], logprobs if kind == "output_text" else [])
            for call in delta.get("tool_calls") or ():
                self._tool_call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def _text(self, kind: str, piece: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        item = self.output[-1] if self.output else None
        if item is None or item["type"] != "message" or item["status"] != "in_progress":
            item = self._add({"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                              "status": "in_progress", "content": []})
        index = self.output.index(item)
        if not item["content"] or item["content"][-1]["type"] != kind:
            if item["content"]:
                self._close_part(item, index)
            part = {"type": kind, kind if kind == "refusal" else "text": ""}
            if kind == "output_text":
                part.update(annotations=[], logprobs=[])
            item["content"].append(part)
            self._emit("response.content_part.added", item_id=item["id"], output_index=index,
                       content_index=len(item["content"]) - 1, part=part)
        part = item["content"][-1]
        field = "refusal" if kind == "refusal" else "text"
        part[field] += piece
        if kind == "output_text":
            logprobs = [_logprob(entry) for entry in logprobs or ()]
            part["logprobs"] += logprobs
        delta = {"logprobs": logprobs} if kind == "output_text" else {}
        self._emit(f"response.{'refusal' if kind == 'refusal' else 'output_text'}.delta", item_id=item["id"],
                   output_index=index, content_index=len(item["content"]) - 1, delta=piece, **delta)

    def _reasoning(self, piece: str) -> None:
        """The backend's chain of thought, as a `reasoning` item's `reasoning_text` content (what
        OpenAI's open-weight models and vLLM's Responses API return): it is the thought itself, not a
        `summary` of it, which no backend writes."""
        item = self.output[-1] if self.output else None
        if item is None or item["type"] != "reasoning" or item["status"] != "in_progress":
            item = self._add({"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "status": "in_progress",
                              "summary": [], "content": []})
            item["content"].append({"type": "reasoning_text", "text": ""})
            self._emit("response.content_part.added", item_id=item["id"], output_index=self.output.index(item),
                       content_index=0, part=item["content"][0])
        item["content"][0]["text"] += piece
        self._emit("response.reasoning_text.delta", item_id=item["id"], output_index=self.output.index(item),
                   content_index=0, delta=piece)

    def _tool_call(self, call: dict[str, Any]) -> None:
        function = call.get("function") or {}
        item = self.calls.get(call.get("index", 0))
        if item is None:
            item = self._add({"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                              "call_id": call.get("id") or f"call_{uuid.uuid4().hex}",
                              "name": function.get("name") or "", "arguments": ""})
            self.calls[call.get("index", 0)] = item
        elif function.get("name") and not item["name"]:
            item["name"] = function["name"]
        if arguments := function.get("arguments"):
            if not isinstance(arguments, str):  # an object, as some servers write it: a Response's are JSON text
                arguments = orjson.dumps(arguments).decode()
            item["arguments"] += arguments
            self._emit("response.function_call_arguments.delta", item_id=item["id"],
                       output_index=self.output.index(item), delta=arguments)

    def _add(self, item: dict[str, Any]) -> dict[str, Any]:
        # Parallel function calls stay open together until the answer ends: a server may interleave
        # their arguments (call 0, call 1, call 0 again), and no delta may follow its item's `.done`.
        self._close_items(keep_calls=item["type"] == "function_call")
        self.output.append(item)
        self._emit("response.output_item.added", output_index=len(self.output) - 1,
                   item={**item, "arguments": ""} if item["type"] == "function_call" else {**item, "content": []})
        return item

    def _close_part(self, item: dict[str, Any], index: int) -> None:
        part = item["content"][-1]
        kind, field = _DONE_TEXT[part["type"]]
        extra = {"logprobs": part["logprobs"]} if part["type"] == "output_text" else {}
        self._emit(kind, item_id=item["id"], output_index=index, content_index=len(item["content"]) - 1,
                   **{field: part[field]}, **extra)
        self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                   content_index=len(item["content"]) - 1, part=part)

    def _close_items(self, status: str = "completed", *, keep_calls: bool = False) -> None:
        """Every output item still being written, finished in output order (`keep_calls`: but function calls)."""
        for item in self.output:
            if item["status"] == "in_progress" and not (keep_calls and item["type"] == "function_call"):
                self._close_item(item, status)

    def _close_item(self, item: dict[str, Any], status: str) -> None:
        index = self.output.index(item)
        if item["type"] in ("message", "reasoning"):
            self._close_part(item, index)
        else:
            self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       name=item["name"], arguments=item["arguments"])
        item["status"] = status
        self._emit("response.output_item.done", output_index=index, item=item)

    # -- endings
    def finish(self, usage: dict[str, Any], ponder: dict[str, Any]) -> dict[str, Any]:
        """The answer is complete: the Response, with the request's usage (every call it made)."""
        reason = INCOMPLETE.get(self.finish_reason or "")
        if not self.output:  # an empty answer is an empty message, not no output at all
            self._text("output_text", "")
        self._close_items("incomplete" if reason else "completed")
        if reason:
            response = self.response("incomplete", incomplete_details={"reason": reason})
        else:
            response = self.response("completed", completed_at=int(time.time()))
        response.update(usage=responses_usage(usage), ponder=ponder)
        self._emit(f"response.{response['status']}", response=response)
        return response

    def fail(self, message: str, code: str = "server_error") -> None:
        """The answer broke off (after the stream started): `response.failed`, never a completion."""
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        self._emit("response.failed", response=self.response("failed", error={"code": code, "message": message}))


def _logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """A chat token logprob as a Response's (the same fields; `bytes` a list, never null as chat allows)."""
    def token(t: dict[str, Any]) -> dict[str, Any]:
        return {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes") or []}
    return {**token(entry), "top_logprobs": [token(t) for t in entry.get("top_logprobs") or ()]}


class ResponsesWire:
    """The Responses API's side of the request path (gateway/wire.py, `Wire`)."""

    id_prefix = "resp_"

    def __init__(self, req: ChatRequest, echo: dict[str, Any]) -> None:
        self.req = req
        self.echo = echo

    def _build(self, completion: dict[str, Any], *, stream: bool) -> tuple[ResponseBuilder, dict[str, Any]]:
        builder = ResponseBuilder(completion["id"], self.echo, stream=stream)
        builder.model = completion.get("model") or ""  # `response.created` says it, as a relayed stream's does
        builder.start()
        for chunk in completion_to_chunks(completion, include_usage=False):
            builder.feed(chunk)
        return builder, builder.finish(completion["usage"], completion["ponder"])

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        return self._build(completion, stream=False)[1]

    def synthesized(self, completion: dict[str, Any]) -> list[bytes]:
        return [self._build(completion, stream=True)[0].take()]

    def error(self, error: ApiError) -> ApiError:
        return responses_error(error)

    def stream_error(self, request_id: str, error: ApiError) -> bytes:
        builder = ResponseBuilder(request_id, self.echo, stream=True)
        builder.start()
        error = responses_error(error)
        builder.fail(error.message, failure_code(error))
        return builder.take()

    async def relay(self, passthrough: PassThrough, caller: Caller, request_id: str,
                    extension: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
        builder = ResponseBuilder(request_id, self.echo, stream=True)
        builder.model = (passthrough.first[1] or {}).get("model") or ""  # the first chunk is in already
        builder.start()
        yield builder.take()
        async with contextlib.aclosing(passthrough.chunks(caller)) as chunks:
            try:
                async for _, parsed in chunks:
                    if parsed:
                        builder.feed(parsed)
                        if frames := builder.take():
                            yield frames
            except UpstreamError as exc:
                builder.fail(f"The upstream stream broke before the answer was complete: {exc.message}")
                yield builder.take()
                return
        builder.finish(usage_block(caller.calls), extension())
        yield builder.take()
