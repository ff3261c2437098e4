"""Strategy orchestration: the I/O around the router's judgements.

Each strategy takes an arm and the request, makes its calls through the request's `Caller`, and
returns one OpenAI-format answer. Which sample wins, whether sampling may stop, whether a cascade
escalates, how an answer is extracted: those are pure functions in router/ (the same ones evals/
replays), so this module only decides *when* to call, never *what counts*.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.backends import Backend, UpstreamError
from gateway.calls import Caller
from gateway.effort import apply_effort, lowest_effort
from policies.backends import BackendSpec
from policies.thinking import thinks_at
from router import cascade, prompts, stopping, voting
from router.estimates import estimate_prompt_tokens
from router.types import TASK_TYPES, Arm, ArmStats

# Knobs a strategy reads from the policy's arm parameters, with their defaults.
DEFAULT_PARAMS: dict[str, Any] = {
    "temperature": 0.7,  # sampling temperature for multi-sample strategies when the client set none (or 0)
    "confidence": 0.8,  # adaptive consistency: stop when P(leader is the majority) >= this
    "wave": 4,  # adaptive consistency: at most this many samples per wave
    "max_concurrency": 8,  # parallel calls per request
    "escalate_below": 0.6,  # cascade: escalate when confidence is below this
    "min_gain": stopping.DEFAULT_MIN_GAIN,  # adaptive: answer with one sample where a vote gains less
}


@dataclass
class StrategyResult:
    response: dict[str, Any]
    arm: Arm
    confidence: float | None = None
    confidence_source: str | None = None  # "vote" | "verifier" | "stated" | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class StrategyContext:
    task: str
    params: dict[str, Any]
    caller: Caller
    # the learner's stats of the request's bucket (arm key -> ArmStats): adaptive consistency reads
    # the bucket's value of a vote from them (router.stopping.bucket_sample_value)
    bucket_stats: Mapping[str, ArmStats] = field(default_factory=dict)
    last_sample_error: UpstreamError | None = None  # why the last dropped sample failed
    # backend -> the output limit the gateway sends with the client's body where the client set none
    # (output_bound: a key with a budget, a backend whose maximum output is unknown); empty for others
    output_caps: Mapping[str, int] = field(default_factory=dict)

    def param(self, name: str) -> Any:
        return self.params.get(name, DEFAULT_PARAMS.get(name))


async def run_arm(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    runner = _RUNNERS.get(arm.strategy)
    if runner is None:
        raise ValueError(f"unknown strategy {arm.strategy!r}")
    return await runner(arm, body, ctx)


# -- what a strategy sends (also what the budget holds for it: cost_bounds.worst_case_usd) -----------

# The output tokens a call is held to when neither the client (max_tokens) nor the backend
# (max_output_tokens, declared or from litellm's map) bounds it; for a key with a budget the gateway
# then sends this length as the call's limit, so that what is held is a bound.
DIRECT_OUTPUT_TOKENS = 1024
REASONING_OUTPUT_TOKENS = 8192
JUDGE_OUTPUT_TOKENS = 16  # a best-of-N judge writes a score: sent as its max_tokens
# A judge that thinks (a reasoning model, even at its lowest effort) spends its thinking out of the same
# limit: with 16 tokens gpt-5 or o4-mini never reaches the score, and best-of-N answered with its first
# sample at N times the cost. Such a judge gets this much more room.
JUDGE_THINKING_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class OutputBound:
    """The most output tokens one call may write, where that number comes from, and whether the
    gateway sends it as the call's limit."""

    tokens: int
    source: str  # "max_tokens": the client's; "backend": the backend's maximum output; "default": ours
    sent: bool = False


