# shared fixtures
#
# redis_server: one real redis-server (Debian package) on a free loopback port for the whole session.
# redis_url:    its URL, with the database flushed before each test. Tests that kill Redis start their
#               own server with telemetry.redis_server.start_redis() instead of killing this one.
#
# For a test module whose `stack` fixture starts its servers once and yields (gateway, mock, ...):
# mock:         the mock, reset before each test (tests/servers.py's control, sent and calls drive it).
# gw:           the gateway (its mock reset).
# client:       the openai SDK on the gateway, no retries (a module whose gateway checks keys overrides it).

from __future__ import annotations

import openai
import pytest
import redis

from telemetry.redis_server import start_redis
from tests.servers import reset


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    proc = start_redis(data_dir=tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def mock(stack):
    reset(stack[1])
    return stack[1]


@pytest.fixture
def gw(stack, mock):
    return stack[0]


@pytest.fixture
def client(gw):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
