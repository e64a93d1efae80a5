"""Fixtures for the in-process app (test_ezauth.py and every layer under tests/), and the one hook
that marks each test with its layer from the directory it lives in.

Layers: test_ezauth.py and tests/app/ run the WSGI app in-process through WebTest; tests/process/
starts ezauth (the CLI, the built-in server, gunicorn) as subprocesses; tests/nginx/ runs a real
nginx; tests/browser/ drives Chromium; tests/realapps/ puts Gradio and JupyterLab behind nginx.
Helpers live in tests/support/, one module per layer; conftests hold only fixtures and this hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import webtest

import ezauth
from tests.support.app import new_client
from tests.support.basics import PASSWORD, T0, FakeClock, write_users

TESTS = Path(__file__).resolve().parent / "tests"
LAYER_MARKERS = ("process", "nginx", "browser", "realapps")  # tests/<layer>/: marker <layer>
# tests/conftest.py offers these to every layer under tests/, tests/app/ included; a test there that
# starts ezauth belongs in tests/process/ (or the layer it drives), where its marker says so.
PROCESS_FIXTURES = {"server_factory", "servers", "live_server", "lenient_server", "gunicorn_bin"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/LAYER/ with LAYER, so no test file sets its layer by hand; refuse
    an in-process test that starts a real server."""
    misplaced = []
    for item in items:
        layer = item.path.relative_to(TESTS).parts[0] if item.path.is_relative_to(TESTS) else ""
        if layer in LAYER_MARKERS:
            item.add_marker(layer)
        elif PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError("these start a real ezauth, so they belong under tests/process/ "
                                "(or the layer they drive), not with the in-process tests:\n  "
                                + "\n  ".join(misplaced))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with users alice and bob, both with PASSWORD (cheap hashes)."""
    path = tmp_path / "data"
    write_users(path, alice=PASSWORD, bob=PASSWORD)
    return path


@pytest.fixture
def settings(data_dir: Path) -> ezauth.Settings:
    return ezauth.Settings(data_dir=data_dir)


@pytest.fixture
def service(settings: ezauth.Settings, clock: FakeClock) -> ezauth.EzauthApp:
    return ezauth.make_app(settings, clock=clock)


@pytest.fixture
def client(service: ezauth.EzauthApp) -> webtest.TestApp:
    """A browser behind nginx on loopback (the default trusted proxy)."""
    return new_client(service)


@pytest.fixture
def make_client(settings: ezauth.Settings,
                clock: FakeClock) -> Callable[..., tuple[ezauth.EzauthApp, webtest.TestApp]]:
    """An app and client for a variant of the settings: make_client(cookie_secure="1") ->
    (app, client)."""
    def make(**changes) -> tuple[ezauth.EzauthApp, webtest.TestApp]:
        app = ezauth.make_app(replace(settings, **changes), clock=clock)
        return app, new_client(app)
    return make
