"""Scale-out on one machine: two real gateway processes (`ponder serve`) sharing one real redis-server.

- One learned state: outcomes recorded through either replica, and feedback sent to the other one,
  change what both replicas decide, and `ponder stats` reads the combined counts.
- One budget: concurrent requests spread over both replicas never spend more than the key's cap.
- SIGKILL of one replica loses no recorded outcome of the other (nor any the killed one had flushed).
- SIGTERM: the listening socket closes at once, in-flight requests finish with 200, and their events
  are in Redis when the process has exited.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
import redis

from telemetry.redis_server import start_redis
from tests.servers import PYTHON, ROOT, mock_backend, start_gateway, start_mock, write_policy

STREAM = "ponder:{events}:stream"  # telemetry/redis_schema.py RedisKeys(namespace="ponder").stream
FREE_KEY = "sk-scale-free"       # no budget
CAPPED_KEY = "sk-scale-capped"   # a small daily budget
GRACE_KEY = "sk-scale-grace"     # the same budget, for the shutdown test alone
ANSWER = "one two three four five six seven eight nine ten"  # 10 completion tokens at the mock
PRICE_PER_TOKEN = 0.001          # output $1000 per M tokens: $0.01 per answer, prompts free
COST = 10 * PRICE_PER_TOKEN
CAP = 5.5 * COST                 # room for exactly 5 answers
PROMPT = "hello there, how is it going today?"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth(key: str = FREE_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    redis_proc = start_redis(data_dir=tmp / "redis")
    try:
        mock = start_mock(tmp)
    except BaseException:
        redis_proc.stop()
        raise
    prices = {"prices": {"input_per_mtok": 0.0, "output_per_mtok": PRICE_PER_TOKEN * 1e6}}
    backends = [mock_backend("mock-a", mock, **prices), mock_backend("mock-b", mock, **prices)]
    policy_path = write_policy(tmp, {
        "name": "scale",
        "backends": backends,  # also inline, so `ponder stats --policy-file` can load the policy alone
        "arms": {
            "a": {"backend": "mock-a", "strategy": "single", "tokens": 10},
            "b": {"backend": "mock-b", "strategy": "single", "tokens": 10},
        },
        "routes": [{"name": "all", "candidates": {"a": 0.8, "b": 0.7}}],
        "objective": {"cost_weight": 0.0, "latency_weight": 0.0},
        "exploration": {"share": 0.0},
        "learner": {"prior_strength": 2, "half_life_hours": None},
    })
    config = {
        "backends": backends,
        "policy": policy_path,
        "telemetry": {"redis_url": redis_proc.url, "refresh_s": 0.2},
        "api_keys": [
            {"id": "free", "sha256": sha(FREE_KEY), "admin": True},
            {"id": "capped", "sha256": sha(CAPPED_KEY), "budget_usd_per_day": CAP},
            {"id": "grace", "sha256": sha(GRACE_KEY), "budget_usd_per_day": CAP},
        ],
    }
    httpx.post(mock.url + "/control", json={"answers": [ANSWER]}).raise_for_status()

    def gateway(name: str, **extra):
        cfg = {**config, "telemetry": {**config["telemetry"], "data_dir": str(tmp / f"{name}-data")}, **extra}
        return start_gateway(tmp, cfg, name=name)

    yield {"tmp": tmp, "redis": redis_proc, "mock": mock, "gateway": gateway, "policy": policy_path}
    mock.stop()
    redis_proc.stop()


def start_two(shared, first: str, second: str):
    one = shared["gateway"](first)
    try:
        return one, shared["gateway"](second)
    except BaseException:
        one.stop()
        raise


@pytest.fixture(scope="module")
def pair(shared):
    one, two = start_two(shared, "gw1", "gw2")
    yield one, two
    one.stop()
    two.stop()


@pytest.fixture
def r(shared):
    client = redis.Redis.from_url(shared["redis"].url, decode_responses=True)
    yield client
    client.close()


def chat(gw, key: str = FREE_KEY, timeout: float = 30, **body) -> httpx.Response:
    payload = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}], **body}
    return httpx.post(gw.url + "/v1/chat/completions", json=payload, headers=auth(key), timeout=timeout)


def stream_ids(client: redis.Redis) -> set[str]:
    return {orjson.loads(fields["e"])["request_id"] for _, fields in client.xrange(STREAM) if "e" in fields}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def ponder_stats(redis_url: str, policy_file: str) -> dict:
    out = subprocess.run([PYTHON, "-m", "gateway.cli", "stats", "--redis-url", redis_url, "--policy", "scale",
                          "--policy-file", policy_file, "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout).get("scale", {})


def arm_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["x-ponder-arm"].split("/")[0]


def test_both_replicas_learn_one_state(pair, shared):
    one, two = pair
    # Cold start: both replicas follow the priors (a: 0.8 > b: 0.7; no exploration, cost and latency free).
    served = []
    for i in range(16):
        gw = (one, two)[i % 2]
        response = chat(gw)
        assert arm_of(response) == "mock-a"
        served.append((gw, response.json()["id"]))
    # Feedback on every answer goes to the *other* replica: the request was recorded by its replica,
    # so the other one can only find it through Redis.
    for gw, request_id in served:
        other = two if gw is one else one
        fb = httpx.post(other.url + "/v1/feedback", headers=auth(), json={"request_id": request_id, "correct": False})
        assert fb.status_code == 200 and fb.json()["status"] == "accepted", fb.text
    # 16 failures of `a` (posterior mean ~0.09) put it below `b` on both replicas within a refresh.
    switched = {gw.url: wait_for(lambda gw=gw: arm_of(chat(gw)) == "mock-b", timeout=10, interval=0.2)
                for gw in (one, two)}
    assert all(switched.values()), switched

    # `ponder stats` over the same Redis shows what both replicas recorded together.
    table = wait_for(lambda: ponder_stats(shared["redis"].url, shared["policy"]), timeout=10)
    rows = {arm: row for bucket in table.values() for arm, row in bucket.items()}
    a_key = next(k for k in rows if k.startswith("mock-a/"))
    b_key = next(k for k in rows if k.startswith("mock-b/"))
    assert rows[a_key]["requests"] == 16
    assert rows[a_key]["success_rate"] == pytest.approx(0.0)
    assert rows[b_key]["requests"] >= 2
    assert rows[b_key].get("current_choice") is True and not rows[a_key].get("current_choice")


def test_one_budget_across_both_replicas(pair, r):
    one, two = pair
    barrier = threading.Barrier(24)

    def call(i: int) -> httpx.Response:
        barrier.wait()
        # max_tokens bounds each answer's cost, so a reservation (the worst case) equals the actual cost
        return chat((one, two)[i % 2], key=CAPPED_KEY, max_tokens=10)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(call, range(24)))
    statuses = [resp.status_code for resp in responses]
    assert set(statuses) <= {200, 429}, [resp.text for resp in responses if resp.status_code not in (200, 429)]
    ok = [resp for resp in responses if resp.status_code == 200]
    spent = sum(float(resp.headers["x-ponder-cost-usd"]) for resp in ok)
    # Expected cost equals actual cost here, so the atomic reserve admits exactly floor(cap / cost) over
    # both replicas together (per-replica caps would admit up to 10).
    assert len(ok) == int(CAP // COST) == 5, statuses
    assert spent <= CAP + COST
    assert {"mock-a", "mock-b"} & {arm_of(resp) for resp in ok}
    rejected = [resp for resp in responses if resp.status_code == 429]
    # refused while its replica's own requests were still in flight: told to retry in a moment
    # (budget_held; their holds might have come back), else budget_exhausted
    assert {resp.json()["error"]["code"] for resp in rejected} <= {"budget_exhausted", "budget_held"}
    # The counter in Redis holds the settled spend of both replicas.
    (counter,) = r.keys("ponder:{budget:capped}:day:*")
    assert float(r.get(counter)) == pytest.approx(spent)
    # all settled: the budget is spent, and both replicas say so until the period ends
    for replica in (one, two):
        spent_out = chat(replica, key=CAPPED_KEY)
        assert spent_out.status_code == 429 and spent_out.json()["error"]["code"] == "budget_exhausted"


def test_sigkill_of_one_replica_loses_no_outcome_of_the_other(shared, r):
    victim, survivor = start_two(shared, "victim", "survivor")
    try:
        # The victim answers some requests; after a quiet second its events have been flushed.
        victim_ids = [chat(victim).json()["id"] for _ in range(8)]
        assert wait_for(lambda: set(victim_ids) <= stream_ids(r), timeout=5)

        survivor_ids: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def load():
            while not stop.is_set():
                response = chat(survivor)
                if response.status_code == 200:
                    survivor_ids.append(response.json()["id"])
                else:
                    failures.append(response.text)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        # Traffic on the victim too, so it dies with work in hand.
        with ThreadPoolExecutor(4) as pool:
            inflight = [pool.submit(chat, victim) for _ in range(8)]
            time.sleep(0.5)
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait(10)
            for future in inflight:
                try:
                    future.result()
                except httpx.HTTPError:
                    pass
        time.sleep(1.0)  # the survivor keeps serving after its peer died
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not failures
        assert len(survivor_ids) >= 10
        # Every outcome the survivor answered is in the stream within its flush interval ...
        missing = wait_for(lambda: not (set(survivor_ids) - stream_ids(r)), timeout=5)
        assert missing, f"{len(set(survivor_ids) - stream_ids(r))} survivor events lost"
        # ... and so is everything the victim had flushed before it died.
        assert set(victim_ids) <= stream_ids(r)
        assert httpx.get(survivor.url + "/readyz").status_code == 200
    finally:
        victim.stop()
        survivor.stop()


def connection_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def test_sigterm_drains_in_flight_requests_and_flushes_telemetry(shared, r):
    mock = shared["mock"]
    gw = shared["gateway"]("drain")
    port = int(gw.url.rsplit(":", 1)[1])
    try:
        httpx.post(mock.url + "/control", json={"delay_ms": 1500}).raise_for_status()
        before = httpx.get(mock.url + "/calls").json()["count"]
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(chat, gw)
            streamed = pool.submit(lambda: httpx.post(
                gw.url + "/v1/chat/completions", headers=auth(), timeout=30,
                json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}))
            # Both requests have reached the (slow) upstream: they are in flight.
            assert wait_for(lambda: httpx.get(mock.url + "/calls").json()["count"] >= before + 2, timeout=10)
            sent_term = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            # New connections are refused while the in-flight requests are still running.
            assert wait_for(lambda: connection_refused(port), timeout=1.0, interval=0.02)
            refused_after = time.monotonic() - sent_term
            assert not plain.done() and not streamed.done()
            plain_response, streamed_response = plain.result(30), streamed.result(30)
        assert refused_after < 1.0
        assert plain_response.status_code == 200, plain_response.text
        assert plain_response.json()["choices"][0]["message"]["content"] == ANSWER
        assert streamed_response.status_code == 200
        assert streamed_response.text.rstrip().endswith("data: [DONE]")
        # uvicorn re-raises the signal once its shutdown (lifespan included) has finished: -SIGTERM
        # (exit status 143 in a container) is the clean end of a graceful shutdown.
        assert gw.process.wait(40) in (0, -signal.SIGTERM)
        assert "Traceback" not in gw.log()
        # Both events were written to Redis before the process exited (nothing can flush them later).
        ids = {plain_response.json()["id"], streamed_response.headers["x-ponder-request-id"]}
        assert ids <= stream_ids(r)
    finally:
        httpx.post(mock.url + "/control", json={"delay_ms": 0})
        gw.stop()


def test_feedback_sent_at_once_to_the_other_replica_is_accepted(pair):
    """A round-robin balancer sends the feedback to the other replica the moment the answer arrives:
    the answering replica writes its event tens of ms later, and the other must not say 404 meanwhile
    (a client takes unknown_request as final)."""
    one, two = pair
    for i in range(10):
        gw, other = (one, two) if i % 2 else (two, one)
        request_id = chat(gw).json()["id"]
        fb = httpx.post(other.url + "/v1/feedback", headers=auth(), json={"request_id": request_id, "correct": True})
        assert fb.status_code == 200 and fb.json()["status"] == "accepted", fb.text


def test_a_request_outlasting_the_shutdown_grace_gets_a_503_and_is_settled(shared, r):
    """SIGTERM with a request that will not finish within shutdown_grace_s (1 s here): the client gets
    a 503 shutting_down to retry elsewhere (not a bare 500), the request is recorded, and the key's
    budget hold is settled to what was spent (the prompt, free here), not left at its worst case."""
    mock = shared["mock"]
    gw = shared["gateway"]("grace", shutdown_grace_s=1.0)
    admin = shared["gateway"]("grace-admin")
    try:
        spent_before = _spent(admin, "grace")
        httpx.post(mock.url + "/control", json={"delay_ms": 4000}).raise_for_status()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, gw, GRACE_KEY, 30, max_tokens=10)
            time.sleep(0.5)  # in flight: the upstream answers after 4 s
            gw.process.send_signal(signal.SIGTERM)
            response = pending.result(20)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down" and int(response.headers["retry-after"]) >= 1
        assert gw.process.wait(20) in (0, -signal.SIGTERM)
        request_id = response.headers["x-ponder-request-id"]
        assert wait_for(lambda: request_id in stream_ids(r), timeout=5)
        assert wait_for(lambda: abs(_spent(admin, "grace") - spent_before) < 1e-9, timeout=5), _spent(admin, "grace")
    finally:
        httpx.post(mock.url + "/control", json={"delay_ms": 0})
        gw.stop()
        admin.stop()


def capped_key(key_id: str) -> tuple[str, dict, str]:
    """A key of a test's own, capped at CAP a day: its secret, the gateway config that has it, and its
    budget's day counter in Redis."""
    key = f"sk-scale-{key_id}"
    config = {"api_keys": [{"id": key_id, "sha256": sha(key), "budget_usd_per_day": CAP}]}
    return key, config, f"ponder:{{budget:{key_id}}}:day:{time.strftime('%Y%m%d', time.gmtime())}"


