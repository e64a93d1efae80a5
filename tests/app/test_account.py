"""The account page, the session registry and API tokens, in-process through WebTest.

In order: the registry and the page with a fake clock (two apps on one data dir are two workers; a
request more than a second later makes each reload what the other wrote), then API tokens at
verify. The same features from the command line are in tests/process/test_account_cli.py, under
gunicorn in tests/process/test_workers.py, through nginx in tests/nginx/test_tokens_and_logout.py
and in Chromium in tests/browser/test_account_page.py.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import html
import io
import logging
import os
import secrets
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
import pytest
import webtest

import ezauth
from tests.support.app import (
    build,
    change,
    cookie_header,
    enrollment_on,
    error_text,
    login,
    logout,
    new_client,
    new_token_on,
    notice_text,
    other_code,
    session_token,
    tick,
    verify,
)
from tests.support.basics import (
    ACCOUNT,
    CLIENT_IP,
    CSRF,
    FIREFOX,
    FORWARDED,
    HEALTHZ,
    IPHONE,
    LOGIN,
    NEW_PASSWORD,
    PASSWORD,
    TEXT,
    basic,
    bearer,
    cookie_attrs,
    events,
    fail2ban_lines,
    fail2ban_re,
    form_field,
    parse_page,
    shown_time,
    sid_of,
    token_of,
    write_users,
)
from tests.support.process import TOKEN_RE

ZH = ezauth.PAGE_TEXT["zh-CN"]
# -- Helpers --------------------------------------------------------------------------------


def join_flushes() -> None:
    """Wait for the background write of last-seen times that a refresh may have started."""
    for thread in threading.enumerate():
        if thread.name == "ezauth-flush":
            thread.join(timeout=10)


def flush(app: ezauth.EzauthApp) -> None:
    """The minute's write-out of last-seen times, now (after any that a refresh started)."""
    join_flushes()
    app.stores.flush(app.clock())



def account_page(client: webtest.TestApp, status: int = 200, **headers: str) -> webtest.TestResponse:
    return client.get(ACCOUNT, headers={**FORWARDED, **headers}, status=status)


def done(reply: webtest.TestResponse, notice: str, revoked: int | None = None) -> None:
    """A change was made: 303 back to the page, which says so (and how many API tokens it revoked)."""
    assert reply.status_int == 303
    assert reply.headers["Location"] == f"{ACCOUNT}?done={notice}" + ("" if revoked is None else f"&count={revoked}")
    assert reply.headers["Cache-Control"] == "no-store"


@dataclass
class Row:
    current: bool
    cells: list[str]
    inputs: dict[str, str]


