"""`ponder stats`: the learned per-bucket table (arms, requests, success rate, cost, p95 latency).

Reads Redis when a URL is given (or PONDER_REDIS_URL is set), else the embedded store's sqlite file
under the data directory, read-only, so it works while a gateway is running.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from router.types import StatsSnapshot

from .aggregates import arm_stats, summary_row
from .summaries import LATENCY_FIELDS

RawAggregates = dict[str, dict[tuple[str, str], dict[str, float]]]


async def _read_redis(url: str, half_life_s: float | None) -> RawAggregates:
    from .redis_store import RedisStore

    try:
        store = RedisStore(
            url, stream_maxlen=1, refresh_s=3600, buffer_max=1, decay_half_life_s=half_life_s, feedback_window_s=0
        )
    except ValueError:  # redis-py's message quotes the URL's pieces, a piece of the password among them
        raise ValueError("not a Redis URL (redis://[user:password@]host:port/db, rediss://..., "
                         "unix://[user:password@]/path?db=N): percent-encode a user name or password that "
                         "holds / # ? @ or %") from None
    try:
        if not await store._ensure_connected(force=True):
            # the URL without its user name and password
            raise ConnectionError(store.last_error or f"cannot reach {url.rpartition('@')[2]}")
        return await store._load_aggregates(read_only=True)
    finally:
        await store._client.aclose()


def _choice_column(policy: Any, snapshot: StatsSnapshot):
    """bucket -> arm key the learner would pick now under this policy (a loaded Policy), None for a
    bucket it has none for (e.g. no arm of `auto` holds the bucket's typical prompt)."""
    from router.learner import current_choice

    chosen: dict[str, str | None] = {}

    def choice(bucket: str) -> str | None:
        if bucket not in chosen:
            try:
                chosen[bucket] = current_choice(bucket, policy, snapshot).key
            except Exception:  # noqa: BLE001 - that bucket goes unmarked; the others keep their mark
                chosen[bucket] = None
        return chosen[bucket]

    return choice


def _policy_loader(policy_file: str | None, config: Any):
    """policy name -> loaded Policy, or None (with a warning on stderr: the column is left out, the
    table is still printed), and the --policy-file's policy (None without one, or when it does not load).
    From the gateway config (its policies with its backends, as it serves them), else --policy-file for
    the policy of its name, else policies/<name>.yaml."""
    if config is not None:
        from gateway.service import configured_policies

        policies = configured_policies(config)  # raises: a config whose policy does not load is an error
        return (lambda name: policies.get(name).policy if policies.get(name) is not None else None), None

    def read(path: Path, what: str) -> Any:
        from policies.loader import load_policy

        try:
            return load_policy(path)
        except Exception as exc:  # noqa: BLE001 - any load failure only drops the column
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"ponder stats: no current-choice column from {what}: {first}"
                  " (a policy whose backends are in the gateway config needs --config)", file=sys.stderr)
            return None

    given = read(Path(policy_file), f"--policy-file {policy_file}") if policy_file else None

    def load(name: str) -> Any:
        # --policy-file marks the policy of its own name only: another policy's stats are of other arms
        if given is not None and given.name == name:
            return given
        path = Path(__file__).resolve().parents[1] / "policies" / f"{name}.yaml"
        if path.exists():
            return read(path, f"policy {name!r}")
        if name != "direct":  # requests that named a backend: no policy, no learner, nothing to say
            print(f"ponder stats: no current-choice column for policy {name!r}: no policies/{name}.yaml; give the "
                  "gateway's --config, or the policy's file as --policy-file", file=sys.stderr)
        return None

    return load, given


