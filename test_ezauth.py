"""ezauth's core behaviour in-process: pure units first, then HTTP through WebTest.

The command line and the real server as subprocesses are in tests/process/."""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import html
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import string
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from urllib.parse import quote

import jwt
import pytest
import webtest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

import ezauth
from ezauth import (
    PUBLISH_DELAY,
    REFRESH_EVERY,
    InvalidSession,
    KeyRing,
    Session,
    Sessions,
    Settings,
    SettingsError,
    Throttle,
    Users,
    VisitCounter,
    check_password,
    choose_lang,
    cookie_values,
    hash_password,
    issue_token,
    load_template,
    make_app,
    parse_users,
    read_token,
    render_page,
    safe_return_target,
)
from tests.support.app import cookie_header, login, logout, new_client, session_token, verify
from tests.support.basics import (
    EZAUTH,
    LOGIN,
    PASSWORD,
    T0,
    TRUSTED_PEER,
    VERIFY,
    FakeClock,
    b64,
    cheap_hash,
    cookie_attrs,
    events,
    forge,
    form_field,
    token_of,
    visits_pattern,
    wait_until,
    write_users,
)

FAST = 2**10  # the cost the hash-format tests spell out
BOB_PASSWORD = "bob's long password"
UNTRUSTED_PEER = {"REMOTE_ADDR": "198.51.100.7"}
SID = "test-session-id-00001"  # a session id for tokens made by hand


# -- Helpers ----------------------------------------------------------------------------------


def text(key: str, lang: str = "en", **fields: object) -> str:
    """A message of the page as it appears in the HTML."""
    return html.escape(ezauth.PAGE_TEXT[lang][key].format(**fields), quote=True)


def shows(page: webtest.TestResponse, key: str, lang: str = "en", **fields: object) -> bool:
    return text(key, lang, **fields) in page.text


def visits(count: int) -> str:
    return text("msg_visits", count=f"{count:,}")


# -- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(tmp_path / "keys.json", rotate_every=86400, longest_ttl=2592000, now=T0)


# == Pure units ================================================================================

# -- Passwords --------------------------------------------------------------------------------


def test_hash_password_is_self_describing_scrypt_with_a_salt():
    encoded = hash_password("pässwörd ✓", n=FAST)
    assert re.fullmatch(r"scrypt:1024:8:1\$[A-Za-z0-9_-]+\$[A-Za-z0-9_-]+", encoded)
    assert check_password("pässwörd ✓", encoded)
    assert not check_password("pässwörd", encoded)
    assert hash_password("same", n=FAST) != hash_password("same", n=FAST)


def test_default_hash_uses_the_configured_cost():
    cost = f"{ezauth.SCRYPT_N}:{ezauth.SCRYPT_R}:{ezauth.SCRYPT_P}"
    assert hash_password(PASSWORD).startswith(f"scrypt:{cost}$")


def test_check_password_reads_the_cost_from_the_hash():
    raised = hash_password(PASSWORD, n=2**11, r=4, p=2)
    assert raised.startswith("scrypt:2048:4:2$")
    assert check_password(PASSWORD, raised)


def _good_hash() -> str:
    return hash_password(PASSWORD, n=FAST)


@pytest.mark.parametrize("encoded", [
    "",
    "scrypt",
    "scrypt:1024:8:1",
    "scrypt:1024:8:1$$",
    "scrypt:abc:8:1$c2FsdA$ZGlnZXN0",
    "scrypt:1000:8:1$c2FsdA$ZGlnZXN0",        # N not a power of two
    "scrypt:1024:8:1$!!!!$!!!!",               # not base64
    "scrypt:1024:8$c2FsdA$ZGlnZXN0",           # a parameter missing
    "scrypt:1073741824:8:1$c2FsdA$ZGlnZXN0",   # a cost nobody should be made to pay
    "pbkdf2:1024:8:1$c2FsdA$ZGlnZXN0",
    "md5$c2FsdA$ZGlnZXN0",
    "plaintext-" + PASSWORD,
    PASSWORD,
])
def test_malformed_hash_never_matches(encoded):
    assert check_password(PASSWORD, encoded) is False


@pytest.mark.parametrize("mangle", [
    lambda h: h[:-4],                                   # digest cut short
    lambda h: h + "AAAA",                               # digest too long
    lambda h: h + "$extra",                             # a field too many
    lambda h: h.replace("scrypt:1024", "scrypt:2048"),  # the cost changed under the hash
])
def test_altered_hash_never_matches(mangle):
    assert check_password(PASSWORD, mangle(_good_hash())) is False


def test_unknown_user_costs_as_much_as_a_known_one(tmp_path, monkeypatch):
    """Same response time whether the user exists or not: both pay one full-cost scrypt (counted,
    not timed, so a busy machine cannot make it flaky)."""
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password(PASSWORD)}\n")
    users = Users(path)
    real_scrypt, costs = ezauth._scrypt, []

    def counting_scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        costs.append((n, r, p))
        return real_scrypt(password, salt, n, r, p)

    monkeypatch.setattr(ezauth, "_scrypt", counting_scrypt)
    for name in ("alice", "mallory"):
        assert users.check(name, "wrong password") is False
    assert costs == [(ezauth.SCRYPT_N, ezauth.SCRYPT_R, ezauth.SCRYPT_P)] * 2


# -- Users file -------------------------------------------------------------------------------


def test_users_file_skips_and_logs_bad_lines_by_number(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="ezauth")
    # Line 4 is then a user we cannot check.
    monkeypatch.setattr(ezauth, "bcrypt_available", lambda: False)
    good = cheap_hash(PASSWORD)
    data = b"\n".join([
        b"# a comment",                                    # 1
        f"alice:{good}".encode(),                          # 2
        b"no colon at all",                                # 3
        b"bob:$2b$12$" + b"a" * 53,                        # 4 bcrypt, package not installed here
        b"carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",        # 5 unknown scheme
        f":{good}".encode(),                               # 6 no name
        b"dave:",                                          # 7 no hash
        f"bad name:{good}".encode(),                       # 8 not a valid name
        b"",                                               # 9
        f"  erin:{good}  ".encode(),                       # 10 whitespace around is fine
        b"frank:scrypt:\xff\xfe",                          # 11 not UTF-8
        f"gina:{good}".encode(),                           # 12
    ])
    assert parse_users(data) == {"alice": good, "erin": good, "gina": good}
    skipped = events(caplog, "users_line_skipped")
    numbers = {int(re.search(r"line=(\d+)", m).group(1)) for m in skipped}
    assert numbers == {3, 4, 5, 6, 7, 8, 11}
    assert any("line=4" in m and "bcrypt" in m for m in skipped)
    assert not any(good in m for m in skipped)


def test_malformed_users_file_never_grants_access(tmp_path):
    path = tmp_path / "users"
    path.write_text("alice\nbob:\ncarol:plaintext\ndave:$2y$10$short\n")
    users = Users(path)
    for name, password in [("alice", ""), ("bob", ""), ("carol", "plaintext"), ("dave", "short"),
                           ("", "")]:
        assert users.check(name, password) is False


def test_users_file_with_crlf_line_endings_works(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(f"alice:{cheap_hash(PASSWORD)}\r\nbob:{cheap_hash(BOB_PASSWORD)}\r\n".encode())
    users = Users(path)
    assert users.names() == ["alice", "bob"]
    assert users.check("alice", PASSWORD) and users.check("bob", BOB_PASSWORD)


def test_bcrypt_line_is_accepted_when_bcrypt_is_installed(tmp_path, monkeypatch):
    """htpasswd -B lines work with the optional bcrypt package (a stand-in module here)."""
    stored = "$2y$05$" + "x" * 53
    fake = types.ModuleType("bcrypt")
    fake.checkpw = lambda pw, hashed: pw == b"htpasswd pw" and hashed == stored.encode()
    monkeypatch.setitem(sys.modules, "bcrypt", fake)
    path = tmp_path / "users"
    path.write_text(f"carol:{stored}\n")
    users = Users(path)
    assert users.names() == ["carol"]
    assert users.check("carol", "htpasswd pw")
    assert not users.check("carol", "wrong")


def test_set_password_and_delete_keep_every_other_line(tmp_path):
    path = tmp_path / "users"
    bob = cheap_hash(BOB_PASSWORD)
    original = ["# managed by hand", f"bob:{bob}", "this line is broken", "carol:{SHA}legacy"]
    path.write_text("\n".join(original) + "\n")
    users = Users(path)
    users.set_password("alice", PASSWORD)
    lines = path.read_text().splitlines()
    assert lines[:4] == original and lines[4].startswith("alice:scrypt:")
    users.set_password("bob", "a new password")
    lines = path.read_text().splitlines()
    assert [ln for ln in lines if not ln.startswith("bob:")] == [*original[:1], *original[2:],
                                                                 lines[3]]
    assert users.check("bob", "a new password") and not users.check("bob", BOB_PASSWORD)
    assert users.delete("alice") is True
    assert users.delete("alice") is False
    assert "alice" not in users.names()
    assert path.read_text().splitlines()[0:1] == ["# managed by hand"]
    assert "this line is broken" in path.read_text()


def test_users_file_stores_only_hashes_and_is_private(tmp_path):
    path = tmp_path / "users"
    Users(path).set_password("alice", PASSWORD)
    assert PASSWORD not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("name", ["", "bad name", "a:b", "-leading-dash", "x" * 65, "new\nline"])
def test_set_password_refuses_bad_user_names(tmp_path, name):
    with pytest.raises(ValueError):
        Users(tmp_path / "users").set_password(name, PASSWORD)


def test_users_reload_when_another_process_changes_the_file(tmp_path):
    path = write_users(tmp_path, alice=PASSWORD)
    mine, theirs = Users(path), Users(path)
    theirs.set_password("bob", BOB_PASSWORD)
    mine.load()
    assert mine.names() == ["alice", "bob"]


def test_first_admin_is_created_once_with_a_urlsafe_password(tmp_path):
    users = Users(tmp_path / "users")
    password = users.create_first_admin()
    assert password and re.fullmatch(r"[A-Za-z0-9_-]{16,}", password)
    assert users.names() == ["admin"]
    assert users.check("admin", password)
    assert password not in (tmp_path / "users").read_text()
    assert users.create_first_admin() is None
    assert Users(tmp_path / "users").create_first_admin() is None


def test_unreadable_users_file_is_logged_and_grants_nothing(tmp_path, caplog):
    path = tmp_path / "users"
    path.mkdir()
    users = Users(path)
    assert users.names() == [] and not users.check("alice", PASSWORD)
    assert events(caplog, "users_unreadable")


def test_first_admin_is_not_created_when_users_exist(tmp_path):
    users = Users(write_users(tmp_path, alice=PASSWORD))
    assert users.create_first_admin() is None
    assert users.names() == ["alice"]


# -- Key ring ---------------------------------------------------------------------------------


def test_new_key_ring_has_one_32_byte_key_in_a_private_file(ring, tmp_path):
    assert len(ring.keys) == 1 and len(ring.keys[0].secret) == 32
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) & 0o077 == 0
    again = KeyRing(tmp_path / "keys.json", 86400, 2592000, T0 + 5)
    assert [k.kid for k in again.keys] == [k.kid for k in ring.keys]


