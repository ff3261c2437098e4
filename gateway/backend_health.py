"""A backend's health: the cool-down that makes later requests skip a failing backend at once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gateway.upstream_errors import UpstreamError

log = logging.getLogger("ponder.backends")


@dataclass(slots=True)
class BackendHealth:
    """Cool a failing backend down so later requests skip it at once instead of waiting on it. An
    outage is logged twice, however long it lasts: when the backend is first cooled down, and when it
    answers again (an operator reads one line per problem, not one per request)."""

    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    last_failed_request: int | None = None
    name: str = ""
    failing_since: float | None = None  # time.monotonic() of the cool-down that began this outage
    # The end of the wait the upstream itself asked for (Retry-After): calls already under way when it
    # asked (a vote's other samples) that answer or fail since must not end it sooner.
    asked_wait_until: float = 0.0
    # While the first call after a cool-down tests whether the backend is back (time.monotonic() until
    # which that call may run, `probe`), requests that have another arm take it: each one arriving
    # meanwhile was sent to it too, and one that still hangs held them all for its whole timeout.
    probe_until: float = 0.0

    def available(self, now: float) -> bool:
        """Whether a call may be sent to it now (its cool-down is over)."""
        return now >= self.cooldown_until

    def in_doubt(self, now: float) -> bool:
        """Cooling down, or being tested by a call after its cool-down: another arm answers if one can."""
        return now < self.cooldown_until or now < self.probe_until

    def probe(self, now: float, lease_s: float) -> bool:
        """Whether a call starting now is the one that tests a failing backend after its cool-down: then
        the backend is in doubt until `probe_ended`, or `lease_s` (the call's time) has passed."""
        if self.failing_since is None or self.in_doubt(now):
            return False
        self.probe_until = now + lease_s
        return True

    def probe_ended(self) -> None:
        self.probe_until = 0.0

    def answered(self) -> None:
        """A stream's first event came: the backend answers again, and the outage is over (logged once),
        so the next calls test nothing and the requests that had gone elsewhere come back. Its failures
        are kept until a call ends well: a stream that breaks mid-answer cools it down again at once."""
        if self.failing_since is not None:
            log.warning("backend %s answers again, after %.0f s of failures", self.name,
                        time.monotonic() - self.failing_since)
        self.failing_since = None
        self.probe_until = 0.0

    def failed(self, now: float, retry_after: float | None = None, *, slow: bool = False,
               request: int | None = None, error: UpstreamError | None = None) -> None:
        # One failure may be a blip worth one quick retry; failures of two requests in a row, an
        # explicit Retry-After, or one timeout (`slow`: no answer or no first byte in time, which
        # already cost the whole timeout) mean the backend is in trouble, and waiting on it again
        # would only add latency. A request failing again counts once: a body this upstream cannot
        # take fails every attempt, and must not cool the backend down for every other client.
        if request is None or request != self.last_failed_request:
            self.consecutive_failures += 1
        self.last_failed_request = request
        if retry_after:
            self.asked_wait_until = max(self.asked_wait_until, now + min(retry_after, self.max_cooldown_s))
        # A refusal of the gateway's credentials (a key revoked or wrong) will not mend in a second: it
        # cools the backend down at once, for the longest cool-down, and one call tests it again after
        # each (a key fixed in its environment or in a reloaded config is picked up within that time).
        credentials = error is not None and error.credentials
        if self.consecutive_failures < 2 and not retry_after and not slow and not credentials:
            return
        pause = self.max_cooldown_s if credentials else \
            min(self.base_cooldown_s * 2 ** (self.consecutive_failures - 2), self.max_cooldown_s)
        self.cooldown_until = max(now + pause, self.asked_wait_until)
        if self.failing_since is None:
            self.failing_since = now
            if credentials:  # the operator's to fix: said as an error, with what the upstream said
                log.error("backend %s refuses the gateway's credentials (HTTP %s: %s): check its API key; cooled "
                          "down, its calls fall back to other arms, tested again every %g s", self.name,
                          error.upstream_status, error.detail, self.max_cooldown_s)
            else:
                log.warning("backend %s is failing (%s): cooled down, its calls are skipped or fall back until it "
                            "answers again", self.name, _failure(error))

    def restarted(self) -> None:
        """The server behind it started again (the managed local model): what it asked for before
        (a Retry-After) and its failures are forgotten with it."""
        self.asked_wait_until = 0.0
        self.succeeded()

    def succeeded(self) -> None:
        self.answered()
        self.consecutive_failures = 0
        self.cooldown_until = self.asked_wait_until if self.asked_wait_until > time.monotonic() else 0.0
        self.last_failed_request = None


def _failure(error: UpstreamError | None) -> str:
    """What failed, for the log. No prompt text reaches the logs, and an upstream's message may quote the
    request: its status is told, or the gateway's own words up to their first colon ("upstream timed
    out", "ClientConnectorError", "stream broken"), never what follows them."""
    if error is None:
        return "no answer"
    if error.upstream_status is not None:
        return f"HTTP {error.upstream_status}"
    return error.message.removeprefix(f"{error.backend}: ").split(":", 1)[0][:80]
