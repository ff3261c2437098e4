"""The learning loop, live: `ponder serve` in front of two mock upstreams, the openai SDK as the client,
and feedback sent for every answer (compared with the known right one), as an app would.

- Traffic moves to the arm that pays (utility = P(correct) - lambda x cost), exploration stays within
  its share, and /v1/ponder/summary and `ponder stats` say what the client saw and sent.
- A change in the world (the good arm starts failing) moves the traffic back within the half-life.
- A client's `n` choices do not make the learner read an arm as dearer than it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from tests.servers import (PYTHON, ROOT, Process, calls, control, mock_backend, running, start_gateway, start_mock,
                           write_policy)

RIGHT, WRONG = "42", "17"
QUESTION = [{"role": "user", "content": "What is 6 times 7? Reply with the number only."}]
CHEAP, STRONG = "mock-a/-/single/1", "mock-b/-/single/1"


def answers(accuracy: float) -> list[str]:
    """What a mock answers in turn: `accuracy` of them right, spread over 20."""
    right = round(accuracy * 20)
    return [RIGHT if (i * right) % 20 < right else WRONG for i in range(20)]


@contextlib.contextmanager
def two_arm_gateway(tmp, name: str, *, half_life_hours: float | None, cheap: list[str], strong: list[str],
                    arms: dict | None = None) -> Iterator[tuple[Process, Process, Process, str]]:
    """`cheap` on mock-a ($1/$2 per M tokens) starts ahead on its prior; `strong` on mock-b ($0.0001 per
    prompt token, $0.01 per output token) is dearer, the more so the longer the prompt. Both arms
    expect one-word answers, so the cost model is right from the start."""
    policy = write_policy(tmp, {
        "name": name,
        "arms": arms or {"cheap": {"backend": "mock-a", "prior": 0.8, "tokens": 1},
                         "strong": {"backend": "mock-b", "prior": 0.5, "tokens": 1}},
        "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
        "objective": {"cost_weight": 20, "latency_weight": 0},
        "exploration": {"share": 0.1, "max_extra_cost_usd": 1.0},
        "learner": {"half_life_hours": half_life_hours},
    }, f"{name}.yaml")
    with running(start_mock(tmp)) as mock_a, running(start_mock(tmp)) as mock_b:
        control(mock_a, answers=cheap)
        control(mock_b, answers=strong)
        config = {"backends": [mock_backend("mock-a", mock_a),
                               mock_backend("mock-b", mock_b, prices={"input_per_mtok": 100.0, "output_per_mtok": 10_000.0})],
                  "policy": policy, "telemetry": {"data_dir": str(tmp / f"{name}-data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp, config, name=name)) as gateway:
            yield gateway, mock_a, mock_b, str(next(tmp.glob(f"{name}-*.yaml")))


class App:
    """An app that grades every answer it gets and says so (POST /v1/feedback)."""

    def __init__(self, gateway: Process) -> None:
        self.url = gateway.url
        self.client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        self.log: list[dict] = []

    def ask(self) -> dict:
        raw = self.client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
        completion = raw.parse()
        correct = completion.choices[0].message.content.strip() == RIGHT
        graded = httpx.post(self.url + "/v1/feedback", json={"request_id": completion.id, "correct": correct})
        assert graded.json()["status"] == "accepted", graded.text
        row = {"arm": raw.headers["x-ponder-arm"], "correct": correct, "cost": float(raw.headers["x-ponder-cost-usd"]),
               "explore": completion.model_extra["ponder"]["explore"]}
        self.log.append(row)
        return row


def test_traffic_moves_to_the_arm_that_pays_and_every_view_agrees(tmp_path):
    """`cheap` is right 40% of the time, `strong` 90% at ~1000x the price: utility 0.40 against
    0.9 - 20 x $0.011 = 0.68 on these ~10-token prompts. The learner starts on `cheap` (its prior) and
    must move, and the dashboard and `ponder stats` must name `strong` as the current choice: priced
    for a typical 300-token prompt instead of the bucket's own (~$0.04: utility 0.13) they named `cheap`."""
    with two_arm_gateway(tmp_path, "moves", half_life_hours=None, cheap=answers(0.4),
                         strong=answers(0.9)) as (gateway, _, _, config):
        app = App(gateway)
        for _ in range(300):
            app.ask()
        arms = Counter(row["arm"] for row in app.log)
        assert app.log[0]["arm"] == CHEAP  # the cold start follows the priors
        assert Counter(row["arm"] for row in app.log[-100:])[STRONG] >= 90, arms
        explored = sum(row["explore"] for row in app.log)
        assert explored <= 0.1 * 300 + 15  # the share is an upper bound (3 sd of binomial noise over it)

        time.sleep(0.3)  # the events are written and the stats refreshed
        summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
        (task,) = summary["tasks"]
        rows = {row["arm"]: row for row in task["arms"]}
        assert set(rows) == set(arms)
        for arm, sent in arms.items():
            mine = [row for row in app.log if row["arm"] == arm]
            assert rows[arm]["requests"] == sent
            assert rows[arm]["success_rate"] == pytest.approx(sum(r["correct"] for r in mine) / sent, abs=1e-4)
            assert rows[arm]["cost_usd"] == pytest.approx(sum(r["cost"] for r in mine), rel=1e-4)
        assert rows[STRONG]["current_choice_for"] == [task["tiers"][0]["tier"]]
        assert summary["totals"]["requests"] == 300
        assert summary["exploration"] == {"window": 300, "explored": explored, "exploited": 300 - explored,
                                          "share": pytest.approx(explored / 300, abs=1e-4)}

        stats = subprocess.run([PYTHON, "-m", "gateway.cli", "stats", "--config", config, "--json"], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr
        (table,) = json.loads(stats.stdout)["moves"].values()
        for arm, sent in arms.items():
            assert table[arm]["requests"] == sent
            assert table[arm]["success_rate"] == pytest.approx(rows[arm]["success_rate"], abs=1e-4)
            assert table[arm]["current_choice"] == (arm == STRONG)


def test_the_good_arm_failing_is_noticed_within_the_half_life(tmp_path):
    """Once traffic is on `strong`, it starts answering wrong (10% right): its own outcomes and the
    decay of its good record must hand the traffic back to `cheap` (utility 0.4, against 0.9 - 0.22
    before and 0.1 - 0.22 after) within three half-lives.

    The half-life is wall time and the test's pace is the machine's: a fixed one (3.6 s) decayed the
    good record before a loaded machine's 200 requests had built it. So the record is built with no
    decay, and the half-life then set (SIGHUP) to REQUESTS_PER_HALF_LIFE requests at the pace measured
    while building it: the same test in requests on any machine."""
    with two_arm_gateway(tmp_path, "drift", half_life_hours=None, cheap=answers(0.4),
                         strong=answers(0.9)) as (gateway, _, mock_b, _):
        app = App(gateway)
        started = time.monotonic()
        for _ in range(200):
            app.ask()
        per_request_s = (time.monotonic() - started) / 200
        assert Counter(row["arm"] for row in app.log[-50:])[STRONG] >= 40  # (room for exploration)
        half_life_s = REQUESTS_PER_HALF_LIFE * per_request_s
        policy_path = tmp_path / "drift.yaml"
        policy = yaml.safe_load(policy_path.read_text())
        policy["learner"]["half_life_hours"] = half_life_s / 3600
        policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
        os.kill(gateway.process.pid, signal.SIGHUP)  # re-read now, not at the next poll a second on
        control(mock_b, answers=answers(0.1))
        changed, seen = time.monotonic(), len(app.log)
        while time.monotonic() - changed < 3 * half_life_s:
            app.ask()
            recent = app.log[-40:]
            if len(app.log) - seen >= 40 and Counter(row["arm"] for row in recent)[CHEAP] >= 32:
                break
        else:
            pytest.fail(f"still on strong {3 * half_life_s:.1f} s ({len(app.log) - seen} requests) after it failed: "
                        f"{Counter(row['arm'] for row in app.log[-40:])}")


REQUESTS_PER_HALF_LIFE = 100  # the drift test's half-life, in requests at the pace the machine allows


def test_a_clients_n_choices_leave_one_answers_cost_as_it_is(tmp_path):
    """Apps that ask for n=4 choices pay for four answers. The outcomes were compared with the cost
    model's estimate for one, so the learner read the arm (and, through the route's calibration, the
    untried one) as costing ~3.5x what one answer does, and priced every later request so."""
    essay = " ".join(["word"] * 300)
    arms = {"cheap": {"backend": "mock-a", "prior": 0.9}, "strong": {"backend": "mock-b", "prior": 0.5}}
    with two_arm_gateway(tmp_path, "choices", half_life_hours=None, cheap=[essay], strong=[essay],
                         arms=arms) as (gateway, _, _, _):
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(40):
            asked = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION, n=4)
            assert asked.headers["x-ponder-arm"] == CHEAP and len(asked.parse().choices) == 4
        time.sleep(0.3)
        one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
        detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
        expected = next(c["expected_cost_usd"] for c in detail["decision"]["candidates"] if c["arm"] == CHEAP)
        assert expected == pytest.approx(float(one.headers["x-ponder-cost-usd"]), rel=0.1)


