"""A script in the app cannot quietly become you (issue 16), in-process through WebTest.

The account page shares its origin with the app, so any script the app serves has the session:
every lasting change needs the password in the request that makes it, tokens die with the
password, ezauth's pages refuse in-page requests, logout is a POST, sessions have an absolute
lifetime, cookies over https carry a prefix plain http cannot set, verify judges one host only,
and a password typed into the user name field never reaches a log line. The same through nginx
and Chromium is in tests/browser/test_scripts_in_the_app.py; the CLI side in
tests/process/test_account_cli.py.
"""

from __future__ import annotations

import logging
import re
import sqlite3

import jwt
import pytest

import ezauth
from tests.support.app import (
    build,
    change,
    cookie_header,
    enrollment_on,
    error_text,
    login,
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
    FORWARDED,
    LOGIN,
    LOGOUT,
    NEW_PASSWORD,
    PASSWORD,
    TEXT,
    basic,
    bearer,
    cookie_attrs,
    events,
    form_field,
    jwt_parts,
    parse_page,
    sid_of,
    token_of,
)

HTTPS = {"X-Forwarded-Proto": "https"}  # nginx on loopback saying the browser came over https
VIA_HTTPS = {"X_Forwarded_Proto": "https"}  # the same as keywords of `verify`


def tokens_of(app: ezauth.EzauthApp, user: str = "alice") -> list[str]:
    return sorted(t.label for t in app.stores.tokens.list(app.clock(), user))


# -- 1. A lasting change needs the password in the request that makes it ----------------------


@pytest.mark.parametrize("fields", [{}, {"current": "not my password"}], ids=["no-password", "wrong-password"])
def test_a_token_needs_the_password_even_right_after_the_login(client, service, caplog, fields):
    """The review's case: within the first 10 minutes of a login, a script (or a copied cookie) that
    read the CSRF token made a token without the password, one that outlived logout."""
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    refused = change(client, "token_create", 401 if fields else 403, label="exfiltrate", **fields)
    assert error_text(refused.text) == TEXT["msg_wrong_current" if fields else "msg_confirm_needed"]
    assert not [a for _, a in parse_page(refused.text).tags if a.get("id") == "new-token"]
    assert tokens_of(service) == []
    assert len(events(caplog, "login_failed")) == (1 if fields else 0)
    made = change(client, "token_create", 200, label="mine", current=PASSWORD)
    verify(new_client(service), 200, Authorization=bearer(new_token_on(made.text)))
    assert tokens_of(service) == ["mine"]


def test_a_wrong_password_on_the_account_page_counts_toward_the_lockout_and_is_logged(client, service, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    for _ in range(service.settings.max_attempts):
        change(client, "token_create", 401, label="guess", current="not my password")
    locked = change(client, "token_create", 429, label="guess", current=PASSWORD)
    assert int(locked.headers["Retry-After"]) > 0
    assert tokens_of(service) == []
    failed = events(caplog, "login_failed")
    assert len(failed) == service.settings.max_attempts
    assert all(line == f"event=login_failed via=account user=alice ip={CLIENT_IP}" for line in failed)


def test_two_factor_turns_on_only_with_the_password_beside_the_confirming_code(client, service, clock, caplog):
    """The review's other case: a script turned two-factor on with the attacker's secret, so the
    owner's next login asked for a code only the attacker had."""
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client)
    secret, _, enrollment = enrollment_on(change(client, "totp_begin", 200).text)  # showing a secret is harmless
    code = ezauth.totp(secret, clock())
    refused = change(client, "totp_confirm", 403, enrollment=enrollment, code=code)
    assert error_text(refused.text) == TEXT["msg_confirm_needed"]
    assert enrollment_on(refused.text)[0] == secret  # the set-up goes on: no new secret to scan
    change(client, "totp_confirm", 401, enrollment=enrollment, code=code, current="not my password")
    assert not service.stores.totp.enrolled("alice")
    login(new_client(service))  # the password alone still logs in
    change(client, "totp_confirm", enrollment=enrollment, code=code, current=PASSWORD)
    assert service.stores.totp.enrolled("alice")
    assert len(events(caplog, "login_failed")) == 1