def _spent(gw, key_id: str) -> float:
    keys = httpx.get(gw.url + "/v1/ponder/spend", headers=auth(), timeout=10).json()["keys"]
    return next((k["spent"].get("day", 0.0) for k in keys if k["key_id"] == key_id), 0.0)


def test_budget_spent_while_redis_is_away_survives_a_sigterm(shared, r):
    """Redis hangs (SIGSTOP), the gateway keeps answering a capped key from its in-process ledger, and
    is then shut down (SIGTERM) while Redis is still away: the spend it could not push is saved in its
    data directory, and the next start pushes it, so the key cannot overspend by it after a restart."""
    key, config, counter = capped_key("outage")
    gw = shared["gateway"]("outage", **config)
    redis_pid = shared["redis"].pid
    try:
        assert chat(gw, key=key, max_tokens=10).status_code == 200
        assert float(r.get(counter)) == pytest.approx(COST)
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                response = chat(gw, key=key, max_tokens=10)
                assert response.status_code == 200, response.text
            store = httpx.get(gw.url + "/readyz").json()["store"]
            assert store["budget_mode"] == "local" and store["unsynced_budget_usd"] == pytest.approx(3 * COST)
            gw.process.send_signal(signal.SIGTERM)
            assert gw.process.wait(40) in (0, -signal.SIGTERM)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        first_log = gw.log()
        assert "Traceback" not in first_log
        assert float(r.get(counter)) == pytest.approx(COST)  # nothing reached Redis during the outage
        gw.stop()
        gw = shared["gateway"]("outage", **config)  # the same data directory
        assert float(r.get(counter)) == pytest.approx(4 * COST)  # pushed before it served anything
        assert "budget changes by shutdown: saved to" in first_log
        assert not list((shared["tmp"] / "outage-data").glob("budget-unsynced-*"))
    finally:
        gw.stop()