def output_bound(backend: Backend, client_max: int | None, *, capped: bool) -> OutputBound:
    """The one rule for how long a call's answer may be, as a budget holds it (cost_bounds.worst_case_usd)
    and as strategies send it (`StrategyContext.output_caps`). `capped`: the request's key has a
    budget, which must hold the request's true worst case.

    - The client's max_tokens (or max_completion_tokens) bounds every call.
    - Without one, for a key with a budget: the backend's maximum output when known; when it is not, a
      default length (1024, 8192 for a reasoning backend), *sent* to the upstream as the limit so the
      hold is a bound (not for a backend whose output is free: nothing to bound).
    - A key without a budget holds nothing, and nothing is added to its requests: the default length is
      only the worst case a named backend's per-request cost caps are checked against, as always."""
    if client_max is not None:
        return OutputBound(client_max, "max_tokens")
    if capped and backend.max_output is not None:
        return OutputBound(backend.max_output, "backend")
    default = REASONING_OUTPUT_TOKENS if backend.spec.reasoning else DIRECT_OUTPUT_TOKENS
    return OutputBound(default, "default", sent=capped and backend.prices.output_per_mtok > 0)


def judge_output_tokens(spec: BackendSpec) -> int:
    """The output limit a best-of-N judge on this backend is sent (and a budget holds for it)."""
    return JUDGE_OUTPUT_TOKENS + (JUDGE_THINKING_TOKENS if thinks_at(spec, lowest_effort(spec)) else 0)


