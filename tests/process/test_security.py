"""Hostile input against the real server: raw bytes on sockets (oversized and repeated headers, two
Cookie headers, path traversal), the lockout across worker processes, gunicorn on a unix socket, and
the real log format that fail2ban reads. The in-process corpora are in tests/app/test_security.py."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import urllib.parse
from pathlib import Path

import ezauth
from tests.support.basics import (
    CSRF,
    PASSWORD,
    TRAVERSALS,
    assert_nothing_leaked,
    basic,
    clean_env,
    fail2ban_re,
    traversal_setup,
    wait_until,
    write_users,
)
from tests.support.process import http_call, real_login, start_server

# -- Raw bytes on a socket --------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send DATA on a fresh connection and return what comes back until the server closes or stops."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # No half-close after sending: the server takes a FIN as the client giving up. And the server
        # may answer (431) and close before it has read everything: then sending fails, reading works.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except OSError:
            pass
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
    assert match, f"no status line in {reply[:80]!r}"
    return int(match.group(1))


def test_oversized_cookie_against_the_real_server_is_refused_not_5xx(live_server):
    for size in (8 * 1024, 16 * 1024, 32 * 1024, 63 * 1024, 65 * 1024, 100 * 1024):
        request = (f"GET /ezauth/verify HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                   f"Cookie: ezauth={'A' * size}\r\n\r\n").encode()
        assert status_of(raw_exchange(live_server.port, request)) in (400, 401, 413, 431), size
    assert status_of(raw_exchange(live_server.port, b"GET /ezauth/healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


def test_two_cookie_headers_on_the_real_server_let_the_valid_one_win(live_server):
    token = real_login(live_server.port, ip="127.0.0.1", csrf=CSRF).cookie()
    for first, second in (("garbage", token), (token, "garbage"), ("garbage", "x.y.z")):
        replies = {raw_exchange(live_server.port, (
            "GET /ezauth/verify HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Cookie: ezauth={first}\r\nCookie: ezauth={second}\r\n\r\n").encode()).split(b"\r\n")[0]
            for _ in range(3)}
        assert len(replies) == 1, replies
        assert status_of(replies.pop()) == (401 if token not in (first, second) else 200)


def test_static_traversal_against_the_real_server(tmp_path, live_server):
    secret = traversal_setup(tmp_path, live_server.data_dir)
    for name in TRAVERSALS:
        reply = raw_exchange(live_server.port, (
            f"GET /ezauth/static/{name} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").encode("latin-1"))
        assert_nothing_leaked(status_of(reply), reply, secret)
    for target in ("/ezauth/../ezauth.py", "/ezauth/static/../../ezauth.py", "/ezauth/%2e%2e/ezauth.py",
                   "http://localhost/ezauth/static/../../ezauth.py", "/ezauth/static/%ff%fe.css"):
        reply = raw_exchange(live_server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert_nothing_leaked(status_of(reply), reply, secret)


# -- Lockout and fail2ban across processes ------------------------------------------------------


def test_lockout_holds_across_four_worker_processes_under_parallel_guessing(server_factory):
    env = {"EZAUTH_MAX_ATTEMPTS": "3", "EZAUTH_LOCKOUT_WINDOW": "300", "EZAUTH_LOCKOUT_TIME": "300"}
    first = server_factory(**env)
    workers = [first]
    try:
        workers += [start_server(first.data_dir, **env) for _ in range(3)]
        user_run = guess_in_parallel(workers, lambda n: ("alice", f"203.0.113.{n + 1}"))
        assert set(user_run) <= {401, 429} and user_run.count(401) <= 3, user_run
        assert user_run.count(401) >= 1
        ip_run = guess_in_parallel(workers, lambda n: (f"user{n}", "198.51.100.9"))
        assert set(ip_run) <= {401, 429} and ip_run.count(401) <= 3, ip_run
        for server in workers:  # the right password from a fresh address: alice is still locked
            real_login(server.port, ip="192.0.2.50", csrf=CSRF, status=429)
        logs = "".join(server.log() for server in workers)
        assert_fail2ban_filter_works(logs)
    finally:
        for server in workers[1:]:
            server.stop()


def test_concurrent_correct_logins_never_leave_a_lockout_behind(live_server):
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def right_login() -> None:
        barrier.wait(timeout=10)
        statuses.append(real_login(live_server.port, ip="127.0.0.1", csrf=CSRF, status="*").status)

    threads = [threading.Thread(target=right_login) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [303] * 8, statuses  # a right password waits for checks in flight, never 429
    real_login(live_server.port, ip="127.0.0.1", csrf=CSRF, status=303)
    assert "event=login_locked" not in live_server.log()


def guess_in_parallel(workers: list, who, per_worker: int = 4) -> list[int]:
    """per_worker wrong-password guesses on every worker at once; their statuses."""
    jobs = [(server.port, *who(n)) for n, server in enumerate(workers * per_worker)]
    results: list[int] = [0] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def guess(index: int, port: int, user: str, ip: str) -> None:
        barrier.wait(timeout=10)
        results[index] = real_login(port, user, "wrong password", ip=ip, csrf=CSRF, status="*").status

    threads = [threading.Thread(target=guess, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def assert_fail2ban_filter_works(log_text: str) -> None:
    lines = log_text.splitlines()
    failures = [ln for ln in lines if "event=login_failed" in ln]
    assert failures, log_text[-2000:]
    for line in failures:
        match = fail2ban_re().search(line)
        assert match, line
        assert match.group("host") in {*(f"203.0.113.{n}" for n in range(1, 17)), "198.51.100.9"}, line
    assert any("event=login_locked" in ln for ln in lines)
    for line in lines:
        if "event=login_failed" not in line:
            assert not fail2ban_re().search(line), line


def test_repeated_headers_are_joined_once_and_capped(live_server):
    many = "".join(f"X-Forwarded-For: 203.0.113.{n % 250}\r\n" for n in range(ezauth.MAX_HEADERS + 1))
    reply = raw_exchange(live_server.port, f"GET /ezauth/verify HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert status_of(reply) == 431
    joined = ezauth.header_environ([("Cookie", "a=1"), ("X-A", "1"), ("Cookie", "b=2"), ("X-A", "2")])
    assert joined == {"HTTP_COOKIE": "a=1; b=2", "HTTP_X_A": "1, 2"}


# -- The outside review's findings: each fails on the code before the fix ---------------------


def test_gunicorn_on_a_unix_socket_sees_the_forwarded_address(tmp_path, gunicorn_bin):
    data = tmp_path / "data"
    write_users(data, alice=PASSWORD)
    sock_path = tmp_path / "ezauth.sock"
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([gunicorn_bin, "-k", "gthread", "-w", "1", "-b", f"unix:{sock_path}",
                                 "ezauth:app"], cwd=ezauth.HERE, stdout=out, stderr=subprocess.STDOUT,
                                env=clean_env(EZAUTH_DATA_DIR=str(data)))
    try:
        assert wait_until(sock_path.exists, timeout=20), log_path.read_text()
        body = urllib.parse.urlencode({"username": "alice", "password": "wrong", "csrf": CSRF, "rd": "/"})
        request = (f"POST /ezauth/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                   f"Content-Type: application/x-www-form-urlencoded\r\nCookie: ezauth_csrf={CSRF}\r\n"
                   f"X-Forwarded-For: 203.0.113.9\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
        reply = wait_until(lambda: unix_exchange(sock_path, request), timeout=20)
        assert status_of(reply) == 401
        assert wait_until(lambda: "event=login_failed user=alice ip=203.0.113.9" in log_path.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def unix_exchange(path: Path, data: bytes) -> bytes:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        return b"".join(iter(lambda: sock.recv(65536), b""))
    return b""


def test_sixteen_parallel_basic_requests_on_a_cold_cache_all_get_in(tmp_path):
    """An API client firing 16 requests at once got 11 spurious 401s with WWW-Authenticate."""
    server = start_server(write_users(tmp_path / "data", alice=PASSWORD).parent, EZAUTH_BASIC_AUTH="1")
    try:
        results: list[int] = []
        barrier = threading.Barrier(16)

        def call() -> None:
            barrier.wait(timeout=10)
            results.append(http_call(server.port, "GET", "/ezauth/verify",
                                     headers={"Authorization": basic("alice", PASSWORD)}).status)

        threads = [threading.Thread(target=call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert results == [200] * 16
        assert server.log().count("event=login_ok via=basic") <= ezauth.Settings().max_attempts
    finally:
        server.stop()