def test_two_factor_turns_off_only_with_the_password_and_a_current_code(client, service, clock):
    login(client)
    secret = service.stores.totp.enroll("alice")
    clock.advance(60)
    change(client, "totp_off", 403, code=ezauth.totp(secret, clock()))
    assert service.stores.totp.enrolled("alice")
    change(client, "totp_off", 401, code=ezauth.totp(secret, clock()), current="not my password")
    change(client, "totp_off", 401, code=other_code(ezauth.totp(secret, clock())), current=PASSWORD)
    assert service.stores.totp.enrolled("alice")
    change(client, "totp_off", code=ezauth.totp(secret, clock()), current=PASSWORD)
    assert not service.stores.totp.enrolled("alice")


def test_an_enrolled_second_factor_is_never_replaced_by_a_new_secret(client, service, clock):
    """A new secret in place of the old one would skip the current code that turning it off needs."""
    login(client)
    original = service.stores.totp.enroll("alice")
    assert error_text(change(client, "totp_begin", 409).text) == TEXT["msg_totp_already_on"]
    new_secret = b"n" * 20
    enrollment = ezauth.issue_enrollment("alice", service.stores.users.fingerprint("alice"), new_secret,
                                         service.stores.keys.signer(clock()), clock())
    change(client, "totp_confirm", 409, enrollment=enrollment, code=ezauth.totp(new_secret, clock()),
           current=PASSWORD)
    assert service.stores.totp.accept("alice", ezauth.totp(original, clock() + 30), clock() + 30)


def test_no_window_after_a_login_or_an_earlier_password(client, service, clock):
    """Entering the password once opens nothing: each lasting change asks again, at once or later."""
    login(client)
    change(client, "token_create", 200, label="first", current=PASSWORD)
    change(client, "token_create", 403, label="second")
    clock.advance(5)
    change(client, "token_create", 403, label="second")
    change(client, "password", 403, new=NEW_PASSWORD, again=NEW_PASSWORD)
    assert tokens_of(service) == ["first"]
    assert service.stores.users.check("alice", PASSWORD)


def test_viewing_the_page_ending_sessions_and_revoking_tokens_need_no_password(data_dir, clock):
    app, client = build(data_dir, clock)
    login(client)
    other = session_token(new_client(app))
    token, secret = app.stores.tokens.add("alice", "script", clock())
    client.get(ACCOUNT, headers=FORWARDED, status=200)
    change(client, "end_session", sid=sid_of(other))
    change(client, "token_revoke", id=token.id)
    tick(clock, client)
    verify(new_client(app), 401, other)
    verify(new_client(app), 401, Authorization=bearer(secret))


# -- 2. Tokens die with the password ------------------------------------------------------------


