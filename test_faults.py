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
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ezauth
from conftest import (
    CSRF,
    HERE,
    PASSWORD,
    FakeClock,
    build,
    cheap_hash,
    clean_env,
    cli_token,
    events,
    free_port,
    http_call,
    jwt_parts,
    login,
    real_login,
    real_verify,
    run_cli,
    session_token,
    start_server,
    verify,
    write_users,
)

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


def test_read_only_data_dir_keeps_verify_working_and_refuses_logins_with_503(tmp_path, monkeypatch, caplog):
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
    # A login whose attempt cannot be counted is not checked at all: the lockout never lapses into memory.
    for password in (PASSWORD, "wrong password"):
        assert login(client, password=password, csrf=CSRF, status=503).headers["Retry-After"]
    lines = events(caplog, "store_unavailable")
    assert len(lines) == 2 and all(f'file="{data / "throttle.sqlite3"}"' in line for line in lines), lines
    assert not events(caplog, "login_failed") and len(events(caplog, "login_ok")) == 1  # the one before

    clock.advance(app.settings.rotate_every + 5)  # a rotation is due and cannot be written
    verify(client, 200, before)
    assert "event=rotation_failed" in caplog.text
    client.get("/ezauth/logout", status=303)  # the registry itself is still writable here
    verify(client, 401, before)
    assert counter_value(data) == count_before
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()
    (data / "throttle.sqlite3").rmdir()
    verify(client, 200, session_token(client, csrf=CSRF))  # writable again: logins work, nothing restarted


def test_start_on_a_read_only_data_dir_stops_naming_it(tmp_path, monkeypatch):
    data = tmp_path / "data"
    build(data)
    make_unwritable(monkeypatch, data, throttle=False)
    with pytest.raises(ezauth.StoreUnavailable) as refused:
        build(data)  # a restart on the now read-only dir: it could not record a login, so it does not start
    assert refused.value.path == data and "Read-only file system" in refused.value.error


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


# -- A disk that really fills up, a lock held too long, a registry that cannot be read ------------