class TableRows(HTMLParser):
    """The body rows of <table id=TABLE_ID>: whether a row is marked current, its cells' text and
    its inputs by name."""

    def __init__(self, table_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.table_id, self.state, self.in_cell = table_id, "", False
        self.rows: list[Row] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "table" and found.get("id") == self.table_id:
            self.state = "table"
        elif self.state == "table" and tag == "tbody":
            self.state = "body"
        elif self.state == "body" and tag == "tr":
            self.rows.append(Row("current" in (found.get("class") or "").split(), [], {}))
        elif self.state == "body" and tag == "td" and self.rows:
            self.rows[-1].cells.append("")
            self.in_cell = True
        elif self.state == "body" and tag == "input" and self.rows and found.get("name"):
            self.rows[-1].inputs[found["name"]] = found.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self.in_cell = False
        elif tag == "tbody" and self.state == "body":
            self.state = "done"

    def handle_data(self, data: str) -> None:
        if self.state == "body" and self.in_cell:
            self.rows[-1].cells[-1] += data


def rows(page: str, table_id: str) -> list[Row]:
    parser = TableRows(table_id)
    parser.feed(page)
    return [Row(r.current, [" ".join(c.split()) for c in r.cells], r.inputs) for r in parser.rows]


def token_rows(page: str) -> list[Row]:
    """The rows of the tokens table, without the one-cell "no tokens yet" line."""
    return [r for r in rows(page, "tokens") if len(r.cells) > 1]


class Spy:
    """Stands in for an object and notes every attribute anyone uses."""

    def __init__(self, target: object, name: str, touched: list[str]) -> None:
        self._target, self._name, self._touched = target, name, touched

    def __getattr__(self, attr: str) -> object:
        self._touched.append(f"{self._name}.{attr}")
        return getattr(self._target, attr)


@contextlib.contextmanager
def noting_file_access(stores: ezauth.Stores, touched: list[str]) -> Iterator[None]:
    """Note (and still perform) every file open, stat and SQLite use while inside."""
    def spy(name: str, real: Callable) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            touched.append(f"{name}({args[0] if args else ''})")
            return real(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((os, "stat"), (os, "lstat"), (os, "open"), (io, "open"), (builtins, "open"),
                             (sqlite3, "connect")):
            patch.setattr(module, name, spy(f"{module.__name__}.{name}", getattr(module, name)))
        for db in (stores.registry.db, stores.throttle.db):
            if db._watcher is not None:
                patch.setattr(db, "_watcher", Spy(db._watcher, f"{db.path.name} connection", touched))
        yield


# -- The session registry, two workers on one data dir --------------------------------------


def test_logout_ends_the_session_for_every_copy_of_its_cookie_in_every_worker(data_dir, clock):
    (app_a, browser), (app_b, worker_b) = build(data_dir, clock), build(data_dir, clock)
    token = session_token(browser)
    copy = new_client(app_a)
    verify(copy, 200, token)
    verify(worker_b, 200, token)

    reply = logout(browser)
    assert reply.headers["Location"] == LOGIN
    assert cookie_attrs(cookie_header(reply))["max-age"] == "0"

    refused = verify(copy, 401, token)  # the worker that logged out: at once
    assert "expired=1" in refused.headers["X-Ezauth-Login"]
    tick(clock, worker_b)
    verify(worker_b, 401, token)  # the other one: within a second
    record = app_b.stores.registry.get(sid_of(token), clock())
    assert record is not None and record.ended is not None and record.reason == "logout"
    assert app_b.stores.registry.live(clock(), "alice") == []


def test_password_change_on_the_account_page_ends_the_other_sessions_in_every_worker(data_dir, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    (app_a, here), (app_b, there) = build(data_dir, clock), build(data_dir, clock)
    before = session_token(here)
    elsewhere = session_token(there)  # alice on another device, served by worker B
    bob = session_token(new_client(app_b), "bob")

    reply = change(here, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    done(reply, "password_changed", revoked=0)
    fresh = token_of(cookie_header(reply))
    assert sid_of(fresh) == sid_of(before)  # the same session goes on, with a fresh cookie
    assert notice_text(here.get(reply.headers["Location"], status=200).text) == TEXT[
        "msg_password_changed"].format(count=0)

    verify(new_client(app_a), 200, fresh)
    verify(new_client(app_a), 401, before)  # the cookie from before the change
    verify(new_client(app_a), 401, elsewhere)
    tick(clock, there)
    verify(new_client(app_b), 200, fresh)
    verify(new_client(app_b), 401, elsewhere)
    verify(new_client(app_b), 200, bob)
    assert app_b.stores.registry.get(sid_of(elsewhere), clock()).reason == "password_changed"
    assert [r.sid for r in app_b.stores.registry.live(clock(), "alice")] == [sid_of(fresh)]

    login(new_client(app_b), password=PASSWORD, status=401)
    login(new_client(app_b), password=NEW_PASSWORD)
    assert events(caplog, "account_password_changed") == [
        f"event=account_password_changed user=alice ip={CLIENT_IP} tokens_revoked=0"]


def test_password_change_keeps_remember_me_on_the_fresh_cookie(client, service, clock):
    login(client, remember=True)
    clock.advance(60)
    reply = change(client, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    attrs = cookie_attrs(cookie_header(reply))
    # A whole remember-me lifetime, but counted from the login: EZAUTH_SESSION_MAX_AGE (30 days) caps it.
    assert attrs["max-age"] == str(30 * 86400 - 60) and "httponly" in attrs
    [record] = service.stores.registry.live(clock(), "alice")
    assert record.remember


def test_registry_records_ip_browser_and_remember_me(service, clock):
    laptop, phone = new_client(service), new_client(service)
    login(laptop, remember=True, headers={"User-Agent": FIREFOX, **FORWARDED})
    clock.advance(5)
    login(phone, headers={"User-Agent": IPHONE, "X-Forwarded-For": "2001:db8::7"})
    # A client that is not the trusted proxy cannot choose the address that is recorded.
    stranger = webtest.TestApp(service, extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    clock.advance(5)
    login(stranger, "bob", headers={"User-Agent": "curl/8.5.0", "X-Forwarded-For": "198.51.100.1"})

    alice = service.stores.registry.live(clock(), "alice")  # newest first
    laptop_at, phone_at = clock() - 10, clock() - 5
    assert [(r.agent, r.ip, r.remember, r.created, r.last_seen, r.expires, r.ended) for r in alice] == [
        ("Safari on iOS", "2001:db8::7", False, phone_at, phone_at, phone_at + 1800, None),
        ("Firefox on Linux", CLIENT_IP, True, laptop_at, laptop_at, laptop_at + 30 * 86400, None),
    ]
    [bob] = service.stores.registry.live(clock(), "bob")
    assert (bob.agent, bob.ip) == ("curl", "192.0.2.9")


def test_last_seen_is_noted_at_most_once_a_minute_and_written_by_the_flush(client, service, clock):
    token = session_token(client)
    join_flushes()
    registry, sid, started = service.stores.registry, sid_of(token), clock()
    nginx = new_client(service)

    def stored() -> tuple[float, str]:
        join_flushes()
        record = registry.get(sid, clock())
        return record.last_seen, record.ip

    clock.advance(10)
    verify(nginx, 200, token, X_Forwarded_For="198.51.100.1")
    assert stored() == (started, "127.0.0.1")  # verify only notes it in memory
    flush(service)
    assert stored() == (started + 10, "198.51.100.1")

    clock.advance(20)
    verify(nginx, 200, token, X_Forwarded_For="198.51.100.2")
    flush(service)
    assert stored() == (started + 10, "198.51.100.1")  # 20 s after the last note: not noted again

    clock.advance(41)
    verify(nginx, 200, token, X_Forwarded_For="198.51.100.3")
    flush(service)
    assert stored() == (started + 71, "198.51.100.3")
    [row] = rows(account_page(client).text, "sessions")
    assert row.cells[1:4] == ["198.51.100.3", shown_time(started + 71), shown_time(started)]


def test_last_seen_reaches_the_registry_within_a_minute_without_anyone_asking(client, service, clock):
    token = session_token(client)  # the first request's refresh started the minute's flush
    join_flushes()
    started = clock()
    clock.advance(10)
    verify(new_client(service), 200, token, X_Forwarded_For="198.51.100.1")
    join_flushes()
    assert service.stores.registry.get(sid_of(token), clock()).last_seen == started
    clock.advance(51)  # a minute after the last write
    client.get(HEALTHZ, status=200)
    join_flushes()
    record = service.stores.registry.get(sid_of(token), clock())
    assert (record.last_seen, record.ip) == (started + 10, "198.51.100.1")


@pytest.mark.parametrize("renewal", ["verify_renews_it", "password_change"])
def test_an_ended_session_stays_ended_until_its_newest_token_expires(client, service, clock, renewal):
    """A session that got a newer token (renewed past half its life, or re-signed by a password
    change) and then logged out must stay refused until that newer token expires, not only until
    its first token would have."""
    first = session_token(client)
    nginx = new_client(service)
    if renewal == "verify_renews_it":
        clock.advance(899)
        verify(nginx, 200, first)  # noted as seen
        clock.advance(1)
        newest = token_of(cookie_header(verify(nginx, 200, first)))  # half its life: a new token
    else:
        clock.advance(1000)
        newest = token_of(cookie_header(change(client, "password", current=PASSWORD, new=NEW_PASSWORD,
                                               again=NEW_PASSWORD)))
    assert sid_of(newest) == sid_of(first)
    assert jwt.decode(newest, options={"verify_signature": False})["exp"] > clock() + 1500

    logout(new_client(service), Cookie=f"ezauth={newest}")
    verify(new_client(service), 401, newest)
    # Just past the first token's expiry, long before the newest one's; the server's minute write-out.
    clock.advance(jwt.decode(first, options={"verify_signature": False})["exp"] + 2 - clock())
    join_flushes()
    flush(service)
    client.get(HEALTHZ, status=200)
    verify(new_client(service), 401, newest)


def test_registry_forgets_sessions_once_their_tokens_expire_so_its_file_stays_small(
        client, service, clock, monkeypatch, capsys, caplog):
    """10,000 sessions, one every 6 s (about 17 hours), a third of them logged out, the rest left to
    expire; the server's minute write-out forgets each once its token has expired (plus a margin of
    two write-outs, for renewals other workers have not written yet). At most (1800 + 120) s / 6 s
    = 320 sessions are kept at once, about 300 bytes each with the two indexes: under 100 KiB. Had
    the registry kept them all, 10,000 rows would take well over 2 MB."""
    client.get(HEALTHZ, status=200)  # as in a running server: a connection stays open on the file
    join_flushes()
    path = service.settings.data_dir / "sessions.sqlite3"
    wal = path.with_name(path.name + "-wal")
    real_connect = sqlite3.connect

    def without_fsync(*args: object, **kwargs: object) -> sqlite3.Connection:
        # Only speed: the file's size does not depend on fsync, and 10,000 synced commits take 15 s.
        db = real_connect(*args, **kwargs)
        db.execute("PRAGMA synchronous=OFF")
        return db

    def stored_rows() -> int:
        with contextlib.closing(real_connect(path)) as db:
            return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    monkeypatch.setattr(sqlite3, "connect", without_fsync)
    caplog.set_level(logging.WARNING, logger="ezauth")
    stores, samples = service.stores, []
    for n in range(1, 10_001):
        _, session = stores.sessions.start("alice" if n % 2 else "bob", clock(), False, CLIENT_IP, FIREFOX)
        if n % 3 == 0:
            stores.registry.end([session.sid], "logout", clock())
        clock.advance(6)
        if n % 10 == 0:
            stores.flush(clock())  # once a minute, as the server does
        if n % 1000 == 0:
            samples.append((path.stat().st_size, wal.stat().st_size if wal.exists() else 0, stored_rows()))
    clock.advance(1800 + 2 * ezauth.SEEN_EVERY)
    stores.flush(clock())

    assert stored_rows() == 0
    assert max(rows for _, _, rows in samples) <= (1800 + 2 * ezauth.SEEN_EVERY) // 6 + 10
    assert max(size for size, _, _ in samples) < 256 * 1024, samples
    assert path.stat().st_size < 256 * 1024
    # Each flush ends with a checkpoint that copies the write-ahead log into the file and empties
    # it: right after a flush the log holds nothing, however many sessions came and went.
    assert [w for _, w, _ in samples] == [0] * len(samples), samples
    assert capsys.readouterr() == ("", "")
    assert caplog.records == []


def test_a_flush_while_another_worker_reads_leaves_the_log_to_the_next_flush(client, service, clock, caplog):
    """The checkpoint never waits for a reader (the flush runs on its own thread, but holds the
    flush lock): a worker reading at that moment makes it skip, quietly, and the next flush empties
    the log."""
    join_flushes()
    path = service.settings.data_dir / "sessions.sqlite3"
    wal = path.with_name(path.name + "-wal")
    session_token(client)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM sessions").fetchone() == (1,)  # a read snapshot, held
        service.stores.flush(clock())
        assert wal.stat().st_size > 0
        reader.execute("COMMIT")
    clock.advance(ezauth.FLUSH_EVERY)
    service.stores.flush(clock())
    assert wal.stat().st_size == 0
    assert caplog.records == []


def test_verify_between_refreshes_touches_no_file(client, service, clock):
    token = session_token(client)
    bob = session_token(new_client(service), "bob")
    _, secret = service.stores.tokens.add("alice", "script", clock())
    nginx = new_client(service)
    tick(clock, nginx)  # a refresh now: none is due for a second
    join_flushes()

    touched: list[str] = []
    with noting_file_access(service.stores, touched):
        for _ in range(3):
            verify(nginx, 200, token)
            verify(nginx, 200, bob, X_Forwarded_For="198.51.100.1")
            verify(nginx, 200, Authorization=bearer(secret))
            verify(nginx, 200, Authorization=basic("alice", secret))
            verify(nginx, 401)
            verify(nginx, 401, "not-a-token")
        clock.advance(0.5)
        verify(nginx, 200, token)
    assert touched == []

    # An unknown token (one the CLI may have just made) looks at the registry early: a stat (is it
    # still the same file?) and one PRAGMA on the connection kept open, no file opened, and not again
    # within LOOK_EVERY.
    with noting_file_access(service.stores, touched):
        for _ in range(20):
            verify(nginx, 401, Authorization=bearer("ezt_" + "A" * 43))
    assert touched == [f"os.stat({service.stores.registry.db.path})", "sessions.sqlite3 connection.execute"]
    touched.clear()

    # The same watch sees the refresh a second later: it would have seen any file access above.
    clock.advance(0.6)
    with noting_file_access(service.stores, touched):
        verify(nginx, 200, token)
    assert touched


# -- The account page -----------------------------------------------------------------------


def test_account_page_without_a_session_goes_to_the_login_and_back(client, service):
    reply = client.get(ACCOUNT, status=303)
    assert reply.headers["Location"] == "/ezauth/login?rd=%2Fezauth%2Faccount"
    page = client.get(reply.headers["Location"], status=200)
    assert form_field(page.text, "rd") == ACCOUNT
    logged_in = login(client, rd=ACCOUNT)
    assert logged_in.headers["Location"] == ACCOUNT
    assert TEXT["msg_signed_in"].format(user="alice") in account_page(client).text
    # Opened straight, the login page lands on the account page too.
    assert login(new_client(service)).headers["Location"] == ACCOUNT

    # A change posted without a session changes nothing and goes the same way.
    stranger = new_client(service)
    posted = stranger.post(ACCOUNT, {"csrf": CSRF, "action": "end_others"},
                           headers={"Cookie": f"ezauth_csrf={CSRF}"}, status=303)
    assert posted.headers["Location"] == "/ezauth/login?rd=%2Fezauth%2Faccount"
    assert len(service.stores.registry.live(service.clock(), "alice")) == 2

    # So does a logged-out session.
    logout(client)
    gone = new_client(service).get(ACCOUNT, headers={"Cookie": f"ezauth={token_of(cookie_header(logged_in))}"},
                                   status=303)
    assert gone.headers["Location"].startswith(LOGIN)


def test_account_page_lists_every_session_of_the_user_and_marks_this_one(service, clock):
    laptop, phone = new_client(service), new_client(service)
    login(laptop, headers={"User-Agent": FIREFOX, **FORWARDED})
    clock.advance(60)
    phone_token = session_token(phone, remember=True, headers={"User-Agent": IPHONE,
                                                                "X-Forwarded-For": "198.51.100.23"})
    bob_token = session_token(new_client(service), "bob")

    page = account_page(laptop, **{"User-Agent": FIREFOX})
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Frame-Options"] == "DENY"
    listed = rows(page.text, "sessions")
    assert len(listed) == 2
    [here] = [r for r in listed if r.current]
    [other] = [r for r in listed if not r.current]
    assert here.cells[:2] == [f"Firefox on Linux {TEXT['t_this_device']}", CLIENT_IP]
    assert here.inputs == {}  # no button to end the session in use
    assert other.cells[:4] == ["Safari on iOS", "198.51.100.23", shown_time(clock()), shown_time(clock())]
    assert other.inputs["action"] == "end_session" and other.inputs["sid"] == sid_of(phone_token)
    assert sid_of(bob_token) not in page.text


def test_ending_one_session_on_the_page_refuses_it_in_every_worker(data_dir, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    (app_a, here), (app_b, there) = build(data_dir, clock), build(data_dir, clock)
    mine = session_token(here)
    elsewhere = session_token(there)
    bob = session_token(new_client(app_a), "bob")

    reply = change(here, "end_session", sid=sid_of(elsewhere))
    done(reply, "session_ended")
    page = here.get(reply.headers["Location"], headers=FORWARDED, status=200).text
    assert notice_text(page) == TEXT["msg_session_ended"]
    assert [r.current for r in rows(page, "sessions")] == [True]
    verify(new_client(app_a), 401, elsewhere)
    tick(clock, there)
    verify(new_client(app_b), 401, elsewhere)
    assert there.get(ACCOUNT, status=303).headers["Location"].startswith(LOGIN)
    assert events(caplog, "account_session_ended") == [f"event=account_session_ended user=alice ip={CLIENT_IP}"]

    # Not this session (that is logging out), not bob's, not one that does not exist.
    for sid in (sid_of(mine), sid_of(bob), "A" * 22, ""):
        refused = change(here, "end_session", 404, sid=sid)
        assert error_text(refused.text) == TEXT["msg_gone"]
    verify(new_client(app_a), 200, mine)
    verify(new_client(app_a), 200, bob)
    assert len(events(caplog, "account_session_ended")) == 1


def test_log_out_everywhere_else_keeps_only_this_session(service, client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    mine = session_token(client)
    others = [session_token(new_client(service)) for _ in range(3)]
    bob = session_token(new_client(service), "bob")
    done(change(client, "end_others"), "others_ended")
    for token in others:
        verify(new_client(service), 401, token)
    verify(new_client(service), 200, mine)
    verify(new_client(service), 200, bob)
    page = account_page(client, status=200).text
    assert [r.current for r in rows(page, "sessions")] == [True]
    assert events(caplog, "account_others_ended") == [f"event=account_others_ended user=alice ip={CLIENT_IP}"]


@pytest.mark.parametrize(("fields", "status", "message"), [
    pytest.param({"new": NEW_PASSWORD, "again": NEW_PASSWORD}, 403, "msg_confirm_needed", id="no-current"),
    pytest.param({"current": "not my password", "new": NEW_PASSWORD, "again": NEW_PASSWORD}, 401,
                 "msg_wrong_current", id="wrong-current"),
    pytest.param({"current": PASSWORD, "new": "short", "again": "short"}, 400, "msg_password_short", id="short"),
    pytest.param({"current": PASSWORD, "new": NEW_PASSWORD, "again": NEW_PASSWORD + "!"}, 400,
                 "msg_password_mismatch", id="mismatch"),
])
def test_password_change_is_refused_without_the_current_password_or_a_good_new_one(
        client, service, caplog, fields, status, message):
    caplog.set_level(logging.INFO, logger="ezauth")
    token = session_token(client)  # the password was entered just now, and still must be given again
    other = session_token(new_client(service))
    refused = change(client, "password", status, **fields)
    assert error_text(refused.text) == TEXT[message]
    assert cookie_header(refused) is None  # no new session cookie
    assert service.stores.users.check("alice", PASSWORD)
    verify(new_client(service), 200, token)
    verify(new_client(service), 200, other)
    assert events(caplog, "account_password_changed") == []
    assert len(events(caplog, "account_refused")) == 1


def test_wrong_current_passwords_count_toward_the_lockout(client, service, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    for _ in range(5):
        change(client, "password", 401, current="not my password", new=NEW_PASSWORD, again=NEW_PASSWORD)
    locked = change(client, "password", 429, current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    assert error_text(locked.text) == "Too many attempts. Try again in 5 minutes."
    assert locked.headers["Retry-After"] == "300"
    assert service.stores.users.check("alice", PASSWORD)
    login(new_client(service), status=429)  # the login form is locked for alice as well
    failed = events(caplog, "login_failed")
    assert failed == [f"event=login_failed via=account user=alice ip={CLIENT_IP}"] * 5
    # fail2ban's filter from the README bans the address behind them, as for wrong logins.
    hosts = [fail2ban_re().search(line) for line in fail2ban_lines(caplog)]
    assert [m.group("host") for m in hosts if m] == [CLIENT_IP] * 5


def test_two_factor_turns_on_only_after_a_correct_code_and_off_with_a_current_code(client, service, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    page = change(client, "totp_begin", 200)
    assert page.headers["Cache-Control"] == "no-store"
    secret, uri, enrollment = enrollment_on(page.text)
    assert len(secret) == 20
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc, unquote(parts.path)) == ("otpauth", "totp", "/ezauth:alice")
    assert parse_qs(parts.query)["secret"] == [base64.b32encode(secret).decode().rstrip("=")]
    assert not service.stores.totp.enrolled("alice")
    login(new_client(service))  # shown is not turned on: the password alone still logs in

    code = ezauth.totp(secret, clock())
    wrong = change(client, "totp_confirm", 401, enrollment=enrollment, code=other_code(code), current=PASSWORD)
    assert error_text(wrong.text) == TEXT["msg_wrong_code"]
    change(client, "totp_confirm", 400, enrollment=enrollment[:-4] + "AAAA", code=code, current=PASSWORD)
    assert not service.stores.totp.enrolled("alice")

    done(change(client, "totp_confirm", enrollment=enrollment, code=code, current=PASSWORD), "totp_on")
    assert service.stores.totp.enrolled("alice")
    assert notice_text(client.get(f"{ACCOUNT}?done=totp_on", status=200).text) == TEXT["msg_totp_on"]
    assert TEXT["t_totp_is_on"] in account_page(client).text
    asked = login(new_client(service), status=200)
    assert form_field(asked.text, "pending")  # the login now asks for a code

    change(client, "totp_off", 401, code=code, current=PASSWORD)  # the code that turned it on is spent
    change(client, "totp_off", 401, code=other_code(ezauth.totp(secret, clock() + 30)), current=PASSWORD)
    assert service.stores.totp.enrolled("alice")
    clock.advance(30)
    done(change(client, "totp_off", code=ezauth.totp(secret, clock()), current=PASSWORD), "totp_off")
    assert not service.stores.totp.enrolled("alice")
    login(new_client(service))
    assert events(caplog, "account_totp_on") == [f"event=account_totp_on user=alice ip={CLIENT_IP}"]
    assert events(caplog, "account_totp_off") == [f"event=account_totp_off user=alice ip={CLIENT_IP}"]


def test_two_factor_set_up_expires_and_dies_with_a_password_change(client, service, clock):
    login(client)
    secret, _, enrollment = enrollment_on(change(client, "totp_begin", 200).text)
    clock.advance(601)
    slow = change(client, "totp_confirm", 400, enrollment=enrollment, code=ezauth.totp(secret, clock()))
    assert error_text(slow.text) == TEXT["msg_too_slow"]
    secret, _, enrollment = enrollment_on(change(client, "totp_begin", 200, current=PASSWORD).text)
    change(client, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    change(client, "totp_confirm", 400, enrollment=enrollment, code=ezauth.totp(secret, clock()))
    assert not service.stores.totp.enrolled("alice")


def test_an_enrolled_user_cannot_swap_the_second_factor_without_a_current_code(client, service, data_dir):
    """Turning two-factor login off needs a current code; putting a new secret in its place must too,
    or a stolen session (within 10 minutes of its login) takes the second factor over."""
    login(client)
    original = service.stores.totp.enroll("alice")
    before = (data_dir / "totp").read_text()
    begun = client.post(ACCOUNT, {"csrf": form_field(account_page(client).text, "csrf"), "action": "totp_begin"},
                        headers=FORWARDED, status="*")
    assert begun.status_int < 500
    assert "enrollment" not in parse_page(begun.text).hidden  # nothing to confirm a new secret with
    assert TEXT["t_totp_is_on"] in begun.text
    assert (data_dir / "totp").read_text() == before
    assert f"alice:{base64.b32encode(original).decode().rstrip('=')}:" in before


def test_qr_code_is_an_svg_data_uri_of_the_otpauth_uri_with_segno(client):
    import segno  # in requirements-test.txt: without it this test fails rather than skips
    login(client)
    page = change(client, "totp_begin", 200).text
    _, uri, _ = enrollment_on(page)
    images = [attrs for tag, attrs in parse_page(page).tags if tag == "img" and attrs.get("class") == "qr"]
    assert len(images) == 1
    src = images[0]["src"]
    assert src.startswith("data:image/svg+xml")
    assert "<svg" in unquote(src.partition(",")[2]) and "</svg>" in unquote(src.partition(",")[2])
    assert src == segno.make(uri, error="m").svg_data_uri(scale=4, border=2)  # exactly the URI shown
    assert images[0]["alt"] == TEXT["t_totp_qr"]
    assert int(images[0]["width"]) == int(images[0]["height"]) > 0
    assert "img-src 'self' data:" in client.get(ACCOUNT, status=200).headers["Content-Security-Policy"]


def test_without_segno_the_secret_and_uri_are_shown_as_text(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "segno", None)  # `import segno` now raises ImportError
    login(client)
    page = change(client, "totp_begin", 200).text
    secret, uri, enrollment = enrollment_on(page)
    assert enrollment and uri.startswith("otpauth://totp/")
    assert base64.b32encode(secret).decode().rstrip("=") in "".join(parse_page(page).text)
    assert not [attrs for tag, attrs in parse_page(page).tags if tag == "img" and attrs.get("class") == "qr"]
    assert "data:image/svg" not in page


def test_api_token_made_on_the_page_is_shown_once_listed_and_revoked_in_every_worker(data_dir, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    (app_a, here), (app_b, there) = build(data_dir, clock), build(data_dir, clock)
    login(here)
    page = change(here, "token_create", 200, label="sd script", days="90", paths="/sdapi/ /extra/",
                  current=PASSWORD)
    assert page.headers["Cache-Control"] == "no-store" and "Location" not in page.headers
    secret = new_token_on(page.text)
    assert TOKEN_RE.fullmatch(secret)
    [listed] = token_rows(page.text)
    never = ezauth.format_time(None, "en")
    assert listed.cells[:5] == ["sd script", shown_time(clock()), never, shown_time(clock() + 90 * 86400),
                                "/sdapi/ /extra/"]
    [stored] = app_a.stores.tokens.list(clock(), "alice")
    assert listed.inputs["action"] == "token_revoke" and listed.inputs["id"] == stored.id

    again = account_page(here).text  # shown once: never again, and never logged
    assert secret not in again and not [t for t, a in parse_page(again).tags if a.get("id") == "new-token"]
    assert secret not in caplog.text
    assert events(caplog, "account_token_created") == [
        f"event=account_token_created user=alice ip={CLIENT_IP} token={stored.id}"]

    verify(new_client(app_a), 200, Authorization=bearer(secret), uri="/sdapi/v1/txt2img")
    tick(clock, there)
    verify(new_client(app_b), 200, Authorization=bearer(secret), uri="/extra/x")

    done(change(here, "token_revoke", id=stored.id), "token_revoked")
    verify(new_client(app_a), 401, Authorization=bearer(secret), uri="/sdapi/v1/txt2img")
    tick(clock, there)
    verify(new_client(app_b), 401, Authorization=bearer(secret), uri="/sdapi/v1/txt2img")
    after = account_page(here).text
    assert token_rows(after) == [] and len(rows(after, "tokens")) == 1  # the "no tokens yet" line
    assert events(caplog, "account_token_revoked") == [f"event=account_token_revoked user=alice ip={CLIENT_IP}"]

    # Bob's token cannot be revoked from alice's page.
    bob_token, bob_secret = app_a.stores.tokens.add("bob", "bob's", clock())
    refused = change(here, "token_revoke", 404, id=bob_token.id)
    assert error_text(refused.text) == TEXT["msg_gone"]
    verify(new_client(app_a), 200, Authorization=bearer(bob_secret))


@pytest.mark.parametrize("fields", [
    pytest.param({"label": ""}, id="no-label"),
    pytest.param({"label": "x" * 61}, id="long-label"),
    pytest.param({"label": "tab\there"}, id="control-character"),
    pytest.param({"label": "ok", "days": "0"}, id="zero-days"),
    pytest.param({"label": "ok", "days": "3651"}, id="too-many-days"),
    pytest.param({"label": "ok", "days": "soon"}, id="days-not-a-number"),
    pytest.param({"label": "ok", "paths": "sdapi/"}, id="relative-path"),
])
def test_token_with_bad_fields_is_refused_and_nothing_is_made(client, service, clock, fields):
    login(client)
    refused = change(client, "token_create", 400, current=PASSWORD, **fields)
    assert error_text(refused.text) == TEXT["msg_bad_token"]
    assert service.stores.tokens.list(clock(), "alice") == []


def test_token_labels_and_paths_with_html_are_escaped(client):
    login(client)
    label, path = "<img src=x onerror=alert(1)>\"&'", "/\"><script>alert(1)</script>"
    made = change(client, "token_create", 200, label=label, paths=path, current=PASSWORD)
    for page in (made.text, account_page(client).text):
        assert "<img src=x" not in page and "<script>alert" not in page
        [row] = token_rows(page)
        assert row.cells[0] == label and row.cells[4] == path


def test_account_page_in_chinese(client, service):
    zh = {"Accept-Language": "zh-CN,zh;q=0.9"}
    login(client)
    session_token(new_client(service))
    page = account_page(client, **zh).text
    assert '<html lang="zh-CN">' in page
    for key in ("t_account", "t_sessions", "t_change_password", "t_two_factor", "t_api_tokens", "t_end_others",
                "t_this_device", "t_end"):
        assert html.escape(ZH[key]) in page, key
    assert ZH["msg_signed_in"].format(user="alice") in page
    assert TEXT["t_sessions"] not in page and TEXT["t_change_password"] not in page
    refused = change(client, "password", 401, headers=zh, current="not my password", new=NEW_PASSWORD,
                     again=NEW_PASSWORD)
    assert error_text(refused.text) == ZH["msg_wrong_current"]
    ended = change(client, "end_others", headers=zh)
    assert notice_text(client.get(ended.headers["Location"], headers=zh, status=200).text) == ZH["msg_others_ended"]


@pytest.mark.parametrize("action", sorted(ezauth.ACCOUNT_ACTIONS))
@pytest.mark.parametrize("forgery", ["no_field", "wrong_field", "another_browsers_pair", "no_csrf_cookie"])
def test_every_account_change_needs_the_pages_csrf_token(data_dir, clock, caplog, action, forgery):
    caplog.set_level(logging.INFO, logger="ezauth")
    app, victim = build(data_dir, clock)
    mine = session_token(victim)
    other = session_token(new_client(app))
    token, secret = app.stores.tokens.add("alice", "script", clock())
    new_secret = secrets.token_bytes(20)
    enrollment = ezauth.issue_enrollment("alice", app.stores.users.fingerprint("alice"), new_secret,
                                         app.stores.keys.signer(clock()), clock())
    fields = {"sid": sid_of(other), "current": PASSWORD, "new": NEW_PASSWORD, "again": NEW_PASSWORD,
              "enrollment": enrollment, "code": ezauth.totp(new_secret, clock()), "label": "forged",
              "id": token.id, "action": action}
    attacker = new_client(app)
    attacker_csrf = form_field(attacker.get(LOGIN, status=200).text, "csrf")
    victim.get(ACCOUNT, status=200)  # the victim's browser holds a CSRF cookie of its own
    poster, headers = victim, {}
    if forgery == "wrong_field":
        fields["csrf"] = "x" * 43
    elif forgery == "another_browsers_pair":
        fields["csrf"] = attacker_csrf  # a valid token, but of the attacker's cookie, not the victim's
    elif forgery == "no_csrf_cookie":
        fields["csrf"] = attacker_csrf
        poster, headers = new_client(app), {"Cookie": f"ezauth={mine}"}  # the session cookie alone
    refused = poster.post(ACCOUNT, fields, headers={**FORWARDED, **headers}, status="*")
    assert refused.status_int == 403, refused.status
    assert error_text(refused.text) == TEXT["msg_csrf"]

    verify(new_client(app), 200, mine)
    verify(new_client(app), 200, other)
    verify(new_client(app), 200, Authorization=bearer(secret))
    assert app.stores.users.check("alice", PASSWORD)
    assert not app.stores.totp.enrolled("alice")
    assert [t.label for t in app.stores.tokens.list(clock(), "alice")] == ["script"]
    assert not [attrs for _, attrs in parse_page(refused.text).tags if attrs.get("id") == "new-token"]
    assert [r.getMessage() for r in caplog.records if "event=account_" in r.getMessage()
            and "account_refused" not in r.getMessage()] == []


def test_unknown_or_missing_action_is_400(client):
    login(client)
    assert error_text(change(client, "make_me_admin", 400).text) == TEXT["msg_bad_form"]
    csrf = form_field(account_page(client).text, "csrf")
    client.post(ACCOUNT, {"csrf": csrf}, status=400)


def test_each_change_logs_exactly_one_line_with_user_and_address(client, service, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    doomed = session_token(new_client(service))
    session_token(new_client(service))
    change(client, "end_session", sid=sid_of(doomed))
    change(client, "end_others")
    change(client, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    secret, _, enrollment = enrollment_on(change(client, "totp_begin", 200).text)
    change(client, "totp_confirm", enrollment=enrollment, code=ezauth.totp(secret, clock()), current=NEW_PASSWORD)
    clock.advance(30)
    change(client, "totp_off", code=ezauth.totp(secret, clock()), current=NEW_PASSWORD)
    created = new_token_on(change(client, "token_create", 200, label="one", current=NEW_PASSWORD).text)
    [token] = service.stores.tokens.list(clock(), "alice")
    change(client, "token_revoke", id=token.id)

    lines = [r.getMessage() for r in caplog.records if r.name == "ezauth" and "event=account_" in r.getMessage()]
    tail = f"user=alice ip={CLIENT_IP}"
    assert lines == [f"event=account_{what} {tail}" for what in ("session_ended", "others_ended")] + [
        f"event=account_password_changed {tail} tokens_revoked=0"] + [
        f"event=account_{what} {tail}" for what in ("totp_on", "totp_off")] + [
        f"event=account_token_created {tail} token={token.id}", f"event=account_token_revoked {tail}"]
    assert created not in caplog.text


# -- API tokens at verify ---------------------------------------------------------------------


@pytest.mark.parametrize("basic_auth", [False, True], ids=["basic-off", "basic-on"])
def test_token_is_accepted_as_bearer_and_as_the_basic_password(make_client, clock, basic_auth):
    app, client = make_client(basic_auth=basic_auth)
    _, secret = app.stores.tokens.add("alice", "script", clock())
    for header in (bearer(secret), basic("alice", secret), f"bearer  {secret} "):
        reply = verify(client, 200, Authorization=header)
        assert reply.headers["X-Auth-Request-User"] == "alice"
        assert reply.headers["X-Ezauth-Authorization"] == "strip"
        assert "Set-Cookie" not in reply.headers  # a token makes no session
    refused = verify(client, 401, Authorization=basic("bob", secret))  # with someone else's name
    assert refused.headers["X-Ezauth-Error"] == "wrong_credentials"


def test_token_requests_never_run_scrypt(make_client, clock, monkeypatch):
    hashed: list[int] = []
    real = hashlib.scrypt

    def counted(*args: object, **kwargs: object) -> bytes:
        hashed.append(1)
        return real(*args, **kwargs)

    app, client = make_client(basic_auth=True)
    _, secret = app.stores.tokens.add("alice", "script", clock())
    monkeypatch.setattr(hashlib, "scrypt", counted)
    unknown = "ezt_" + secrets.token_urlsafe(32)
    for _ in range(20):
        verify(client, 200, Authorization=bearer(secret))
        verify(client, 200, Authorization=basic("alice", secret))
        verify(client, 401, Authorization=bearer(unknown))
        verify(client, 401, Authorization=basic("alice", unknown))
        verify(client, 401, Authorization=basic("bob", secret))
        verify(client, 401, Authorization=basic("nobody", secret))
    assert hashed == []
    verify(client, 200, Authorization=basic("alice", PASSWORD))  # the same count sees a password check
    assert hashed


def test_token_expires_after_its_days(service, client, clock):
    _, secret = service.stores.tokens.add("alice", "short", clock(), days=1)
    clock.advance(86400 - 1)
    verify(client, 200, Authorization=bearer(secret))
    clock.advance(1)
    verify(client, 401, Authorization=bearer(secret))


@pytest.mark.parametrize("how", ["unknown", "malformed", "revoked", "user_deleted"])
def test_refused_token_is_401_in_every_worker(data_dir, clock, how):
    (app_a, worker_a), (app_b, worker_b) = build(data_dir, clock), build(data_dir, clock)
    token, secret = app_a.stores.tokens.add("alice", "script", clock())
    tick(clock, worker_a, worker_b)
    for worker in (worker_a, worker_b):
        verify(worker, 200, Authorization=bearer(secret))
    if how == "unknown":
        secret = "ezt_" + secrets.token_urlsafe(32)
    elif how == "malformed":
        secret = secret[:-1]
    elif how == "revoked":
        assert app_b.stores.tokens.revoke(token.id, clock())
    else:
        write_users(data_dir, bob=PASSWORD)
    tick(clock, worker_a, worker_b)
    for worker in (worker_a, worker_b):
        for header, scheme in ((bearer(secret), "Bearer"), (basic("alice", secret), "Basic")):
            reply = verify(worker, 401, Authorization=header)
            assert reply.headers["X-Ezauth-Error"] == "wrong_credentials"
            assert reply.headers["WWW-Authenticate"] == f'{scheme} realm="ezauth"'
            assert "X-Ezauth-Authorization" not in reply.headers


@pytest.mark.parametrize(("uri", "status"), [
    ("/sdapi/", 200),
    ("/sdapi/v1/txt2img", 200),
    ("/sdapi/v1/txt2img?next=/admin", 200),
    ("/sdapi/v1/a%20b", 200),
    ("/sdapi/v1/%2e%2e/options", 200),
    ("/", 403),
    ("/admin", 403),
    ("/sdapi", 403),
    ("/sdapix/v1", 403),
    ("/sdapi/../admin", 403),
    ("/sdapi/%2e%2e/admin", 403),
    ("/sdapi/.%2e/admin", 403),
    ("/sdapi/..%2fadmin", 403),
    ("/sdapi%2f..%2fadmin", 403),
    ("/sdapi/%252e%252e/admin", 403),
    ("/sdapi\\..\\admin", 403),
    ("//admin/sdapi/", 403),
    ("/sdapi//../admin", 403),  # merged slashes, then the dot segment: /admin (Go's path.Clean, normpath)
    ("/sdapi/;/../admin", 403),  # ;params stripped, then the same
    ("/sdapi/%2f../admin", 403),
])
def test_token_paths_hold_for_every_reading_of_the_path(service, client, clock, uri, status):
    _, secret = service.stores.tokens.add("alice", "sd", clock(), paths=("/sdapi/",))
    for header in (bearer(secret), basic("alice", secret)):
        reply = verify(client, status, Authorization=header, uri=uri)
        assert ("X-Auth-Request-User" in reply.headers) == (status == 200)


def test_access_rules_apply_to_tokens(data_dir, clock):
    (data_dir / "rules").write_text("allow alice * /public/\n")
    app, client = build(data_dir, clock)
    _, secret = app.stores.tokens.add("alice", "script", clock())
    _, scoped = app.stores.tokens.add("alice", "scoped", clock(), paths=("/private/",))
    _, bob = app.stores.tokens.add("bob", "bob's", clock())
    verify(client, 200, Authorization=bearer(secret), uri="/public/x")
    verify(client, 403, Authorization=bearer(secret), uri="/private/x")
    verify(client, 403, Authorization=bearer(secret), uri="/public/../private/x")
    verify(client, 403, Authorization=bearer(scoped), uri="/private/x")  # a token's paths never widen the rules
    verify(client, 403, Authorization=bearer(bob), uri="/public/x")


def test_token_last_used_is_written_by_the_flush(client, service, clock):
    login(client)
    _, secret = service.stores.tokens.add("alice", "script", clock())
    clock.advance(5)
    verify(new_client(service), 200, Authorization=bearer(secret))
    join_flushes()
    assert service.stores.tokens.list(clock(), "alice")[0].last_used is None  # only noted in memory
    flush(service)
    assert service.stores.tokens.list(clock(), "alice")[0].last_used == clock()
    [row] = token_rows(account_page(client).text)
    assert row.cells[2] == shown_time(clock())


@pytest.mark.parametrize(("basic_auth", "session", "authorization", "stripped"), [
    pytest.param(False, True, None, False, id="session-alone"),
    pytest.param(False, True, "Bearer app-token", False, id="session-and-the-apps-bearer"),
    pytest.param(True, True, "Bearer app-token", False, id="session-and-the-apps-bearer-basic-on"),
    pytest.param(False, True, "APP_BASIC", False, id="session-and-the-apps-basic"),
    pytest.param(False, True, "TOKEN", True, id="session-and-a-token"),
    pytest.param(False, False, "TOKEN", True, id="token"),
    pytest.param(True, False, "TOKEN", True, id="token-basic-on"),
    pytest.param(False, False, "BASIC_TOKEN", True, id="basic-token"),
    pytest.param(True, False, "BASIC_TOKEN", True, id="basic-token-basic-on"),
    pytest.param(True, False, "BASIC_PASSWORD", True, id="basic-password"),
])
def test_strip_header_is_sent_only_when_ezauths_own_credentials_were_used(
        make_client, clock, basic_auth, session, authorization, stripped):
    app, client = make_client(basic_auth=basic_auth)
    _, secret = app.stores.tokens.add("alice", "script", clock())
    token = session_token(client) if session else None
    header = {"TOKEN": bearer(secret), "BASIC_TOKEN": basic("alice", secret),
              "BASIC_PASSWORD": basic("alice", PASSWORD), "APP_BASIC": basic("app", "app secret")}.get(
        authorization, authorization)
    reply = verify(new_client(app), 200, token, **({"Authorization": header} if header else {}))
    assert reply.headers["X-Auth-Request-User"] == "alice"
    assert reply.headers.get("X-Ezauth-Authorization") == ("strip" if stripped else None)