def judge_body(spec: BackendSpec, question: str, answer: str,
               media: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A best-of-N judge's call: the rubric, question (with its images: `media`) and answer, at the
    judge's lowest effort (a score needs no long thinking) and with room for what that effort still thinks."""
    body = apply_effort({"messages": prompts.judge_messages(question, answer, media=media), "temperature": 0},
                        spec, lowest_effort(spec))
    return with_output_limit(body, spec, judge_output_tokens(spec))


def with_output_limit(body: dict[str, Any], spec: BackendSpec, tokens: int | None) -> dict[str, Any]:
    """The body with `tokens` as its output limit where the client set none (the input is not
    modified): `max_completion_tokens` for a reasoning backend (OpenAI's reasoning models refuse
    `max_tokens`; a basic backend is sent it as `max_tokens`), else `max_tokens`."""
    if tokens is None or "max_tokens" in body or "max_completion_tokens" in body:
        return body
    return {**body, ("max_completion_tokens" if spec.reasoning else "max_tokens"): tokens}


def uses_cot(arm: Arm, spec: Any, params: Mapping[str, Any]) -> bool:
    """Whether this arm's samples carry the reasoning instruction: `cot` always; votes when the
    backend does not reason on its own (or the arm says so with `cot`)."""
    if arm.strategy == "cot":
        return True
    return arm.strategy in ("self_consistency", "adaptive_consistency") and bool(params.get("cot", not spec.reasoning))


def first_stage(arm: Arm) -> Arm:
    """A cascade's own answer, before any escalation: one call, or a vote of its n samples."""
    return Arm(arm.backend, "single" if arm.n <= 1 else "self_consistency", arm.effort, max(1, arm.n))


@functools.lru_cache(maxsize=64)
def cot_instruction_tokens(template: str | None = None, count: Callable[..., int] = estimate_prompt_tokens) -> int:
    """The most tokens the reasoning instruction adds to a prompt, whatever the task, as `count` counts
    prompts (the estimate, or a budget's bound)."""
    return max(count([{"role": "user", "content": prompts.cot_instruction(task, template)}]) for task in TASK_TYPES)


# -- request bodies ---------------------------------------------------------------------------------


def _sample_body(arm: Arm, body: dict[str, Any], ctx: StrategyContext, *, sample: int = 0,
                 n: int = 1, diverse: bool = False, cot: bool = False) -> dict[str, Any]:
    backend = ctx.caller.backend(arm.backend)
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n")}
    if n > 1:
        out["n"] = n
    if diverse:
        if out.get("temperature") in (None, 0):
            out["temperature"] = ctx.param("temperature")
        # Seeded samples: some servers (llama.cpp) ignore `n` and would repeat one greedy answer.
        out["seed"] = _seed(int(body.get("seed") or 0) * 1000 + sample)
    elif sample and body.get("seed") is not None:
        # A client's `n` sent as separate calls: its one seed would make every choice the same one.
        out["seed"] = _seed(int(body["seed"]) + sample)
    if cot:
        out["messages"] = prompts.with_cot_instruction(body["messages"], ctx.task, ctx.params.get("cot_template"))
        out.pop("stop", None)  # the client's stop sequences end the reply after the chain (_ended_at_stop)
    out = apply_effort(out, backend.spec, arm.effort)
    return with_output_limit(out, backend.spec, ctx.output_caps.get(arm.backend))


def _seed(value: int) -> int:
    """A derived seed kept in int64, which providers' `seed` is: a client's seed near the top of
    the range must not become a 400 upstream."""
    return value % (2**63)


def _texts(response: dict[str, Any]) -> list[str]:
    return [(c.get("message") or {}).get("content") or "" for c in response.get("choices") or []]


# -- single and cot ---------------------------------------------------------------------------------


async def _single(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    n = int(body.get("n") or 1)
    backend = ctx.caller.backend(arm.backend)
    if n == 1 or backend.spec.supports_n:
        response = await ctx.caller.complete(arm.backend, _sample_body(arm, body, ctx, n=n))
        response = await _with_all_choices(arm, body, ctx, response, n)
    else:
        responses = await _gather_samples(arm, body, ctx, count=n, diverse=False)
        responses += (await _missing_choices(arm, body, ctx, responses, client_n=n, first=n, diverse=False))[0]
        if not responses:
            raise _every_sample_failed(arm.backend, ctx)
        response = _merge_choices(responses)
    _require_choices(arm, response)
    # samples are the answers drawn: a failed attempt before them (retried) is a call, not a sample
    return StrategyResult(response, arm, cascade.stated_confidence(_texts(response)[0]), "stated",
                          {"samples": len(response["choices"])})


def _require_choices(arm: Arm, response: dict[str, Any]) -> None:
    """A one-answer strategy's answer with no choices (a 200 some servers send under load) is a failed
    call: the next arm answers. Multi-sample strategies count such answers as failed samples instead."""
    if not response.get("choices"):
        raise UpstreamError(arm.backend, 502, f"{arm.backend}: upstream answer has no choices", retryable=False)


async def _cot(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    n = int(body.get("n") or 1)  # the client's choices, drawn as _single draws them
    backend = ctx.caller.backend(arm.backend)
    if n == 1 or backend.spec.supports_n:
        response = await ctx.caller.complete(arm.backend, _sample_body(arm, body, ctx, n=n, cot=True))
        response = await _with_all_choices(arm, body, ctx, _ended_at_stop(response, body.get("stop")), n, cot=True)
    else:
        responses = await _gather_samples(arm, body, ctx, count=n, diverse=False, cot=True)
        responses += (await _missing_choices(arm, body, ctx, responses, client_n=n, first=n, diverse=False,
                                             cot=True))[0]
        if not responses:
            raise _every_sample_failed(arm.backend, ctx)
        response = _merge_choices(responses)
    _require_choices(arm, response)
    _hand_final_answers(response, ctx.task)
    return StrategyResult(response, arm, cascade.stated_confidence(_texts(response)[0]), "stated",
                          {"samples": len(response["choices"])})


def _ended_at_stop(response: dict[str, Any], stop: str | list[str] | None) -> dict[str, Any]:
    """A reasoning sample's choices, sent without the client's `stop`, ended where its sequences end
    their reply (prompts.reply_until_stop), with finish_reason "stop" where one did, in place."""
    if not stop:
        return response
    for choice in response.get("choices") or ():
        message = choice.get("message") or {}
        text = message.get("content")
        finished = choice.get("finish_reason") != "length"
        ended = prompts.reply_until_stop(text, stop, finished=finished) if text else text
        if ended != text:
            choice["message"] = {**message, "content": ended}
            choice["finish_reason"] = "stop"
    return response


def _hand_final_answers(response: dict[str, Any], task: str) -> None:
    """Choices written under the reasoning instruction as the client gets them, in place: the answer
    after its "Final answer:" line as `content` (prompts.final_answer), the whole chain as
    `reasoning_content`. The instruction is the gateway's, not the app's: its chain and marker line
    are no part of the reply the app asked for (a JSON reply asked for in the prompt would not parse).
    A text with no final answer line is the answer itself, and is not repeated as reasoning."""
    for choice in response["choices"]:
        message = choice.get("message") or {}
        chain = message.get("content")
        if not chain:
            continue  # no text (a refusal's null content stays null)
        answer = prompts.final_answer(chain, task)
        handed = {**message, "content": answer}
        if answer != chain.strip():
            thought = message.get("reasoning_content")  # a reasoning model's own, before it wrote the chain
            handed["reasoning_content"] = f"{thought}\n\n{chain}" if thought else chain
        choice["message"] = handed


# -- sampling strategies ----------------------------------------------------------------------------


async def _gather_samples(arm: Arm, body: dict[str, Any], ctx: StrategyContext, *, count: int,
                          first: int = 0, diverse: bool = True, cot: bool = False) -> list[dict[str, Any]]:
    """`count` independent samples, concurrently but bounded; failed samples are dropped (and billed),
    an answer without choices (an upstream's empty 200) with them. A failure that fails the request (a
    request error, the deadline) raises once every sample under way has ended, and no sample starts
    after it: none calls an upstream after the client has its error, and every call is in the ledger
    before the request is billed."""
    limit = asyncio.Semaphore(int(ctx.param("max_concurrency")))
    fatal: list[Exception] = []

    async def one(i: int) -> dict[str, Any] | None:
        async with limit:
            if fatal:
                return None
            try:
                response = await ctx.caller.complete(
                    arm.backend, _sample_body(arm, body, ctx, sample=first + i, diverse=diverse, cot=cot))
                if cot:
                    _ended_at_stop(response, body.get("stop"))
                # kept, it would count as a sample drawn with no answer to count: adaptive waves of
                # them never reached max n, and called the upstream until the deadline
                return response if response.get("choices") else None
            except UpstreamError as exc:
                if not exc.refuses_body:
                    ctx.last_sample_error = exc
                    return None
                fatal.append(exc)  # about the request, not this sample: every sample would fail alike
            except Exception as exc:
                fatal.append(exc)
            return None

    # return_exceptions: a request cancelled (the client left) ends here only once every sample has,
    # its cut-off call billed; by default gather ends at the first sample cancelled
    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    if fatal:
        raise fatal[0]
    return [r for r in results if isinstance(r, dict)]


async def _missing_choices(arm: Arm, body: dict[str, Any], ctx: StrategyContext, responses: list[dict[str, Any]], *,
                           client_n: int, first: int, **sampling: bool) -> tuple[list[dict[str, Any]], int]:
    """Failures left fewer answers than the client's `n` choices: one more round draws the missing ones
    (the budget holds n answers, and a failed sample costs nothing), sampled as the others were
    (`sampling`: _gather_samples' `diverse`, `cot`). (the new answers, samples drawn)"""
    missing = client_n - len(_sample_texts(responses))
    if not responses or missing <= 0:
        return [], 0
    return await _gather_samples(arm, body, ctx, count=missing, first=first, **sampling), missing


async def _with_all_choices(arm: Arm, body: dict[str, Any], ctx: StrategyContext, response: dict[str, Any],
                            client_n: int, *, cot: bool = False) -> dict[str, Any]:
    """The answer to a call asked for the client's `n` choices, with as many: an upstream that ignores
    `n` answers one (litellm drops it for providers without it, such as Anthropic), and the missing
    ones are drawn as separate calls, as for a backend declared `supports_n: false`."""
    got = len(response.get("choices") or ())
    if client_n <= 1 or got >= client_n:
        return response
    more, _ = await _missing_choices(arm, body, ctx, [response], client_n=client_n, first=max(got, 1),
                                     diverse=False, cot=cot)
    return _merge_choices([response, *more])


def _every_sample_failed(backend: str, ctx: StrategyContext) -> UpstreamError:
    """No sample came back: the client's error says why the last call to `backend` failed, with that
    failure's status (a 504 for a deadline, a 503 with Retry-After for a cool-down), as a single call's
    error would; a 502 when the samples came back without choices."""
    last = next((call.error for call in reversed(ctx.caller.calls) if call.backend == backend and call.error), None)
    why = f" (the last: {last})" if last else ""
    error = ctx.last_sample_error
    if error is None:
        return UpstreamError(backend, 502, f"{backend}: every sample failed{why}", retryable=True)
    return UpstreamError(backend, error.status, f"{backend}: every sample failed{why}", retryable=error.retryable,
                         retry_after=error.retry_after, code=error.code)


def _sample_texts(responses: list[dict[str, Any]]) -> list[str]:
    return [text for r in responses for text in _texts(r)]


def _sample_answers(responses: list[dict[str, Any]], task: str) -> list[str | None]:
    """Each sample's answer as the vote counts it (router.voting.sample_answer), in `_sample_texts` order."""
    return [voting.sample_answer((c.get("message") or {}).get("content") or "", task, c.get("finish_reason"))
            for r in responses for c in r.get("choices") or []]


def _voted(arm: Arm, responses: list[dict[str, Any]], ctx: StrategyContext, details: dict[str, Any],
           client_n: int, failed: int = 0, *, cot: bool = False) -> StrategyResult:
    """The vote over the samples that came back; the `failed` ones vote as invalid, so the vote's
    confidence (the learner's signal, a cascade's reason to escalate) counts them as doubt. `cot`: the
    samples were written under the reasoning instruction, and the chosen ones are handed over as a
    cot arm hands its answer (their final answers, the chains as reasoning)."""
    texts = _sample_texts(responses)
    if not texts:  # no sample came back, or only answers without a choice (an upstream's empty 200)
        raise _every_sample_failed(arm.backend, ctx)
    answers = _sample_answers(responses, ctx.task)
    finished = [c.get("finish_reason") != "length" for r in responses for c in r.get("choices") or []]
    result = voting.vote([*texts, *[None] * failed], ctx.task, answers=[*answers, *[None] * failed],
                         finished=[*finished, *[True] * failed])
    order = voting.ranked(texts, ctx.task, result, answers=answers) if client_n > 1 else [result.winner]
    response = _pick_choices(responses, order[:client_n])
    if cot:
        _hand_final_answers(response, ctx.task)
    details.update(samples=len(texts), votes=result.counts, agreement=result.agreement, method=result.method,
                   answer=result.answer)
    if failed:
        details["failed_samples"] = failed
    return StrategyResult(response, arm, result.confidence, "vote", details)


async def _self_consistency(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    backend = ctx.caller.backend(arm.backend)
    cot = uses_cot(arm, backend.spec, ctx.params)
    client_n = int(body.get("n") or 1)
    # a client asking for more choices than the arm's samples gets them: n is drawn (and budgeted)
    count = max(arm.n, client_n)
    responses = await _gather_samples(arm, body, ctx, count=count, cot=cot)
    more, extra = await _missing_choices(arm, body, ctx, responses, client_n=client_n, first=count, cot=cot)
    responses += more
    return _voted(arm, responses, ctx, {"max_n": count}, client_n, failed=count + extra - len(responses), cot=cot)


async def _adaptive_consistency(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    """Sample in waves until router.stopping says the vote is settled (or max n is reached)."""
    backend = ctx.caller.backend(arm.backend)
    cot = uses_cot(arm, backend.spec, ctx.params)
    rule = {"rule": "beta", "confidence": float(ctx.param("confidence")), "task": ctx.task,
            "min_gain": float(ctx.param("min_gain"))}
    # the bucket's value of a vote over one sample gates voting off where it does not pay: a value
    # fixed in the policy wins, else the one learned from this bucket's stats (None: no evidence yet)
    if "sample_value" in ctx.params:
        value, source = float(ctx.params["sample_value"]), "policy"
    else:
        value = stopping.bucket_sample_value(ctx.bucket_stats, arm, one_sample="cot" if cot else "single")
        source = "learned" if value is not None else None
    if value is not None:
        rule["sample_value"] = value
    if "min_samples" in ctx.params:  # the policy's floor: no verdict before this many samples
        rule["min_samples"] = int(ctx.params["min_samples"])
    responses: list[dict[str, Any]] = []
    answers: list[str | None] = []
    client_n = int(body.get("n") or 1)
    max_n = max(arm.n, client_n)
    while True:
        size = stopping.wave_size(answers, max_n=max_n, max_wave=int(ctx.param("wave")), **rule)
        if size == 0 and len(answers) < client_n:
            size = client_n - len(answers)  # settled, but the client asked for this many choices
        if size == 0:
            break
        wave = await _gather_samples(arm, body, ctx, count=size, first=len(answers), cot=cot)
        if not wave and not responses:
            break  # every sample of the first wave failed: nothing to vote on
        responses += wave
        # failed samples still count against max n, so a flaky backend cannot loop forever
        answers += _sample_answers(wave, ctx.task)
        answers += [None] * (size - len(wave))
    more, extra = await _missing_choices(arm, body, ctx, responses, client_n=client_n, first=len(answers), cot=cot)
    responses += more
    answers += _sample_answers(more, ctx.task) + [None] * (extra - len(more))
    verdict = stopping.should_stop(answers, max_n=max_n, **rule)
    details = {"max_n": max_n, "drawn": len(answers), "stop_reason": verdict.reason}
    if value is not None:
        details.update(sample_value=round(value, 4), sample_value_source=source)
    return _voted(arm, responses, ctx, details, client_n, failed=len(answers) - len(_sample_texts(responses)),
                  cot=cot)


async def _best_of_n(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    client_n = int(body.get("n") or 1)
    count = max(arm.n, client_n)
    responses = await _gather_samples(arm, body, ctx, count=count)
    responses += (await _missing_choices(arm, body, ctx, responses, client_n=client_n, first=count))[0]
    if not responses:
        raise _every_sample_failed(arm.backend, ctx)
    texts = _sample_texts(responses)
    verifier = arm.verifier or arm.backend
    question = prompts.last_user_text(body["messages"])
    media = prompts.last_user_media(body["messages"])  # what the question shows: the judge must see it too

    judge = ctx.caller.backend(verifier).spec

    async def score(text: str) -> float | None:
        try:
            verdict = await ctx.caller.complete(verifier, judge_body(judge, question, text, media))
        except UpstreamError:
            return None
        return prompts.parse_judge_score(_texts(verdict)[0] if verdict.get("choices") else "")

    scores = await asyncio.gather(*(score(t) for t in texts))
    best = voting.best_of_n(list(scores))
    # n > 1: the best, then the rest by score (unscored last, in order)
    rest = sorted((i for i in range(len(texts)) if i != best), key=lambda i: -(scores[i] if scores[i] is not None else -1.0))
    response = _pick_choices(responses, [best, *rest][:client_n])
    confidence = scores[best] if scores[best] is not None else None
    return StrategyResult(response, arm, confidence, "verifier",
                          {"samples": len(texts), "scores": scores, "verifier": verifier})


async def _cascade(arm: Arm, body: dict[str, Any], ctx: StrategyContext) -> StrategyResult:
    """Answer with the cheap first stage; escalate stage by stage while confidence stays low."""
    first = first_stage(arm)
    stages = [first, *arm.stages]
    tried: list[dict[str, Any]] = []
    result: StrategyResult | None = None
    failure: UpstreamError | None = None
    samples = 0
    for index, stage in enumerate(stages):
        if stage is not first and _passes_over_stage(stages, index, result is not None, ctx):
            tried.append({"arm": stage.key, "skipped": "backend cooling down"})
            continue
        # each stage samples with its own arm's knobs; the first is this arm's own answer
        stage_ctx = ctx if stage is first else dataclasses.replace(ctx, params=dict(stage.params))
        try:
            result = await run_arm(stage, body, stage_ctx)
        except UpstreamError as exc:
            failure = exc
            tried.append({"arm": stage.key, "error": exc.message})
            if exc.about_request or ctx.caller.out_of_time():  # a 400, a content filter: no stage is sent it
                break
            continue
        samples += int(result.details.get("samples", 1))
        # The answer's own doubt counts next to the vote's (or verifier's) confidence: a unanimous
        # "I'm not sure, maybe 7" is not a sure answer (router.cascade: the lowest signal decides).
        text = _texts(result.response)[0] if result.response.get("choices") else ""
        confidence = min((c for c in (result.confidence, cascade.stated_confidence(text)) if c is not None),
                         default=None)
        escalate = stage is not stages[-1] and cascade.should_escalate(confidence, float(ctx.param("escalate_below")))
        tried.append({"arm": stage.key, "confidence": confidence, "escalated": escalate,
                      "samples": result.details.get("samples", 1),
                      **({"votes": result.details["votes"]} if "votes" in result.details else {})})
        if not escalate:
            break
    if result is None:
        # the last stage's failure status and code, as a single call's error: a 400 stays the client's 400
        assert failure is not None
        raise UpstreamError(arm.backend, failure.status, f"{arm.backend}: every cascade stage failed (the last: "
                                                         f"{failure.message})", retryable=failure.retryable,
                            retry_after=failure.retry_after, code=failure.code, param=failure.param)
    result.details = {**result.details, "stages": tried, "samples": samples}
    result.arm = arm
    return result


def _passes_over_stage(stages: list[Arm], index: int, answered: bool, ctx: StrategyContext) -> bool:
    """Whether a cascade skips its later stage `stages[index]`, as the gateway skips an arm (Caller.passes_over):
    its backend cools down, or is being tested by another call after its cool-down (a call sent now would
    wait on that test, for as long as the backend hangs). With an answer in hand it is always skipped
    (the next stage, else that answer, serves at once); without one, as a fallback arm would be."""
    if ctx.caller.available(stages[index].backend):
        return False
    return answered or ctx.caller.passes_over(stages, index, tried=True)


# -- assembling responses ---------------------------------------------------------------------------


def _merge_choices(responses: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer holding every response's choices (at least one response)."""
    merged = dict(responses[0])
    merged["choices"] = [c for r in responses for c in r.get("choices") or []]
    for index, choice in enumerate(merged["choices"]):
        choice["index"] = index
    return merged


def _pick_choices(responses: list[dict[str, Any]], indices: list[int]) -> dict[str, Any]:
    """Choices by global sample index (samples are numbered across responses, in order)."""
    flat = [c for r in responses for c in r.get("choices") or []]
    out = dict(responses[0])
    out["choices"] = [{**flat[i], "index": k} for k, i in enumerate(indices)]
    return out


_RUNNERS = {
    "single": _single,
    "cot": _cot,
    "self_consistency": _self_consistency,
    "adaptive_consistency": _adaptive_consistency,
    "best_of_n": _best_of_n,
    "cascade": _cascade,
}
