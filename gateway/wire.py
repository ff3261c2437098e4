"""What an answer of the request path carries, and the `Wire` that writes it in an API's format: the
`x-ponder-*` headers, the `x-ponder-cost-usd` of its calls, the opt-in `Server-Timing`, the `ponder`
extension, and the chat-completions API's own Wire (the Responses API's is gateway/responses.py's).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, Protocol

from gateway.calls import Caller
from gateway.errors import ApiError, request_id_headers
from gateway.schemas import ChatRequest
from gateway.service import Plan
from gateway.strategies import StrategyResult
from gateway.streaming import DONE, PassThrough, completion_to_chunks, sse, usage_block
from router.types import Arm


def plan_headers(plan: Plan) -> dict[str, str]:
    decision = plan.decision
    return {
        **request_id_headers(plan.request_id),
        "x-ponder-arm": decision.arm.key,
        "x-ponder-task": decision.task,
        "x-ponder-difficulty": f"{decision.difficulty:.3f}",
        "x-ponder-policy": decision.policy,
    }


def cost_header(caller: Caller) -> dict[str, str]:
    """`x-ponder-cost-usd`: what this request's calls were billed. An error answer carries it too: a
    call cut off by a timeout or the deadline is billed its prompt, and the client is owed the figure."""
    return {"x-ponder-cost-usd": decimal_usd(sum(c.cost_usd for c in caller.calls))}


def decimal_usd(amount: float) -> str:
    """The shortest decimal that reads back as `amount` (`float()` of it is the body's `cost_usd`
    exactly), written without an exponent: a fixed 8 decimals wrote a $1e-9 request as 0.00000000, and
    repr's `1e-09` is no decimal to a client that parses the header as one (docs/api.md)."""
    shortest = repr(amount)
    return shortest if "e" not in shortest else format(Decimal(shortest), "f")


def server_timing(plan: Plan, caller: Caller, received: float, executing: float | None = None, *,
                  finished_calls: bool = True) -> str:
    """The `Server-Timing` header (opt-in, `server_timing: true`): where this request's time went, in ms.
    `execute` is the strategy's wall time (for a relayed stream: until the first chunk); `upstream`
    sums the finished calls' latencies (parallel samples overlap)."""
    now = time.perf_counter()
    parts = [f"classify;dur={plan.classify_s * 1000:.3f}", f"decide;dur={plan.decide_s * 1000:.3f}"]
    if executing is not None:
        if finished_calls:
            upstream_ms = sum(call.latency_ms for call in caller.calls)
            parts.append(f'upstream;dur={upstream_ms:.3f};desc="{len(caller.calls)} call(s)"')
        parts.append(f"execute;dur={(now - executing) * 1000:.3f}")
    parts.append(f"total;dur={(now - received) * 1000:.3f}")
    return ", ".join(parts)


def extension(plan: Plan, caller: Caller, result: StrategyResult | None, served: Arm | None = None) -> dict[str, Any]:
    """`served`: the arm that answered where no result says so (a relayed stream)."""
    arm = result.arm if result else served or plan.decision.arm
    details = result.details if result else {}
    extra: dict[str, Any] = {"max_tokens_sent": plan.output_caps} if plan.output_caps else {}  # only where added
    if any(call.usage_estimated for call in caller.calls):  # an upstream answered without usage
        extra["usage_estimated"] = True
    return {
        "request_id": plan.request_id,
        "arm": arm.key,
        "strategy": arm.strategy,
        "effort": arm.effort,
        "task": plan.decision.task,
        "difficulty": round(plan.decision.difficulty, 4),
        "explore": plan.explored(arm),
        "calls": len(caller.calls),
        "samples": details.get("samples", 1),
        "votes": details.get("votes"),
        "confidence": result.confidence if result else None,
        "cost_usd": sum(c.cost_usd for c in caller.calls),
        **extra,
    }


def finish_response(plan: Plan, caller: Caller, result: StrategyResult) -> dict[str, Any]:
    response = result.response
    response["id"] = plan.request_id  # so clients can send feedback on `completion.id`
    response["usage"] = usage_block(caller.calls)
    response["ponder"] = extension(plan, caller, result)
    return response


class Wire(Protocol):
    """One API at the edge of the shared request path: the internal chat request read from its body
    (`req`), and the chat answer written back in its format."""

    req: ChatRequest
    id_prefix: str  # of the request id, which is also the answer's `id` (feedback takes it)

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A finished chat.completion (our id, usage and `ponder` set) as this API's JSON answer."""
        ...

    def synthesized(self, completion: dict[str, Any]) -> list[bytes]:
        """A finished chat.completion as this API's SSE frames, whole stream."""
        ...

    def error(self, error: ApiError) -> ApiError:
        """An error of the shared path as this API names the request's fields (`param`)."""
        ...

    def stream_error(self, request_id: str, error: ApiError) -> bytes:
        """A failure after the stream's headers, as this API's SSE error."""
        ...

    def relay(self, passthrough: PassThrough, caller: Caller, request_id: str,
              extension: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
        """An upstream stream translated chunk by chunk as it arrives (billed by `passthrough.chunks`)."""
        ...


class ChatWire:
    """The chat-completions API: the body is the request, and the answer goes back as it came."""

    id_prefix = "chatcmpl-"

    def __init__(self, req: ChatRequest) -> None:
        self.req = req

    def answer(self, completion: dict[str, Any]) -> dict[str, Any]:
        return completion

    def synthesized(self, completion: dict[str, Any]) -> list[bytes]:
        return [*map(sse, completion_to_chunks(completion, include_usage=self.req.include_usage)), DONE]

    def error(self, error: ApiError) -> ApiError:
        return error

    def stream_error(self, request_id: str, error: ApiError) -> bytes:
        return sse(error.body())

    def relay(self, passthrough: PassThrough, caller: Caller, request_id: str,
              extension: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
        return passthrough.events(caller, request_id=request_id, include_usage=self.req.include_usage,
                                  extension=extension)