def test_new_key_signs_only_after_the_publish_delay(ring):
    old = ring.signer(T0)
    new = ring.rotate(T0 + 10)
    assert new is not None and ring.get(new.kid) == new
    assert ring.signer(T0 + 10) == old
    assert ring.signer(T0 + 10 + PUBLISH_DELAY - 0.01) == old
    assert ring.signer(T0 + 10 + PUBLISH_DELAY) == new
    assert REFRESH_EVERY < PUBLISH_DELAY  # every worker reloads before anyone signs with it


def test_other_worker_loads_a_new_key_before_it_signs(tmp_path):
    path = tmp_path / "keys.json"
    worker_a = KeyRing(path, 86400, 2592000, T0)
    worker_b = KeyRing(path, 86400, 2592000, T0)
    new = worker_a.rotate(T0 + 1)
    worker_b.refresh(T0 + 1 + REFRESH_EVERY)
    assert worker_b.get(new.kid) is not None
    assert worker_b.signer(T0 + 1 + REFRESH_EVERY).kid != new.kid


def test_rotation_keeps_a_key_until_every_token_it_signed_has_expired(tmp_path):
    ttl = 1000
    ring = KeyRing(tmp_path / "keys.json", rotate_every=100, longest_ttl=ttl, now=T0)
    first = ring.keys[0]
    second = ring.rotate(T0 + 100)
    last_use = second.signs_from - 0.5
    assert ring.signer(last_use) == first
    token = issue_token(Session("alice", "fp", first.kid, int(last_use), int(last_use) + ttl, True,
                                SID, int(last_use)), first)
    for step in range(2, 12):  # keep rotating until just before that token expires
        ring.rotate(T0 + 100 * step)
        assert read_token(token, ring, T0 + 100 * step).user == "alice"
    assert read_token(token, ring, int(last_use) + ttl - 1).user == "alice"
    ring.rotate(second.signs_from + ttl + PUBLISH_DELAY + 1)
    assert ring.get(first.kid) is None


def test_key_ring_stays_small_however_often_it_rotates(tmp_path):
    ring = KeyRing(tmp_path / "keys.json", rotate_every=100, longest_ttl=1000, now=T0)
    for step in range(1, 60):
        ring.rotate(T0 + 100 * step)
    assert len(ring.keys) <= 1000 / 100 + 3


def test_refresh_rotates_when_the_newest_key_is_old_enough(tmp_path):
    ring = KeyRing(tmp_path / "keys.json", rotate_every=600, longest_ttl=1800, now=T0)
    ring.refresh(T0 + 599)
    assert len(ring.keys) == 1
    ring.refresh(T0 + 600)
    assert len(ring.keys) == 2
    ring.refresh(T0 + 601)
    assert len(ring.keys) == 2


