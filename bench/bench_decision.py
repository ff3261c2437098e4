"""Decision time for a 50-arm policy: decide() given the classifier's output (target p99 <= 0.1 ms).

Two cases, both with learned stats for every arm (the steady state, which is the slower path) and
exploration on:
- typical: the request's route lists 10 of the 50 arms;
- all-50: the request's route lists all 50 arms (the worst case a policy can ask for).

Run:  .venv/bin/python bench/bench_decision.py [--iterations N]
Writes bench/results/decision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.backends import BackendSpec, Prices  # noqa: E402
from policies.schema import Policy  # noqa: E402
from router.decide import decide  # noqa: E402
from router.estimates import compile_policy  # noqa: E402
from router.request_hints import RequestHints  # noqa: E402
from router.types import DIFFICULTY_TIERS, TASK_TYPES, ArmStats, Classification, bucket_key  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decision.json"
EFFORTS = ("low", "medium", "high")


def fifty_arm_policy() -> Policy:
    backends, arms = [], {}
    for b in range(10):
        name = f"model-{b}"
        backends.append(BackendSpec(
            name=name, model=f"bench/{name}", reasoning=True, efforts=list(EFFORTS),
            prices=Prices(input_per_mtok=0.1 * (b + 1), output_per_mtok=0.4 * (b + 1)),
            output_tokens_per_s=40 + 10 * b, first_token_ms=200 + 50 * b,
        ))
        arms[f"{name}-none"] = {"backend": name}
        for effort in EFFORTS:
            arms[f"{name}-{effort}"] = {"backend": name, "effort": effort}
        arms[f"{name}-vote"] = {"backend": name, "effort": "medium", "strategy": "self_consistency", "n": 5}
    names = list(arms)
    rng = random.Random(0)
    routes = [{"name": "math-hard-all-50", "when": {"tasks": ["math"], "tiers": ["hard"]},
               "candidates": {name: round(rng.uniform(0.5, 0.95), 3) for name in names}}]
    for i, task in enumerate(TASK_TYPES):
        for j, (tier, _) in enumerate(DIFFICULTY_TIERS):
            chosen = rng.sample(names, 10)
            route = {"name": f"{task}-{tier}", "when": {"tasks": [task], "tiers": [tier]},
                     "candidates": {name: round(rng.uniform(0.5, 0.95), 3) for name in chosen}}
            if (task, tier) != ("math", "hard"):  # that one is the 50-arm route's, which comes first
                routes.append(route)
    routes.append({"name": "catch-all", "candidates": names[:10]})
    return Policy.model_validate({
        "name": "bench-50", "backends": [spec.model_dump() for spec in backends], "arms": arms, "routes": routes,
        "objective": {"cost_weight": 20, "latency_weight": 0.005, "max_p95_latency_ms": 120000,
                      "max_cost_usd": 0.2},
        "exploration": {"share": 0.05, "max_extra_cost_usd": 0.01},
    })


def learned_stats(policy: Policy) -> dict:
    rng = random.Random(1)
    keys = [arm.key for arm in compile_policy(policy).arms.values()]
    stats = {}
    for task in TASK_TYPES:
        for _, upper in DIFFICULTY_TIERS:
            bucket = bucket_key(task, upper - 0.01)
            stats[bucket] = {}
            for key in keys:
                count = rng.uniform(10, 500)
                stats[bucket][key] = ArmStats(count=count, successes=count * rng.uniform(0.3, 0.95), weight=count,
                                              cost_usd=count * rng.uniform(1e-4, 0.02),
                                              latency_ms=count * rng.uniform(500, 30000),
                                              latency_p95_ms=rng.uniform(1000, 60000))
    return stats


def measure(policy, stats, classification, iterations: int) -> dict:
    rng = random.Random(7)
    hints = [RequestHints(prompt_tokens=random.Random(i).randint(20, 4000)) for i in range(64)]
    for i in range(2000):  # warm up
        decide(classification, policy, stats, request=hints[i % 64], rng=rng)
    samples, cpu_samples = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for i in range(iterations):
        hint = hints[i % 64]
        start, cpu_start = clock(), cpu_clock()
        decide(classification, policy, stats, request=hint, rng=rng)
        cpu_samples.append(cpu_clock() - cpu_start)
        samples.append(clock() - start)
    samples.sort()
    cpu_samples.sort()

    def pick(q: float, values: list[int] = samples) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] / 1000

    return {"candidates": len(decide(classification, policy, stats, rng=rng).candidates),
            "p50_us": round(pick(0.50), 2), "p90_us": round(pick(0.90), 2), "p99_us": round(pick(0.99), 2),
            "max_us": round(samples[-1] / 1000, 2), "mean_us": round(statistics.fmean(samples) / 1000, 2),
            # CPU time of the calling thread: what a call costs when the machine is not preempting us
            # (the wall-clock tail above includes other processes' time slices on a shared machine)
            "cpu_p50_us": round(pick(0.50, cpu_samples), 2), "cpu_p99_us": round(pick(0.99, cpu_samples), 2),
            "iterations": iterations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000)
    args = parser.parse_args()
    policy = fifty_arm_policy()
    start = time.perf_counter()
    compile_policy(policy)
    compile_ms = (time.perf_counter() - start) * 1000
    stats = learned_stats(policy)
    cases = {
        "typical_route_10_of_50_arms": measure(policy, stats, Classification("chat", {"chat": 1.0}, 0.2),
                                               args.iterations),
        "route_with_all_50_arms": measure(policy, stats, Classification("math", {"math": 1.0}, 0.9),
                                          args.iterations),
    }
    result = {
        "what": "router.decide.decide() wall time per call, given the classifier output; learned stats for "
                "every arm; exploration 5%",
        "policy_arms": len(policy.arms), "compile_ms": round(compile_ms, 2), "target_p99_us": 100, "cases": cases,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "command": "python bench/bench_decision.py",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, case in cases.items():
        print(f"{name:<30} candidates={case['candidates']:<3} p50={case['p50_us']:.1f} us  "
              f"p99={case['p99_us']:.1f} us  max={case['max_us']:.0f} us | cpu p50={case['cpu_p50_us']:.1f} "
              f"p99={case['cpu_p99_us']:.1f} us")
    print(f"compile {compile_ms:.1f} ms; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus; wrote {RESULTS}")
    worst = max(case["p99_us"] for case in cases.values())
    if worst > 100:
        print(f"wall-clock p99 {worst:.0f} us is over the 100 us target (see the cpu columns and the load)")
    return 0 if worst <= 100 else 1


if __name__ == "__main__":
    raise SystemExit(main())