def test_an_arm_made_free_by_a_price_edit_costs_nothing_to_the_learner(tmp_path):
    """An operator moves `strong` to a free endpoint (its prices edited to 0 in the policy, hot
    reloaded) and weighs cost more. The learner kept charging the arm most of the mean cost it had
    observed at the old price (~$0.011 a request), so at cost_weight 100 the free arm, right 90% of the
    time, lost to `cheap`, right 40%, for as long as its old record lasted (for ever without a
    half-life). The old record's cost ratio (observed / estimated) applies to the new price, as it
    does to any other price edit."""
    def policy(strong_prices: dict, cost_weight: float) -> dict:
        return {"name": "repriced",
                "backends": [mock_backend("mock-a", mock_a), mock_backend("mock-b", mock_b, prices=strong_prices)],
                "arms": {"cheap": {"backend": "mock-a", "prior": 0.5, "tokens": 1},
                         "strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1}},
                "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
                "objective": {"cost_weight": cost_weight, "latency_weight": 0},
                "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}

    with running(start_mock(tmp_path)) as mock_a, running(start_mock(tmp_path)) as mock_b:
        control(mock_a, answers=answers(0.4))
        control(mock_b, answers=answers(0.9))
        path = write_policy(tmp_path, policy({"input_per_mtok": 100.0, "output_per_mtok": 10_000.0}, 20), "repriced.yaml")
        config = {"policy": path, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="repriced")) as gateway:
            app = App(gateway)
            for _ in range(30):
                assert app.ask()["arm"] == STRONG  # 0.9 - 20 x $0.011 beats 0.4
            assert app.log[-1]["cost"] > 0.005

            write_policy(tmp_path, policy({"input_per_mtok": 0.0, "output_per_mtok": 0.0}, 100), "repriced.yaml")
            time.sleep(2.5)  # the policy watcher looks every second
            for _ in range(10):
                row = app.ask()
                assert (row["arm"], row["cost"]) == (STRONG, 0.0)
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{raw.headers['x-ponder-request-id']}").json()
            expected = {c["arm"]: c["expected_cost_usd"] for c in detail["decision"]["candidates"]}
            assert expected[STRONG] == 0.0 and raw.headers["x-ponder-arm"] == STRONG


def test_requests_no_arm_answered_leave_an_answers_cost_as_it_is(tmp_path):
    """The route's only backend fails every other call: those requests fail (502), billed nothing.
    They were recorded with the cost model's estimate of an answer against $0 spent, so the learner
    expected an answer to cost about half what it does (the ratio of what was spent to what was
    estimated), and the objective and the cost caps used that: a flaky arm looked cheap, and one
    outage made an arm look cheap for as long as its record lasted."""
    arms = {"strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "outage", "arms": arms, "routes": [{"name": "all", "candidates": ["strong"]}],
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "outage.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        control(mock_b, answers=[RIGHT])
        config = {"backends": [mock_backend("mock-b", mock_b, max_retries=0,
                                            prices={"input_per_mtok": 100.0, "output_per_mtok": 10_000.0})],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="outage")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            control(mock_b, script=["500", "ok"] * 15)  # flaky: every other call fails
            for i in range(30):
                if i % 2 == 0:
                    with pytest.raises(openai.InternalServerError):
                        client.chat.completions.create(model="auto", messages=QUESTION)
                else:
                    answered = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            time.sleep(0.3)
            one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
            (expected,) = (c["expected_cost_usd"] for c in detail["decision"]["candidates"])
            assert expected == pytest.approx(float(answered.headers["x-ponder-cost-usd"]), rel=0.1)


def test_requests_no_arm_answered_leave_an_answers_latency_as_it_is(tmp_path):
    """The route's only backend answers in 300 ms, or fails at once every other call (502, no answer).
    The failures' few milliseconds were summed with the answers' latency and divided by every request,
    so the learner expected an answer in about half the time it takes: with `latency_weight` above 0
    a flaky arm looked faster than it is (and faster the flakier), as it looked cheaper before."""
    arms = {"strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1, "latency_ms": 300}}
    policy = write_policy(tmp_path, {"name": "flaky", "arms": arms, "routes": [{"name": "all", "candidates": ["strong"]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0.1},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "flaky.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        control(mock_b, answers=[RIGHT])
        config = {"backends": [mock_backend("mock-b", mock_b, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="flaky")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            for i in range(30):
                if i % 2 == 0:
                    control(mock_b, script=["500"], delay_ms=0)
                    with pytest.raises(openai.InternalServerError):
                        client.chat.completions.create(model="auto", messages=QUESTION)
                else:
                    control(mock_b, delay_ms=300)
                    client.chat.completions.create(model="auto", messages=QUESTION)
            time.sleep(0.3)
            one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
            (expected,) = (c["expected_latency_ms"] for c in detail["decision"]["candidates"])
            assert 300 <= expected < 450  # an answer takes 300 ms and a little; the failures say nothing of it
            summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
            (row,) = summary["tasks"][0]["arms"]
            assert 300 <= row["mean_latency_ms"] < 450, row


def test_an_explored_arm_that_fails_leaves_the_request_unexplored(tmp_path):
    """Every request explores `strong` (share 1.0, its prior in doubt). Once, its backend fails and the
    greedy arm answers as the fallback: that request was recorded under the greedy arm, yet counted as
    explored, in the client's `ponder.explore`, the request's detail, the summary's explore share and
    ponder_learner_decisions_total. Explored means the explored arm answered, as when a budget makes
    it give way before any call (docs/policies.md)."""
    arms = {"cheap": {"backend": "mock-a", "prior": 0.9, "tokens": 1},
            "strong": {"backend": "mock-b", "prior": 0.7, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "explored", "arms": arms,
                                     "routes": [{"name": "all", "candidates": ["cheap", "strong"]}],
                                     "exploration": {"share": 1.0, "max_extra_cost_usd": 1.0},
                                     "learner": {"half_life_hours": None, "prior_strength": 1}}, "explored.yaml")
    with running(start_mock(tmp_path)) as mock_a, running(start_mock(tmp_path)) as mock_b:
        control(mock_a, answers=[RIGHT])
        control(mock_b, answers=[RIGHT])
        config = {"backends": [mock_backend("mock-a", mock_a, max_retries=0), mock_backend("mock-b", mock_b, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="explored")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            explored = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert explored.headers["x-ponder-arm"] == STRONG and explored.parse().model_extra["ponder"]["explore"]
            control(mock_b, script=["500"])
            fell_back = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert fell_back.headers["x-ponder-arm"] == CHEAP  # strong was chosen, failed, and cheap answered
            assert fell_back.parse().model_extra["ponder"]["explore"] is False
            time.sleep(0.3)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{fell_back.headers['x-ponder-request-id']}").json()
            assert detail["decision"]["arm"] == CHEAP and detail["decision"]["explore"] is False
            summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
            assert summary["exploration"]["explored"] == 1 and summary["exploration"]["exploited"] == 1
            metrics = httpx.get(gateway.url + "/metrics").text
            assert sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("ponder_learner_decisions_total{") and 'mode="explore"' in line) == 1.0


def test_feedback_after_a_reset_of_the_learned_stats_reads_as_a_score(tmp_path, redis_url):
    """An operator resets a policy's learned stats (docs/telemetry.md: its agg and arms keys deleted,
    its alive marker kept); the app then grades an answer from before, a vote's (scored 0.94 at weight
    0.3). The feedback replaces that score in a record that no longer holds it: successes -0.28 over
    weight 0.7, which the summary and `ponder stats` showed as a success rate of -40%."""
    import redis

    arms = {"vote": {"backend": "mock-b", "strategy": "self_consistency", "n": 3, "prior": 0.9, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "reset", "arms": arms, "routes": [{"name": "all", "candidates": ["vote"]}],
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "reset.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        control(mock_b, answers=[RIGHT])
        config = {"backends": [mock_backend("mock-b", mock_b)], "policy": policy,
                  "telemetry": {"redis_url": redis_url, "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="reset")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            earlier = client.chat.completions.create(model="auto", messages=QUESTION)
            assert earlier.model_extra["ponder"]["confidence"] > 0.9
            time.sleep(0.3)
            store = redis.Redis.from_url(redis_url)
            learned = [*store.scan_iter("ponder:{policy:reset}:agg:*"), b"ponder:{policy:reset}:arms"]
            assert len(learned) == 2 and store.delete(*learned) == 2
            graded = httpx.post(gateway.url + "/v1/feedback", json={"request_id": earlier.id, "correct": False})
            assert graded.json()["status"] == "accepted"
            time.sleep(0.3)
            (task,) = httpx.get(gateway.url + "/v1/ponder/summary").json()["tasks"]
            (row,) = task["arms"]
            assert row["success_rate"] == 0.0, row  # wrong, as the client said; never below 0
            stats = subprocess.run([PYTHON, "-m", "gateway.cli", "stats", "--redis-url", redis_url, "--json"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
            assert stats.returncode == 0, stats.stderr
            (table,) = json.loads(stats.stdout)["reset"].values()
            assert table["mock-b/-/self_consistency/3"]["success_rate"] == 0.0


def test_requests_whose_client_left_leave_an_answers_latency_as_it_is(tmp_path):
    """The route's only backend answers in 600 ms; every other client gives up after 150 ms (499: billed,
    not the arm's error, no latency sample, as docs/telemetry.md says). Each added the 150 ms its client
    waited to latency_ms and one to the mean's denominator (count - errors), as if an answer had come in
    150 ms: the learner expected one in about 60% of the time it takes, and the slower an arm, the more
    clients leave it and the faster it looked. Now they are `left`, out of the sum and the denominator."""
    arms = {"strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1, "latency_ms": 600}}
    policy = write_policy(tmp_path, {"name": "slow", "arms": arms, "routes": [{"name": "all", "candidates": ["strong"]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0.1},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "slow.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        control(mock_b, answers=[RIGHT], delay_ms=600)
        config = {"backends": [mock_backend("mock-b", mock_b, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="slow")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            impatient = client.with_options(timeout=0.15)
            for i in range(12):
                if i % 2 == 0:
                    with pytest.raises(openai.APITimeoutError):
                        impatient.chat.completions.create(model="auto", messages=QUESTION)
                    time.sleep(0.6)  # the gateway sees the hang-up and records the 499
                else:
                    client.chat.completions.create(model="auto", messages=QUESTION)
            time.sleep(0.3)
            one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
            (expected,) = (c["expected_latency_ms"] for c in detail["decision"]["candidates"])
            assert 600 <= expected < 800, expected  # an answer takes 600 ms and a little
            for _ in range(100):  # the last request is recorded just after its answer went out
                (row,) = httpx.get(gateway.url + "/v1/ponder/summary").json()["tasks"][0]["arms"]
                if row["requests"] == 13:
                    break
                time.sleep(0.05)
            assert row["requests"] == 13 and 600 <= row["mean_latency_ms"] < 800, row


def test_requests_whose_client_left_leave_an_answers_cost_as_it_is(tmp_path):
    """Two answers, then six clients who leave after 0.2 s (499), each call cut and billed its prompt
    (about a tenth of an answer). Each was recorded with the cost model's estimate of a whole answer
    against that partial bill, so the learner expected an answer to cost less than it does (observed
    ratio 0.35, three quarters of it after the prior's shrinkage), and the objective and the
    per-request cost caps used that: the more clients gave up on an arm, the cheaper it looked. Like
    a request no arm answered, a hang-up has no answer to estimate."""
    arms = {"strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "gone", "arms": arms,
                                     "routes": [{"name": "all", "candidates": ["strong"]}],
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "gone.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        control(mock_b, answers=[RIGHT])
        config = {"backends": [mock_backend("mock-b", mock_b, max_retries=0,
                                            prices={"input_per_mtok": 100.0, "output_per_mtok": 10_000.0})],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="gone")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            for _ in range(2):
                answered = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            control(mock_b, delay_ms=3000)
            for _ in range(6):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "auto", "messages": QUESTION},
                               timeout=httpx.Timeout(10, read=0.2))
            for _ in range(100):  # recorded once the gateway has seen the client go
                (row,) = httpx.get(gateway.url + "/v1/ponder/summary").json()["tasks"][0]["arms"]
                if row["requests"] == 8:
                    break
                time.sleep(0.05)
            assert row["requests"] == 8 and row["spent_usd"] > 2 * float(answered.headers["x-ponder-cost-usd"]), row
            control(mock_b, delay_ms=0)
            one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
            (expected,) = (c["expected_cost_usd"] for c in detail["decision"]["candidates"])
            # never under what an answer costs (the cost caps hold); a little over, as the hang-ups' cut
            # prompts are charged to the answers, as a failure's cut prompt is (it was 0.74 of it)
            answer = float(answered.headers["x-ponder-cost-usd"])
            assert answer <= expected < 1.3 * answer, (expected, answer)


def test_a_fallbacks_learned_latency_is_its_own_not_the_failed_arms_wait(tmp_path):
    """`first` times out (its backend's `timeout_s`, 1 s) and `fast`, 100 ms, answers for it. The event's
    latency is the request's (what the client waited, its detail keeps it), and it was all learned as
    `fast`'s: an arm answering in 100 ms read as a 1.1 s one, in the objective and on the dashboard
    (mean and percentiles), for every timeout of another arm it stood in for."""
    arms = {"first": {"backend": "slow", "prior": 0.9, "tokens": 1},
            "fast": {"backend": "fast", "prior": 0.5, "tokens": 1, "latency_ms": 100}}
    policy = write_policy(tmp_path, {"name": "stand-in", "arms": arms,
                                     "routes": [{"name": "all", "candidates": ["first", "fast"]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}},
                          "stand-in.yaml")
    with running(start_mock(tmp_path)) as slow, running(start_mock(tmp_path)) as fast:
        control(slow, script=["hang"] * 10, hang_s=5)
        control(fast, answers=[RIGHT], delay_ms=100)
        config = {"backends": [mock_backend("slow", slow, max_retries=0, timeout_s=1),
                               mock_backend("fast", fast, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="stand-in")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert raw.headers["x-ponder-arm"] == "fast/-/single/1"
            time.sleep(0.3)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{raw.headers['x-ponder-request-id']}").json()
            assert [c["ok"] for c in detail["execution"]["calls"]] == [False, True]  # the fallback answered
            assert detail["request"]["latency_ms"] >= 1000  # the request's whole time, as the client waited
            summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
            (row,) = summary["tasks"][0]["arms"]
            assert 100 <= row["mean_latency_ms"] < 400, row
            assert row["p50_latency_ms"] < 400 and row["p95_latency_ms"] < 400, row
            one = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{one.headers['x-ponder-request-id']}").json()
            expected = {c["arm"]: c["expected_latency_ms"] for c in detail["decision"]["candidates"]}
            assert expected["fast/-/single/1"] < 400, expected


def test_a_fallbacks_p95_is_not_the_failed_arms_wait_under_a_latency_cap(tmp_path):
    """`first` (expected 200 ms) times out now and then at 1 s and `fast`, 100 ms, answers for it, under
    max_p95_latency_ms 500. The fallback's p95 was its requests' whole time, the other arm's timeouts
    included: after two of them `fast` was ruled out as over the cap, so it was no fallback either,
    and every request from then on failed (504, then 503 while `first` cooled down)."""
    arms = {"first": {"backend": "slow", "prior": 0.9, "tokens": 1, "latency_ms": 200},
            "fast": {"backend": "fast", "prior": 0.5, "tokens": 1, "latency_ms": 100}}
    policy = write_policy(tmp_path, {"name": "capped", "arms": arms,
                                     "routes": [{"name": "all", "candidates": ["first", "fast"]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0, "max_p95_latency_ms": 500},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}},
                          "capped.yaml")
    with running(start_mock(tmp_path)) as slow, running(start_mock(tmp_path)) as fast:
        control(slow, script=["hang"] * 30, hang_s=5)
        control(fast, answers=[RIGHT], delay_ms=100)
        config = {"backends": [mock_backend("slow", slow, max_retries=0, timeout_s=1),
                               mock_backend("fast", fast, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="capped")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            served = []
            for _ in range(10):
                raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
                served.append(raw.headers["x-ponder-arm"])
                time.sleep(0.15)  # recorded and refreshed before the next decision
            assert served == ["fast/-/single/1"] * 10
            assert calls(slow)["count"] >= 3  # `first` was tried, timed out, and `fast` stood in
            (row,) = httpx.get(gateway.url + "/v1/ponder/summary").json()["tasks"][0]["arms"]
            assert row["p95_latency_ms"] < 400, row


def test_an_arm_ruled_out_by_the_latency_cap_alone_answers_when_the_fast_one_fails(tmp_path):
    """`fast` (100 ms) fails every call; `slow` (expected 2 s, p95 3 s) is affordable but over the
    policy's max_p95_latency_ms of 1 s. Latency is a soft limit (docs/policies.md), yet `slow` was no
    fallback: every request failed (502, then 503 while `fast` cooled down) though `slow` answers."""
    arms = {"fast": {"backend": "fast", "prior": 0.9, "tokens": 1, "latency_ms": 100},
            "slow": {"backend": "slow", "prior": 0.9, "tokens": 1, "latency_ms": 2000}}
    policy = write_policy(tmp_path, {"name": "soft", "arms": arms,
                                     "routes": [{"name": "all", "candidates": ["fast", "slow"]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0, "max_p95_latency_ms": 1000},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}},
                          "soft.yaml")
    with running(start_mock(tmp_path)) as fast, running(start_mock(tmp_path)) as slow:
        control(fast, script=["500"] * 10)
        control(slow, answers=[RIGHT])
        config = {"backends": [mock_backend("fast", fast, max_retries=0), mock_backend("slow", slow, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="soft")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            for _ in range(3):
                raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
                assert raw.headers["x-ponder-arm"] == "slow/-/single/1"
                assert raw.parse().choices[0].message.content == RIGHT


# An upstream's overload that asks for a wait: its backend cools down at once, for that long
OVERLOADED = {"status": 503, "headers": {"Retry-After": "3"}, "body": '{"error": {"message": "overloaded"}}'}


def test_while_the_best_arms_backends_cool_down_the_best_arm_whose_backend_answers_serves(tmp_path):
    """Arms on backends `a` to `d` (one upstream, which fails asking for 3 s) rank above `e`'s. The first
    request tries four of them (the decision's arm and its three fallbacks), and fails. `e` was never a
    fallback, and for as long as they cooled down every request was refused 503 at once although `e`
    answers: the decision did not know which backends cool down. Now `e` serves meanwhile (greedily, not
    explored, the reasons say why), the cooling backends are not called, and once their cool-down is
    over the best arm serves again."""
    arms = {name: {"backend": name, "prior": prior, "tokens": 1}
            for name, prior in (("a", 0.9), ("b", 0.85), ("c", 0.8), ("d", 0.75), ("e", 0.5))}
    policy = write_policy(tmp_path, {"name": "cool", "arms": arms, "routes": [{"name": "all", "candidates": [*arms]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}},
                          "cool.yaml")
    with running(start_mock(tmp_path)) as down, running(start_mock(tmp_path)) as up:
        control(down, script=["error"] * 4, error=OVERLOADED, answers=[RIGHT])
        control(up, answers=[RIGHT])
        config = {"backends": [mock_backend(name, down if name != "e" else up, max_retries=0) for name in arms],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="cool")) as gateway:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="auto", messages=QUESTION)
            assert refused.value.status_code == 502 and calls(down)["count"] == 4
            cooled = time.monotonic()
            for stream in (False, True, False):
                raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION, stream=stream)
                assert raw.headers["x-ponder-arm"] == "e/-/single/1"
                if not stream:
                    completion = raw.parse()
                    assert completion.choices[0].message.content == RIGHT
                    assert completion.model_extra["ponder"]["explore"] is False
                else:
                    assert "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse()
                                   if chunk.choices) == RIGHT
            control(up, script=["500", "500"])  # the arm standing in fails: its failure is the answer, as ever
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as failed:
                    client.chat.completions.create(model="auto", messages=QUESTION, stream=stream)
                assert failed.value.status_code == 502 and "e: upstream 500" in failed.value.message
                assert failed.value.response.headers["x-should-retry"] == "false"
            assert time.monotonic() - cooled < 3, "the test ran past the cool-down"
            assert calls(down)["count"] == 4  # nothing sent to a backend cooling down
            detail = httpx.get(f"{gateway.url}/v1/ponder/requests/{completion.id}").json()["decision"]
            assert any("backend `a` is cooling down" in reason for reason in detail["reasons"]), detail["reasons"]
            time.sleep(max(0.0, cooled + 3.2 - time.monotonic()))  # their cool-down is over: the best arm again
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert raw.headers["x-ponder-arm"] == "a/-/single/1" and raw.parse().choices[0].message.content == RIGHT


def test_a_degraded_key_falls_back_to_the_next_cheapest_arm_its_budget_holds(tmp_path):
    """Under the degrade line (no `max_cost_usd`) a key gets the cheapest arm, and the next cheapest arms
    are its fallbacks (it had none: a key whose cheapest arm failed got a 502 although the next cheapest
    fit its budget and answered). Never beyond the budget: a fallback whose worst case is more than the
    key has left is dropped (cost_bounds.arms_within), and that key gets the 502. While the cheapest arm's
    backend cools down the next cheapest serves without calling it."""
    arms = {"cheap": {"backend": "cheap", "prior": 0.8, "tokens": 1},
            "dear": {"backend": "dear", "prior": 0.9, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "low", "arms": arms, "routes": [{"name": "all", "candidates": [*arms]}],
                                     "objective": {"cost_weight": 0, "latency_weight": 0},
                                     "budgets": {"degrade": {"below_usd": 100}},
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "low.yaml")
    # without max_tokens a budget holds 1,024 output tokens a call: cheap's worst case is $0.0021 (2/M
    # output), dear's $0.0105 (10/M): a key with $0.005 holds the cheap arm only
    keys = {"sk-low": ("low", 10), "sk-tiny": ("tiny", 0.005)}
    with running(start_mock(tmp_path)) as cheap, running(start_mock(tmp_path)) as dear:
        control(cheap, script=["500"], answers=[RIGHT])
        control(dear, answers=[RIGHT])
        config = {"backends": [mock_backend("cheap", cheap, max_retries=0),
                               mock_backend("dear", dear, max_retries=0,
                                            prices={"input_per_mtok": 5.0, "output_per_mtok": 10.0})],
                  "api_keys": [{"id": ident, "sha256": hashlib.sha256(key.encode()).hexdigest(),
                                "budget_usd_per_day": cap} for key, (ident, cap) in keys.items()],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="low")) as gateway:
            def client(key: str) -> openai.OpenAI:
                return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)

            raw = client("sk-low").chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert raw.headers["x-ponder-arm"] == "dear/-/single/1"  # the cheapest failed: the next cheapest
            assert raw.parse().choices[0].message.content == RIGHT
            assert calls(cheap)["count"] == 1 and calls(dear)["count"] == 1
            control(cheap, script=["500"])  # its second failure in a row: it cools down
            with pytest.raises(openai.APIStatusError) as refused:  # dear's worst case is over what tiny has
                client("sk-tiny").chat.completions.create(model="auto", messages=QUESTION)
            assert refused.value.status_code == 502 and calls(dear)["count"] == 1  # dear was never called
            raw = client("sk-low").chat.completions.with_raw_response.create(model="auto", messages=QUESTION)
            assert raw.headers["x-ponder-arm"] == "dear/-/single/1"
            assert calls(cheap)["count"] == 2  # cooling down: not called


def test_a_request_the_client_left_is_no_latency_sample(tmp_path):
    """The client gives up on two requests after 0.3 s (499) and waits for one, 100 ms. docs/telemetry.md:
    a hang-up is neither the arm's error nor a latency sample, but its 0.3 s was summed into the arm's
    latency and counted in the mean's denominator: the arm read as 230 ms, and the more clients gave
    up on a slow arm, the faster it looked."""
    arms = {"strong": {"backend": "mock-b", "prior": 0.9, "tokens": 1}}
    policy = write_policy(tmp_path, {"name": "leave", "arms": arms, "routes": [{"name": "all", "candidates": ["strong"]}],
                                     "exploration": {"share": 0.0}, "learner": {"half_life_hours": None}}, "leave.yaml")
    with running(start_mock(tmp_path)) as mock_b:
        config = {"backends": [mock_backend("mock-b", mock_b, max_retries=0)],
                  "policy": policy, "telemetry": {"data_dir": str(tmp_path / "data"), "refresh_s": 0.05}}
        with running(start_gateway(tmp_path, config, name="leave")) as gateway:
            control(mock_b, answers=[RIGHT], delay_ms=100)
            openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
                model="auto", messages=QUESTION)
            control(mock_b, delay_ms=3000)
            for _ in range(2):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(gateway.url + "/v1/chat/completions", json={"model": "auto", "messages": QUESTION},
                               timeout=httpx.Timeout(10, read=0.3))
            for _ in range(100):  # recorded once the gateway has seen the client go
                summary = httpx.get(gateway.url + "/v1/ponder/summary").json()
                if summary["tasks"] and summary["tasks"][0]["arms"][0]["requests"] == 3:
                    break
                time.sleep(0.05)
            (row,) = summary["tasks"][0]["arms"]
            assert row["requests"] == 3 and row["error_rate"] == 0, row  # billed and counted, not an error
            assert 100 <= row["mean_latency_ms"] < 200, row
