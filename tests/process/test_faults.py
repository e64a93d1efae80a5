"""Faults in real processes: kill -9 in the middle of writes, rotation under load, and damaged files
at start-up of the real server. ezauth must lose nothing, never go backwards and keep answering.
The faults a single app meets in-process (a read-only or full data dir, corrupt files) are in
tests/app/test_faults.py."""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import ezauth
from tests.support.app import build, login
from tests.support.basics import (
    CSRF,
    HERE,
    PASSWORD,
    assert_keyring_valid,
    cheap_hash,
    clean_env,
    corrupt_files,
    counter_value,
    visits_pattern,
    write_users,
)
from tests.support.process import real_login, real_verify, run_cli, start_server

pytestmark = pytest.mark.slow


# -- kill -9 in the middle of writes -------------------------------------------------------

# A single-threaded driver (so fork is safe): for each "go DELAY" line it forks a child that
# loops VisitCounter.increment() and KeyRing.rotate() on the data dir, SIGKILLs it after DELAY
# seconds, reaps it and answers "killed N" (N = increments the child had finished, via a pipe).
DRIVER = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import ezauth
from pathlib import Path
data = Path(sys.argv[2])
for line in sys.stdin:
    delay = float(line.split()[1])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        counter = ezauth.VisitCounter(data / "counter.txt", time.time)
        keys = ezauth.KeyRing(data / "keys.json", 86400, 1, time.time())
        stop = time.monotonic() + 5  # bounded even if nobody kills it
        n = 0
        while time.monotonic() < stop:
            if counter.increment() is not None:
                n += 1
                os.write(write_end, b".")
            keys.rotate(time.time())
        os._exit(0)
    os.close(write_end)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    done = 0
    while chunk := os.read(read_end, 65536):
        done += len(chunk)
    os.close(read_end)
    print("killed", done, flush=True)
"""


def test_kill_9_during_counter_and_key_ring_writes_200_times(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(HERE), str(data)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=clean_env())
    last, finished_total, mid_write = 0, 0, 0
    try:
        for round_ in range(200):
            driver.stdin.write(f"go {rng.uniform(0.0005, 0.012):.4f}\n")
            driver.stdin.flush()
            answer = driver.stdout.readline()
            assert answer.startswith("killed"), f"round {round_} (seed {seed}): driver said {answer!r}"
            finished_total += int(answer.split()[1])
            value = counter_value(data) or 0
            # never backwards; and every increment the child saw finish is in the file
            assert value >= last, f"round {round_} (seed {seed}): counter went from {last} to {value}"
            assert value >= finished_total, (value, finished_total)
            last = value
            if (data / "keys.json").exists():
                assert_keyring_valid(data)
            mid_write += any(p.name.endswith(".tmp") for p in data.iterdir())
    finally:
        driver.stdin.close()
        driver.wait(timeout=10)
    assert last > 0 and assert_keyring_valid(data), f"seed {seed}: counter {last}"
    assert corrupt_files(data) == [], (f"seed {seed}: a killed writer left a file its successor could not read "
                                       f"({mid_write} rounds ended with a temp file)")
    # the last write of a later writer sweeps temp files a killed one left behind
    ezauth.VisitCounter(data / "counter.txt", time.time).increment()
    assert not [p.name for p in data.iterdir() if p.name.startswith(".counter.txt.")], f"seed {seed}"


def page_loads(port: int, stop: threading.Event, seen: list[int]) -> None:
    """Load the login page on a keep-alive connection until STOP or the server dies."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            conn.request("GET", "/ezauth/login")
            reply = conn.getresponse()
            body = reply.read().decode()
            seen.append(reply.status)
            match = visits_pattern().search(body)
            if match:
                seen.append(-int(match.group(1).replace(",", "")))
    except (OSError, http.client.HTTPException):
        pass  # the server was killed under us: that is the point


def test_kill_9_of_the_real_server_under_load_keeps_files_valid(tmp_path):
    data = tmp_path / "data"
    write_users(data, alice=PASSWORD)
    rng = random.Random()
    last, logs = 0, []
    for round_ in range(6):
        server = start_server(data, EZAUTH_ROTATE_EVERY="1")  # key-ring writes every second too
        stop, seen = threading.Event(), []
        threads = [threading.Thread(target=page_loads, args=(server.port, stop, seen)) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.4, 1.5))
        server.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        assert seen and all(s == 200 or s < 0 for s in seen), seen
        logs.append(server.log())
        value = counter_value(data) or 0
        shown = [-s for s in seen if s < 0]
        assert value >= last and value >= max(shown, default=0), (round_, last, value)
        last = value
        assert_keyring_valid(data)
    assert corrupt_files(data) == []
    assert "event=key_rotated" in "".join(logs)
    assert "Traceback" not in "".join(logs)

# -- Rotation while sessions are being verified ----------------------------------------------


