"""Fixtures for the suites that run nginx.conf.example in a real nginx."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from tests.support.basics import require_tool
from tests.support.nginx import Stack, build_stack


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return require_tool("nginx", "EZAUTH_REQUIRE_NGINX", "nginx-light")


@pytest.fixture
def make_stack(nginx_bin, tmp_path) -> Iterator[Callable[..., Stack]]:
    """Private stacks (build_stack's options), all stopped in teardown."""
    with contextlib.ExitStack() as cleanup:
        count = iter(range(100))
        yield lambda **kw: build_stack(nginx_bin, tmp_path / f"stack{next(count)}", cleanup, **kw)


@pytest.fixture(scope="module")
def stack(nginx_bin, tmp_path_factory) -> Iterator[Stack]:
    """One stack per test file with users alice and bob, shared by the tests that change nothing in it."""
    with contextlib.ExitStack() as cleanup:
        yield build_stack(nginx_bin, tmp_path_factory.mktemp("stack"), cleanup, users=("alice", "bob"))
