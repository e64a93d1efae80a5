"""Several real worker processes on one data dir (the built-in server twice or more, gunicorn with
workers): the lockout, the visit counter, key rotation, logouts and revoked tokens hold in all."""

from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from ezauth import PUBLISH_DELAY, REFRESH_EVERY
from tests.support.basics import (
    CSRF,
    EZAUTH,
    HERE,
    LAG,
    LOGIN,
    LOGOUT,
    VERIFY,
    bearer,
    clean_env,
    free_port,
    visits_pattern,
    wait_until,
)
from tests.support.process import add_user, cli_token, http_call, real_login, real_verify, run_cli, wait_healthy


@pytest.fixture
def shared_dir(tmp_path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    add_user(path, "alice")
    return path


def test_gunicorn_serves_the_module_level_app(shared_dir, tmp_path, gunicorn_bin):
    gunicorn = gunicorn_bin
    port = free_port()
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", "2", "ezauth:app"],
                                cwd=EZAUTH.parent, stdout=log, stderr=subprocess.STDOUT,
                                env=clean_env(EZAUTH_DATA_DIR=str(shared_dir), EZAUTH_TITLE="Via gunicorn"))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert b"Via gunicorn" in http_call(port, "GET", LOGIN).body
        token = real_login(port).cookie()
        assert all(real_verify(port, token) == 200 for _ in range(4))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert "event=login_ok" in log_path.read_text()


def test_lockout_holds_across_two_worker_processes(shared_dir, servers):
    worker_a, worker_b = servers(shared_dir), servers(shared_dir)
    for i in range(5):
        port = (worker_a if i % 2 else worker_b).port
        real_login(port, "alice", "wrong password", status=401)
    real_login(worker_a.port, status=429)
    real_login(worker_b.port, status=429)


