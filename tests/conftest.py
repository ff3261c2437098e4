# shared fixtures: gateway fixtures live below
#
# redis_server: one real redis-server (Debian package) on a free loopback port for the whole session.
# redis_url:    its URL, with the database flushed before each test. Tests that kill Redis start their
#               own server with telemetry.redis_server.start_redis() instead of killing this one.

from __future__ import annotations

import pytest
import redis

from telemetry.redis_server import start_redis


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