def _outage_spend(gw, key: str, redis_pid: int, requests: int) -> None:
    """With Redis hung (SIGSTOP), `requests` answers for `key` that the gateway admits from its ledger."""
    os.kill(redis_pid, signal.SIGSTOP)
    for _ in range(requests):
        response = chat(gw, key=key, max_tokens=10)
        assert response.status_code == 200, response.text
    store = httpx.get(gw.url + "/readyz").json()["store"]
    assert store["budget_mode"] == "local" and store["unsynced_budget_usd"] == pytest.approx(requests * COST)


def test_budget_spent_while_redis_is_away_survives_a_sigkill(shared, r):
    """A replica killed (SIGKILL: no shutdown runs) while Redis is away has journaled the spend it
    admitted locally; the next start on its data directory pushes it, once: a later restart pushes
    nothing more, so the key can neither overspend by it nor be charged twice."""
    key, config, counter = capped_key("killed")
    data = shared["tmp"] / "killed-data"
    gw = shared["gateway"]("killed", **config)
    redis_pid = shared["redis"].pid
    try:
        assert chat(gw, key=key, max_tokens=10).status_code == 200
        assert float(r.get(counter)) == pytest.approx(COST)
        try:
            _outage_spend(gw, key, redis_pid, 3)
            gw.stop(signal.SIGKILL)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert float(r.get(counter)) == pytest.approx(COST)  # nothing reached Redis during the outage
        gw = shared["gateway"]("killed", **config)  # the same data directory
        assert float(r.get(counter)) == pytest.approx(4 * COST)  # pushed before it served anything
        assert wait_for(lambda: not list(data.glob("budget-unsynced-*")), timeout=5)
        gw.stop()
        gw = shared["gateway"]("killed", **config)
        assert float(r.get(counter)) == pytest.approx(4 * COST)  # exactly once
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()


