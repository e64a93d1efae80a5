"""HTTP Basic for API clients, in-process: off by default, the challenge, the keyed cache, the
shared lockout."""

from __future__ import annotations

import base64

import pytest
import webtest

import ezauth
from tests.support.app import login, verify
from tests.support.basics import (
    PASSWORD,
    T0,
    basic,
)


@pytest.fixture
def api(make_client) -> webtest.TestApp:
    return make_client(basic_auth=True)[1]


def test_basic_auth_is_off_by_default(client):
    denied = verify(client, 401, Authorization=basic("alice", PASSWORD))
    assert denied.headers["WWW-Authenticate"] == 'Bearer realm="ezauth"'  # never a browser's password dialog


def test_basic_auth_lets_an_api_client_in_and_asks_nginx_to_strip_the_header(api):
    allowed = verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert allowed.headers["X-Auth-Request-User"] == "alice"
    assert allowed.headers["X-Ezauth-Authorization"] == "strip"


@pytest.mark.parametrize("header", [basic("alice", "wrong password"), basic("nobody", PASSWORD), "Basic %%%",
                                    "Basic " + base64.b64encode(b"no-colon").decode()])
def test_bad_basic_credentials_get_401_with_the_challenge(api, header):
    denied = verify(api, 401, Authorization=header)
    assert denied.headers["WWW-Authenticate"] == 'Basic realm="ezauth"'


def test_browsers_without_credentials_get_no_challenge(api):
    navigating = verify(api, 401, Accept="text/html,application/xhtml+xml", Sec_Fetch_Mode="navigate")
    assert "WWW-Authenticate" not in navigating.headers and "X-Ezauth-Error" not in navigating.headers
    # In-page requests of a logged-out tab get a challenge no browser answers with a password dialog.
    fetching = verify(api, 401, Accept="*/*", Sec_Fetch_Mode="cors")
    assert fetching.headers["WWW-Authenticate"] == 'Bearer realm="ezauth"'
    assert fetching.headers["X-Ezauth-Error"] == "login_required"


def test_basic_credentials_are_cached_for_a_minute_by_keyed_hash(api, clock, monkeypatch):
    checks = []
    real_check = ezauth.Users.check
    monkeypatch.setattr(ezauth.Users, "check", lambda self, n, p: checks.append(n) or real_check(self, n, p))
    for _ in range(3):
        verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert checks == ["alice"]
    clock.now += 61
    verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert checks == ["alice", "alice"]


def test_basic_cache_keeps_no_password_and_stays_bounded(settings):
    users = ezauth.Users(settings.data_dir / "users")
    cache = ezauth.BasicCache()
    digest = cache.digest("alice", PASSWORD)
    assert digest != ezauth.BasicCache().digest("alice", PASSWORD)  # a random key per process
    cache.put(digest, "alice", users.fingerprint("alice"), T0)
    assert cache.get(digest, users.fingerprint, T0 + 59) == "alice"
    assert cache.get(digest, users.fingerprint, T0 + 60) is None
    assert cache.get(digest, lambda name: "another factor", T0 + 1) is None
    assert PASSWORD not in repr(cache.__dict__)
    for n in range(cache.MAX + 10):
        cache.put(cache.digest("alice", str(n)), "alice", "fp", T0 + 100)
    assert len(cache._entries) <= cache.MAX


def test_a_password_change_ends_cached_basic_credentials(api, clock, settings):
    verify(api, 200, Authorization=basic("alice", PASSWORD))
    ezauth.Users(settings.data_dir / "users").set_password("alice", "another password")
    clock.now += 1.5
    verify(api, 401, Authorization=basic("alice", PASSWORD))


def test_basic_failures_share_the_login_lockout(api):
    for _ in range(5):
        verify(api, 401, Authorization=basic("alice", "wrong password"))
    verify(api, 401, Authorization=basic("alice", PASSWORD))
    login(api, status=429)
