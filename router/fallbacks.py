"""Who answers when the chosen arm cannot: the stand-in while the greedy arm's backend cools down
after failures, and the fallbacks the gateway tries, in order, when the chosen arm fails (the gateway's
health hands router.decide.decide() the backends cooling down).
"""

from __future__ import annotations

from collections.abc import Collection

from router.estimates import CompiledArm
from router.types import Candidate

MAX_FALLBACKS = 3


def plan_fallbacks(eligible: list[int], chosen: int, winner: CompiledArm, rows: tuple, utils: list[float],
                   kinds: dict[int, int], candidates: list[Candidate], cooling: Collection[str],
                   degraded: bool, cheapest_next: list[int] | None = None) -> list[int]:
    """The fallbacks (by index) after the chosen arm, at most MAX_FALLBACKS. `cheapest_next`: under the
    degrade line without `max_cost_usd` (the cheapest arm only), the other affordable arms, cheapest
    first: they fall back in that order, other backends and those answering now first."""
    if cheapest_next is not None:
        answering = set(answering_now(cheapest_next, rows, cooling))
        return sorted(cheapest_next, key=lambda i: (i not in answering, rows[i][0].backend == winner.backend)
                      )[:MAX_FALLBACKS]
    # Fallbacks: the next best eligible arms, other backends first (a failing backend tends to fail
    # again), then the same backend.
    other_backend: list[int] = []
    same_backend: list[int] = []
    room = len(rows) if cooling else MAX_FALLBACKS  # cooling ones are moved last: rank them all
    for i in sorted(eligible, key=utils.__getitem__, reverse=True):
        if i == chosen:
            continue
        if rows[i][0].backend != winner.backend:
            other_backend.append(i)
            if len(other_backend) == room:
                break
        elif len(same_backend) < room:
            same_backend.append(i)
    fallbacks = other_backend + same_backend
    slow: list[int] = []
    if (cooling or len(fallbacks) < MAX_FALLBACKS) and not degraded:
        # Latency is a soft limit: an arm ruled out only by it answers, fastest first, when every
        # eligible one has failed, later than they would have rather than not at all (a 502 or 503).
        slow = sorted((i for i, kind in kinds.items() if kind == 3 and i != chosen),
                      key=lambda i: candidates[i].expected_latency_ms)
    if cooling:
        # Arms whose backend cools down come after all the others, in the same order: the gateway
        # skips them, unless the cool-down has ended by the time the others have failed.
        answering = set(answering_now(fallbacks, rows, cooling) + answering_now(slow, rows, cooling))
        fallbacks = sorted(fallbacks + slow, key=lambda i: i not in answering)[:MAX_FALLBACKS]
    else:
        fallbacks = (fallbacks[:MAX_FALLBACKS] + slow)[:MAX_FALLBACKS]
    return fallbacks


def answering_now(indices: list[int], rows: tuple, cooling: Collection[str]) -> list[int]:
    """The candidates (by index) whose backend is not cooling down (nor, for a cascade, every backend it
    escalates to: see cools)."""
    return [i for i in indices if not cools(rows[i][0], cooling)] if cooling else indices


def cools(arm: CompiledArm, cooling: Collection[str]) -> bool:
    """Whether the arm cannot answer as planned now: its backend cools down, or it is a cascade whose
    every later stage's backend does. Such a cascade would answer with its first stage alone, however
    unsure (gateway/strategies.py passes the stages over), which is not what it was ranked for: the best
    arm that answers stands in for it, as for an arm whose own backend cools down."""
    return arm.backend in cooling or (bool(arm.stage_backends) and all(b in cooling for b in arm.stage_backends))


def what_cools(arm: CompiledArm, cooling: Collection[str]) -> str:
    """What cools down, for the decision's reasons (see cools)."""
    if arm.backend in cooling:
        return f"backend `{arm.backend}` is"
    stages = ", ".join(f"`{backend}`" for backend in dict.fromkeys(arm.stage_backends))
    return f"the backends its cascade escalates to ({stages}) are"


def pick_stand_in(ready: list[int], kinds: dict[int, int], rows: tuple, cooling: Collection[str],
                  candidates: list[Candidate], utils: list[float], degraded: bool) -> int | None:
    """Who answers while the greedy arm's backend cools down: the best eligible arm whose backend
    answers now; else (latency being a soft limit, and not under the degrade line) the fastest one
    ruled out by the latency limit alone; else nobody but the greedy arm itself (None), whose cool-down
    may end before the request is served and whose refusal says when it ends (503 with Retry-After)."""
    if ready:
        return max(ready, key=utils.__getitem__)
    if not degraded:
        slow = answering_now([i for i, kind in kinds.items() if kind == 3], rows, cooling)
        if slow:
            return min(slow, key=lambda i: (candidates[i].expected_latency_ms, -utils[i]))
    return None