def test_a_running_replica_pushes_what_a_replica_killed_beside_it_journaled(shared, r):
    """Two replicas on one data directory (a shared volume); one is SIGKILLed while Redis is away and
    never restarted (scaled down). The survivor takes its journal over and pushes the spend once Redis
    is back, without waiting for a start: the key could spend it again meanwhile."""
    key, config, counter = capped_key("survivor")
    config["telemetry"] = {"redis_url": shared["redis"].url, "refresh_s": 0.2,
                           "data_dir": str(shared["tmp"] / "shared-volume")}
    survivor = shared["gateway"]("survivor", **config)
    dying = shared["gateway"]("dying", **config)
    redis_pid = shared["redis"].pid
    try:
        try:
            _outage_spend(dying, key, redis_pid, 3)
            dying.stop(signal.SIGKILL)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert r.get(counter) is None  # nothing reached Redis during the outage
        assert wait_for(lambda: r.get(counter) is not None, timeout=20)
        assert float(r.get(counter)) == pytest.approx(3 * COST)
        time.sleep(1.0)
        assert float(r.get(counter)) == pytest.approx(3 * COST)  # once
        assert "Traceback" not in survivor.log()
    finally:
        dying.stop()
        survivor.stop()


def test_budget_saved_at_shutdown_survives_a_start_while_redis_is_still_away(shared, r):
    """The start that takes the spend an earlier replica saved cannot push it (Redis still away) and is
    killed: the spend is not lost with it. The one after, with Redis back, pushes it once, and a
    replica that starts while Redis is away counts it against the key's cap."""
    key, config, counter = capped_key("restart")
    gw = shared["gateway"]("restart", **config)
    redis_pid = shared["redis"].pid
    try:
        assert chat(gw, key=key, max_tokens=10).status_code == 200
        try:
            _outage_spend(gw, key, redis_pid, 3)
            gw.stop(signal.SIGTERM)  # saves what it could not push
            gw = shared["gateway"]("restart", **config)  # Redis still away: takes it, cannot push it
            store = httpx.get(gw.url + "/readyz").json()["store"]
            assert store["unsynced_budget_usd"] == pytest.approx(3 * COST)
            gw.stop(signal.SIGKILL)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert float(r.get(counter)) == pytest.approx(COST)
        gw = shared["gateway"]("restart", **config)
        assert float(r.get(counter)) == pytest.approx(4 * COST)
    finally:
        gw.stop()


