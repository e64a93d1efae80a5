"""Faults one app meets in-process: a read-only or full data dir, and corrupt files at start-up.
ezauth must lose nothing, never go backwards and keep answering. kill -9, rotation under load and
the real server's start-up are in tests/process/test_faults.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sqlite3
from pathlib import Path

import pytest

import ezauth
from tests.support.app import build, login, logout, session_token, verify
from tests.support.basics import CSRF, PASSWORD, FakeClock, assert_keyring_valid, counter_value, events

pytestmark = pytest.mark.slow


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
    logout(client)  # the registry itself is still writable here
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
    _, client = build(data, clock)
    token = session_token(client, csrf=CSRF)
    registry = data / "sessions.sqlite3"
    registry.rename(tmp_path / "aside")
    registry.mkdir()  # cannot be opened: what a disk error or a careless hand looks like to SQLite
    clock.advance(1)  # the next look sees another file at the path, and cannot open it
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


@pytest.mark.parametrize("how", ["damaged", "deleted"])
def test_a_replaced_sessions_database_forgets_no_logout(tmp_path, caplog, how):
    """A damaged (or deleted) sessions.sqlite3 is started afresh, and the fresh one knows no ended
    session: a logged-out cookie must not come back to life, so every session from before it ends."""
    caplog.set_level(logging.INFO, logger="ezauth")
    clock = FakeClock()
    data = tmp_path / "data"
    _, client = build(data, clock)
    logged_out, still_in = session_token(client, csrf=CSRF), session_token(build(data, clock)[1], csrf=CSRF)
    logout(client, Cookie=f"ezauth={logged_out}")
    verify(client, 401, logged_out)
    clock.advance(5)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{data / 'sessions.sqlite3'}{suffix}").unlink(missing_ok=True)
    if how == "damaged":
        (data / "sessions.sqlite3").write_bytes(b"definitely not sqlite" * 100)
    fresh = session_token(client, csrf=CSRF)  # the next write finds the file gone or damaged: a new one
    clock.advance(1.1)
    for token in (logged_out, still_in):
        verify(client, 401, token)
        verify(build(data, clock)[1], 401, token)  # another worker, started after it
    verify(client, 200, fresh)
    assert (how == "damaged") == ("event=sessions_corrupt" in caplog.text)