@pytest.mark.parametrize("content", [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b'{"keys": []}',
    b'{"nokeys": 1}',
    b'{"keys": [{"kid": "../../etc/passwd", "secret": "' + b"A" * 43
    + b'", "created": 1, "signs_from": 1}]}',
    b'{"keys": [{"kid": "short", "secret": "AAAA", "created": 1, "signs_from": 1}]}',
    b"",
])
def test_corrupt_key_ring_is_moved_aside_and_replaced(tmp_path, caplog, content):
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    ring = KeyRing(path, 86400, 2592000, T0)
    assert len(ring.keys) == 1
    aside = list(tmp_path.glob("keys.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert json.loads(path.read_text())["keys"][0]["kid"] == ring.keys[0].kid
    assert any(r.levelno >= logging.ERROR for r in caplog.records
               if "keyring_corrupt" in r.getMessage())


def test_sessions_signed_by_a_lost_key_ring_end(tmp_path):
    path = tmp_path / "keys.json"
    old = KeyRing(path, 86400, 2592000, T0)
    token = issue_token(Session("alice", "fp", old.keys[0].kid, int(T0), int(T0) + 1800, False, SID,
                                int(T0)),
                        old.keys[0])
    path.write_text("{ truncated")
    fresh = KeyRing(path, 86400, 2592000, T0 + 1)
    with pytest.raises(InvalidSession):
        read_token(token, fresh, T0 + 2)


def test_unwritable_key_ring_keeps_the_loaded_keys(ring, tmp_path, caplog):
    lock = tmp_path / "keys.json.lock"
    lock.unlink()
    lock.mkdir()  # the lock cannot be opened, like a read-only data dir (even for root)
    before = ring.keys
    assert ring.rotate(T0 + 10) is None
    ring.refresh(T0 + 86400 * 2)  # due for rotation, cannot write: keeps going
    assert ring.keys == before
    assert ring.signer(T0 + 86400 * 2) == before[-1]
    assert events(caplog, "rotation_failed")


def test_an_error_naming_a_file_names_it_whole_however_deep_the_data_dir(tmp_path, caplog):
    deep = tmp_path.joinpath(*["a-long-directory-name"] * 6)
    deep.mkdir(parents=True)
    ring = KeyRing(deep / "keys.json", rotate_every=86400, longest_ttl=2592000, now=T0)
    lock = deep / "keys.json.lock"
    lock.unlink()
    lock.mkdir()
    assert ring.rotate(T0 + 10) is None
    (failed,) = events(caplog, "rotation_failed")
    error = re.search(r' error=(".*") action=', failed)
    assert error and str(lock) in json.loads(error.group(1)), failed


def test_unreadable_key_ring_is_moved_aside_at_start_up(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.mkdir()  # exists but cannot be read as a file, even by root
    (path / "note").write_text("kept for a human")
    ring = KeyRing(path, 86400, 2592000, T0)
    for second in range(1, 4):
        ring.refresh(T0 + second)
    aside = list(tmp_path.glob("keys.json.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "note").read_text() == "kept for a human"
    assert json.loads(path.read_text())["keys"][0]["kid"] == ring.keys[0].kid
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) <= 1


# -- Tokens -----------------------------------------------------------------------------------


def session_for(key, issued: float = T0, ttl: int = 1800, user: str = "alice",
                remember: bool = False) -> Session:
    return Session(user, "fp", key.kid, int(issued), int(issued) + ttl, remember, SID, int(issued))


def test_token_round_trip_keeps_every_field(ring):
    key = ring.signer(T0)
    session = session_for(key, remember=True)
    token = issue_token(session, key)
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": key.kid, "typ": "JWT"}
    assert set(jwt.decode(token, options={"verify_signature": False})) >= {"sub", "iat", "exp"}
    assert read_token(token, ring, T0 + 1) == session


@pytest.mark.parametrize(("offset", "valid"), [
    (-29, True), (0, True), (1799, True), (1800, False), (100000, False),
])
def test_token_expiry_follows_the_injected_now(ring, offset, valid):
    key = ring.signer(T0)
    token = issue_token(session_for(key), key)
    if valid:
        assert read_token(token, ring, T0 + offset).user == "alice"
    else:
        with pytest.raises(InvalidSession):
            read_token(token, ring, T0 + offset)


@pytest.mark.parametrize(("issued_ahead", "valid"), [(29, True), (31, False), (3600, False)])
def test_token_from_the_future_is_not_yet_valid(ring, issued_ahead, valid):
    key = ring.signer(T0)
    token = issue_token(session_for(key, issued=T0 + issued_ahead), key)
    if valid:
        assert read_token(token, ring, T0).user == "alice"
    else:
        with pytest.raises(InvalidSession):
            read_token(token, ring, T0)


def _claims(**changes) -> dict:
    claims = {"sub": "alice", "iat": int(T0), "exp": int(T0) + 1800, "fp": "fp", "rem": 0,
              "sid": SID}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


BAD_TOKENS = {
    "alg none": lambda key: (f"{b64(json.dumps({'alg': 'none', 'kid': key.kid, 'typ': 'JWT'}))}."
                             f"{b64(json.dumps(_claims()))}."),
    "alg none, no kid": lambda key: jwt.encode(_claims(), None, algorithm="none"),
    "HS256 header, no signature": lambda key: jwt.encode(_claims(), key.secret, "HS256",
                                                         {"kid": key.kid}).rpartition(".")[0] + ".",
    "HS512 with the right key": lambda key: forge({"alg": "HS512", "kid": key.kid}, _claims(),
                                                  key.secret, "sha512"),
    "wrong key, right kid": lambda key: jwt.encode(_claims(), secrets.token_bytes(32), "HS256",
                                                   {"kid": key.kid}),
    "unknown kid": lambda key: jwt.encode(_claims(), key.secret, "HS256", {"kid": "nosuchkey"}),
    "no kid": lambda key: jwt.encode(_claims(), key.secret, "HS256"),
    "path-like kid": lambda key: jwt.encode(_claims(), key.secret, "HS256",
                                            {"kid": "../../keys.json"}),
    "numeric kid": lambda key: forge({"alg": "HS256", "kid": 1}, _claims(), key.secret),
    "list kid": lambda key: forge({"alg": "HS256", "kid": [key.kid]}, _claims(), key.secret),
    "object kid": lambda key: forge({"alg": "HS256", "kid": {"kid": key.kid}}, _claims(),
                                    key.secret),
    "long kid": lambda key: jwt.encode(_claims(), key.secret, "HS256", {"kid": "k" * 1000}),
    "huge kid": lambda key: jwt.encode(_claims(), key.secret, "HS256", {"kid": "k" * 100_000}),
    "missing sub": lambda key: jwt.encode(_claims(sub=None), key.secret, "HS256", {"kid": key.kid}),
    "numeric sub": lambda key: jwt.encode(_claims(sub=7), key.secret, "HS256", {"kid": key.kid}),
    "missing exp": lambda key: jwt.encode(_claims(exp=None), key.secret, "HS256", {"kid": key.kid}),
    "missing iat": lambda key: jwt.encode(_claims(iat=None), key.secret, "HS256", {"kid": key.kid}),
    "string exp": lambda key: jwt.encode(_claims(exp="9999999999"), key.secret, "HS256",
                                         {"kid": key.kid}),
    "missing fingerprint": lambda key: jwt.encode(_claims(fp=None), key.secret, "HS256",
                                                  {"kid": key.kid}),
    "tampered payload": lambda key: ".".join([
        (parts := jwt.encode(_claims(), key.secret, "HS256", {"kid": key.kid}).split("."))[0],
        b64(json.dumps(_claims(sub="admin"))), parts[2]]),
    "empty": lambda key: "",
    "garbage": lambda key: "not-a-token",
    "three dots": lambda key: "a.b.c",
}


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_bad_token_is_rejected(ring, make):
    with pytest.raises(InvalidSession):
        read_token(make(ring.signer(T0)), ring, T0 + 1)


# -- Sessions cache -----------------------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path, ring) -> Sessions:
    users = Users(write_users(tmp_path / "d", alice=PASSWORD, bob=BOB_PASSWORD))
    registry = ezauth.SessionRegistry(ezauth.open_sessions_database(tmp_path / "d", T0))
    return Sessions(users, ring, registry, 1800, 2592000, 2592000)


def test_sessions_check_a_token_they_issued(sessions):
    token, session = sessions.start("alice", T0, remember=False)
    assert sessions.check(token, T0 + 1) == session
    assert sessions.check(token, T0 + 2) == session  # the cached answer


def test_cached_session_never_outlives_its_expiry(sessions):
    token, _ = sessions.start("alice", T0, remember=False)
    assert sessions.check(token, T0 + 1)
    assert sessions.check(token, T0 + 1800) is None


def test_cached_session_never_outlives_user_deletion(sessions):
    token, _ = sessions.start("alice", T0, remember=False)
    assert sessions.check(token, T0 + 1)
    sessions.users.delete("alice")
    assert sessions.check(token, T0 + 2) is None


def test_cached_session_never_outlives_a_password_change(sessions):
    token, _ = sessions.start("alice", T0, remember=False)
    assert sessions.check(token, T0 + 1)
    # Even the same password: a new salt, a new credential.
    sessions.users.set_password("alice", PASSWORD)
    assert sessions.check(token, T0 + 2) is None
    other, _ = sessions.start("bob", T0, remember=False)
    assert sessions.check(other, T0 + 2)


def test_cached_session_never_outlives_its_key(sessions, tmp_path):
    token, _ = sessions.start("alice", T0, remember=False)
    assert sessions.check(token, T0 + 1)
    keys_file = tmp_path / "keys.json"
    keys_file.unlink()
    KeyRing(keys_file, 86400, 2592000, T0 + 2)  # another process starts a brand-new ring
    sessions.keys.refresh(T0 + 3)
    assert sessions.check(token, T0 + 3) is None


def test_session_for_an_unknown_user_is_refused(sessions):
    token, _ = sessions.start("nobody", T0, remember=False)
    assert sessions.check(token, T0 + 1) is None


# -- Visit counter ----------------------------------------------------------------------------


def test_counter_counts_in_decimal_text(tmp_path):
    counter = VisitCounter(tmp_path / "counter.txt", FakeClock(T0))
    assert [counter.increment() for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "counter.txt").read_text().strip() == "3"


def test_counter_continues_from_an_existing_file(tmp_path):
    (tmp_path / "counter.txt").write_text("41")
    counter = VisitCounter(tmp_path / "counter.txt", FakeClock(T0))
    assert counter.current() == 41
    assert counter.increment() == 42
    assert counter.current() == 42


@pytest.mark.parametrize("content",
                         [b"forty-two", b"-5", b"12abc", b"\xff\xfe", b"1e6", b"\xd9\xa3"])
def test_corrupt_counter_is_moved_aside_and_restarts(tmp_path, caplog, content):
    path = tmp_path / "counter.txt"
    path.write_bytes(content)
    assert VisitCounter(path, FakeClock(T0)).increment() == 1
    aside = list(tmp_path.glob("counter.txt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert events(caplog, "counter_corrupt")


def test_unusable_counter_returns_none_and_logs(tmp_path, caplog):
    (tmp_path / "counter.txt").mkdir()
    assert VisitCounter(tmp_path / "counter.txt", FakeClock(T0)).increment() is None
    assert VisitCounter(tmp_path / "missing-dir" / "counter.txt", FakeClock(T0)).increment() is None
    assert len(events(caplog, "counter_skipped")) == 2


def test_counter_is_exact_across_threads(tmp_path):
    counter = VisitCounter(tmp_path / "counter.txt", FakeClock(T0))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: counter.increment(), range(400)))
    assert sorted(seen) == list(range(1, 401))
    assert (tmp_path / "counter.txt").read_text().strip() == "400"


def test_counter_rewrites_in_place_without_an_fsync_per_view(tmp_path, monkeypatch):
    clock = FakeClock(T0)
    counter = VisitCounter(tmp_path / "counter.txt", clock)
    counter.increment()
    inode = (tmp_path / "counter.txt").stat().st_ino
    calls: list[str] = []
    real_fsync, real_replace, real_mkstemp = os.fsync, os.replace, tempfile.mkstemp
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda *a, **k: (calls.append("replace"), real_replace(*a, **k))[1])
    monkeypatch.setattr(tempfile, "mkstemp",
                        lambda *a, **k: (calls.append("mkstemp"), real_mkstemp(*a, **k))[1])
    assert [counter.increment() for _ in range(500)] == list(range(2, 502))
    assert calls == []  # 500 views: no new file, no rename, nothing forced to the disk
    assert (tmp_path / "counter.txt").stat().st_ino == inode
    clock.advance(ezauth.COUNTER_SYNC_EVERY)
    counter.increment()
    assert calls == ["fsync"]  # once a minute, so a power cut loses at most a minute of views
    assert (tmp_path / "counter.txt").read_bytes() == b"502\n"


def test_counter_shrinking_digits_never_leave_old_ones_behind(tmp_path):
    (tmp_path / "counter.txt").write_text("000041\n")  # leading zeros, as a human might type it
    counter = VisitCounter(tmp_path / "counter.txt", FakeClock(T0))
    assert counter.increment() == 42
    assert (tmp_path / "counter.txt").read_bytes() == b"42\n"
    assert counter.current() == 42


# -- Hash gate --------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "block"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("unknown", "unknown"),
])
def test_client_block_is_the_ipv6_64_and_the_ipv4_address(address, block):
    assert ezauth.client_block(address) == block


def gated_checks(gate: ezauth.HashGate, clients: list[str], release: threading.Semaphore,
                 started: list[str]) -> list[threading.Thread]:
    """One thread per client name, each running a check that records its client as it starts and
    then waits for RELEASE."""
    def check(client: str) -> bool:
        started.append(client)
        release.acquire()
        return True

    threads = [threading.Thread(target=gate.run, args=(client, lambda c=client: check(c)))
               for client in clients]
    for thread in threads:
        thread.start()
    return threads


def test_hash_gate_lets_another_client_in_ahead_of_a_200_check_flood():
    gate, release, started = ezauth.HashGate(slots=2), threading.Semaphore(0), []
    threads = gated_checks(gate, ["flood"] * 202, release, started)
    # Two run, 200 wait.
    assert wait_until(lambda: gate.waiting == 200 and len(started) == 2, timeout=10)
    threads += gated_checks(gate, ["2001:db8:2::/64"], release, started)
    assert wait_until(lambda: gate.waiting == 201, timeout=10)
    for finished in range(1, 202):  # one check at a time finishes, and the next one in turn starts
        release.release()
        assert wait_until(lambda n=finished: len(started) == 2 + n, timeout=10,
                          interval=0.001), finished
    for _ in range(2):
        release.release()
    for thread in threads:
        thread.join(timeout=10)
    # FIFO would start it last; taking turns, it starts right after one more flood check.
    assert started.index("2001:db8:2::/64") == 3 and len(started) == 203


def test_hash_gate_runs_at_most_its_slots_at_once_and_every_check_once():
    gate, lock, running, most = ezauth.HashGate(slots=2), threading.Lock(), [0], [0]

    def check(n: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.001)  # a check that takes a moment, so the checks overlap
        with lock:
            running[0] -= 1
        return n

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        done = list(pool.map(lambda n: gate.run(f"client{n % 5}", lambda: check(n)), range(300)))
    assert done == list(range(300)) and most[0] == 2 and gate.waiting == 0


# -- Throttle ---------------------------------------------------------------------------------


@pytest.fixture
def throttle(tmp_path) -> Throttle:
    return Throttle(tmp_path / "throttle.sqlite3", max_attempts=3, window=60, lockout=120, now=T0)


def fail(throttle: Throttle, keys: list[str], now: float):
    """One wrong password, as the login handler records it."""
    attempt = throttle.begin(keys, now)
    if not attempt.locked:
        throttle.failed(attempt, now)
    return attempt


def test_throttle_locks_an_ip_after_the_allowed_failures(throttle):
    for i in range(3):
        assert not fail(throttle, ["ip:203.0.113.1", f"user:u{i}"], T0 + i).locked
    locked = throttle.begin(["ip:203.0.113.1", "user:fresh"], T0 + 3)
    assert locked.locked and locked.retry_after == 120 - 1
    assert not throttle.begin(["ip:203.0.113.2", "user:fresh"], T0 + 3).locked


def test_throttle_locks_a_user_across_ips(throttle):
    for i in range(3):
        assert not fail(throttle, [f"ip:203.0.113.{i}", "user:alice"], T0).locked
    assert throttle.begin(["ip:192.0.2.99", "user:alice"], T0 + 1).locked
    assert not throttle.begin(["ip:192.0.2.99", "user:bob"], T0 + 1).locked


def test_throttle_forgets_failures_outside_the_window(throttle):
    keys = ["ip:203.0.113.1", "user:alice"]
    fail(throttle, keys, T0)
    fail(throttle, keys, T0 + 1)
    for i in range(3):  # the first two have left the 60 s window
        assert not fail(throttle, keys, T0 + 61 + i).locked
    assert throttle.begin(keys, T0 + 64).locked


def test_throttle_lockout_lasts_the_lockout_time(throttle):
    keys = ["ip:203.0.113.1", "user:alice"]
    for _ in range(3):
        fail(throttle, keys, T0)
    assert throttle.begin(keys, T0).retry_after == 120
    assert throttle.begin(keys, T0 + 119).retry_after == 1
    assert not throttle.begin(keys, T0 + 120).locked


def test_throttle_does_not_count_successes(throttle):
    keys = ["ip:203.0.113.1", "user:alice"]
    for i in range(10):
        attempt = throttle.begin(keys, T0 + i)
        assert not attempt.locked
        throttle.succeeded(attempt)


def test_throttle_is_shared_by_every_instance_on_the_file(tmp_path):
    path = tmp_path / "throttle.sqlite3"
    worker_a = Throttle(path, 3, 60, 120, T0)
    worker_b = Throttle(path, 3, 60, 120, T0)
    fail(worker_a, ["ip:x", "user:alice"], T0)
    fail(worker_b, ["ip:x", "user:alice"], T0)
    fail(worker_a, ["ip:x", "user:alice"], T0)
    assert worker_b.begin(["ip:y", "user:alice"], T0 + 1).locked


def test_corrupt_throttle_database_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "throttle.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    throttle = Throttle(path, 3, 60, 120, T0)
    for _ in range(3):
        fail(throttle, ["ip:x"], T0)
    assert throttle.begin(["ip:x"], T0).locked
    assert [p.read_bytes()
            for p in tmp_path.glob("throttle.sqlite3.corrupt-*")] == [b"this is not sqlite" * 100]
    assert events(caplog, "throttle_corrupt")


def test_unwritable_throttle_refuses_to_open_naming_its_file(tmp_path):
    path = tmp_path / "throttle.sqlite3"
    path.mkdir()  # cannot be opened as a database, even by root
    with pytest.raises(ezauth.StoreUnavailable) as refused:
        Throttle(path, 3, 60, 120, T0)
    assert refused.value.path == path


def test_throttle_that_becomes_unwritable_fails_closed_and_forgets_nothing(tmp_path):
    path = tmp_path / "throttle.sqlite3"
    throttle = Throttle(path, 3, 60, 120, T0)
    fail(throttle, ["ip:x"], T0)
    fail(throttle, ["ip:x"], T0)
    path.rename(tmp_path / "aside")
    path.mkdir()  # for now the file cannot be opened: no private memory takes its place
    with pytest.raises(ezauth.StoreUnavailable):
        throttle.begin(["ip:x"], T0 + 1)
    path.rmdir()
    (tmp_path / "aside").rename(path)
    fail(throttle, ["ip:x"], T0 + 2)  # the third failure, counted with the two from before
    assert throttle.begin(["ip:x"], T0 + 3).locked


# -- Return targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    ("/app/?a=1&b=2&c=%2F", "/app/?a=1&b=2&c=%2F"),
    ("/", "/"),
    ("/notebook/tree", "/notebook/tree"),
    ("/a%20b?q=%E4%BD%A0", "/a%20b?q=%E4%BD%A0"),
    ("https://localhost/app/?x=1", "/app/?x=1"),
    ("http://LOCALHOST:8443/app", "/app"),
    ("", "/"),
    ("//evil.example", "/"),
    ("//evil.example/app", "/"),
    ("/\\evil.example", "/"),
    ("\\\\evil.example", "/"),
    ("https://evil.example", "/"),
    ("https://evil.example/app/?a=1", "/"),
    ("https://localhost.evil.example/", "/"),
    ("https://localhost@evil.example/", "/"),
    ("https://evil.example@localhost/", "/"),
    ("javascript:alert(1)", "/"),
    ("JaVaScRiPt:alert(1)", "/"),
    ("data:text/html,hi", "/"),
    ("ftp://localhost/x", "/"),
    ("app/relative", "/"),
    ("/app\r\nSet-Cookie: x=1", "/"),
    ("/app\nLocation: //evil.example", "/"),
    ("/\t/evil.example", "/"),
    ("/ /evil.example", "/"),
    ("/app\x00", "/"),
    ("/" + "a" * 5000, "/"),
    ("/ezauth/login?rd=/ezauth/login", "/"),
    ("/ezauth/logout", "/"),
])
def test_safe_return_target(target, expected):
    assert safe_return_target(target, "localhost") == expected