def test_events_buffered_while_redis_is_away_survive_a_sigterm(shared, r):
    """A rollout stops a replica (SIGTERM) while Redis hangs (SIGSTOP): the events it buffered (learned
    stats, request records, spend rollups) were lost, and feedback for those requests was a 404. They
    are saved in its data directory, and the next start there writes them, once."""
    data = shared["tmp"] / "events-data"
    gw = shared["gateway"]("events")
    redis_pid = shared["redis"].pid
    try:
        first = chat(gw)
        assert wait_for(lambda: first.json()["id"] in stream_ids(r))
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            ids = []
            for _ in range(3):
                response = chat(gw)
                assert response.status_code == 200, response.text
                ids.append(response.json()["id"])
            gw.process.send_signal(signal.SIGTERM)
            assert gw.process.wait(40) in (0, -signal.SIGTERM)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        first_log = gw.log()
        assert "Traceback" not in first_log
        assert "Redis did not take 3 buffered events by shutdown: saved to" in first_log
        assert list(data.glob("events-unwritten-*.jsonl"))
        # (The batch the gateway sent as Redis hung may be in the stream already: Redis runs it once it
        # resumes. Its mark makes the start below skip it.)
        gw.stop()
        gw = shared["gateway"]("events")  # the same data directory
        assert set(ids) <= stream_ids(r)  # written before it served
        assert not list(data.glob("events-unwritten-*"))
        feedback = httpx.post(gw.url + "/v1/feedback", headers=auth(), json={"request_id": ids[0], "score": 1.0})
        assert feedback.status_code == 200, feedback.text
        gw.stop()
        gw = shared["gateway"]("events")
        ids_in_stream = [orjson.loads(f["e"])["request_id"] for _, f in r.xrange(STREAM) if "e" in f]
        assert [ids_in_stream.count(i) for i in ids] == [1, 1, 1]  # once
    finally:
        gw.stop()


