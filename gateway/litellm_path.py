"""The litellm path: a backend's calls to every provider the fast path does not call (Anthropic, Gemini,
Bedrock, ...), and the rules that keep a client's body from steering them (litellm's own options,
what litellm would drop without a word). litellm itself, what it knows of a model and its errors'
mapping are gateway/litellm_calls.py's.

`LitellmPath` is that part of gateway/backends.py's Backend (its spec and names are set up there).
"""

from __future__ import annotations

import base64
import functools
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.effort import fit_claude_thinking, thoughts_left_out
from gateway.litellm_calls import (
    StreamEnd, claude_thinking, litellm_error, litellm_module, sends_embedding_dimensions, supported_openai_params,
)
from gateway.upstream_errors import UpstreamError

# What a client asks to get back in the answer, by the litellm parameters that carry it to a provider
ANSWER_PARAMS = {"logprobs": ("logprobs",), "audio": ("audio", "modalities")}
# litellm takes a keyword argument it knows as its own option, however it got there: a body field
# named like one would choose where the call goes and with what key (`base_url`, `api_key`), its headers,
# an OpenAI organization to bill, retries, a mock answer. Its list (all_litellm_params) has most; these are
# its call's own arguments and OpenAI client options it maps, and what it reads from its keyword arguments
# outside that list: logging callbacks (`callbacks: ["generic_api"]` registered one for every later call of
# the process), a mock answer of tool calls (made up, no upstream call), which parameters to drop; providers'
# credentials and endpoints go by prefix (Bedrock's `aws_sts_endpoint`, Vertex's `vertex_credentials`,
# Azure's `azure_ad_token`, GigaChat's `gigachat_auth_url`), as do its private switches (`_skip_mcp_handler`).
LITELLM_OPTIONS = frozenset({"base_url", "api_base", "api_key", "api_type", "api_version", "organization",
                             "extra_headers", "default_headers", "custom_llm_provider", "deployment_id",
                             "model_list", "shared_session", "client", "timeout", "max_retries", "num_retries",
                             "enable_json_schema_validation", "logger_fn", "caching", "litellm_call_id",
                             "callbacks", "success_callback", "failure_callback", "mock_tool_calls", "mock_delay",
                             "drop_params", "additional_drop_params", "original_function"})
LITELLM_OPTION_PREFIXES = ("aws_", "vertex_", "azure_", "litellm_", "gigachat_", "_")
# OpenAI's own fields that litellm also reads (its logging `metadata`): a client sends them as to OpenAI
OPENAI_FIELDS_LITELLM_READS = frozenset({"metadata", "user"})


