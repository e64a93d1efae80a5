"""Several real worker processes on one data dir (the built-in server twice or more, gunicorn with
workers): the lockout, the visit counter, key rotation, logouts and revoked tokens hold in all."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import jwt
import pytest

from ezauth import PUBLISH_DELAY, REFRESH_EVERY
from tests.support.basics import EZAUTH, LOGIN, clean_env, free_port, visits_pattern, wait_until
from tests.support.process import add_user, http_call, real_login, real_verify, run_cli, wait_healthy


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
