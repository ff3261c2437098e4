"""How long a policy reload stalls the event loop: a 1 ms ticker on the loop records its longest gap
while policies/multi-provider.yaml is edited and reloaded, once per round.

    .venv/bin/python bench/policy_reload_stall.py [--rounds 30]

Three ways per run: `idle` (no reload: the machine's own noise), `on-loop` (read, check and compile
on the loop, as the gateway did) and `thread` (PolicySet.read_changed in a thread, swap_in on the
loop, as Gateway._reload_policies does now).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.policy_watch import PolicySet  # noqa: E402


async def longest_stalls(mode: str, rounds: int) -> list[float]:
    path = Path(tempfile.mkdtemp()) / "multi-provider.yaml"
    shutil.copy(ROOT / "policies" / "multi-provider.yaml", path)
    policies = PolicySet(str(path), {}, [])
    stalls = []
    for i in range(rounds):
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last - 0.001)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        path.write_text(path.read_text() + f"\n# edit {i}\n")
        if mode == "thread":
            assert policies.swap_in(await asyncio.to_thread(policies.read_changed))
        elif mode == "on-loop":
            assert policies.reload_changed()
        else:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.02)
        done.set()
        await ticker
        stalls.append(max(gaps))
    return sorted(stalls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for mode in ("idle", "on-loop", "thread"):
        stalls = asyncio.run(longest_stalls(mode, args.rounds))
        print(f"{mode:8} longest loop stall per edit: median {statistics.median(stalls) * 1e3:5.1f} ms, "
              f"p90 {stalls[int(len(stalls) * 0.9)] * 1e3:5.1f} ms ({args.rounds} edits)")


if __name__ == "__main__":
    main()
