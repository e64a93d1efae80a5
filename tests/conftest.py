"""Fixtures for real ezauth processes, used by every layer under tests/ that starts one."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.basics import PASSWORD, missing
from tests.support.process import Server, add_user, start_server


@pytest.fixture
def gunicorn_bin() -> str:
    """gunicorn beside this Python (`.venv/bin/pytest` does not put .venv/bin on PATH), or on PATH."""
    found = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    if found is None:
        missing("gunicorn is not installed; install it with: .venv/bin/pip install -r requirements-test.txt",
                "EZAUTH_REQUIRE_NGINX")
    return found


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real servers on demand (users=None: alice; {}: none); every one is stopped by PID in teardown."""
    started: list[Server] = []

    def start(data_dir: Path | None = None, users: dict[str, str] | None = None,
              args: tuple = (), **env: str) -> Server:
        data_dir = data_dir or tmp_path / f"data{len(started)}"
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, password in ({"alice": PASSWORD} if users is None else users).items():
            add_user(data_dir, name, password)
        server = start_server(data_dir, args=args, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def servers(server_factory) -> Callable[..., Server]:
    """Start real servers on a given data dir, without creating users."""
    return lambda data_dir, args=(), **env: server_factory(data_dir, users={}, args=args, **env)


@pytest.fixture
def live_server(server_factory) -> Server:
    """One real ezauth with user alice / PASSWORD."""
    return server_factory()


@pytest.fixture
def lenient_server(server_factory) -> Server:
    """A real ezauth with alice; generous lockout so several wrong attempts in one test are fine."""
    return server_factory(EZAUTH_MAX_ATTEMPTS="50")
