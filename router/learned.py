"""What the learned stats make of one candidate arm: P(correct) from the route's prior and the
learner's records at up to three levels (router.learner.shared_levels), and the cost ratio, cost
addend, latency and p95 moved from the cost model's estimates toward what was observed. Pure
arithmetic for router.decide.decide(), which keeps the results per route and bucket until the store
hands in new stats.
"""

from __future__ import annotations

from collections.abc import Mapping

from router.estimates import P95_OVER_MEAN, CompiledRoute
from router.types import ArmStats, Candidate

def learned_numbers(seen: ArmStats | None, shared: ArmStats | None, alpha: float, beta: float, reference: float,
                    latency: float, p95: float, prior_strength: float, calibration: tuple | None = None,
                    task: ArmStats | None = None, bucket_strength: float | None = None, in_calibration: bool = True,
                    ) -> tuple[float, float, float, float, float, float]:
    """What the learned stats make of one candidate: (P(correct), cost factor, cost addend, latency, p95,
    pseudo-outcomes behind P(correct): what exploration's optimism is measured against).

    Up to three levels (see router.learner.shared_levels): `shared` is the arm's record summed over
    every bucket, `task` over the buckets of this request's task (every tier), `seen` its record in
    this bucket. Outermost first, each level's record less the next one's (so no outcome counts
    twice) updates the prior, which is then worth `prior_strength` pseudo-outcomes again: the route's
    prior, updated by the other tasks' record, is the task's prior; updated by the task's other
    tiers, the bucket's, worth `bucket_strength` (learner.bucket_strength: more than prior_strength
    where the snapshot's tiers of a task behave alike, capped by what the task level knows); then the
    bucket's own scored outcomes are added and P(correct) is that Beta posterior's mean. So an arm's
    record elsewhere informs a bucket that has not tried it yet (nearer buckets more), and the
    bucket's own outcomes outweigh it after a few dozen (more where tiers are alike). Cost,
    latency and p95 move the same way from the estimate through the levels' observed means (each
    level counting what it inherits as `prior_strength` observations); cost via the
    observed/estimated ratio, so a long prompt still costs more than a short one. Before an arm has
    any outcome its cost ratio is what `calibration` (the route's sums, see route_calibration) says of the
    route's *other* arms' estimates, since an estimate's error (e.g. the guessed output length) is
    usually shared by the arms of a route; the arm's own record then moves it level by level, counted
    once. Only costs that no price ever estimated (a replay's recorded costs of unpriced models) are
    learned as an amount added per request (the cost addend) instead.
    """
    # (an arm widened in from outside the route by an override was never in the route's sums)
    factor, addend = _others_ratio(calibration, shared if in_calibration else None, reference, prior_strength), 0.0
    if shared is not None:
        # the task's prior is worth prior_strength; the bucket's what learner.bucket_strength estimates
        levels = ((shared, task, prior_strength), (task, seen, bucket_strength or prior_strength)) \
            if task is not None else ((shared, seen, prior_strength),)
        for record, inner, strength in levels:
            # this level's record less the inner level's (counted there)
            weight, wins, count = record.weight, record.successes, record.count
            cost_usd, latency_ms, answered = record.cost_usd, record.latency_ms, record.answered
            estimated = _estimated_of(record, reference)
            if inner is not None:
                weight, wins, count = weight - inner.weight, wins - inner.successes, count - inner.count
                cost_usd, latency_ms = cost_usd - inner.cost_usd, latency_ms - inner.latency_ms
                answered -= inner.answered
                estimated -= _estimated_of(inner, reference)
            if weight > 1e-9:
                wins = min(max(wins, 0.0), weight)
                total = alpha + beta + weight
                mean = (alpha + wins) / total
                if strength > prior_strength:
                    # An estimated strength (learner.bucket_strength) must not claim more than the parent
                    # knows: the child's prior is uncertain twice over, children differ from the parent's
                    # mean and that mean is known to `total` pseudo-outcomes; the variances (1 / (n + 1)
                    # of m(1 - m) each) add. Never below the policy's prior_strength.
                    strength = max(prior_strength, 1.0 / (1.0 / (strength + 1.0) + 1.0 / (total + 1.0)) - 1.0)
                alpha, beta = strength * mean, strength * (1.0 - mean)
            if count > 1e-9:
                share = count / (prior_strength + count)
                # a ratio wherever a price stood behind the costs (then or now): an arm whose prices
                # were edited to 0 costs nothing, not the mean it was observed at the old price
                if reference > 0 or estimated > 1e-15:
                    factor += share * (_cost_ratio(cost_usd, estimated) - factor)
                else:
                    addend += share * (max(cost_usd, 0.0) / count - addend)
            if answered > 1e-9:  # latency: of the requests an arm answered (a fast failure is no answer's)
                share = answered / (prior_strength + answered)
                observed = max(latency_ms, 0.0) / answered
                p95 += share * ((record.latency_p95_ms or observed * P95_OVER_MEAN) - p95)
                latency += share * (observed - latency)
    if seen is not None:
        weight = seen.weight
        if weight > 0:
            wins = min(max(seen.successes, 0.0), weight)  # (as the levels above: a handed-in record may be off)
            alpha += wins
            beta += weight - wins
        count = seen.count
        if count > 0:
            share = count / (prior_strength + count)
            estimated = _estimated_of(seen, reference)
            if reference > 0 or estimated > 1e-15:
                factor += share * (_cost_ratio(seen.cost_usd, estimated) - factor)
            else:
                addend += share * (seen.cost_usd / count - addend)
        answered = seen.answered
        if answered > 0:
            share = answered / (prior_strength + answered)
            observed = seen.latency_ms / answered
            p95 += share * ((seen.latency_p95_ms or observed * P95_OVER_MEAN) - p95)
            latency += share * (observed - latency)
    alpha, beta = max(alpha, 1e-6), max(beta, 1e-6)
    return alpha / (alpha + beta), factor, addend, latency, p95, alpha + beta


