"""Engine fixtures: a SyncContext on the sandbox, the test Postgres and Redis database 14."""

from __future__ import annotations

import pytest
from helpers import Harness, make_context


@pytest.fixture
def ctx(sandbox, sessions, engine_redis):
    context = make_context(sandbox, sessions, engine_redis)
    yield context
    context.client.http.close()
    context.file_http.close()


@pytest.fixture
def h(ctx):
    return Harness(ctx)