def test_a_password_change_revokes_the_users_tokens_and_says_how_many(data_dir, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    app, client = build(data_dir, clock)
    login(client)
    secrets_ = [app.stores.tokens.add("alice", label, clock())[1] for label in ("one", "two")]
    bobs = app.stores.tokens.add("bob", "bob's", clock())[1]
    reply = change(client, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD)
    assert reply.headers["Location"] == f"{ACCOUNT}?done=password_changed&count=2"
    page = client.get(reply.headers["Location"], headers=FORWARDED, status=200)
    assert notice_text(page.text) == TEXT["msg_password_changed"].format(count=2)
    tick(clock, client)
    for secret in secrets_:
        verify(new_client(app), 401, Authorization=bearer(secret))
        verify(new_client(app), 401, Authorization=basic("alice", secret))
    verify(new_client(app), 200, Authorization=bearer(bobs))
    assert tokens_of(app) == []
    assert events(caplog, "account_password_changed") == [
        f"event=account_password_changed user=alice ip={CLIENT_IP} tokens_revoked=2"]


def test_a_password_change_keeps_the_tokens_only_when_asked_to(data_dir, clock):
    app, client = build(data_dir, clock)
    login(client)
    page = client.get(ACCOUNT, headers=FORWARDED, status=200).text
    box = [a for t, a in parse_page(page).tags if t == "input" and a.get("name") == "keep_tokens"]
    assert len(box) == 1 and "checked" not in box[0]  # unticked unless the user ticks it
    secret = app.stores.tokens.add("alice", "script", clock())[1]
    reply = change(client, "password", current=PASSWORD, new=NEW_PASSWORD, again=NEW_PASSWORD, keep_tokens="1")
    page = client.get(reply.headers["Location"], headers=FORWARDED, status=200)
    assert notice_text(page.text) == TEXT["msg_password_changed_kept"]
    tick(clock, client)
    verify(new_client(app), 200, Authorization=bearer(secret))


def test_log_out_everywhere_this_browser_too_ends_every_session_and_token(data_dir, clock, caplog):
    """What to press when a cookie may have been copied: the copy is a session like any other."""
    caplog.set_level(logging.INFO, logger="ezauth")
    app, client = build(data_dir, clock)
    mine = session_token(client)
    copied = mine  # a script or a thief holding this very cookie
    phone = session_token(new_client(app))
    secret = app.stores.tokens.add("alice", "script", clock())[1]
    bobs_session = session_token(new_client(app), "bob")
    reply = change(client, "end_all")
    assert reply.headers["Location"] == LOGIN
    cleared = cookie_attrs(cookie_header(reply))
    assert cleared["max-age"] == "0"
    tick(clock, client)
    for token in (copied, phone):
        verify(new_client(app), 401, token)
    verify(new_client(app), 401, Authorization=bearer(secret))
    verify(new_client(app), 200, bobs_session)
    assert events(caplog, "account_ended_everywhere") == [
        f"event=account_ended_everywhere user=alice ip={CLIENT_IP} sessions=2 tokens_revoked=1"]


# -- 3. The gate's own pages refuse in-page requests ---------------------------------------------


@pytest.mark.parametrize("path", [LOGIN, LOGOUT, ACCOUNT])
@pytest.mark.parametrize("dest", ["empty", "iframe", "frame", "script", "image", "style", "embed", "object",
                                  "worker", "nested-document"])
def test_a_page_with_a_csrf_token_answers_only_a_top_level_navigation(client, path, dest):
    login(client)
    refused = client.get(path, headers={"Sec-Fetch-Dest": dest, "Sec-Fetch-Mode": "cors",
                                        "Sec-Fetch-Site": "same-origin"}, status=403)
    assert "Set-Cookie" not in refused.headers
    assert "csrf" not in refused.text and not re.search(r"[A-Za-z0-9_-]{40,}", refused.text)
    assert refused.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("path", [LOGIN, LOGOUT, ACCOUNT])
@pytest.mark.parametrize("headers", [{"Sec-Fetch-Dest": "document", "Sec-Fetch-Mode": "navigate",
                                      "Sec-Fetch-Site": "cross-site"}, {}], ids=["navigation", "no-fetch-metadata"])
def test_a_navigation_or_a_client_without_fetch_metadata_gets_the_page(client, path, headers):
    login(client)
    page = client.get(path, headers=headers, status=200)
    assert form_field(page.text, "csrf")
    assert page.headers["Cross-Origin-Opener-Policy"] == "same-origin"


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_change_from_another_site_is_refused_even_with_the_right_token(data_dir, clock, site):
    app, client = build(data_dir, clock)
    mine = session_token(client)
    csrf = form_field(client.get(ACCOUNT, headers=FORWARDED, status=200).text, "csrf")
    headers = {**FORWARDED, "Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    for path, form in ((ACCOUNT, {"action": "end_all"}), (LOGOUT, {}),
                       (LOGIN, {"username": "alice", "password": PASSWORD, "rd": "/"})):
        refused = client.post(path, {"csrf": csrf, **form}, headers=headers, status=403)
        assert "Set-Cookie" not in refused.headers
    verify(new_client(app), 200, mine)
    same = client.post(LOGOUT, {"csrf": csrf}, headers={**headers, "Sec-Fetch-Site": "same-origin"}, status=303)
    assert same.headers["Location"] == LOGIN
    tick(clock, client)
    verify(new_client(app), 401, mine)


@pytest.mark.parametrize("dest", ["empty", "iframe", "worker"])
def test_a_post_from_a_script_is_refused_and_its_answer_holds_no_token(data_dir, clock, dest):
    """A refused form shows its page again, CSRF token and all: a fetch() on the app's own origin
    (same-origin, the right token or a junk one) gets a bare 403 instead, and changes nothing."""
    app, client = build(data_dir, clock)
    mine = session_token(client)
    csrf = form_field(client.get(ACCOUNT, headers=FORWARDED, status=200).text, "csrf")
    headers = {**FORWARDED, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": dest}
    for token in (csrf, "x" * 43):
        for path, form in ((ACCOUNT, {"action": "end_all"}), (ACCOUNT, {"action": "totp_begin"}),
                           (LOGOUT, {}), (LOGIN, {"username": "alice", "password": "a guess", "rd": "/"})):
            refused = client.post(path, {"csrf": token, **form}, headers=headers, status=403)
            assert "Set-Cookie" not in refused.headers
            assert csrf not in refused.text and "csrf" not in refused.text
    tick(clock, client)
    verify(new_client(app), 200, mine)
    page = {**headers, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    client.post(LOGOUT, {"csrf": csrf}, headers=page, status=303)  # the same post as a form
    tick(clock, client)
    verify(new_client(app), 401, mine)


# -- 4. Logout is a POST with the CSRF token ---------------------------------------------------


def test_get_logout_shows_a_button_and_ends_nothing(data_dir, clock):
    app, client = build(data_dir, clock)
    mine = session_token(client)
    page = client.get(LOGOUT, status=200)
    forms = [a for t, a in parse_page(page.text).tags if t == "form"]
    assert [(f["method"], f["action"]) for f in forms] == [("post", LOGOUT)]
    assert form_field(page.text, "csrf")
    assert TEXT["msg_signed_in"].format(user="alice") in page.text
    assert "<script" not in page.text.split("</head>")[1]  # the button works without JavaScript
    tick(clock, client)
    verify(new_client(app), 200, mine)


def test_a_cross_site_link_or_form_without_the_token_cannot_log_anyone_out(data_dir, clock):
    app, client = build(data_dir, clock)
    mine = session_token(client)
    client.get(LOGOUT, status=200)  # the browser holds a CSRF cookie
    refused = client.post(LOGOUT, {"other": "field"}, status=403)
    assert error_text(refused.text) == TEXT["msg_csrf"]
    client.post(LOGOUT, {"csrf": "x" * 43}, status=403)
    tick(clock, client)
    verify(new_client(app), 200, mine)


def test_the_forbidden_pages_link_to_log_in_as_someone_else_still_works(client):
    login(client)
    link = [a["href"] for t, a in parse_page(client.get("/ezauth/forbidden", status=403).text).tags
            if t == "a" and a.get("href", "").endswith("/logout")]
    assert link == [LOGOUT]
    page = client.get(link[0], status=200)
    client.post(LOGOUT, {"csrf": form_field(page.text, "csrf")}, status=303)


# -- 5. An absolute lifetime ---------------------------------------------------------------------


@pytest.mark.parametrize("remember", [False, True], ids=["session", "remember-me"])
def test_a_session_in_constant_use_ends_at_its_login_time_plus_the_max_age(data_dir, clock, remember):
    app, client = build(data_dir, clock, session_ttl=1800, remember_ttl=30 * 86400, session_max_age=3 * 86400)
    token = session_token(client, remember=remember)
    login_time = int(clock())
    assert jwt_parts(token)[1]["auth_time"] == login_time
    step = 600 if not remember else 6 * 3600
    while clock() + step < login_time + 3 * 86400:
        clock.advance(step)
        answer = verify(new_client(app), 200, token)
        renewed = cookie_header(answer)
        if renewed:
            token = token_of(renewed)
            claims = jwt_parts(token)[1]
            assert claims["auth_time"] == login_time and claims["exp"] <= login_time + 3 * 86400
    clock.now = login_time + 3 * 86400
    verify(new_client(app), 401, token)


def test_a_max_age_below_the_session_ttl_is_refused_at_start(data_dir):
    with pytest.raises(ezauth.SettingsError, match="EZAUTH_SESSION_MAX_AGE"):
        ezauth.Settings(data_dir=data_dir, session_ttl=1800, session_max_age=600)
    ezauth.Settings(data_dir=data_dir, session_ttl=1800, session_max_age=1800)


def test_a_session_token_without_its_login_time_is_refused(service, client, clock):
    login(client)
    key = service.stores.keys.signer(clock())
    claims = {"sub": "alice", "iat": int(clock()), "exp": int(clock()) + 600, "rem": 0, "sid": "a" * 32,
              "fp": service.stores.users.fingerprint("alice")}
    for extra in ({}, {"auth_time": "yesterday"}, {"auth_time": int(clock()) + 100}):
        forged = jwt.encode({**claims, **extra}, key.secret, algorithm="HS256", headers={"kid": key.kid})
        verify(new_client(service), 401, forged)


# -- 7. Cookies plain http cannot touch ----------------------------------------------------------


def set_cookies(reply) -> dict[str, dict[str, str]]:
    """Every cookie a reply sets: name -> its attributes (with its value under "value")."""
    found = {}
    for header in reply.headers.getall("Set-Cookie"):
        name, _, rest = header.partition("=")
        found[name] = {**cookie_attrs(header), "value": rest.partition(";")[0]}
    return found


@pytest.mark.parametrize(("how", "overrides", "session_name"), [
    ("https", {}, "__Host-ezauth"),
    ("https", {"cookie_domain": ".example.test"}, "__Secure-ezauth"),
    ("http", {"cookie_secure": "1"}, "__Host-ezauth"),
    ("http", {}, "ezauth"),
    ("https", {"cookie_secure": "0"}, "ezauth"),
])
def test_cookie_names_follow_the_scheme(data_dir, clock, how, overrides, session_name):
    app, client = build(data_dir, clock, **overrides)
    headers = {**FORWARDED, **(HTTPS if how == "https" else {})}
    page = client.get(LOGIN, headers=headers, status=200)
    csrf = set_cookies(page)
    prefixed = session_name != "ezauth"
    csrf_name = "__Host-ezauth_csrf" if prefixed else "ezauth_csrf"
    assert list(csrf) == [csrf_name]
    assert csrf[csrf_name]["path"] == ("/" if prefixed else "/ezauth/")
    assert ("secure" in csrf[csrf_name]) == prefixed and "domain" not in csrf[csrf_name]
    form = {"csrf": form_field(page.text, "csrf"), "rd": "/", "username": "alice", "password": PASSWORD}
    jar = {"Cookie": f"{csrf_name}={csrf[csrf_name]['value']}"}
    reply = client.post(LOGIN, form, headers={**headers, **jar}, status=303)
    session = set_cookies(reply)
    assert list(session) == [session_name]
    attrs = session[session_name]
    assert attrs["path"] == "/" and ("secure" in attrs) == prefixed
    assert ("domain" in attrs) == (session_name == "__Secure-ezauth" or "cookie_domain" in overrides)
    verify(new_client(app), 200, Cookie=f"{session_name}={attrs['value']}", **(VIA_HTTPS if how == "https" else {}))


def test_over_https_verify_reads_no_unprefixed_session_cookie(data_dir, clock):
    """A cookie tossed in over plain http (another port of the same host) must not count over https."""
    app, client = build(data_dir, clock)
    token = session_token(client)  # a real, live session, but under the plain name
    verify(new_client(app), 401, Cookie=f"ezauth={token}", **VIA_HTTPS)
    verify(new_client(app), 200, Cookie=f"__Host-ezauth={token}", **VIA_HTTPS)
    verify(new_client(app), 200, Cookie=f"ezauth={token}")
    verify(new_client(app), 401, Cookie=f"__Secure-ezauth={token}", **VIA_HTTPS)  # no domain set


def test_a_plain_http_login_beside_an_https_session_works(data_dir, clock):
    """https on 8443 and http on 8081 of one host share cookies: the http page used to be refused its
    CSRF cookie (the browser keeps the https one, Secure) and looped on "This form has expired"."""
    app, client = build(data_dir, clock)
    https_page = client.get(LOGIN, headers=HTTPS, status=200)
    https_csrf = set_cookies(https_page)["__Host-ezauth_csrf"]["value"]
    https_session = session_token(new_client(app))
    jar = f"__Host-ezauth_csrf={https_csrf}; __Host-ezauth={https_session}"  # what the browser holds
    http_page = client.get(LOGIN, headers={"Cookie": jar}, status=200)
    http_csrf = set_cookies(http_page)["ezauth_csrf"]["value"]
    assert form_field(http_page.text, "csrf") == http_csrf != https_csrf
    reply = client.post(LOGIN, {"csrf": http_csrf, "rd": "/", "username": "alice", "password": PASSWORD},
                        headers={"Cookie": f"{jar}; ezauth_csrf={http_csrf}"}, status=303)
    assert list(set_cookies(reply)) == ["ezauth"]


@pytest.mark.parametrize(("cookie", "app_cookie"), [
    ("ezauth=T", ";"),
    ("theme=dark; ezauth=T; lang=zh", ";theme=dark; lang=zh"),
    ("a=1; __Host-ezauth=T; ezauth=T; __Secure-ezauth=x; ezauth_csrf=c; __Host-ezauth_csrf=c; b=2", ";a=1; b=2"),
    ("ezauth =T;ezauth_csrf= c ;ezauth_csrf=d;x=ezauth=y", ";x=ezauth=y"),
    ("myezauth=1; ezauth=T; ezauthx=2", ";myezauth=1; ezauthx=2"),
])
def test_verify_hands_nginx_the_cookie_header_without_any_of_ezauths_cookies(service, client, cookie, app_cookie):
    token = session_token(client)
    answer = verify(new_client(service), 200, Cookie=cookie.replace("T", token))
    assert answer.headers["X-Ezauth-App-Cookie"] == app_cookie
    assert token not in answer.headers["X-Ezauth-App-Cookie"]


def test_verify_without_any_ezauth_cookie_leaves_the_cookie_header_alone(service, client):
    secret = service.stores.tokens.add("alice", "script", service.clock())[1]
    answer = verify(new_client(service), 200, Authorization=bearer(secret), Cookie="theme=dark")
    assert "X-Ezauth-App-Cookie" not in answer.headers


def test_sessions_of_two_users_in_one_request_are_refused(data_dir, clock, caplog):
    """A sibling host under the cookie domain could toss in its own session (on a longer path, so it
    comes first) to make the visitor act as someone else."""
    app, _ = build(data_dir, clock, cookie_domain=".example.test")
    alices, bobs = session_token(new_client(app)), session_token(new_client(app), "bob")
    verify(new_client(app), 401, Cookie=f"ezauth={bobs}; ezauth={alices}")
    assert events(caplog, "verify_refused")[-1].startswith("event=verify_refused reason=sessions_of_two_users")
    verify(new_client(app), 200, Cookie=f"ezauth={alices}; ezauth={alices}")


# -- 8. One host -----------------------------------------------------------------------------


@pytest.mark.parametrize(("original_host", "host", "status"), [
    ("public.example.test", "private.example.test", 403),
    ("public.example.test", "public.example.test.evil", 403),
    ("public.example.test", "public.example.test:8443", 200),
    ("public.example.test", "Public.Example.Test.", 200),
    ("public.example.test", "[::1]", 403),
])
def test_the_host_rules_judge_is_the_host_the_app_gets(data_dir, clock, original_host, host, status):
    app, client = build(data_dir, clock)
    (data_dir / "rules").write_text("allow alice public.example.test /\n")
    app.stores.rules.reload()
    token = session_token(client)
    verify(new_client(app), status, token, uri="/x", host=original_host, Host=host)


# -- 9. A password typed into the user name field ----------------------------------------------


def test_an_unknown_user_name_reaches_logs_and_the_lockout_only_as_a_keyed_hash(data_dir, clock, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    _, client = build(data_dir, clock)
    typed = "Tr0ub4dor&3-in-the-name-field"
    login(client, typed, "whatever", status=401)
    login(client, "alice", "not my password", status=401)
    login(client, typed, "whatever", status=401)
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if "Tr0ub4dor" in line]
    failed = events(caplog, "login_failed")
    hashed = re.fullmatch(r"event=login_failed user=(hash:[0-9a-f]{16}) ip=127\.0\.0\.1", failed[0])
    assert hashed and failed[2] == failed[0]  # the same name, the same hash: repeats stay visible
    assert failed[1] == "event=login_failed user=alice ip=127.0.0.1"
    assert b"Tr0ub4dor" not in (data_dir / "throttle.sqlite3").read_bytes()
    with sqlite3.connect(data_dir / "throttle.sqlite3") as db:
        keys = {row[0] for row in db.execute("SELECT key FROM attempts")}
    assert f"user:{hashed[1]}" in keys and "user:alice" in keys
    assert (data_dir / "names.key").stat().st_mode & 0o777 == 0o600
    _, other = build(data_dir.parent / "elsewhere", clock)
    caplog.clear()
    login(other, typed, "whatever", status=401)
    assert hashed[1] not in events(caplog, "login_failed")[0]  # keyed per data dir, not a plain digest
