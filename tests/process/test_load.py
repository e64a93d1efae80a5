"""Load and slow clients against the real built-in server (generous bounds; not micro-benchmarks)."""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

import ezauth
from tests.support.basics import CSRF, PASSWORD, wait_until, write_users
from tests.support.process import http_call, real_login, start_server

pytestmark = pytest.mark.slow


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


# What the built-in server promises: its event loop's thread, a pool of POOL_THREADS for the work
# that blocks (password checks, pages, files) and, for a moment once a minute, the flush thread. A
# thread per connection or per request would pass this under any load.
MOST_THREADS = 1 + ezauth.POOL_THREADS + 1
DRIBBLE_EVERY = 1.0  # each slow client sends its next byte this long after the last


def session_cookie(port: int) -> str:
    return "ezauth=" + real_login(port, rd="/app/", ip="127.0.0.1", csrf=CSRF).cookie()


USERS = [f"user{n}" for n in range(10)]


@pytest.fixture
def server(tmp_path):
    """A real ezauth with alice and user0..user9 (a real-cost hash, written once for all of them)."""
    data_dir = tmp_path / "data"
    encoded = ezauth.hash_password(PASSWORD)
    write_users(data_dir, "".join(f"{name}:{encoded}\n" for name in ["alice", *USERS]))
    started = start_server(data_dir)
    yield started
    started.stop(signal.SIGKILL)


def test_idle_and_dribbling_connections_do_not_slow_verify(server):
    live_server = server
    port = live_server.port
    cookie = session_cookie(port)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    dribblers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    head = b"GET /ezauth/login HTTP/1.1\r\nHost: localhost\r\n"  # a request head that never ends
    body_head = (b"POST /ezauth/login HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")  # then a body that never ends
    for sock in dribblers[25:]:
        sock.sendall(body_head)
    stop = threading.Event()

    def dribble() -> None:
        for i in range(20):
            if stop.wait(DRIBBLE_EVERY if i else 0):
                return
            for n, sock in enumerate(dribblers):
                with contextlib.suppress(OSError):  # a connection the server already timed out
                    sock.send(head[i:i + 1] if n < 25 else b"a")

    trickle = threading.Thread(target=dribble)
    trickle.start()
    latencies: list[float] = []
    try:
        keep_alive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for fresh in (True, False):
                started = time.perf_counter()
                if fresh:
                    status = http_call(port, "GET", "/ezauth/verify", headers={"Cookie": cookie}, timeout=5).status
                else:
                    keep_alive.request("GET", "/ezauth/verify", headers={"Cookie": cookie})
                    reply = keep_alive.getresponse()
                    reply.read()
                    status = reply.status
                latencies.append(time.perf_counter() - started)
                assert status == 200
            time.sleep(0.02)
        keep_alive.close()
        assert live_server.proc.poll() is None
    finally:
        stop.set()
        trickle.join(timeout=5)
        for sock in silent + dribblers:
            sock.close()
    assert len(latencies) > 50
    # A verify that waited on a slow client would wait for its next byte, DRIBBLE_EVERY, or for its
    # HEAD_TIMEOUT: half the dribble interval tells that apart from a busy machine's scheduling.
    assert max(latencies) < DRIBBLE_EVERY / 2, (
        f"verify under 100 slow connections: slowest {max(latencies) * 1000:.1f} ms, "
        f"median {statistics.median(latencies) * 1000:.1f} ms of {len(latencies)}")