def test_a_running_replica_writes_the_events_a_replica_stopped_beside_it_saved(shared, r):
    """Two replicas on one data directory; one is stopped (SIGTERM, scaled down) while Redis hangs and
    saves the events it could not write. The survivor writes them once Redis is back, without a start."""
    config = {"telemetry": {"redis_url": shared["redis"].url, "refresh_s": 0.2,
                            "data_dir": str(shared["tmp"] / "events-volume")}}
    survivor = shared["gateway"]("events-survivor", **config)
    stopping = shared["gateway"]("events-stopping", **config)
    redis_pid = shared["redis"].pid
    try:
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            ids = [chat(stopping).json()["id"] for _ in range(3)]
            stopping.stop(signal.SIGTERM, timeout=40)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        assert "Redis did not take 3 buffered events by shutdown: saved to" in stopping.log()
        assert wait_for(lambda: set(ids) <= stream_ids(r), timeout=20)
        assert wait_for(lambda: not list((shared["tmp"] / "events-volume").glob("events-unwritten-*")), timeout=5)
        time.sleep(6.0)  # past the survivor's next look
        ids_in_stream = [orjson.loads(f["e"])["request_id"] for _, f in r.xrange(STREAM) if "e" in f]
        assert [ids_in_stream.count(i) for i in ids] == [1, 1, 1]
        assert "Traceback" not in survivor.log()
    finally:
        stopping.stop()
        survivor.stop()
