"""Two-factor login (TOTP), in-process: the algorithm against RFC 6238, then logging in with a code
through WebTest. The `totp` command is in tests/process/test_account_cli.py, the code step in
Chromium in tests/browser/test_login_page.py."""

from __future__ import annotations

import base64
import logging
import re
import stat
from urllib.parse import parse_qs, urlsplit

import pytest
import webtest

import ezauth
from tests.support.app import login, verify
from tests.support.basics import (
    PASSWORD,
    T0,
    basic,
    fail2ban_lines,
    fail2ban_re,
)

RFC_SECRET = b"12345678901234567890"
# -- TOTP: the algorithm ------------------------------------------------------------------------


@pytest.mark.parametrize("now, code", [
    (59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
    (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130"),
])
def test_totp_matches_the_rfc_6238_sha1_test_vectors(now, code):
    assert ezauth.totp(RFC_SECRET, now, digits=8) == code


def test_totp_defaults_to_six_digits_of_the_same_value():
    assert ezauth.totp(RFC_SECRET, 59) == "287082"


def test_one_step_of_drift_either_way_is_tolerated_and_no_more():
    code = ezauth.totp(RFC_SECRET, T0)
    assert ezauth.matching_step(RFC_SECRET, code, T0 - 30, -1) is not None
    assert ezauth.matching_step(RFC_SECRET, code, T0 + 30, -1) is not None
    assert ezauth.matching_step(RFC_SECRET, code, T0 + 61, -1) is None


def test_a_used_step_and_older_ones_are_refused():
    step = int(T0 // 30)
    assert ezauth.matching_step(RFC_SECRET, ezauth.totp(RFC_SECRET, T0), T0, step) is None
    assert ezauth.matching_step(RFC_SECRET, ezauth.totp(RFC_SECRET, T0 - 30), T0, step) is None
    assert ezauth.matching_step(RFC_SECRET, ezauth.totp(RFC_SECRET, T0 + 30), T0, step) == step + 1


def test_otpauth_uri_carries_the_secret_in_base32():
    uri = ezauth.totp_uri("alice", RFC_SECRET)
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc, parts.path) == ("otpauth", "totp", "/ezauth%3Aalice")
    assert query["secret"] == [base64.b32encode(RFC_SECRET).decode()]
    assert query["digits"] == ["6"] and query["period"] == ["30"] and query["algorithm"] == ["SHA1"]


def test_totp_store_accepts_a_code_once_even_across_instances(tmp_path):
    store = ezauth.TotpStore(tmp_path / "totp")
    secret = store.enroll("alice")
    other_worker = ezauth.TotpStore(tmp_path / "totp")
    code = ezauth.totp(secret, T0)
    assert store.accept("alice", code, T0)
    assert not other_worker.accept("alice", code, T0)
    assert not store.accept("bob", code, T0)
    assert stat.S_IMODE((tmp_path / "totp").stat().st_mode) == 0o600
    assert re.fullmatch(r"alice:[A-Z2-7]{32}:\d+\n", (tmp_path / "totp").read_text())


def test_a_damaged_totp_line_locks_its_user_out_instead_of_dropping_the_second_factor(tmp_path, caplog):
    (tmp_path / "totp").write_text("alice:not*base32:-1\n")
    store = ezauth.TotpStore(tmp_path / "totp")
    assert store.enrolled("alice")
    assert not store.accept("alice", "123456", T0)
    assert "line=1" in caplog.text


def test_pending_login_and_session_tokens_cannot_stand_in_for_each_other(tmp_path):
    keys = ezauth.KeyRing(tmp_path / "keys.json", 86400, 86400, T0)
    pending = ezauth.issue_pending("alice", "fp", True, keys.signer(T0), T0)
    assert ezauth.read_pending(pending, keys, T0 + 299) == ("alice", "fp", True)
    with pytest.raises(ezauth.InvalidSession):
        ezauth.read_token(pending, keys, T0)
    session = ezauth.Session("alice", "fp", keys.signer(T0).kid, int(T0), int(T0) + 600, False, "test-session-id-00001",
                             int(T0))
    with pytest.raises(ezauth.InvalidSession):
        ezauth.read_pending(ezauth.issue_token(session, keys.signer(T0)), keys, T0)
    with pytest.raises(ezauth.InvalidSession):
        ezauth.read_pending(pending, keys, T0 + 300)


# -- TOTP: logging in ---------------------------------------------------------------------------


@pytest.fixture
def alice_secret(settings) -> bytes:
    return ezauth.TotpStore(settings.data_dir / "totp").enroll("alice")


def code_page(client: webtest.TestApp, remember: bool = False) -> webtest.TestResponse:
    page = login(client, rd="/app/", remember=remember, status=200)
    assert page.html.find("input", {"name": "code"}).parent.parent.get("disabled") is None
    assert page.html.find("input", {"name": "password"}).parent.parent.has_attr("disabled")
    assert "set-cookie" not in {k.lower() for k, _ in page.headerlist if "ezauth=" in _}
    return page


def submit_code(client: webtest.TestApp, page: webtest.TestResponse, code: str, status: int,
                **headers: str) -> webtest.TestResponse:
    fields = {name: page.html.find("input", {"name": name})["value"] for name in ("csrf", "rd", "pending")}
    return client.post("/ezauth/login", {**fields, "code": code}, status=status, headers=headers)


def test_enrolled_user_is_asked_for_a_code_and_logs_in_with_it(client, clock, alice_secret):
    page = code_page(client, remember=True)
    code = page.html.find("input", {"name": "code"})
    assert code["autocomplete"] == "one-time-code" and code["inputmode"] == "numeric"
    done = submit_code(client, page, ezauth.totp(alice_secret, clock.now), 303)
    assert done.location.endswith("/app/")
    assert "Max-Age=2592000" in done.headers["Set-Cookie"]  # "remember me" from the first step
    verify(client, 200)


def test_user_without_totp_logs_in_with_the_password_alone(client, alice_secret):
    login(client, "bob")


def test_wrong_code_shows_the_cat_in_the_code_state(client, alice_secret):
    page = code_page(client)
    wrong = submit_code(client, page, "000000", 401)
    assert ezauth.PAGE_TEXT["en"]["msg_wrong_code"] in wrong.text
    assert wrong.html.find("main")["data-state"] == "error"
    assert wrong.html.find("input", {"name": "pending"})["value"]
    zh = submit_code(client, page, "000000", 401, **{"Accept-Language": "zh-CN"})
    assert ezauth.PAGE_TEXT["zh-CN"]["msg_wrong_code"] in zh.text


def test_a_code_is_accepted_once_only(client, clock, alice_secret):
    code = ezauth.totp(alice_secret, clock.now)
    submit_code(client, code_page(client), code, 303)
    client.reset()
    submit_code(client, code_page(client), code, 401)


def test_codes_one_step_off_are_accepted(client, clock, alice_secret):
    submit_code(client, code_page(client), ezauth.totp(alice_secret, clock.now + 30), 303)


def test_wrong_codes_count_toward_the_lockout(client, clock, alice_secret):
    page = code_page(client)
    for _ in range(5):
        submit_code(client, page, "000000", 401)
    locked = submit_code(client, page, ezauth.totp(alice_secret, clock.now), 429)
    assert int(locked.headers["Retry-After"]) > 0


def test_wrong_codes_and_basic_failures_match_the_fail2ban_filter(make_client, alice_secret, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    _, client = make_client(basic_auth=True)
    submit_code(client, code_page(client), "000000", 401)
    verify(client, 401, Authorization=basic("bob", "wrong password"))
    lines = fail2ban_lines(caplog)
    assert len(lines) == 2 and "step=code" in lines[0] and "via=basic" in lines[1], lines
    for line in lines:
        match = fail2ban_re().search(line)
        assert match and line.endswith(f"ip={match.group('host')}"), line


def test_pending_login_expires_after_five_minutes(client, clock, alice_secret):
    page = code_page(client)
    clock.now += 301
    expired = submit_code(client, page, ezauth.totp(alice_secret, clock.now), 403)
    assert expired.html.find("input", {"name": "password"}).parent.parent.get("disabled") is None


def test_pending_login_ends_when_the_password_changes(client, clock, settings, alice_secret):
    page = code_page(client)
    ezauth.Users(settings.data_dir / "users").set_password("alice", "a new password")
    clock.now += 1.5  # the app rereads the users file at most once a second
    submit_code(client, page, ezauth.totp(alice_secret, clock.now), 403)


def test_pending_token_is_not_a_session(client, alice_secret):
    pending = code_page(client).html.find("input", {"name": "pending"})["value"]
    client.set_cookie("ezauth", pending)
    verify(client, 401)


def test_forged_pending_token_is_refused(client, alice_secret):
    page = code_page(client)
    fields = {name: page.html.find("input", {"name": name})["value"] for name in ("csrf", "rd")}
    client.post("/ezauth/login", {**fields, "pending": "x.y.z", "code": "123456"}, status=403)



def test_two_factor_users_cannot_use_basic(make_client, alice_secret):
    _, api = make_client(basic_auth=True)
    verify(api, 401, Authorization=basic("alice", PASSWORD))