def test_500_concurrent_mixed_requests_no_5xx_and_no_thread_leak(server):
    live_server = server
    port, pid = live_server.port, live_server.proc.pid
    cookie = session_cookie(port)
    # Fill the pool first: 16 logins at once, each a real scrypt, keep every one of its threads busy
    # (it reuses idle ones otherwise), so the bound below is met with the pool at its full size.
    warm_statuses: list[int] = []

    def warm_login(n: int) -> None:
        warm_statuses.append(real_login(port, USERS[n % 10], ip=f"10.9.0.{n + 1}", csrf=CSRF, status="*").status)

    warm = [threading.Thread(target=warm_login, args=(n,)) for n in range(16)]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join(timeout=30)
    assert warm_statuses == [303] * 16, warm_statuses
    http_call(port, "GET", "/ezauth/login")  # a first visit, so the counter file exists
    assert thread_count(pid) <= MOST_THREADS
    counter_before = int((live_server.data_dir / "counter.txt").read_text())

    # 40 logins: 4 per user from 40 addresses, each key below the lockout limit even all in flight at
    # once (see test_concurrent_correct_logins_never_leave_a_lockout_behind for why that matters).
    logins = [("login", USERS[n % 10], f"10.0.{n // 10}.{n % 10 + 1}") for n in range(40)]
    jobs = (logins + [("verify", cookie)] * 200 + [("verify", "ezauth=forged.token.x")] * 60
            + [("page",)] * 150 + [("static",)] * 30 + [("healthz",)] * 20)
    assert len(jobs) == 500
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(index: int, job: tuple) -> None:
        try:
            barrier.wait(timeout=30)
            if job[0] == "login":
                reply = real_login(port, job[1], rd="/app/", ip=job[2], csrf=CSRF, status="*")
                ok = reply.status == 303 and reply.location == "/app/"
            elif job[0] == "verify":
                reply = http_call(port, "GET", "/ezauth/verify", headers={"Cookie": job[1]})
                ok = reply.status == (200 if job[1] == cookie else 401)
            elif job[0] == "page":
                reply = http_call(port, "GET", "/ezauth/login")
                ok = reply.status == 200 and b'name="csrf"' in reply.body
            elif job[0] == "static":
                reply = http_call(port, "GET", "/ezauth/static/login.css")
                ok = reply.status == 200
            else:
                reply = http_call(port, "GET", "/ezauth/healthz")
                ok = reply.status == 200
            results[index] = (job[0], reply.status, ok)
        except Exception as err:  # reported below with the job it belongs to
            results[index] = (job[0], repr(err), False)

    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], thread_count(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    elapsed = time.monotonic() - started
    sampling.set()
    sampler.join(timeout=5)

    failed = [r for r in results if not (r and r[2])]
    assert not [r for r in results if r and isinstance(r[1], int) and r[1] >= 500], (elapsed, failed[:10])
    assert failed == [], (f"{len(failed)} of 500 failed in {elapsed:.1f} s", failed[:10])
    assert int((live_server.data_dir / "counter.txt").read_text()) == counter_before + 150  # exact under load

    assert peak[0] <= MOST_THREADS, f"threads under load: peak {peak[0]}, at most {MOST_THREADS} promised"
    assert thread_count(pid) <= MOST_THREADS
    assert live_server.proc.poll() is None


def timed_login(port: int, ip: str) -> float:
    """Seconds a right password takes to log in, on a fresh connection."""
    started = time.monotonic()
    real_login(port, ip=ip, csrf=CSRF)
    return time.monotonic() - started


def test_a_flood_of_guesses_from_one_ipv6_64_keeps_a_real_login_within_a_few_hash_times(server):
    """240 addresses of one /64 guessing random names kept every scrypt busy, and a real login took
    2 s instead of 0.1 s. Now the /64 is locked out as one client and the hash gate takes turns."""
    port = server.port
    plain = statistics.median(timed_login(port, "198.51.100.7") for _ in range(3))
    stop, statuses = threading.Event(), []

    def flood(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            address = "2001:db8:1:2:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(4))
            statuses.append(real_login(port, f"u{rng.randrange(1 << 32):08x}", "wrong password", ip=address,
                                       csrf=CSRF, status="*").status)

    flooders = [threading.Thread(target=flood, args=(n,)) for n in range(24)]
    for thread in flooders:
        thread.start()
    try:
        assert wait_until(lambda: len(statuses) >= 50, timeout=30), statuses
        under = sorted(timed_login(port, "198.51.100.7") for _ in range(5))
    finally:
        stop.set()
        for thread in flooders:
            thread.join(timeout=60)
    assert set(statuses) <= {401, 429} and statuses.count(401) <= ezauth.Settings().max_attempts, statuses[:20]
    # A few hash times (the flood's own checks in line ahead of it), never the seconds it was.
    assert under[2] < max(6 * plain, 0.75), (plain, under)
