"""`ponder stats`: the learned per-bucket table (arms, requests, success rate, cost, p95 latency).

Reads Redis when a URL is given (or PONDER_REDIS_URL is set), else the embedded store's sqlite file
under the data directory, read-only, so it works while a gateway is running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from router.types import StatsSnapshot

from .aggregates import arm_stats, summary_row

RawAggregates = dict[str, dict[tuple[str, str], dict[str, float]]]


async def _read_redis(url: str, half_life_s: float | None) -> RawAggregates:
    from .redis_store import RedisStore

    store = RedisStore(
        url, stream_maxlen=1, refresh_s=3600, buffer_max=1, decay_half_life_s=half_life_s, feedback_window_s=0
    )
    try:
        if not await store._ensure_connected(force=True):
            raise ConnectionError(store.last_error or f"cannot reach {url}")
        return await store._load_aggregates()
    finally:
        await store._client.aclose()


def _choice_column(policy_name: str, policy_file: str | None, snapshot: StatsSnapshot):
    """bucket -> arm key the learner would pick now, or None when the learner or policy is unavailable."""
    try:
        from policies.loader import load_policy
        from router.learner import current_choice

        path = Path(policy_file) if policy_file else Path(__file__).resolve().parents[1] / "policies" / f"{policy_name}.yaml"
        policy = load_policy(path)
    except Exception:
        return None
    chosen: dict[str, str] = {}

    def choice(bucket: str) -> str:
        if bucket not in chosen:
            chosen[bucket] = current_choice(bucket, policy, snapshot).key
        return chosen[bucket]

    return choice


def _fmt_rate(value: Any) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def stats_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ponder stats", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("PONDER_REDIS_URL"))
    parser.add_argument("--data-dir", default=os.environ.get("PONDER_DATA_DIR", ".ponder"))
    parser.add_argument("--policy", help="only this policy")
    parser.add_argument("--policy-file", help="policy YAML for the learner's current-choice column")
    parser.add_argument("--half-life-s", type=float, default=None, help="decay the gateway is configured with")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    try:
        if args.redis_url:
            raw = asyncio.run(_read_redis(args.redis_url, args.half_life_s))
        else:
            from .embedded_store import read_aggregates

            raw = read_aggregates(Path(args.data_dir))
    except Exception as exc:
        print(f"ponder stats: cannot read telemetry: {exc}", file=sys.stderr)
        return 1

    now = time.time()
    report: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for policy, arms in sorted(raw.items()):
        if args.policy and policy != args.policy:
            continue
        snapshot: StatsSnapshot = {}
        for (bucket, arm), fields in arms.items():
            snapshot.setdefault(bucket, {})[arm] = arm_stats(fields, now, args.half_life_s)
        choose = _choice_column(policy, args.policy_file, snapshot)
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for (bucket, arm), fields in sorted(arms.items()):
            row = summary_row(fields, now, args.half_life_s)
            if choose is not None:
                try:
                    row["current_choice"] = choose(bucket) == arm
                except Exception:
                    choose = None
            table.setdefault(bucket, {})[arm] = row
        report[policy] = table

    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not report:
        print("no telemetry recorded yet" + (f" for policy {args.policy!r}" if args.policy else ""))
        return 0
    for policy, table in report.items():
        with_choice = any("current_choice" in r for arms in table.values() for r in arms.values())
        print(f"policy {policy}")
        header = f"  {'bucket':<18} {'arm':<44} {'requests':>9} {'success':>8} {'mean $':>10} {'p95 ms':>9}"
        print(header + ("  choice" if with_choice else ""))
        for bucket, arms in table.items():
            for arm, r in arms.items():
                line = (f"  {bucket:<18} {arm:<44} {int(r['requests']):>9} {_fmt_rate(r['success_rate']):>8} "
                        f"{r['mean_cost_usd']:>10.6f} {r['p95_latency_ms']:>9.0f}")
                if with_choice:
                    line += "  *" if r.get("current_choice") else ""
                print(line)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(stats_cli())