class LitellmPath:
    """Backend's calls through litellm: chat, streamed chat and embeddings."""

    def _litellm_params(self, body: dict[str, Any], leave_out: tuple[str, ...]) -> dict[str, Any]:
        params = {k: v for k, v in body.items() if k not in leave_out}
        self._refuse_litellm_options(params)
        self._refuse_what_would_be_dropped(params)
        if self.claude:
            params = fit_claude_thinking(params, claude_thinking(params, self.upstream_model),
                                         thoughts_left_out=thoughts_left_out(params.get("messages") or []))
        return params

    def _refuse_litellm_options(self, params: dict[str, Any]) -> None:
        """A client's field that litellm would take as its own option (LITELLM_OPTIONS) is refused, as
        OpenAI refuses a field it does not have, before any call: the backend's address and key are the
        operator's, never a client's to redirect or read."""
        for name in params:
            if name in _litellm_options() or name.startswith(LITELLM_OPTION_PREFIXES):
                raise UpstreamError(self.name, 400, f"Unrecognized request argument supplied: {name}",
                                    retryable=False, code="unknown_parameter", param=name)

    def _refuse_what_would_be_dropped(self, params: dict[str, Any]) -> None:
        """litellm drops a parameter the provider does not have (`drop_params`: a sampling knob one
        provider lacks must not fail the call), but an answer asked for logprobs or audio would come
        back without them, and without a word: refused instead, with OpenAI's code for it, before
        any call (Claude, Mistral and Bedrock give no logprobs, and speak no audio)."""
        asked = {"logprobs": params.get("logprobs") or params.get("top_logprobs"),
                 "audio": params.get("audio") or "audio" in (params.get("modalities") or ())}
        if not any(asked.values()):
            return
        supported = supported_openai_params(self.spec.model)
        for name, wanted in asked.items():
            # what litellm sends the provider for it: `logprobs`; `audio` or output `modalities`. A provider
            # litellm has no list for (None) is sent what it is asked, and answers for it.
            if wanted and supported is not None and supported.isdisjoint(ANSWER_PARAMS[name]):
                raise UpstreamError(self.name, 400, f"{self.name} ({self.spec.model}) cannot give {name}, which the "
                                                    f"request asks for: leave '{name}' out, or ask a backend that can.",
                                    retryable=False, code="unsupported_parameter", param=name)

    async def _complete_litellm(self, body: dict[str, Any]) -> dict[str, Any]:
        litellm = litellm_module()
        params = self._litellm_params(body, ("model", "stream", "stream_options"))
        try:
            response = await litellm.acompletion(**self._litellm_target(), **params)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            raise litellm_error(self.name, exc) from None
        return response.model_dump(exclude_none=True)

    def _litellm_target(self) -> dict[str, Any]:
        """What every litellm call of this backend is given: its model, endpoint and key, its timeout, and
        no retries of litellm's own (gateway/calls.py decides those)."""
        if self.spec.api_key_env:
            api_key = os.environ.get(self.spec.api_key_env)
        else:
            # A self-hosted endpoint with no key configured (as the fast path sends none): provider SDKs
            # behind litellm refuse to call without some key, and such a server ignores it.
            api_key = "no-key" if self.spec.api_base else None
        return {"model": self.spec.model, "api_base": self.spec.api_base, "api_key": api_key,
                "timeout": self.spec.timeout_s, "num_retries": 0}

    async def _stream_litellm(self, body: dict[str, Any]) -> AsyncIterator[tuple[bytes, dict | None]]:
        litellm = litellm_module()
        params = self._litellm_params(body, ("model",))
        try:
            response = await litellm.acompletion(**self._litellm_target(), **params)
            end = StreamEnd(response, self.spec.model)
            async for chunk in response:
                parsed = chunk.model_dump(exclude_none=True)
                _no_empty_content_beside_calls(parsed)
                # litellm writes its finish_reason chunk once the provider's body has ended: the answer
                # is complete only if the provider said so (StreamEnd), as [DONE] says it on the fast path
                if end.cut and any(choice.get("finish_reason") for choice in parsed.get("choices") or ()):
                    raise self._stream_ended_early()
                yield orjson.dumps(parsed), parsed
            if end.cut:
                raise self._stream_ended_early()
        except UpstreamError:
            raise
        except Exception as exc:
            raise litellm_error(self.name, exc) from None

    def _stream_ended_early(self) -> UpstreamError:
        return UpstreamError(self.name, 502, f"{self.name}: stream ended early, without the provider's end of the "
                                             f"answer", retryable=True)

    async def _embed_litellm(self, body: dict[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in body.items() if k != "model"}
        self._refuse_litellm_options(params)
        if params.get("dimensions") is not None and not sends_embedding_dimensions(self.spec.model):
            raise UpstreamError(self.name, 400, f"{self.name} ({self.spec.model}) cannot shorten its vectors, which "
                                                f"'dimensions' asks for: leave 'dimensions' out, or ask a backend that can.",
                                retryable=False, code="unsupported_parameter", param="dimensions")
        # Floats are asked for whatever the client wants: litellm maps `base64` (the openai SDK's default)
        # onto each provider's own idea of it, and Bedrock's Titan then answers its binary embedding,
        # one 0 or 1 a dimension, as the vector; Gemini's and others' drop it. Encoded here as OpenAI does.
        base64_asked = params.pop("encoding_format", None) == "base64"
        try:
            # embedding() reads no `num_retries`, only `max_retries` (see also litellm_module)
            response = await litellm_module().aembedding(**self._litellm_target(), max_retries=0, **params)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            raise litellm_error(self.name, exc) from None
        data = response.model_dump(exclude_none=True)
        if base64_asked:
            for item in data.get("data") or ():
                if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                    item["embedding"] = _float32_base64(item["embedding"])
        return data


def _float32_base64(vector: list[float]) -> str:
    """A vector as OpenAI's `encoding_format: "base64"` writes it: little-endian float32s, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@functools.cache
def _litellm_options() -> frozenset[str]:
    """The names litellm takes as its own call options, less OpenAI's fields it also reads."""
    return frozenset(LITELLM_OPTIONS | set(litellm_module().types.utils.all_litellm_params)) - OPENAI_FIELDS_LITELLM_READS


def _no_empty_content_beside_calls(chunk: dict[str, Any]) -> None:
    """litellm streams Claude's tool calls with `content: ""` in each delta: the SDK's stream helper then
    gave apps "" as the content beside the call, where OpenAI streams (and the JSON answer has) none."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("tool_calls") and delta.get("content") == "":
            del delta["content"]