def test_rotation_while_8_threads_verify_gives_no_false_401(server_factory):
    a = server_factory()
    b = start_server(a.data_dir)  # a second worker process on the same data dir
    tokens = [real_login(a.port, csrf=CSRF).cookie(), real_login(b.port, csrf=CSRF).cookie()]
    stop = threading.Event()
    failures: list[tuple] = []
    checks = [0] * 8

    def verifier(index: int) -> None:
        port = (a.port, b.port)[index % 2]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        rng = random.Random(index)
        while not stop.is_set():
            token = rng.choice(tokens[-4:])
            conn.request("GET", "/ezauth/verify", headers={"Cookie": f"ezauth={token}"})
            reply = conn.getresponse()
            reply.read()
            checks[index] += 1
            if reply.status != 200:
                failures.append((index, reply.status, tokens.index(token)))
        conn.close()

    threads = [threading.Thread(target=verifier, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        kids = set()
        deadline = time.monotonic() + 6.5  # long enough for the rotated keys to start signing (3 s)
        rotations = 0
        while time.monotonic() < deadline:
            if rotations < 3:
                done = run_cli("rotate", data_dir=a.data_dir)
                assert done.returncode == 0, done.stderr
                rotations += 1
            for port in (a.port, b.port):
                token = real_login(port, csrf=CSRF).cookie()
                tokens.append(token)
                kids.add(json.loads(ezauth._unb64(token.split(".")[0]))["kid"])
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        b.stop()
    assert failures == [], failures[:10]
    assert sum(checks) > 200 and len(kids) >= 2, (checks, kids)


# -- Corrupt files at start-up --------------------------------------------------------------

def test_corrupt_key_ring_on_the_real_server_ends_old_sessions_with_a_clear_line(server_factory):
    server = server_factory()
    old = real_login(server.port, csrf=CSRF).cookie()
    server.stop()
    (server.data_dir / "keys.json").write_text("{ oops")
    again = start_server(server.data_dir)
    try:
        assert real_verify(again.port, old) == 401
        assert real_verify(again.port, real_login(again.port, csrf=CSRF).cookie()) == 200
    finally:
        again.stop()
    line = next(ln for ln in again.log().splitlines() if "event=keyring_corrupt" in ln)
    assert " ERROR " in line and "moved_to=" in line and "sessions" in line
    assert len(corrupt_files(server.data_dir)) == 1


def test_users_file_with_bad_lines_skips_them_and_keeps_the_rest(server_factory, tmp_path):
    data = tmp_path / "data"
    text = (b"# users\n"
            b"no colon here\n"                                   # 2 malformed
            b":nohash\n"                                         # 3 malformed
            b"eve:plaintext-password\n"                          # 4 unknown hash
            b"bad name:scrypt:16:8:1$AAAA$AAAA\n"                # 5 malformed name
            b"mallory:$2b$12$abcdefghijklmnopqrstuu5cLLJ5VnNnFPX0DLbZ4xjKZaXjC1Yqm\n"  # 6 bcrypt
            b"# caf\xe9 - a latin-1 comment\n"                   # 7 not UTF-8
            b"\xff\xfe\xfd:garbage\n"                            # 8 not UTF-8
            b"trent:scrypt:garbage\n"                            # 9 never verifies
            + f"alice:{cheap_hash()}\n".encode()                   # 10 good
            + b"\r\n\t\n")
    write_users(data, text)
    server = start_server(data)
    try:
        assert real_login(server.port, csrf=CSRF).cookie()
        for user, password in (("eve", "plaintext-password"), ("trent", "garbage"), ("mallory", "x" * 8),
                               ("admin", "")):
            real_login(server.port, user, password or "x", csrf=CSRF, status=401)
    finally:
        server.stop()
    log = server.log()
    for number in (2, 3, 4, 5, 7, 8):
        assert re.search(rf"event=users_line_skipped line={number} ", log), (number, log)
    assert "line=6 " in log  # bcrypt is optional: skipped when missing, loaded when installed
    assert (data / "users").read_bytes() == text, "the users file was rewritten"
    assert "no users yet" not in log


def test_stale_temp_and_lock_files_from_a_crash_do_not_block_start_up(tmp_path):
    data = tmp_path / "data"
    _, client = build(data)
    login(client, csrf=CSRF)
    for name in (".keys.json.abc.tmp", ".counter.txt.abc.tmp", ".users.abc.tmp"):
        (data / name).write_bytes(b"half-written")
    server = start_server(data)
    try:
        assert real_login(server.port, csrf=CSRF).cookie()
    finally:
        server.stop()
    assert_keyring_valid(data)


def test_cli_on_a_data_dir_that_cannot_be_written_fails_with_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "keys.json.lock").mkdir()  # root ignores permissions; a directory where a file must be does not
    done = run_cli("rotate", data_dir=data)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ezauth: "), done.stderr  # the one-line reason

