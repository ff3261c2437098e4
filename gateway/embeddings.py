"""The OpenAI embeddings API (`POST /v1/embeddings`): a pass-through to the backend the client names.

An embedding has no effort and no strategy, so nothing is classified, decided or learned: the request's
`model` names a configured backend (Gateway.embedding_backend), the body goes to it as sent (fast path
or litellm, Backend.embed), under the chat path's rules for retries, cool-downs, deadline and errors
(Caller.embed). Money is accounted as for chat: a key with a budget holds the input's worst case
first, and settles to `usage.prompt_tokens` x the backend's input price; the event recorded for it is
billed (spend rollups, budgets, metrics) but marked as no arm's outcome (telemetry.events.EMBEDDING_TASK).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.auth import Principal
from gateway.backends import Backend
from gateway.errors import ApiError
from gateway.prices import call_cost
from gateway.schemas import is_type_tag
from gateway.usage import CallRecord
from router.estimates import estimate_input_tokens, input_tokens_bound
from telemetry.events import EMBEDDING_TASK, Event

MAX_INPUTS = 2048  # inputs in one request, as OpenAI takes at most
INPUT_FORMS = "expected a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists"
ID_PREFIX = "emb-"  # of the request id (the x-ponder-request-id header): an embedding's answer has no id


class _EmbeddingsBody(BaseModel):
    """OpenAI's fields, strictly typed; others (a provider's own, vLLM's `truncate_prompt_tokens`) pass."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    input: Any  # checked by separate_inputs
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


@dataclass(slots=True)
class EmbeddingRequest:
    body: dict[str, Any]  # as the client sent it, less fields sent as null
    model: str
    inputs: int  # how many


def parse_embeddings_request(body: dict[str, Any]) -> EmbeddingRequest:
    body = {key: value for key, value in body.items() if value is not None}  # null: the default, as in chat
    try:
        parsed = _EmbeddingsBody.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not is_type_tag(p)) or None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value") from None
    items = separate_inputs(parsed.input)
    if not items or not all(items):
        raise ApiError(400, "Invalid value for 'input': an input may not be empty.", param="input",
                       code="invalid_value")
    if len(items) > MAX_INPUTS:
        raise ApiError(400, f"Invalid value for 'input': at most {MAX_INPUTS} inputs in one request, got "
                            f"{len(items)}; send them in several requests.", param="input", code="invalid_value")
    return EmbeddingRequest(body, parsed.model, len(items))


def separate_inputs(value: Any) -> list:
    """`input` as its inputs (one string or one list of token ids is one): a string, strings, token ids,
    or lists of token ids (never negative, as OpenAI checks). Checked here, stopping at the first wrong
    item: pydantic's union of lists would build an error per item for each form it tries, tens of
    seconds of the event loop for the 2 million token ids of a 4 MiB body with one wrong."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if all(type(item) is str for item in value):
            return value
        if _token_ids(value):
            return [value]
        if all(type(item) is list and _token_ids(item) for item in value):
            return value
    raise ApiError(400, f"Invalid value for 'input': {INPUT_FORMS}", param="input", code="invalid_value")


def _token_ids(items: list) -> bool:
    return all(type(item) is int and item >= 0 for item in items)  # not a bool, as pydantic's strict int


def worst_case_usd(backend: Backend, req: EmbeddingRequest) -> float:
    """What a key's budget holds while the request runs: the input at its bound (UTF-8 bytes; token ids
    exactly), each input at most the model's window, at the backend's input price."""
    return call_cost(backend.prices, input_tokens_bound(req.body["input"], backend.max_context), 0)


def estimated_usd(backend: Backend, req: EmbeddingRequest) -> float:
    """The input at its estimate (4 characters a token; token ids exactly) at the backend's input price:
    what the request's cost caps are held to, as a chat prompt's estimate is."""
    return call_cost(backend.prices, estimate_input_tokens(req.body["input"]), 0)


def what_fits(usd: float, where: str, only_if_fits: bool) -> str:
    """The advice of a budget refusal (KeyBudgets.hold): no input is cheaper to send in pieces, so only
    a whole budget too small for it says anything."""
    return "" if only_if_fits else "send fewer or shorter inputs: each holds a token per UTF-8 byte until it is billed"


def new_request_id() -> str:
    return f"{ID_PREFIX}{uuid.uuid4().hex}"


def embedding_event(request_id: str, ts: float, started: float, principal: Principal, backend: Backend,
                    req: EmbeddingRequest, calls: list[CallRecord], *, status: int,
                    error: str | None = None) -> Event:
    """The request's event: spend, tokens, latency and status as for chat; task `embedding` keeps it out of
    the learner's and the routing views' per-arm stats, and policy `direct` out of explore/exploit."""
    return Event(
        request_id=request_id, ts=ts, key_id=principal.key_id, policy="direct", alias=req.model,
        task=EMBEDDING_TASK, arm=backend.name, strategy="embedding",
        reasons=[f"client named backend {backend.name!r} for embeddings"],
        calls=[c.as_dict() for c in calls],
        prompt_tokens=sum(c.prompt_tokens for c in calls),
        cost_usd=sum(c.cost_usd for c in calls),
        estimated_prompt_tokens=estimate_input_tokens(req.body["input"]),
        latency_ms=(time.perf_counter() - started) * 1000,
        status=status, error=error, details={"inputs": req.inputs},
    )