@pytest.mark.parametrize(("target", "expected"), [
    ("https://wiki.example.com/page?a=1", "https://wiki.example.com/page?a=1"),
    ("https://example.com/x", "https://example.com/x"),
    ("https://auth.example.com/app", "/app"),
    ("https://evil-example.com/x", "/"),
    ("https://example.com.evil.example/x", "/"),
    ("https://wiki.example.com//evil.example", "https://wiki.example.com/"),
])
def test_safe_return_target_under_the_cookie_domain(target, expected):
    assert safe_return_target(target, "auth.example.com", ".example.com") == expected


TARGET_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
ASCII_TEXT = st.text(alphabet=string.printable + "\x00\x7f\u2028", max_size=60)


@hsettings(max_examples=400, deadline=None)
@given(st.one_of(TARGET_TEXT, ASCII_TEXT,
                 st.builds("/{}".format, ASCII_TEXT),
                 st.builds("https://{}".format, ASCII_TEXT),
                 st.builds("http://localhost{}".format, ASCII_TEXT)))
def test_safe_return_target_only_ever_returns_a_same_site_path(target):
    result = safe_return_target(target, "localhost")
    assert result == "/" or (result.startswith("/") and not result.startswith("//"))
    assert "\\" not in result
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in result)


# -- Language, cookies, settings, page ------------------------------------------------------


@pytest.mark.parametrize(("header", "forced", "expected"), [
    ("", "", "en"),
    ("zh-CN,zh;q=0.9,en;q=0.8", "", "zh-CN"),
    ("zh-TW", "", "zh-CN"),
    ("en-US,en;q=0.9,zh-CN;q=0.8", "", "en"),
    ("en;q=0.5,zh;q=0.9", "", "zh-CN"),
    ("fr-FR,de;q=0.9", "", "en"),
    ("*", "", "en"),
    ("zh;q=abc, en;q=0.1", "", "en"),
    ("zh-CN", "en", "en"),
    ("en", "zh-CN", "zh-CN"),
    ("zh;q=0.9," * 1000, "", "zh-CN"),
])
def test_choose_lang(header, forced, expected):
    assert choose_lang(header, forced) == expected


def test_english_and_chinese_have_the_same_keys_and_placeholders():
    def placeholders(text: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}

    english, chinese = ezauth.PAGE_TEXT["en"], ezauth.PAGE_TEXT["zh-CN"]
    assert set(ezauth.PAGE_TEXT) == {"en", "zh-CN"}
    assert sorted(english) == sorted(chinese)
    differ = {key: (placeholders(english[key]), placeholders(chinese[key]))
              for key in english if placeholders(english[key]) != placeholders(chinese[key])}
    assert differ == {}
    assert placeholders(english["msg_locked"]) == {"wait"}  # the check sees placeholders at all


@pytest.mark.parametrize(("header", "expected"), [
    ("", []),
    ("ezauth=abc", ["abc"]),
    ("a=1; ezauth=abc; b=2", ["abc"]),
    ("ezauth=one; ezauth=two", ["one", "two"]),
    ('ezauth="quoted"', ["quoted"]),
    ("xezauth=no; ezauth_csrf=no", []),
    ("ezauth", []),
    ("ezauth=", [""]),
])
def test_cookie_values(header, expected):
    assert cookie_values(header, "ezauth") == expected


def test_split_cookies_answers_the_same_header_alike_and_hands_out_nothing_to_change():
    """Remembered per header: what one request got back cannot be changed for the next."""
    names = frozenset(("ezauth", "ezauth_csrf"))
    header = "a=1; ezauth=one; ezauth_csrf=c; b= 2 ; ezauth=two"
    found, rest = ezauth.split_cookies(header, names)
    assert dict(found) == {"ezauth": ("one", "two"), "ezauth_csrf": ("c",)}
    assert rest == "a=1; b= 2"
    with pytest.raises(TypeError):
        found["ezauth"] = ("mine",)  # type: ignore[index]
    assert ezauth.split_cookies(header, names) == (found, rest)
    assert ezauth.split_cookies(header, frozenset(("ezauth",)))[0]["ezauth"] == ("one", "two")


def test_settings_defaults_match_the_documentation(tmp_path):
    s = Settings.from_env(environ={}, env_file=tmp_path / "missing.env")
    # Beside ezauth.py, not ./ezauth-data.
    assert (s.host, s.port, s.data_dir) == ("127.0.0.1", 2424, ezauth.HERE / "ezauth-data")
    assert (s.data_dir_named, s.counter) == (False, True)
    assert (s.session_ttl, s.remember_ttl, s.rotate_every) == (1800, 2592000, 86400)
    assert (s.max_attempts, s.lockout_window, s.lockout_time) == (5, 300, 300)
    assert set(s.trusted_proxies) == {ipaddress.ip_network("127.0.0.1/32"),
                                      ipaddress.ip_network("::1/128")}
    assert (s.cookie_domain, s.cookie_secure, s.lang) == ("", "auto", "")
    assert s.legacy_users == ()


def test_flags_override_environment_which_overrides_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("EZAUTH_PORT=1111\nEZAUTH_TITLE=from dotenv\nEZAUTH_SLOGAN=dotenv slogan\n")
    environ = {"EZAUTH_PORT": "2222", "EZAUTH_TITLE": "from env"}
    assert Settings.from_env(environ={}, env_file=env_file).port == 1111
    from_env = Settings.from_env(environ=environ, env_file=env_file)
    assert (from_env.port, from_env.title, from_env.slogan) == (2222, "from env", "dotenv slogan")
    flagged = Settings.from_env(environ=environ, flags={"port": 3333, "host": None},
                                env_file=env_file)
    assert (flagged.port, flagged.host) == (3333, "127.0.0.1")


@pytest.mark.parametrize("where", ["environment", "dotenv", "flag"])
def test_a_data_dir_named_anywhere_counts_as_named(tmp_path, where):
    env_file = tmp_path / ".env"
    env_file.write_text("EZAUTH_DATA_DIR=/srv/a\n" if where == "dotenv" else "")
    s = Settings.from_env(environ={"EZAUTH_DATA_DIR": "/srv/a"} if where == "environment" else {},
                          flags={"data_dir": Path("/srv/a")} if where == "flag" else None,
                          env_file=env_file)
    assert (s.data_dir, s.data_dir_named) == (Path("/srv/a"), True)