def require_root() -> None:
    """Skip without root (mounting a tmpfs needs it), or fail in CI, which runs as root and must run it."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("this test mounts a tmpfs and needs root; CI runs as root")
        pytest.skip("mounting a tmpfs needs root: run the suite as root to cover full and read-only disks")


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems (mount options as given), all unmounted afterwards."""
    require_root()
    mounted: list[Path] = []

    def mount(options: str = "size=8m") -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode=0700,{options}", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill_up(disk: Path) -> Path:
    """Write a file until the disk says ENOSPC, down to the last byte; delete it to free the disk."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    return filler


def refused_after_a_second(port: int, checks: dict[str, dict[str, str]]) -> dict[str, list[tuple[float, int]]]:
    """Ask verify with each set of headers for 2.5 s (a new connection each time): (time, status) by name."""
    started, answers = time.monotonic(), {name: [] for name in checks}
    while (elapsed := time.monotonic() - started) < 2.5:
        for name, headers in checks.items():
            answers[name].append((elapsed, http_call(port, "GET", "/ezauth/verify", headers=headers).status))
        time.sleep(0.01)
    return answers


def real_verify_with(port: int, headers: dict[str, str]) -> int:
    return http_call(port, "GET", "/ezauth/verify", headers=headers).status


def test_full_disk_refuses_logins_and_cli_revocations_until_freed_then_nothing_is_lost(tmpfs):
    data = tmpfs("size=8m")
    write_users(data, alice=PASSWORD, bob=PASSWORD)
    server = start_server(data)  # its log lives beside the disk, not on it
    try:
        session = real_login(server.port, csrf=CSRF).cookie()
        secret, token_id = cli_token(data)
        checks = {"session": {"Cookie": f"ezauth={session}"}, "token": {"Authorization": f"Bearer {secret}"}}
        assert {name: real_verify_with(server.port, h) for name, h in checks.items()} == {"session": 200, "token": 200}
        filler = fill_up(data)

        failed = real_login(server.port, csrf=CSRF, status=503)
        assert failed.headers["Retry-After"] and not failed.cookie()
        assert re.search(r"event=store_unavailable method=POST path=/ezauth/login file=\".*sqlite3\" ", server.log())
        sid = jwt_parts(session)[1]["sid"]
        for command in (("token", "revoke", token_id), ("sessions", "--end", sid)):
            done = run_cli(*command, data_dir=data)
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
            assert str(data / "sessions.sqlite3") in done.stderr and "full" in done.stderr, done.stderr
        # Nothing was revoked, and the command said so: both still work until the revocation is made.
        assert {name: real_verify_with(server.port, h) for name, h in checks.items()} == {"session": 200, "token": 200}
        users_before = (data / "users").read_bytes()
        for command, stdin in ((("passwd", "bob", "--password-stdin"), "another password\n"),
                               (("deluser", "bob"), None)):
            done = run_cli(*command, data_dir=data, stdin=stdin)
            assert done.returncode == 1 and f"cannot use {data / 'users'}: No space left" in done.stderr, done.stderr
        assert (data / "users").read_bytes() == users_before  # bob is still there to delete once there is room

        filler.unlink()
        for command in (("token", "revoke", token_id), ("sessions", "--end", sid), ("deluser", "bob")):
            done = run_cli(*command, data_dir=data)
            assert done.returncode == 0, (command, done.stderr)
        answers = refused_after_a_second(server.port, checks)
        for name, seen in answers.items():
            late = [status for elapsed, status in seen if elapsed >= 1.1]
            assert len(late) >= 10 and set(late) == {401}, (name, seen)
        fresh = real_login(server.port, csrf=CSRF).cookie()  # and logins work again, no restart
        assert real_verify(server.port, fresh) == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_database_lock_held_past_the_timeout_is_a_503_then_logins_work(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    monkeypatch.setattr(ezauth, "DB_TIMEOUT", 0.2)
    data = tmp_path / "data"
    _, client = build(data)
    holder = sqlite3.connect(data / "throttle.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's transaction that does not end
    try:
        login(client, csrf=CSRF, status=503)
        assert re.search(r"event=store_unavailable .*throttle\.sqlite3.* error=\"?database is locked", caplog.text)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    verify(client, 200, session_token(client, csrf=CSRF))


def test_verify_refuses_with_503_once_the_registry_stays_unreadable_past_its_grace(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    clock = FakeClock()
    data = tmp_path / "data"
    app, client = build(data, clock)
    token = session_token(client, csrf=CSRF)
    registry = data / "sessions.sqlite3"
    registry.rename(tmp_path / "aside")
    registry.mkdir()  # cannot be opened: what a disk error or a careless hand looks like to SQLite
    app.stores.registry.db.read_if_changed(lambda db: None)  # the kept connection still reads the old file
    app.stores.registry.db._watcher.close()  # as a failing disk would end it
    clock.advance(1)
    verify(client, 200, token)  # within the grace: a revocation can be this late anyway
    assert "action=verify_refuses_after_5s" in caplog.text
    clock.advance(ezauth.REGISTRY_GRACE)
    verify(client, 503, token)  # past it: a session ended meanwhile would be missed, so nobody is let in
    assert "action=verify_refuses_everyone" in caplog.text
    registry.rmdir()
    (tmp_path / "aside").rename(registry)
    clock.advance(1)
    verify(client, 200, token)
    assert "event=sessions_readable_again" in caplog.text


def test_only_a_failed_look_at_the_registry_makes_verify_refuse(tmp_path):
    clock = FakeClock()
    data = tmp_path / "data"
    app, client = build(data, clock)
    token = session_token(client, csrf=CSRF)
    clock.advance(600)  # a quiet hour of the day: nobody looked at the registry for ten minutes
    with app.stores._refresh_lock:  # another request is looking right now
        verify(client, 200, token)
    registry = data / "sessions.sqlite3"
    registry.rename(tmp_path / "aside")
    registry.mkdir()
    app.stores.registry.db._watcher.close()
    clock.advance(600)
    verify(client, 503, token)  # the first look fails, and what it last saw is ten minutes old: no grace


@pytest.mark.parametrize("how", ["serve", "gunicorn"])
def test_start_on_a_read_only_data_dir_stops_with_one_line_naming_it(tmpfs, tmp_path, gunicorn_bin, how):
    data = tmpfs("size=1m")
    write_users(data, alice=PASSWORD)
    subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
    port = free_port()
    command = ([sys.executable, str(HERE / "ezauth.py"), "serve", "--port", str(port), "--data-dir", str(data)]
               if how == "serve" else [gunicorn_bin, "-w", "2", "-b", f"127.0.0.1:{port}", "ezauth:app"])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=HERE,
                          env=clean_env(EZAUTH_DATA_DIR=str(data)))
    assert done.returncode != 0, done.stderr
    line = f"ezauth: cannot use {data}: the data dir cannot be written (Read-only file system)"
    assert any(ln.startswith(line) for ln in done.stderr.splitlines()), done.stderr
    if how == "serve":
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    else:  # every worker stops with that line, and gunicorn halts instead of starting them again
        assert "App failed to load" in done.stderr and "Booting worker" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr.partition("Worker (pid")[0], done.stderr


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

