"""Faults in real processes: kill -9 in the middle of writes, rotation under load, and damaged files
at start-up of the real server. ezauth must lose nothing, never go backwards and keep answering.
The faults a single app meets in-process (a read-only or full data dir, corrupt files) are in
tests/app/test_faults.py."""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
    free_port,
    jwt_parts,
    visits_pattern,
    write_users,
)
from tests.support.process import cli_token, http_call, real_login, real_verify, run_cli, start_server

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
            # the data dir it used, then the one-line reason
            assert done.stderr.count("\n") == 2 and "Traceback" not in done.stderr, done.stderr
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
    if how == "serve":  # 3: the systemd unit's RestartPreventExitStatus, since a restart cannot fix it
        assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
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