@pytest.fixture
def install(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """ezauth.py as if it lived in tmp/opt, run from tmp/home: (its folder, the working
    directory)."""
    here, cwd = tmp_path / "opt", tmp_path / "home"
    here.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(ezauth, "HERE", here)
    monkeypatch.chdir(cwd)
    return here, cwd


def test_the_dotenv_beside_ezauth_py_is_read_and_the_working_directorys_overrides_it(install):
    here, cwd = install
    (here / ".env").write_text("EZAUTH_TITLE=beside\nEZAUTH_SLOGAN=beside too\n")
    assert (Settings.from_env(environ={}).title,
            Settings.from_env(environ={}).slogan) == ("beside", "beside too")
    (cwd / ".env").write_text("EZAUTH_TITLE=here\n")
    s = Settings.from_env(environ={})
    assert (s.title, s.slogan) == ("here", "beside too")


def test_the_dotenv_beside_ezauth_py_is_read_once_when_it_is_the_working_directorys(install,
                                                                                    monkeypatch):
    here, _ = install
    (here / ".env").write_text("EZAUTH_TITLE=beside\n")
    monkeypatch.chdir(here)
    assert ezauth.read_env_files() == {"EZAUTH_TITLE": "beside"}


def test_an_unreadable_dotenv_in_the_working_directory_is_a_warning(install, caplog):
    """As root every file is readable by mode, so a folder named .env stands in for one that is not:
    reading either fails with the same OSError."""
    here, cwd = install
    (here / ".env").write_text("EZAUTH_TITLE=beside\n")
    (cwd / ".env").mkdir()
    assert Settings.from_env(environ={}).title == "beside"
    assert [line.split(" error=")[0]
            for line in events(caplog, "env_file_unreadable")] == ["event=env_file_unreadable"]
    assert str(cwd / ".env") in events(caplog, "env_file_unreadable")[0]


def test_an_unreadable_dotenv_beside_ezauth_py_stops_with_one_line_naming_it(install):
    here, _ = install
    (here / ".env").mkdir()
    with pytest.raises(SettingsError, match=re.escape(f"{here / '.env'}: cannot read it")):
        Settings.from_env(environ={})


def test_dotenv_allows_comments_quotes_and_export(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('# comment\n\nexport EZAUTH_TITLE="My cats"\n'
                        'EZAUTH_SUBTITLE=\'Quoted\'\nnonsense\n')
    s = Settings.from_env(environ={}, env_file=env_file)
    assert (s.title, s.subtitle) == ("My cats", "Quoted")


@pytest.mark.parametrize(("name", "value"), [
    ("EZAUTH_PORT", "abc"),
    ("EZAUTH_PORT", "70000"),
    ("EZAUTH_PORT", "-1"),
    ("EZAUTH_SESSION_TTL", "-5"),
    ("EZAUTH_SESSION_TTL", "1.5"),
    ("EZAUTH_REMEMBER_TTL", "0"),
    ("EZAUTH_ROTATE_EVERY", "soon"),
    ("EZAUTH_TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip"),
    ("EZAUTH_MAX_ATTEMPTS", "0"),
    ("EZAUTH_LOCKOUT_WINDOW", "-300"),
    ("EZAUTH_LOCKOUT_TIME", "five"),
    ("EZAUTH_COOKIE_NAME", "bad name;"),
    ("EZAUTH_COOKIE_DOMAIN", "evil.example/path"),
    ("EZAUTH_COOKIE_SECURE", "maybe"),
    ("EZAUTH_LANG", "fr"),
    ("EZAUTH_TITLE", "x" * 301),
])
def test_bad_setting_raises_an_error_naming_it(tmp_path, name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(environ={name: value}, env_file=tmp_path / "missing.env")
    env_file = tmp_path / ".env"
    env_file.write_text(f"{name}={value}\n")
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(environ={}, env_file=env_file)


def test_bad_flag_value_raises_an_error_naming_the_setting(tmp_path):
    with pytest.raises(SettingsError, match="EZAUTH_PORT"):
        Settings.from_env(environ={}, flags={"port": 99999}, env_file=tmp_path / "missing.env")


def test_settings_variants_are_validated_too(settings):
    with pytest.raises(SettingsError, match="EZAUTH_SESSION_TTL"):
        dataclasses.replace(settings, session_ttl=-5)


def test_legacy_dotenv_user_becomes_a_user(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("chat_username=bob\npassword=hunter2hunter2\nSECRET_KEY=xyz\nLAST_UPDATED=2023-01-01\n")
    s = Settings.from_env(environ={}, env_file=env_file)
    assert s.legacy_users == (("bob", "hunter2hunter2"),)
    assert "hunter2hunter2" not in repr(s)


def test_only_ezauth_variables_are_read_from_the_environment(tmp_path):
    s = Settings.from_env(environ={"chat_username": "bob", "password": "x" * 10, "PORT": "1"},
                          env_file=tmp_path / "missing.env")
    assert s.legacy_users == () and s.port == 2424


def test_legacy_secret_key_and_last_updated_are_ignored_with_a_note(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    env_file = tmp_path / ".env"
    env_file.write_text("SECRET_KEY=0123456789abcdef\nLAST_UPDATED=2023-05-01\n")
    settings = Settings.from_env(environ={}, env_file=env_file)
    make_app(dataclasses.replace(settings, data_dir=tmp_path / "data"), clock=FakeClock(T0))
    notes = " ".join(r.getMessage() for r in caplog.records if r.name == "ezauth")
    assert "SECRET_KEY" in notes and "LAST_UPDATED" in notes


def _page_values(**overrides: str) -> dict[str, str]:
    values = {field: f"<{field}>" for field in ezauth.PAGE_FIELDS if field != "lang"}
    values.update(overrides)
    return values


def test_render_page_escapes_every_value():
    hostile = "<script>alert('x')</script> & \"quoted\""
    fields = [f for f in ezauth.PAGE_FIELDS if f != "lang"]
    template = string.Template("|".join(f"${f}" for f in fields))
    page = render_page(template, "en", _page_values(**dict.fromkeys(fields, hostile))).decode()
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;"
    assert page.split("|") == [escaped] * len(fields)


def test_shipped_page_escapes_what_it_shows(tmp_path):
    hostile = "<script>alert('x')</script> & \"quoted\""
    page = render_page(load_template(tmp_path), "en",
                       _page_values(title=hostile, username=hostile, rd=hostile,
                                    error=hostile, footer=hostile)).decode()
    assert "<script>alert" not in page and '"quoted"' not in page


def test_render_page_leaves_dollar_signs_in_values_alone(tmp_path):
    page = render_page(load_template(tmp_path), "en", _page_values(title="$csrf ${rd} $$")).decode()
    assert "$csrf ${rd} $$" in page


def test_render_page_fails_loudly_when_a_value_is_missing(tmp_path):
    values = _page_values()
    del values["csrf"]
    with pytest.raises(KeyError):
        render_page(load_template(tmp_path), "en", values)


def test_render_page_uses_the_language_texts(tmp_path):
    page = render_page(load_template(tmp_path), "zh-CN", _page_values()).decode()
    assert 'lang="zh-CN"' in page and ezauth.PAGE_TEXT["zh-CN"]["t_password"] in page


# -- Log values -------------------------------------------------------------------------------


def test_log_values_from_clients_are_cut_and_the_machines_own_are_whole():
    """A user name is cut at 80 characters; a command under a long install path is not, and still
    cannot break the line or forge a field."""
    assert ezauth.logval("alice") == "alice"
    assert ezauth.logval("a" * 81) == json.dumps("a" * 80)
    deep = "/" + "a-long-directory/" * 8 + "ezauth"
    assert ezauth.logval(deep, limit=None) == deep
    command = f"{deep}/.venv/bin/python {deep}/ezauth.py passwd admin"
    assert json.loads(ezauth.logval(command, limit=None)) == command
    forged = ezauth.logval('x" ip=6.6.6.6\nevent=login_ok', limit=None)
    assert "\n" not in forged and json.loads(forged) == 'x" ip=6.6.6.6\nevent=login_ok'


# == HTTP through WebTest ======================================================================

# -- The settings table, --help, the README and the code's own shape -------------------------------


def readme_settings() -> dict[str, str]:
    """variable -> default, from the README's settings table."""
    readme = (ezauth.HERE / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(EZAUTH_[A-Z_]+)` \| `([^`]*)` \|", table, re.M))


def test_the_readme_settings_table_matches_the_settings_table():
    declared = {ezauth.variable(item): ezauth.shown_default(item, spec)
                for item, spec in ezauth.setting_specs()}
    assert readme_settings() == declared


def test_every_setting_is_a_flag_too(tmp_path):
    args = ezauth.build_parser().parse_args(["serve", "--session-ttl", "99", "--basic-auth",
                                             "--cookie-domain", ".Example.com"])
    settings = ezauth.Settings.from_env(environ={}, flags=ezauth.setting_flags(args),
                                        env_file=tmp_path / "none")
    assert (settings.session_ttl, settings.basic_auth,
            settings.cookie_domain) == (99, True, ".example.com")


def test_an_unknown_ezauth_variable_is_logged(tmp_path, caplog):
    ezauth.Settings.from_env(environ={"EZAUTH_PROT": "2425"}, env_file=tmp_path / "none")
    assert events(caplog, "setting_unknown") == ["event=setting_unknown name=EZAUTH_PROT "
                                                 "note=ignored_see_python_ezauth.py_--help"]


def test_no_function_in_ezauth_is_longer_than_forty_lines():
    tree = ast.parse(EZAUTH.read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno >= 40]
    assert long == []


def test_the_readme_describes_the_sections_of_ezauth_py_in_order():
    banners = re.findall(r"^# -- ([A-Za-z ()]+?) -+$", EZAUTH.read_text(), re.M)
    layout = (ezauth.HERE / "README.md").read_text().split("### How the code is laid out", 1)[1]
    described = re.findall(r"^\| ([A-Z][^|]+?) \|", layout, re.M)
    named = [name.strip() for row in described for name in row.split(",")]
    assert [b.split(" (")[0] for b in banners] == named


def docstring_block(opening: str) -> list[str]:
    """The lines of the indented block in ezauth's module docstring after the paragraph OPENING
    starts."""
    paragraphs = (ezauth.__doc__ or "").split("\n\n")
    at = next(n for n, paragraph in enumerate(paragraphs) if paragraph.startswith(opening))
    return paragraphs[at + 1].splitlines()


def test_the_docstring_names_the_sections_of_ezauth_py_in_order():
    banners = re.findall(r"^# -- (.+?) -+$", EZAUTH.read_text(), re.M)
    table = [re.split(r" {2,}", line.strip())[0]
             for line in docstring_block("Sections, top to bottom")]
    assert table == [banner.split(" (")[0] for banner in banners]
    assert table[0] == "Basics" and len(table) > 20


def test_every_function_in_the_docstrings_verify_chain_exists():
    lines = docstring_block("One verify from start to finish")
    chain = [name.strip() for name in " ".join(lines).split("->")]
    assert (chain[0], chain[-1]) == ("Connection.process", "Connection.send")
    assert "Verify.verify" in chain
    missing = []
    for name in chain:
        found: object = ezauth
        for part in name.split("."):
            found = getattr(found, part, None)
        if not callable(found):
            missing.append(name)
    assert missing == []


@pytest.mark.parametrize(("seconds", "lang", "text"),
                         [(300, "en", "5 minutes"), (60, "en", "1 minute"),
                          (61, "en", "2 minutes"), (45, "en", "45 seconds"),
                          (1, "en", "1 second"), (120, "zh-CN", "2 分钟")])
def test_a_lockout_says_how_long_in_words(seconds, lang, text):
    assert ezauth.wait_text(lang, seconds) == text


# -- Login: the happy path --------------------------------------------------------------------


def test_login_page_renders_with_csrf_field_and_cookie(client):
    page = client.get(LOGIN, status=200)
    assert page.content_type == "text/html"
    csrf = form_field(page.text, "csrf")
    assert len(csrf) >= 32
    attrs = cookie_attrs(cookie_header(page, "ezauth_csrf"))
    assert token_of(cookie_header(page, "ezauth_csrf")) == csrf
    assert {"httponly", "samesite"} <= set(attrs) and attrs["samesite"] == "Lax"
    assert form_field(page.text, "rd") == "/ezauth/account"


def test_login_page_keeps_the_csrf_cookie_it_already_set(client):
    first = client.get(LOGIN, status=200)
    second = client.get(LOGIN, status=200)
    assert cookie_header(second, "ezauth_csrf") is None
    assert form_field(second.text, "csrf") == form_field(first.text, "csrf")


def test_login_redirects_to_the_exact_return_target(client):
    response = login(client, rd="/app/?a=1&b=2&c=%2F")
    assert response.headers["Location"] == "/app/?a=1&b=2&c=%2F"


def test_login_without_a_return_target_lands_on_the_account_page(client):
    landed = login(client)
    assert landed.headers["Location"] == "/ezauth/account"
    page = client.get(landed.headers["Location"], status=200)
    assert "You are logged in as alice." in page.text
    assert 'action="/ezauth/logout"' in page.text


@pytest.mark.parametrize("original", [
    "/app/?a=1&b=2&c=%2F",
    "/files/%C3%A9t%C3%A9/?q=caf%C3%A9&empty=&x=%2F%2Fnot-a-host",
    "/notebook/tree?token=a+b%2Bc",
    "/a;b=c/d",
])
def test_return_target_survives_the_whole_round_trip_from_verify(client, original):
    """nginx sends X-Original-URI to verify, the 401 names the login URL, login returns there."""
    denied = verify(client, 401, uri=original)
    login_url = denied.headers["X-Ezauth-Login"]
    assert login_url == "/ezauth/login?rd=" + quote(original, safe="")
    page = client.get(login_url, status=200)
    assert form_field(page.text, "rd") == original
    form = {"csrf": form_field(page.text, "csrf"), "rd": form_field(page.text, "rd"),
            "username": "alice", "password": PASSWORD}
    assert client.post(LOGIN, form, status=303).headers["Location"] == original


@pytest.mark.parametrize("rd", ["https://localhost/app/?a=1", "http://localhost/app/?a=1"])
def test_redirect_to_an_absolute_same_host_target_is_relative(client, rd):
    assert login(client, rd=rd).headers["Location"] == "/app/?a=1"


@pytest.mark.parametrize("rd", ["//evil.example", "/\\evil.example", "https://evil.example/",
                                "javascript:alert(1)", "/app\r\nSet-Cookie: x=1"])
def test_hostile_return_target_falls_back_to_home(client, rd):
    assert login(client, rd=rd).headers["Location"] == "/"


@pytest.mark.parametrize("rd", ["//evil.example", "/\\evil.example", "https://evil.example/app",
                                "javascript:alert(1)", "/app\r\nSet-Cookie: x=1",
                                "HTTPS://EVIL.EXAMPLE"])
def test_hostile_return_target_posted_directly_falls_back_to_home(client, rd):
    """The hidden field is the attacker's to fill in: the POST checks rd again."""
    form = {"csrf": csrf_pair(client), "username": "alice", "password": PASSWORD, "rd": rd}
    assert client.post(LOGIN, form, status=303).headers["Location"] == "/"


@pytest.mark.parametrize(("host", "rd"), [
    ("[::1]:8080", "http://[::1]:8080/app/?a=1"),
    ("192.0.2.10:8443", "https://192.0.2.10:8443/app/?a=1"),
    ("Example.COM", "https://example.com/app/?a=1"),
])
def test_absolute_target_on_the_request_host_is_allowed(client, host, rd):
    assert login(client, rd=rd, headers={"Host": host}).headers["Location"] == "/app/?a=1"


def test_redirect_to_another_host_under_the_cookie_domain_is_absolute(make_client):
    _, client = make_client(cookie_domain="example.com")
    base = "https://auth.example.com"
    response = login(client, rd="https://wiki.example.com/page?a=1", base=base)
    assert response.headers["Location"] == "https://wiki.example.com/page?a=1"
    assert cookie_attrs(cookie_header(response))["domain"] == "example.com"


def test_login_sets_a_session_cookie_that_verify_accepts(client):
    response = login(client)
    cookie = cookie_header(response)
    attrs = cookie_attrs(cookie)
    assert {"httponly", "samesite", "path"} <= set(attrs)
    assert attrs["samesite"] == "Lax" and attrs["path"] == "/"
    assert not {"max-age", "expires", "secure", "domain"} & set(attrs)
    assert response.headers["Cache-Control"] == "no-store"
    ok = verify(client, 200)
    assert ok.headers["X-Auth-Request-User"] == "alice"


def test_remember_me_sets_max_age_to_the_remember_lifetime(client):
    attrs = cookie_attrs(cookie_header(login(client, remember=True)))
    assert attrs["max-age"] == "2592000"


def test_remembered_session_outlives_the_normal_lifetime(client, clock):
    login(client, remember=True)
    clock.advance(1800 + 60)
    assert verify(client, 200).headers["X-Auth-Request-User"] == "alice"


@pytest.mark.parametrize(("base", "headers", "peer", "forced", "secure"), [
    ("http://localhost", {}, TRUSTED_PEER, "auto", False),
    ("http://localhost", {"X-Forwarded-Proto": "https"}, TRUSTED_PEER, "auto", True),
    ("http://localhost", {"X-Forwarded-Proto": "https"}, UNTRUSTED_PEER, "auto", False),
    ("http://localhost", {"X-Forwarded-Proto": "http"}, TRUSTED_PEER, "auto", False),
    ("https://localhost", {}, UNTRUSTED_PEER, "auto", True),
    ("http://localhost", {}, TRUSTED_PEER, "1", True),
    ("http://localhost", {"X-Forwarded-Proto": "https"}, TRUSTED_PEER, "0", False),
], ids=["plain-http", "https-via-trusted-proxy", "https-header-from-untrusted-peer",
        "proxy-says-http", "direct-https", "forced-on", "forced-off"])
def test_secure_cookie_flag(make_client, base, headers, peer, forced, secure):
    _, client = make_client(cookie_secure=forced)
    response = login(client, base=base, headers=headers, extra_environ=peer, send_csrf_cookie=True)
    assert ("secure" in cookie_attrs(cookie_header(response))) is secure


def test_cookie_name_setting_names_both_cookies(make_client):
    _, client = make_client(cookie_name="homeauth")
    page = client.get(LOGIN, status=200)
    assert cookie_header(page, "homeauth_csrf") is not None
    form = {"csrf": form_field(page.text, "csrf"), "username": "alice", "password": PASSWORD,
            "rd": "/"}
    assert cookie_header(client.post(LOGIN, form, status=303), "homeauth") is not None
    assert verify(client, 200).headers["X-Auth-Request-User"] == "alice"
    client.get(VERIFY, headers={"Cookie": "ezauth=whatever"}, status=401)


def test_secure_session_cookie_works_over_https(make_client):
    _, client = make_client(cookie_secure="1")
    login(client, base="https://localhost")
    ok = client.get("https://localhost" + VERIFY, status=200)
    assert ok.headers["X-Auth-Request-User"] == "alice"


def test_successful_login_is_logged_with_user_and_ip(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client, headers={"X-Forwarded-For": "203.0.113.9"})
    assert any("user=alice" in m and "ip=203.0.113.9" in m for m in events(caplog, "login_ok"))


# -- Login: the POST check order ----------------------------------------------------------------


def csrf_pair(client: webtest.TestApp) -> str:
    """Load the page so the client holds the CSRF cookie; return its token."""
    return form_field(client.get(LOGIN, status=200).text, "csrf")


def test_body_over_16_kib_is_413_before_anything_else(client):
    body = "username=" + "a" * (16 * 1024) + "&password=%ff"
    page = client.post(LOGIN, body, content_type="application/x-www-form-urlencoded", status=413)
    assert shows(page, "msg_too_large")


def test_body_of_exactly_16_kib_is_read(client):
    csrf = csrf_pair(client)
    body = f"csrf={csrf}&username=alice&password={'p' * 100}&rd="
    body += "&pad=" + "x" * (16 * 1024 - len(body) - 5)
    assert len(body) == 16 * 1024
    client.post(LOGIN, body, content_type="application/x-www-form-urlencoded", status=401)


@pytest.mark.parametrize(("body", "content_type"), [
    (b"username=%ff%fe&password=x", "application/x-www-form-urlencoded"),
    (b"username=al\xffice&password=x", "application/x-www-form-urlencoded"),
    (b"username=%C0%AF&password=x", "application/x-www-form-urlencoded"),
    (b'{"username": "alice", "password": "x"}', "application/json"),
    (b"username=alice&password=x", "text/plain"),
    (b"--b\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nalice\r\n--b--\r\n",
     "multipart/form-data; boundary=b"),
    (b"username=alice&password=x", ""),
], ids=["invalid-utf8-escape", "raw-non-ascii-byte", "overlong-utf8", "json", "text-plain",
        "multipart", "no-content-type"])
def test_undecodable_form_is_400_before_the_csrf_check(client, body, content_type):
    page = client.post(LOGIN, body, content_type=content_type, status=400)
    assert shows(page, "msg_bad_form")


def test_missing_csrf_is_403_before_missing_fields(client):
    csrf_pair(client)
    page = client.post(LOGIN, {"username": "alice"}, status=403)
    assert shows(page, "msg_csrf")


def test_csrf_without_its_cookie_is_403(client):
    csrf = csrf_pair(client)
    client.reset()
    client.post(LOGIN, {"csrf": csrf, "username": "alice", "password": PASSWORD}, status=403)


def test_csrf_token_from_another_browser_is_403(service):
    mine = new_client(service)
    theirs = new_client(service)
    their_token = csrf_pair(theirs)
    csrf_pair(mine)
    page = mine.post(LOGIN,
                     {"csrf": their_token, "username": "alice", "password": PASSWORD, "rd": "/app"},
                     status=403)
    assert form_field(page.text, "username") == "alice"
    assert cookie_header(page) is None


def test_csrf_failure_is_logged(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    csrf_pair(client)
    client.post(LOGIN, {"csrf": "forged" * 8, "username": "alice", "password": "x"}, status=403)
    assert any("reason=csrf" in m and "ip=127.0.0.1" in m for m in events(caplog, "login_rejected"))


@pytest.mark.parametrize("fields", [
    {},
    {"username": "alice"},
    {"password": PASSWORD},
    {"username": "", "password": PASSWORD},
    {"username": "   ", "password": PASSWORD},
    {"username": "alice", "password": ""},
])
def test_missing_fields_are_400(client, fields):
    csrf = csrf_pair(client)
    page = client.post(LOGIN, {"csrf": csrf, **fields}, status=400)
    assert shows(page, "msg_missing")


def lock_out(client: webtest.TestApp, username: str = "alice", **headers: str) -> None:
    for _ in range(5):
        login(client, username, "wrong password", headers=headers, status=401)


def test_missing_fields_are_400_even_when_locked_out(client):
    lock_out(client)
    client.post(LOGIN, {"csrf": csrf_pair(client), "username": "alice"}, status=400)


def test_lockout_is_429_with_retry_after_even_for_the_right_password(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    lock_out(client)
    page = login(client, status=429)
    assert page.headers["Retry-After"] == "300"
    assert shows(page, "msg_locked", wait="5 minutes")
    assert cookie_header(page) is None
    assert any("user=alice" in m for m in events(caplog, "login_locked"))


def test_lockout_ends_after_the_lockout_time(client, clock):
    lock_out(client)
    clock.advance(299)
    assert login(client, status=429).headers["Retry-After"] == "1"
    clock.advance(1)
    login(client, status=303)


def test_failures_outside_the_window_are_forgotten(client, clock):
    for _ in range(4):
        login(client, "alice", "wrong password", status=401)
    clock.advance(301)
    for _ in range(4):
        login(client, "alice", "wrong password", status=401)
    login(client, status=303)


def test_lockout_is_per_client_ip(client):
    for i in range(5):
        login(client, f"user{i}", "wrong password", headers={"X-Forwarded-For": "203.0.113.1"},
              status=401)
    login(client, headers={"X-Forwarded-For": "203.0.113.1"}, status=429)
    login(client, headers={"X-Forwarded-For": "203.0.113.2"}, status=303)


def test_lockout_is_per_user_name(client):
    for i in range(5):
        login(client, "alice", "wrong password", headers={"X-Forwarded-For": f"203.0.113.{i}"},
              status=401)
    login(client, "alice", headers={"X-Forwarded-For": "192.0.2.50"}, status=429)
    login(client, "bob", headers={"X-Forwarded-For": "192.0.2.50"}, status=303)


def test_forwarded_for_from_an_untrusted_peer_is_ignored(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    for i in range(5):
        login(client, f"user{i}", "wrong password", headers={"X-Forwarded-For": f"203.0.113.{i}"},
              extra_environ=UNTRUSTED_PEER, status=401)
    assert all("ip=198.51.100.7" in m for m in events(caplog, "login_failed"))
    login(client, headers={"X-Forwarded-For": "192.0.2.77"}, extra_environ=UNTRUSTED_PEER,
          status=429)


def test_real_ip_header_from_a_trusted_proxy_is_used(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client, "alice", "wrong password", headers={"X-Real-IP": "2001:db8::7"}, status=401)
    assert any("ip=2001:db8::7" in m for m in events(caplog, "login_failed"))


def test_trusted_proxies_setting_accepts_cidrs(make_client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    proxies = Settings.from_env(environ={"EZAUTH_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1"},
                                env_file=Path("/nonexistent/.env")).trusted_proxies
    _, client = make_client(trusted_proxies=proxies)
    login(client, "alice", "wrong password", headers={"X-Forwarded-For": "203.0.113.5"},
          extra_environ={"REMOTE_ADDR": "10.1.2.3"}, status=401)
    login(client, "alice", "wrong password", headers={"X-Forwarded-For": "203.0.113.6"},
          extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=401)
    failed = events(caplog, "login_failed")
    assert "ip=203.0.113.5" in failed[0] and "ip=127.0.0.1" in failed[1]


# -- Login: wrong credentials -------------------------------------------------------------------


def test_wrong_password_is_401_with_the_page_and_the_username_kept(client):
    page = login(client, "alice", "wrong password", rd="/app/?a=1", remember=True, status=401)
    assert page.content_type == "text/html"
    assert shows(page, "msg_wrong")
    assert form_field(page.text, "username") == "alice"
    assert form_field(page.text, "rd") == "/app/?a=1"
    assert "wrong password" not in page.text
    assert cookie_header(page) is None
    verify(client, 401)


def test_unknown_and_known_users_get_the_same_answer(client):
    known = login(client, "alice", "wrong password", status=401)
    unknown = login(client, "mallory", "wrong password", status=401)
    assert shows(known, "msg_wrong") and shows(unknown, "msg_wrong")
    counter = visits_pattern()
    assert (counter.sub("", known.text).replace('value="alice"', 'value="mallory"')
            == counter.sub("", unknown.text))
    assert sorted(k for k, _ in known.headerlist) == sorted(k for k, _ in unknown.headerlist)


def test_failed_login_is_logged_for_fail2ban(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client, "alice", "wrong password", headers={"X-Forwarded-For": "203.0.113.9"}, status=401)
    login(client, "mallory", "wrong password", headers={"X-Forwarded-For": "203.0.113.9"},
          status=401)
    failed = events(caplog, "login_failed")
    assert len(failed) == 2
    # A name that is no user's may be a password typed into the wrong field: only its keyed hash is
    # logged.
    assert "user=alice " in failed[0] and re.search(r" user=hash:[0-9a-f]{16} ", failed[1])
    assert not any("mallory" in r.getMessage() for r in caplog.records)
    assert all("ip=203.0.113.9" in m and "\n" not in m for m in failed)
    assert not any("wrong password" in r.getMessage() for r in caplog.records)


def test_login_name_is_case_sensitive(client):
    login(client, "ALICE", PASSWORD, status=401)


# -- Verify -----------------------------------------------------------------------------------


def test_verify_without_cookie_is_401(client):
    response = verify(client, 401)
    assert response.body == b""
    assert response.headers["X-Ezauth-Login"] == "/ezauth/login"
    assert "X-Auth-Request-User" not in response.headers
    assert "no-cache" in response.headers["Cache-Control"]


def test_verify_names_the_original_uri_in_the_login_url(client):
    response = verify(client, 401, uri="/app/?a=1&b=2&c=%2F")
    expected = "/ezauth/login?rd=%2Fapp%2F%3Fa%3D1%26b%3D2%26c%3D%252F"
    assert response.headers["X-Ezauth-Login"] == expected


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "", "x" * 5000])
def test_verify_with_a_bad_cookie_is_401_and_marks_it_expired(client, token):
    response = verify(client, 401, token=token, uri="/app/")
    assert response.headers["X-Ezauth-Login"] == "/ezauth/login?rd=%2Fapp%2F&expired=1"


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_verify_with_a_forged_or_tampered_token_is_401(client, service, make):
    response = verify(client, 401, token=make(service.stores.keys.signer(T0)))
    assert "X-Auth-Request-User" not in response.headers


def test_verify_with_a_token_signed_in_the_future_is_401(client, service):
    key = service.stores.keys.signer(T0)
    verify(client, 401,
           token=issue_token(Session("alice", service.stores.users.fingerprint("alice"), key.kid,
                                     int(T0) + 3600, int(T0) + 7200, False, SID, int(T0) + 3600),
                                     key))


def test_verify_with_an_oversized_cookie_header_never_500s(client):
    response = client.get(VERIFY, headers={"Cookie": "ezauth=" + "A" * 60_000}, status="*")
    assert response.status_int in (400, 401, 413, 431)


def test_expired_login_page_shows_the_message(client):
    page = client.get(LOGIN + "?rd=%2Fapp%2F&expired=1", status=200)
    assert shows(page, "msg_expired")
    assert form_field(page.text, "rd") == "/app/"


def test_verify_accepts_the_right_one_of_several_cookies(client):
    token = session_token(client)
    client.reset()
    response = client.get(VERIFY, headers={"Cookie": f"ezauth=stale; ezauth={token}"}, status=200)
    assert response.headers["X-Auth-Request-User"] == "alice"


def test_verify_of_a_session_past_its_lifetime_is_401(client, clock):
    login(client)
    clock.advance(1800)
    response = verify(client, 401)
    assert response.headers["X-Ezauth-Login"].endswith("expired=1")


def test_verify_renews_the_cookie_only_past_half_the_lifetime(client, clock):
    token = session_token(client)
    clock.advance(899)
    assert cookie_header(verify(client, 200)) is None
    clock.advance(2)
    renewed = cookie_header(verify(client, 200))
    assert renewed is not None and token_of(renewed) != token
    attrs = cookie_attrs(renewed)
    assert {"httponly", "samesite", "path"} <= set(attrs) and "max-age" not in attrs
    clock.advance(1800 - 901 + 60)  # past the first token's expiry, within the renewed one's
    verify(client, 401, token=token)
    assert verify(client, 200, token=token_of(renewed)).headers["X-Auth-Request-User"] == "alice"


def test_renewal_keeps_remember_me(make_client, clock):
    # Room for a renewal under the absolute lifetime.
    _, client = make_client(session_max_age=3 * 2592000)
    login(client, remember=True)
    clock.advance(2592000 // 2 + 1)
    renewed = cookie_header(verify(client, 200))
    assert cookie_attrs(renewed)["max-age"] == "2592000"


def test_session_in_use_stays_alive(client, clock):
    login(client)
    for _ in range(18):  # three hours of activity, a request every ten minutes
        clock.advance(600)
        verify(client, 200)


def test_verify_writes_no_log_line(client, caplog, clock):
    login(client)
    caplog.set_level(logging.INFO, logger="ezauth")
    caplog.clear()
    verify(client, 200)
    verify(client, 401, token="garbage")
    client.reset()
    verify(client, 401)
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


def test_the_access_log_is_the_apps_so_any_server_writes_the_same_lines(make_client, caplog):
    """EZAUTH_ACCESS_LOG under WSGI (gunicorn, WebTest) as under the built-in server: a verify line
    names the host, the path without its query and the user, never /ezauth/verify."""
    _, client = make_client(access_log=True)
    token = session_token(client)
    caplog.set_level(logging.INFO, logger="ezauth")
    caplog.clear()
    verify(client, 200, token, uri="/notes/today?key=ezt_secret", host="nb.example.test",
           X_Forwarded_For="198.51.100.4")
    (line,) = events(caplog, "verify")
    assert re.fullmatch(r"event=verify method=GET host=nb\.example\.test path=/notes/today "
                        r"status=200 user=alice ip=198\.51\.100\.4 ms=\d+\.\d", line), line
    client.get("/ezauth/healthz", status=200)
    assert events(caplog, "request")[0].startswith(
        "event=request method=GET path=/ezauth/healthz status=200 ")
    assert "ezt_secret" not in caplog.text


def test_verify_does_not_count_a_visit(client, service):
    login(client)
    before = (service.settings.data_dir / "counter.txt").read_text()
    for _ in range(5):
        verify(client, 200)
    assert (service.settings.data_dir / "counter.txt").read_text() == before


# -- Sessions end with their user, password or key -------------------------------------------


def test_deleted_user_loses_their_session(client, service):
    login(client)
    service.stores.users.delete("alice")
    verify(client, 401)


def test_changed_password_ends_the_session(client, service):
    login(client)
    service.stores.users.set_password("alice", "a brand new password")
    verify(client, 401)
    login(client, "alice", "a brand new password")
    verify(client, 200)


def test_user_deleted_by_another_process_loses_their_session_within_a_second(client, service,
                                                                              clock):
    login(client)
    Users(service.settings.data_dir / "users").delete("alice")  # what `ezauth.py deluser` does
    clock.advance(REFRESH_EVERY)
    verify(client, 401)


def test_other_users_keep_their_sessions(service, clock):
    alice = new_client(service)
    bob = new_client(service)
    login(alice)
    login(bob, "bob")
    service.stores.users.delete("alice")
    verify(alice, 401)
    assert verify(bob, 200).headers["X-Auth-Request-User"] == "bob"


def test_rotation_keeps_existing_sessions(client, service, clock):
    old_token = session_token(client)
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    new_key = service.stores.keys.rotate(clock())
    verify(client, 200)
    clock.advance(PUBLISH_DELAY)
    new_token = session_token(client)
    assert jwt.get_unverified_header(new_token)["kid"] == new_key.kid != old_kid
    verify(client, 200, token=old_token)
    verify(client, 200, token=new_token)


def test_automatic_rotation_keeps_sessions_alive(make_client, clock):
    service, client = make_client(rotate_every=600)
    token = session_token(client)
    for _ in range(5):
        clock.advance(300)
        verify(client, 200)  # each request may refresh the ring, which rotates when due
    assert len(service.stores.keys.keys) >= 3
    clock.advance(PUBLISH_DELAY)
    newer = session_token(client)
    assert jwt.get_unverified_header(newer)["kid"] != jwt.get_unverified_header(token)["kid"]


def test_workers_agree_on_a_rotated_key(settings, clock):
    """Two app instances on one data dir: a token signed by either verifies on the other at any
    moment."""
    worker_a = make_app(settings, clock=clock)
    worker_b = make_app(settings, clock=clock)
    browser_a = new_client(worker_a)
    browser_b = new_client(worker_b)
    login(browser_a)
    worker_a.stores.keys.rotate(clock())
    for _ in range(8):
        clock.advance(0.5)
        token = session_token(browser_a)
        verify(browser_b, 200, token=token)
    assert worker_a.stores.keys.signer(clock()).kid == worker_b.stores.keys.signer(clock()).kid


def test_restart_with_an_unwritable_key_ring_keeps_sessions(settings, clock, caplog):
    first = make_app(settings, clock=clock)
    browser = new_client(first)
    token = session_token(browser)
    lock = settings.data_dir / "keys.json.lock"
    lock.unlink()
    lock.mkdir()
    clock.advance(5)
    restarted = new_client(make_app(settings, clock=clock))
    verify(restarted, 200, token=token)


def test_corrupt_key_ring_at_start_ends_old_sessions_but_serves(settings, clock, caplog):
    browser = new_client(make_app(settings, clock=clock))
    token = session_token(browser)
    (settings.data_dir / "keys.json").write_text("{oops")
    restarted = new_client(make_app(settings, clock=clock))
    verify(restarted, 401, token=token)
    login(restarted)
    verify(restarted, 200)
    assert list(settings.data_dir.glob("keys.json.corrupt-*"))
    assert events(caplog, "keyring_corrupt")


# -- Logout -----------------------------------------------------------------------------------


def test_logout_clears_the_cookie_and_redirects_to_login(client):
    login(client)
    response = logout(client)  # the page's button: a POST with its CSRF token
    assert response.headers["Location"] == "/ezauth/login"
    cleared = cookie_header(response)
    assert token_of(cleared) == ""
    attrs = cookie_attrs(cleared)
    assert attrs["max-age"] == "0" and attrs["path"] == "/" and "httponly" in attrs
    verify(client, 401)


@pytest.mark.parametrize(("base", "name"), [("http://auth.example.com", "ezauth"),
                                            ("https://auth.example.com", "__Secure-ezauth")])
def test_logout_with_a_cookie_domain_clears_the_domain_cookie_too(make_client, base, name):
    _, client = make_client(cookie_domain="example.com")
    response = logout(client, base)
    cleared = [v for k, v in response.headerlist if k == "Set-Cookie" and v.startswith(f"{name}=;")]
    assert any("domain=example.com" in v.lower() for v in cleared)


# -- Other routes -----------------------------------------------------------------------------


def test_healthz_is_ok(client):
    response = client.get("/ezauth/healthz", status=200)
    assert response.text.strip() == "ok"


SHIPPED_STATIC = sorted(p.name for p in (ezauth.HERE / "static").iterdir() if p.is_file())
CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml",
                 ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2",
                 ".webp": "image/webp", ".jpg": "image/jpeg"}


@pytest.mark.parametrize("name", SHIPPED_STATIC)
def test_static_files_have_content_types_and_caching(client, name):
    response = client.get(f"/ezauth/static/{name}", status=200)
    assert response.content_type == CONTENT_TYPES.get(Path(name).suffix)
    assert response.body == (ezauth.HERE / "static" / name).read_bytes()
    assert "max-age=" in response.headers["Cache-Control"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    etag = response.headers["ETag"]
    again = client.get(f"/ezauth/static/{name}", headers={"If-None-Match": etag}, status=304)
    assert again.body == b""


def test_static_file_in_the_data_dir_overrides_the_shipped_one(client, service):
    own = service.settings.data_dir / "static"
    own.mkdir()
    (own / "login.css").write_text("body { color: rebeccapurple; }\n")
    (own / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert client.get("/ezauth/static/login.css",
                      status=200).text == "body { color: rebeccapurple; }\n"
    assert client.get("/ezauth/static/logo.png", status=200).content_type == "image/png"
    assert client.get("/ezauth/static/cat.svg", status=200).content_type == "image/svg+xml"


@pytest.mark.parametrize("path", [
    "/ezauth/static/", "/ezauth/static/missing.css", "/ezauth/static/../ezauth.py",
    "/ezauth/static/..%2fezauth.py", "/ezauth/static/.hidden.css", "/ezauth/static/login.html",
    "/ezauth/static/sub/login.css",
])
def test_static_never_serves_anything_outside_static(client, path):
    client.get(path, status=404)


def test_static_symlink_out_of_the_folder_is_not_served(client, service, tmp_path):
    outside = tmp_path / "secret.css"
    outside.write_text("secret")
    own = service.settings.data_dir / "static"
    own.mkdir()
    (own / "evil.css").symlink_to(outside)
    client.get("/ezauth/static/evil.css", status=404)


@pytest.mark.parametrize("path",
                         ["/", "/ezauth", "/ezauth/", "/ezauth/nope", "/login", "/ezauth/login/"])
def test_unknown_path_is_404(client, path):
    client.get(path, status=404)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/ezauth/login", {"GET", "HEAD", "POST"}),
    ("DELETE", "/ezauth/login", {"GET", "HEAD", "POST"}),
    ("POST", "/ezauth/healthz", {"GET", "HEAD"}),
    ("PUT", "/ezauth/logout", {"GET", "HEAD", "POST"}),
    ("POST", "/ezauth/static/login.css", {"GET", "HEAD"}),
])
def test_wrong_method_is_405_with_allow(client, method, path, allowed):
    response = client.request(path, method=method, status=405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


@pytest.mark.parametrize("path", ["/ezauth/login", "/ezauth/healthz", "/ezauth/static/login.css"])
def test_head_answers_like_get_without_a_body(client, path):
    got = client.get(path, status=200)
    head = client.head(path, status=200)
    assert head.body == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"]


# -- The page ----------------------------------------------------------------------------------


def _page_responses(client) -> dict[str, webtest.TestResponse]:
    return {
        "200": client.get(LOGIN, status=200),
        "401": login(client, "alice", "nope", status=401),
        "403": client.post(LOGIN, {"username": "alice", "password": "x"}, status=403),
        "400": client.post(LOGIN, b"\xff", content_type="application/x-www-form-urlencoded",
                           status=400),
    }


def test_page_responses_carry_the_security_headers(client):
    for status, response in _page_responses(client).items():
        headers = response.headers
        assert headers["Cache-Control"] == "no-store", status
        assert headers["X-Frame-Options"] == "DENY", status
        assert headers["Referrer-Policy"] == "no-referrer", status
        assert headers["X-Content-Type-Options"] == "nosniff", status
        csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split(";")
               if d.strip()}
        assert csp["script-src"] == ["'self'"], status
        assert csp["frame-ancestors"] == ["'none'"] and csp["default-src"] == ["'none'"], status
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"], status


def test_page_has_no_inline_script(client):
    page = client.get(LOGIN, status=200).text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", page)


def test_page_shows_the_configured_texts_escaped(make_client):
    _, client = make_client(title='<b>Tom & "Jerry"</b>', subtitle="Sub $title", slogan="It's fine")
    page = client.get(LOGIN, status=200).text
    assert "&lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;/b&gt;" in page
    assert "Sub $title" in page and "It&#x27;s fine" in page


def test_page_language_follows_accept_language_unless_forced(client, make_client):
    zh = client.get(LOGIN, headers={"Accept-Language": "zh-CN,zh;q=0.9"}, status=200)
    assert 'lang="zh-CN"' in zh.text and ezauth.PAGE_TEXT["zh-CN"]["t_username"] in zh.text
    assert "Accept-Language" in zh.headers["Vary"]
    _, forced = make_client(lang="en")
    assert 'lang="en"' in forced.get(LOGIN, headers={"Accept-Language": "zh-CN"}, status=200).text


def test_error_messages_follow_the_language(client):
    page = login(client, "alice", "nope", headers={"Accept-Language": "zh-CN"}, status=401)
    assert shows(page, "msg_wrong", "zh-CN")


def test_hostile_return_target_is_escaped_in_the_page(client):
    page = client.get(LOGIN + "?rd=" + quote('/x"><script>alert(1)</script>', safe=""), status=200)
    assert "<script>alert(1)" not in page.text
    assert form_field(page.text, "rd") in ("/", '/x"><script>alert(1)</script>')


def test_counter_is_shown_in_the_footer_and_counts_each_page_view_once(client, service):
    assert visits(1) in client.get(LOGIN, status=200).text
    assert visits(2) in client.get(LOGIN, status=200).text
    client.get("/ezauth/healthz", status=200)
    client.get("/ezauth/static/login.css", status=200)
    verify(client, 401)
    # Shown, not counted.
    assert visits(2) in client.post(LOGIN, {"username": "alice"}, status=403).text
    assert (service.settings.data_dir / "counter.txt").read_text().strip() == "2"
    assert visits(3) in client.get(LOGIN, status=200).text


def test_counter_off_counts_nothing_writes_nothing_and_shows_no_line(make_client, settings):
    """EZAUTH_COUNTER=0: no footer line, no counter.txt (not even an empty one), no metric."""
    footer = text("msg_visits", count="\x00").split("\x00")[0]
    _, client = make_client(counter=False, metrics=True)
    for _ in range(3):
        page = client.get(LOGIN, status=200)
        assert footer not in page.text and form_field(page.text, "csrf")
    assert footer not in client.post(LOGIN, {"username": "alice"}, status=403).text
    assert "ezauth_visits" not in client.get("/ezauth/metrics", status=200).text
    assert not (settings.data_dir / "counter.txt").exists()
    assert Settings.from_env(environ={"EZAUTH_COUNTER": "0"},
                             env_file=settings.data_dir / "none").counter is False


def test_unusable_counter_never_breaks_the_page(client, service, caplog):
    (service.settings.data_dir / "counter.txt").mkdir()
    page = client.get(LOGIN, status=200)
    assert text("msg_visits", count="\x00").split("\x00")[0] not in page.text
    assert form_field(page.text, "csrf")
    assert events(caplog, "counter_skipped")


def test_corrupt_counter_is_moved_aside_and_the_page_still_shows(client, service):
    (service.settings.data_dir / "counter.txt").write_text("lots")
    page = client.get(LOGIN, status=200)
    assert visits(1) in page.text
    assert [p.read_text()
            for p in service.settings.data_dir.glob("counter.txt.corrupt-*")] == ["lots"]


def test_login_html_in_the_data_dir_overrides_the_page(settings, clock):
    (settings.data_dir / "login.html").write_text(
        '<title>$title</title><form action="$action"><input name="csrf" value="$csrf">'
        '<input name="rd" value="$rd"></form><p>$footer</p> costs $$5')
    client = new_client(make_app(settings, clock=clock))
    page = client.get(LOGIN + "?rd=%2Fapp", status=200)
    assert page.text.startswith("<title>Welcome back</title>") and "costs $5" in page.text
    assert form_field(page.text, "rd") == "/app"
    form = {"csrf": form_field(page.text, "csrf"), "rd": "/app", "username": "alice",
            "password": PASSWORD}
    assert client.post(LOGIN, form, status=303).headers["Location"] == "/app"


@pytest.mark.parametrize("template",
                         ["<p>$title $nosuchfield</p>", "<p>${broken</p>", "<p>costs 5$</p>"])
def test_template_with_an_unknown_placeholder_fails_at_start_up(settings, template):
    (settings.data_dir / "login.html").write_text(template)
    with pytest.raises(SettingsError, match=r"login\.html"):
        make_app(settings)


# -- Users through the app ------------------------------------------------------------------------


def test_first_admin_can_log_in(make_client, tmp_path):
    service, client = make_client(data_dir=tmp_path / "empty")
    password = service.stores.users.create_first_admin()
    login(client, "admin", password)
    assert verify(client, 200).headers["X-Auth-Request-User"] == "admin"


def test_legacy_dotenv_user_can_log_in_and_is_warned_about(make_client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    service, client = make_client(legacy_users=(("carol", "blog post password"),))
    assert any("user=carol" in m and "passwd" in m for m in events(caplog, "legacy_env_user"))
    login(client, "carol", "blog post password")
    assert "blog post password" not in (service.settings.data_dir / "users").read_text()


def test_data_dir_and_secret_files_are_private(settings, tmp_path, clock):
    fresh = tmp_path / "fresh"
    fresh.mkdir(mode=0o755)
    fresh.chmod(0o755)
    service = make_app(dataclasses.replace(settings, data_dir=fresh), clock=clock)
    service.stores.users.create_first_admin()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    for name in ("keys.json", "users"):
        assert stat.S_IMODE((fresh / name).stat().st_mode) & 0o077 == 0, name


def test_unexpected_error_is_a_500_with_a_log_line(service, caplog, monkeypatch):
    def boom(request):
        raise RuntimeError("kaput")
    monkeypatch.setitem(service.routes, ("GET", "/ezauth/healthz"), boom)
    client = new_client(service)
    response = client.get("/ezauth/healthz", status=500)
    assert "kaput" not in response.text
    assert events(caplog, "error")
