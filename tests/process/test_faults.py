"""Faults: kill -9 in the middle of writes, a read-only or full data dir, rotation under load,
and corrupt files at start-up. ezauth must lose nothing, never go backwards and keep answering."""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ezauth
from tests.support.app import build, login, session_token, verify
from tests.support.basics import CSRF, HERE, PASSWORD, FakeClock, cheap_hash, clean_env, write_users
from tests.support.process import real_login, real_verify, run_cli, start_server

pytestmark = pytest.mark.slow


# -- Helpers -------------------------------------------------------------------------------


def counter_value(data_dir: Path) -> int | None:
    path = data_dir / "counter.txt"
    if not path.exists():
        return None
    text = path.read_bytes()
    assert re.fullmatch(rb"\d+\n", text), f"counter file holds {text!r}"
    return int(text)


def assert_keyring_valid(data_dir: Path) -> tuple[ezauth.SigningKey, ...]:
    keys = ezauth.parse_keyring((data_dir / "keys.json").read_text(encoding="utf-8"))
    assert keys
    return keys


def corrupt_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if ".corrupt-" in p.name)


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
            match = re.search(r"visited ([\d,]+) times", body)
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


# -- Read-only and full data dir -----------------------------------------------------------

# Why monkeypatching: CI runs as root, and root ignores chmod 0500, and a container offers no
# read-only bind mount. So the data dir is made unwritable in-process: every os.open that would
# write under it and every os.replace into it fail with EROFS (or ENOSPC for a full disk), which is
# exactly what the kernel would say. SQLite opens its files from C, so the throttle database is
# replaced by a directory instead, which SQLite cannot open either.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_unwritable(monkeypatch, data_dir: Path, code: int = errno.EROFS, throttle: bool = True) -> None:
    root = str(data_dir.resolve())
    real_open, real_replace = os.open, os.replace

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(root)

    def guarded_open(path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS and inside(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if inside(dst):
            raise OSError(code, os.strerror(code), os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "replace", guarded_replace)
    if throttle:
        db = data_dir / "throttle.sqlite3"
        for stale in data_dir.glob("throttle.sqlite3*"):
            stale.unlink()
        db.mkdir()


def test_read_only_data_dir_keeps_verify_and_login_working(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    clock = FakeClock()
    data = tmp_path / "data"
    app, client = build(data, clock, max_attempts=3, rotate_every=60)
    client.get("/ezauth/login", status=200)
    before = session_token(client, csrf=CSRF)
    count_before = counter_value(data)
    make_unwritable(monkeypatch, data)

    page = client.get("/ezauth/login", status=200)
    assert "visited" not in page.text and 'name="csrf"' in page.text  # the page, without the number
    assert "event=counter_skipped" in caplog.text
    verify(client, 200, before)
    after = session_token(client, csrf=CSRF)
    verify(client, 200, after)
    login(client, password="wrong password", csrf=CSRF, status=401)
    assert "event=throttle_unwritable" in caplog.text
    login(client, password="wrong password", csrf=CSRF, status=401)
    login(client, password="wrong password", csrf=CSRF, status=401)
    login(client, password="wrong password", csrf=CSRF, status=429)  # the lockout still holds, in memory

    clock.advance(app.settings.rotate_every + 5)  # a rotation is due and cannot be written
    verify(client, 200, before)
    verify(client, 200, after)
    assert "event=rotation_failed" in caplog.text
    client.get("/ezauth/logout", status=303)
    assert counter_value(data) == count_before
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_start_on_a_read_only_data_dir_keeps_the_existing_sessions(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    data = tmp_path / "data"
    _, first = build(data)
    token = session_token(first, csrf=CSRF)
    make_unwritable(monkeypatch, data)
    _, client = build(data)  # a restart on the now read-only dir
    verify(client, 200, token)
    fresh = session_token(client, csrf=CSRF)
    verify(client, 200, fresh)
    verify(first, 200, fresh)  # signed by the shared file key, not a private one
    client.get("/ezauth/login", status=200)
    assert re.search(r"event=keyring_readonly error=.*Read-only file system.* action=using_loaded_keys", caplog.text)


def test_full_disk_skips_the_counter_and_rotation_but_not_logins(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    clock = FakeClock()
    data = tmp_path / "data"
    app, client = build(data, clock, rotate_every=60)
    client.get("/ezauth/login", status=200)
    token = session_token(client, csrf=CSRF)
    make_unwritable(monkeypatch, data, errno.ENOSPC, throttle=False)
    assert "visited" not in client.get("/ezauth/login", status=200).text
    assert "No space left on device" in caplog.text and "event=counter_skipped" in caplog.text
    clock.advance(app.settings.rotate_every + 5)
    verify(client, 200, token)
    verify(client, 200, session_token(client, csrf=CSRF))
    monkeypatch.undo()
    clock.advance(61)  # after the retry pause, a freed disk gets its rotation and its counter back
    client.get("/ezauth/login", status=200)
    assert counter_value(data) == 2
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_unusable_counter_file_never_breaks_the_page(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    data = tmp_path / "data"
    _, client = build(data)
    (data / "counter.txt").mkdir()  # not a file: reading and replacing it both fail
    page = client.get("/ezauth/login", status=200)
    assert "visited" not in page.text
    assert "event=counter_skipped" in caplog.text or "event=counter_corrupt" in caplog.text


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

BAD_KEYRINGS = {
    "garbage": b"this is not json\n",
    "empty": b"",
    "truncated": b'{"keys": [{"kid": "abc", "secret": "',
    "no-keys": b'{"keys": []}',
    "wrong-shape": b'{"kids": 1}',
    "list": b"[1, 2, 3]",
    "short-secret": b'{"keys": [{"kid": "abc", "secret": "AAAA", "created": 1, "signs_from": 1}]}',
    "bad-kid": json.dumps({"keys": [{"kid": "../x", "secret": ezauth._b64(b"k" * 32), "created": 1,
                                     "signs_from": 1}]}).encode(),
    "not-base64": b'{"keys": [{"kid": "abc", "secret": "!!!!", "created": 1, "signs_from": 1}]}',
    "not-utf8": b'{"keys": "\xff\xfe"}',
    "nul-bytes": b"\0" * 64,
}


@pytest.mark.parametrize("name", sorted(BAD_KEYRINGS))
def test_corrupt_key_ring_at_start_up_is_moved_aside(tmp_path, caplog, name):
    caplog.set_level(logging.INFO, logger="ezauth")
    data = tmp_path / "data"
    data.mkdir()
    (data / "keys.json").write_bytes(BAD_KEYRINGS[name])
    _, client = build(data)
    aside = [p for p in data.iterdir() if p.name.startswith("keys.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == BAD_KEYRINGS[name]
    assert_keyring_valid(data)
    assert f"moved_to={aside[0]}" in caplog.text and "event=keyring_corrupt" in caplog.text
    verify(client, 200, session_token(client, csrf=CSRF))


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


def test_corrupt_counter_is_moved_aside_and_counting_goes_on(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    data = tmp_path / "data"
    data.mkdir()
    (data / "counter.txt").write_bytes(b"12x\n")
    _, client = build(data)
    assert "visited 1 times" in client.get("/ezauth/login", status=200).text
    aside = [p for p in data.iterdir() if p.name.startswith("counter.txt.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"12x\n"
    assert "event=counter_corrupt" in caplog.text


def test_corrupt_throttle_database_is_moved_aside(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    data = tmp_path / "data"
    data.mkdir()
    (data / "throttle.sqlite3").write_bytes(b"definitely not sqlite" * 100)
    _, client = build(data, max_attempts=2)
    login(client, password="wrong password", csrf=CSRF, status=401)
    login(client, password="wrong password", csrf=CSRF, status=401)
    login(client, password="wrong password", csrf=CSRF, status=429)
    assert any(p.name.startswith("throttle.sqlite3.corrupt-") for p in data.iterdir())
    assert "event=throttle_corrupt" in caplog.text


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