def _half_life(text: str) -> float:
    """An argparse type: a half-life in seconds, above 0 (0 or less would silently mean no decay)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a half-life: it must be above 0 seconds")
    return value


def _fmt_rate(value: Any) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def _fmt_usd(value: float) -> str:
    """As the dashboard writes money (dashboard.js usd(): to the cent from $1 up, 3 significant digits
    below a cent). A fixed 6 decimals printed a request of $4e-7 (a small model, a short prompt) as
    0.000000, the same as a free local model's."""
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 0.01:
        return f"{value:,.2f}" if a >= 1 else f"{value:.3f}"
    exponent = math.floor(math.log10(float(f"{a:.2e}")))  # of the value as rounded to 3 digits
    if exponent >= -6:
        return f"{value:.{2 - exponent}f}"
    mantissa, _, power = f"{value:.2e}".partition("e")
    return f"{mantissa}e{int(power)}"


def _fmt_ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def stats_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ponder stats", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="default: --config's; without one, $PONDER_REDIS_URL")
    parser.add_argument("--data-dir", help="default: --config's; without one, $PONDER_DATA_DIR, else .ponder")
    parser.add_argument("--policy", help="only this policy")
    parser.add_argument("--policy-file", help="policy YAML for the learner's current-choice column")
    # the gateway's own default (`ponder serve` reads $PONDER_CONFIG): in the image, where it is set, the
    # stats are the serving gateway's, not an empty ./.ponder's
    parser.add_argument("--config", default=os.environ.get("PONDER_CONFIG"),
                        help="the gateway's config: its policies (with its backends) and its telemetry "
                             "(default: $PONDER_CONFIG)")
    parser.add_argument("--half-life-s", type=_half_life, default=None,
                        help="decay to apply to the displayed numbers (default: --config's, else none)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    try:
        config = None
        if args.config:
            from gateway.config import load_config

            config = load_config(args.config)
        policy_for, given = _policy_loader(args.policy_file, config)
    except Exception as exc:  # noqa: BLE001 - a config or policy that does not load: say why, once
        print(f"ponder stats: cannot load {args.config}: {exc}", file=sys.stderr)
        return 2
    if config is not None:  # the config beats the environment, its embedded store (no redis_url) too
        args.redis_url = args.redis_url or config.telemetry.redis_url
        args.data_dir = args.data_dir or config.telemetry.data_dir
        if args.half_life_s is None:  # the decay the gateway applies: its default policy's
            hours = policy_for(None).learner.half_life_hours
            args.half_life_s = hours * 3600.0 if hours else None
    else:
        args.redis_url = args.redis_url or os.environ.get("PONDER_REDIS_URL")
        args.data_dir = args.data_dir or os.environ.get("PONDER_DATA_DIR", ".ponder")
    try:
        if args.redis_url:
            raw = asyncio.run(_read_redis(args.redis_url, args.half_life_s))
        else:
            from .embedded_store import read_aggregates

            raw = read_aggregates(Path(args.data_dir))
    except Exception as exc:
        print(f"ponder stats: cannot read telemetry: {exc}", file=sys.stderr)
        return 1

    if given is not None and given.name not in raw:
        print(f"ponder stats: --policy-file {args.policy_file} is policy {given.name!r}, which has no telemetry here "
              f"(recorded: {', '.join(sorted(raw)) or 'none'}); it marks no current choice", file=sys.stderr)
    now = time.time()
    report: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for policy, arms in sorted(raw.items()):
        if args.policy and policy != args.policy:
            continue
        snapshot: StatsSnapshot = {}
        for (bucket, arm), fields in arms.items():
            snapshot.setdefault(bucket, {})[arm] = arm_stats(fields, now, args.half_life_s)
        loaded = policy_for(policy)
        choose = _choice_column(loaded, snapshot) if loaded is not None else None
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for (bucket, arm), fields in sorted(arms.items()):
            row = summary_row(fields, now, args.half_life_s)
            if not row["answered"] > 0:  # as the dashboard shows it: no answer, no latency (not 0 ms)
                row.update(dict.fromkeys(LATENCY_FIELDS))
            if choose is not None:
                row["current_choice"] = choose(bucket) == arm
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
                        f"{_fmt_usd(r['mean_cost_usd']):>10} {_fmt_ms(r['p95_latency_ms']):>9}")
                if with_choice:
                    line += "  *" if r.get("current_choice") else ""
                print(line)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(stats_cli())