def _cost_ratio(cost_usd: float, estimated_usd: float) -> float:
    """Observed / estimated cost of the same requests (1 when nothing was estimated)."""
    return max(cost_usd, 0.0) / estimated_usd if estimated_usd > 1e-15 else 1.0


def route_calibration(route: CompiledRoute, pooled: Mapping[str, ArmStats], prior_strength: float) -> tuple:
    """(observed cost, estimated cost, outcomes) summed over the route's arms that have outcomes (their
    records over all buckets): what _others_ratio turns into each arm's starting cost ratio. Kept on
    the route until the pooled stats change (once per snapshot)."""
    cached = route.calibrated
    if cached is not None and cached[0] is pooled:
        return cached[1]
    observed = estimated = count = 0.0
    for row in route.rows:
        shared = pooled.get(row[1])
        if shared is not None and shared.count > 0 and row[8] > 0:
            observed += shared.cost_usd
            estimated += _estimated_of(shared, row[8])
            count += shared.count
    sums = (observed, estimated, count)
    route.calibrated = (pooled, sums)
    return sums


def _estimated_of(record: ArmStats, reference: float) -> float:
    """What the cost model estimated for a record's requests: their own estimates where they carry one
    (their prompt lengths, their max_tokens), a typical prompt's (`reference`) for the rest (records
    from before estimates were kept, replays that keep none): a mixed record is never divided by
    only part of its estimates."""
    return record.estimated_cost_usd + max(record.count - record.estimated_count, 0.0) * reference


def _others_ratio(calibration: tuple | None, own: ArmStats | None, reference: float, prior_strength: float) -> float:
    """Observed / estimated cost of the route's arms other than this one, shrunk toward 1 as if the
    estimate had `prior_strength` outcomes of its own: an arm's own record is its levels' to add."""
    if calibration is None:
        return 1.0
    observed, estimated, count = calibration
    if own is not None and own.count > 0 and reference > 0:
        observed, estimated, count = observed - own.cost_usd, estimated - _estimated_of(own, reference), count - own.count
    if estimated <= 1e-15 or count <= 1e-9:
        return 1.0
    return 1.0 + count / (prior_strength + count) * (observed / estimated - 1.0)


def posterior_of(candidate: Candidate, evidence: float) -> tuple[float, float]:
    """Beta(alpha, beta) behind a candidate's expected accuracy: its mean, over the pseudo-outcomes
    every level gave it (the route's prior, the arm's record in other buckets, this bucket's own), so
    an arm ruled out by a thousand outcomes elsewhere is as sure as that evidence. Recovered here for
    the few explored requests rather than stored as a Beta for every arm on the hot path."""
    alpha = min(max(candidate.expected_accuracy * evidence, 1e-6), evidence - 1e-6)
    return alpha, evidence - alpha
