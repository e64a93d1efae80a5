"""`python ezauth.py serve` as a real process: signals, IPv6, keep-alive, the access log, a slow
client, what it logs and the metrics a scraper reads."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support.basics import EZAUTH, VERIFY, clean_env, free_port, metric
from tests.support.process import add_user, http_call, real_login, real_verify, wait_healthy


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_cleanly(tmp_path, servers, sig):
    server = servers(tmp_path / "data")
    assert server.stop(sig) == 0
    assert "Traceback" not in server.log()
    assert "event=stop" in server.log()


def test_ipv6_host_serves_healthz(tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    data = tmp_path / "data"
    add_user(data, "alice")
    proc = subprocess.Popen([sys.executable, str(EZAUTH), "serve", "--host", "::1", "--port", str(port),
                             "--data-dir", str(data)], env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://[::1]:{port}", proc)
        reply = http_call(port, "GET", "/ezauth/healthz", host="::1")
        assert (reply.status, reply.body.strip()) == (200, b"ok")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_keep_alive_answers_two_requests_on_one_connection(live_server):
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
    try:
        conn.request("GET", "/ezauth/healthz")
        first = conn.getresponse()
        assert first.status == 200 and first.read().strip() == b"ok"
        sock = conn.sock
        conn.request("GET", VERIFY)
        second = conn.getresponse()
        assert second.status == 401 and second.read() == b""
        assert conn.sock is sock  # no reconnect happened
    finally:
        conn.close()


def test_access_log_flag_logs_every_request(server_factory):
    server = server_factory(args=("--access-log",))
    token = real_login(server.port).cookie()
    http_call(server.port, "GET", "/ezauth/healthz", headers={"X-Forwarded-For": "203.0.113.7"})
    asked = {"X-Original-URI": "/app/x?token=ezt_secret", "X-Original-Host": "sd.example.test",
             "Host": "sd.example.test:8443", "X-Forwarded-For": "203.0.113.7"}
    http_call(server.port, "GET", VERIFY, headers={**asked, "Cookie": f"ezauth={token}"})
    http_call(server.port, "POST", VERIFY, headers=asked)
    log = server.log()
    assert re.search(r"event=request method=GET path=/ezauth/healthz status=200 ip=203\.0\.113\.7 ms=", log)
    # A verify says what nginx asked about, never the query string (it may carry tokens).
    assert re.search(r"event=verify method=GET host=sd\.example\.test path=/app/x status=200 user=alice "
                     r"ip=203\.0\.113\.7 ms=", log)
    assert re.search(r"event=verify method=POST host=sd\.example\.test path=/app/x status=401 user=- ", log)
    assert "ezt_secret" not in log and "path=/ezauth/verify" not in log


def test_one_slow_client_does_not_block_others(live_server):
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as slow:
        slow.sendall(b"GET /ezauth/healthz HTTP/1.1\r\nHost: x\r\n")  # and never finishes the head
        started = time.monotonic()
        assert http_call(live_server.port, "GET", "/ezauth/healthz").status == 200
        assert time.monotonic() - started < 2


def test_server_does_not_log_verify_calls(live_server):
    token = real_login(live_server.port).cookie()
    for _ in range(5):
        assert real_verify(live_server.port, token) == 200
    assert "verify" not in live_server.log()
    assert "event=login_ok" in live_server.log()


def test_metrics_reach_a_scraper_on_loopback(server_factory):
    server = server_factory(EZAUTH_METRICS="1")
    reply = http_call(server.port, "GET", "/ezauth/metrics")
    assert reply.status == 200, reply.text
    assert metric(reply.text, 'ezauth_verify_total{result="allowed"}') == 0
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
