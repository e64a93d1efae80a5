"""Prometheus metrics, in-process: off by default, only for loopback and trusted proxies, and what
they count."""

from __future__ import annotations

import pytest

import ezauth
from tests.support.app import login, verify
from tests.support.basics import (
    T0,
    metric,
)


def test_metrics_are_off_by_default(client):
    client.get("/ezauth/metrics", status=404)


@pytest.mark.parametrize("peer, forwarded, status", [
    ("127.0.0.1", None, 200),
    ("::1", None, 200),
    ("127.0.0.1", "127.0.0.1", 200),
    ("127.0.0.1", "203.0.113.9", 404),  # through nginx: the visitor is the real client
    ("203.0.113.9", None, 404),
    ("10.0.0.5", None, 200),  # a trusted proxy itself (e.g. Prometheus on that host)
])
def test_metrics_only_for_loopback_and_trusted_proxies(make_client, peer, forwarded, status):
    trusted = (*ezauth.DEFAULT_PROXIES, ezauth.ipaddress.ip_network("10.0.0.0/8"))
    _, client = make_client(metrics=True, trusted_proxies=trusted)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    client.get("/ezauth/metrics", headers=headers, extra_environ={"REMOTE_ADDR": peer}, status=status)


def test_metrics_count_what_happened(settings, make_client, clock):
    _, client = make_client(metrics=True, session_ttl=100, max_attempts=3)
    login(client, password="wrong password", status=401)
    login(client)
    verify(client, 200)
    clock.now += 60  # past half the session: renewed
    verify(client, 200)
    ezauth.KeyRing(settings.data_dir / "keys.json", 86400, 86400, clock.now).rotate(clock.now)  # as `rotate` does
    clock.now += 1.5
    client.reset()
    verify(client, 401)
    login(client, "bob", "wrong password", status=401)
    login(client, "bob", "wrong password", status=401)
    login(client, "bob", status=429)
    page = client.get("/ezauth/metrics")
    assert page.content_type == "text/plain"
    text = page.text
    assert metric(text, 'ezauth_logins_total{result="ok"}') == 1
    assert metric(text, 'ezauth_logins_total{result="failed"}') == 3
    assert metric(text, 'ezauth_logins_total{result="locked"}') == 1
    assert metric(text, 'ezauth_verify_total{result="allowed"}') == 2
    assert metric(text, 'ezauth_verify_total{result="denied"}') == 1
    assert metric(text, "ezauth_sessions_renewed_total") == 1
    assert metric(text, "ezauth_key_rotations_total") == 1
    assert metric(text, "ezauth_visits") == 5
    assert metric(text, "process_start_time_seconds") == T0
    for name in ("ezauth_logins_total", "ezauth_verify_total", "ezauth_sessions_renewed_total"):
        assert f"# TYPE {name} counter" in text
    assert "# TYPE ezauth_visits gauge" in text


@pytest.mark.parametrize("env, attr", [("EZAUTH_METRICS", "metrics"), ("EZAUTH_BASIC_AUTH", "basic_auth")])
def test_new_settings_are_off_by_default_and_validated(tmp_path, env, attr):
    assert getattr(ezauth.Settings.from_env({}, env_file=tmp_path / "none"), attr) is False
    assert getattr(ezauth.Settings.from_env({env: "1"}, env_file=tmp_path / "none"), attr) is True
    with pytest.raises(ezauth.SettingsError, match=env):
        ezauth.Settings.from_env({env: "maybe"}, env_file=tmp_path / "none")