@pytest.mark.slow
def test_counter_is_exact_with_several_processes(shared_dir, servers):
    workers = [servers(shared_dir) for _ in range(4)]
    seen: list[int] = []
    lock = threading.Lock()
    footer = visits_pattern()

    def load_pages(worker_index: int, count: int) -> None:
        port = workers[worker_index % 4].port
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(count):
                conn.request("GET", LOGIN)
                response = conn.getresponse()
                page = response.read().decode()
                assert response.status == 200
                number = int(footer.search(page).group(1).replace(",", ""))
                with lock:
                    seen.append(number)
        finally:
            conn.close()

    shares = [1000 // 32 + (1 if i < 1000 % 32 else 0) for i in range(32)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for future in [pool.submit(load_pages, i, n) for i, n in enumerate(shares)]:
            future.result()
    assert len(seen) == 1000
    assert sorted(seen) == list(range(1, 1001))
    assert (shared_dir / "counter.txt").read_text().strip() == "1000"


@pytest.mark.slow
def test_cli_rotate_takes_effect_within_seconds_and_old_sessions_stay_valid(shared_dir, servers):
    worker_a, worker_b = servers(shared_dir), servers(shared_dir)
    old_token = real_login(worker_a.port).cookie()
    rotated = run_cli("rotate", data_dir=shared_dir)
    assert rotated.returncode == 0, rotated.stderr
    new_kid = json.loads((shared_dir / "keys.json").read_text())["keys"][-1]["kid"]
    started = time.monotonic()
    kids = set()

    def new_key_signs() -> bool:
        """Every moment on the way: each worker verifies what the other signs, and the old session."""
        for signer, checker in ((worker_a, worker_b), (worker_b, worker_a)):
            token = real_login(signer.port).cookie()
            assert real_verify(checker.port, token) == 200  # no worker meets a key it has not loaded
            kids.add(jwt.get_unverified_header(token)["kid"])
        assert real_verify(worker_b.port, old_token) == 200
        return new_kid in kids

    assert wait_until(new_key_signs, timeout=10, interval=0.3), kids
    assert time.monotonic() - started < PUBLISH_DELAY + REFRESH_EVERY + 3


@dataclass
class Gunicorn:
    """`gunicorn -w 2 -k gthread ezauth:app` on a free port, its access log naming the worker of each request."""

    data_dir: Path
    port: int
    proc: subprocess.Popen
    access_log: Path

    def workers(self, marks: list[str]) -> dict[str, str]:
        """mark -> the worker (pid) that answered the request `?mark=MARK`."""
        pattern = re.compile(r"^<(\d+)> \S+ \S+\?mark=(\S+) ", re.MULTILINE)

        def found() -> dict[str, str] | None:
            seen = {m.group(2): m.group(1) for m in pattern.finditer(self.access_log.read_text())}
            return seen if all(mark in seen for mark in marks) else None

        seen = wait_until(found, timeout=5)
        assert seen, "gunicorn did not log every request"
        return seen


@pytest.fixture
def gunicorn(tmp_path, gunicorn_bin) -> Iterator[Gunicorn]:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice")
    port, access_log = free_port(), tmp_path / "access.log"
    with open(tmp_path / "gunicorn.log", "wb") as out:
        proc = subprocess.Popen(
            [gunicorn_bin, "-w", "2", "-k", "gthread", "--threads", "4", "-b", f"127.0.0.1:{port}",
             "--access-logfile", str(access_log), "--access-logformat", "%(p)s %(r)s %(s)s", "ezauth:app"],
            cwd=HERE, stdout=out, stderr=subprocess.STDOUT, env=clean_env(EZAUTH_DATA_DIR=str(data_dir)))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield Gunicorn(data_dir, port, proc, access_log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def poll_verify(server: Gunicorn, headers: dict[str, str], seconds: float, tag: str) -> list[tuple[float, int, str]]:
    """Ask verify again and again (a new connection each time, so either worker answers) for SECONDS:
    (seconds since the start, status, worker pid) of each."""
    started, answers = time.monotonic(), []
    while (elapsed := time.monotonic() - started) < seconds:
        mark = f"{tag}{len(answers)}"
        answers.append((elapsed, http_call(server.port, "GET", f"{VERIFY}?mark={mark}", headers=headers).status, mark))
        time.sleep(0.005)
    workers = server.workers([mark for _, _, mark in answers])
    return [(elapsed, status, workers[mark]) for elapsed, status, mark in answers]


def warm_up(server: Gunicorn, headers: dict[str, str], tag: str) -> None:
    """Until both workers have answered 200 to these credentials (each holds them as valid)."""
    answered: set[str] = set()
    rounds = itertools.count()  # every request's mark is new, so the access log cannot pair it with an older one

    def both() -> bool:
        answered.update(pid for _, status, pid in poll_verify(server, headers, 0.2, f"{tag}{next(rounds)}-")
                        if status == 200)
        return len(answered) == 2

    assert wait_until(both, timeout=10, interval=0), f"not both workers accepted: {answered}"


def assert_refused_everywhere_within_a_second(answers: list[tuple[float, int, str]]) -> None:
    late = [(status, pid) for elapsed, status, pid in answers if elapsed >= LAG + SLACK]
    assert len(late) >= 20
    assert {status for status, _ in late} == {401}, [a for a in answers if a[0] >= LAG + SLACK and a[1] != 401]
    assert len({pid for _, pid in late}) == 2, "only one worker answered after the deadline"


@pytest.mark.slow
def test_gunicorn_workers_refuse_a_logged_out_cookie_within_a_second(gunicorn):
    cookie = real_login(gunicorn.port).cookie()
    headers = {"Cookie": f"ezauth={cookie}"}
    warm_up(gunicorn, headers, "warm")
    out = http_call(gunicorn.port, "POST", LOGOUT, f"csrf={CSRF}",  # the logout page's button
                    headers={"Cookie": f"ezauth={cookie}; ezauth_csrf={CSRF}",
                             "Content-Type": "application/x-www-form-urlencoded"})
    assert out.status == 303
    assert_refused_everywhere_within_a_second(poll_verify(gunicorn, headers, LAG + 1.5, "out"))


@pytest.mark.slow
def test_gunicorn_workers_refuse_a_revoked_token_within_a_second(gunicorn):
    secret, token_id = cli_token(gunicorn.data_dir)
    headers = {"Authorization": bearer(secret)}
    warm_up(gunicorn, headers, "warm")
    revoked = run_cli("token", "revoke", token_id, data_dir=gunicorn.data_dir)
    assert revoked.returncode == 0, revoked.stderr
    assert_refused_everywhere_within_a_second(poll_verify(gunicorn, headers, LAG + 1.5, "revoked"))


def test_32_parallel_requests_with_a_fresh_token_all_pass(live_server):
    fresh, _ = cli_token(live_server.data_dir, "alice", "parallel")  # never used before the burst
    probe, _ = cli_token(live_server.data_dir, "alice", "probe")  # made after it: once accepted, both are known

    def status(secret: str) -> int:
        return http_call(live_server.port, "GET", VERIFY, headers={"Authorization": bearer(secret)}).status

    assert wait_until(lambda: status(probe) == 200, timeout=5)
    logged_before = len(live_server.log())
    start = threading.Barrier(32)

    def call(_: int) -> tuple[int, str, str]:
        start.wait(timeout=10)
        reply = http_call(live_server.port, "GET", VERIFY, headers={"Authorization": bearer(fresh)})
        return reply.status, reply.headers.get("X-Auth-Request-User", ""), reply.headers.get(
            "X-Ezauth-Authorization", "")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(32)))
    assert answers == [(200, "alice", "strip")] * 32
    log = live_server.log()[logged_before:]
    assert "token_rejected" not in log and "login_failed" not in log and "login_busy" not in log


SLACK = 0.1  # for the request's own travel time
