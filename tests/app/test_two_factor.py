"""Beyond the basics: TOTP, access rules, single sign-on, HTTP Basic for API clients, metrics."""

from __future__ import annotations

import base64
import logging
import re
import stat
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import webtest

import ezauth
from tests.support.app import login, verify
from tests.support.basics import (
    CSRF,
    LOGIN,
    PASSWORD,
    T0,
    VERIFY,
    basic,
    fail2ban_lines,
    fail2ban_re,
    parse_page,
    wait_until,
)
from tests.support.browser import AXE, expect, finish_animations, login_url, open_page, run_axe, submit
from tests.support.nginx import Browser, echo_header, login_through_nginx, start_stub_app
from tests.support.process import Reply, add_user, http_call, real_login, run_cli

RFC_SECRET = b"12345678901234567890"
SD = "sd.example.com"  # the host the rules below are about


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
    session = ezauth.Session("alice", "fp", keys.signer(T0).kid, int(T0), int(T0) + 600, False, "test-session-id-00001")
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


def test_totp_cli_enrolls_prints_the_uri_and_removes(tmp_path):
    data = tmp_path / "data"
    add_user(data, "carol")
    done = run_cli("totp", "carol", data_dir=data)
    assert done.returncode == 0, done.stderr
    assert re.search(r"otpauth://totp/ezauth%3Acarol\?secret=[A-Z2-7]{32}&", done.stdout)
    assert stat.S_IMODE((data / "totp").stat().st_mode) == 0o600
    assert run_cli("totp", "nobody", data_dir=data).returncode == 1
    assert run_cli("totp", "carol", "--remove", data_dir=data).returncode == 0
    assert (data / "totp").read_text() == ""
    assert run_cli("totp", "carol", "--remove", data_dir=data).returncode == 1


# -- Access rules ---------------------------------------------------------------------------


RULES = """\
# admins may go anywhere; friends only to the image generator
group admins: alice
group friends: bob carol
allow @admins * /
deny @friends * /admin
allow @friends sd.example.com /
allow dave *.example.com /public/
"""


@pytest.mark.parametrize("user, host, path, allowed", [
    ("alice", "anything.example", "/admin/x", True),
    ("bob", "sd.example.com", "/", True),
    ("bob", "sd.example.com", "/admin", False),
    ("bob", "notes.example.com", "/", False),
    ("carol", "sd.example.com", "/img", True),
    ("dave", "notes.example.com", "/public/a", True),
    ("dave", "notes.example.com", "/private", False),
    ("dave", "example.com", "/public/a", False),
    ("erin", "sd.example.com", "/", False),  # no rule matches: denied
])
def test_first_matching_rule_decides(user, host, path, allowed):
    assert ezauth.parse_rules(RULES).allows(user, host, path) is allowed


@pytest.mark.parametrize("text, line", [
    ("allow * * /\npermit bob * /\n", 2),
    ("allow @nobody * /\n", 1),
    ("allow bob * admin\n", 1),
    ("allow bob\n", 1),
    ("group x: b@d!\n", 1),
])
def test_malformed_rules_name_the_line(text, line):
    with pytest.raises(ValueError, match=f"line {line}:"):
        ezauth.parse_rules(text)


@pytest.mark.parametrize("uri, path", [
    ("/admin", "/admin"), ("/a/../admin?x=/", "/admin"), ("//admin", "/admin"), ("/%61dmin", "/admin"),
    ("/x/..%2Fadmin", "/admin"), ("/x/%252e%252e/admin", "/admin"), ("/./admin/", "/admin/"),
    ("/../../admin", "/admin"), ("http://h/admin?q", "/admin"), ("", "/"),
])
def test_rules_see_the_normalised_path(uri, path):
    assert ezauth.rules_path(uri) == path


def test_without_a_rules_file_every_logged_in_user_gets_everywhere(client):
    login(client, "bob")
    verify(client, 200, uri="/admin", host="notes.example.com")


def test_rules_answer_403_for_a_user_outside_them(settings, make_client):
    (settings.data_dir / "rules").write_text(RULES)
    _, client = make_client()
    login(client, "bob")
    verify(client, 200, uri="/app/?a=1", host=SD)
    verify(client, 403, uri="/admin/users", host=SD)
    verify(client, 403, uri="/x/../admin", host=SD)
    verify(client, 403, uri="/", host="notes.example.com")


def test_rules_are_reloaded_and_a_broken_edit_keeps_the_previous_ones(settings, make_client, clock, caplog):
    rules = settings.data_dir / "rules"
    rules.write_text(RULES)
    _, client = make_client()
    login(client, "bob")
    verify(client, 403, uri="/admin", host=SD)
    rules.write_text("allow bob * /\n")
    clock.now += 1.5
    verify(client, 200, uri="/admin", host=SD)
    rules.write_text("allow bob * /\nallow bob everywhere\n")
    clock.now += 1.5
    with caplog.at_level(logging.ERROR, "ezauth"):
        verify(client, 200, uri="/admin", host=SD)
    assert "event=rules_rejected" in caplog.text and "line 2" in caplog.text
    rules.unlink()
    clock.now += 1.5
    verify(client, 200, uri="/admin", host="other.example")


def test_a_broken_rules_file_at_start_denies_everyone(settings, make_client):
    (settings.data_dir / "rules").write_text("allow everyone\n")
    _, client = make_client()
    login(client)
    verify(client, 403, uri="/", host=SD)


def test_forbidden_page_is_friendly_and_escaped(client):
    page = client.get("/ezauth/forbidden", status=403, headers={"Accept-Language": "zh-CN"})
    assert ezauth.PAGE_TEXT["zh-CN"]["forbidden_text"] in page.text
    assert page.html.find("a", href="/ezauth/logout")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


# -- HTTP Basic ----------------------------------------------------------------------------


@pytest.fixture
def api(make_client) -> webtest.TestApp:
    return make_client(basic_auth=True)[1]


def test_basic_auth_is_off_by_default(client):
    denied = verify(client, 401, Authorization=basic("alice", PASSWORD))
    assert denied.headers["WWW-Authenticate"] == 'Bearer realm="ezauth"'  # never a browser's password dialog


def test_basic_auth_lets_an_api_client_in_and_asks_nginx_to_strip_the_header(api):
    allowed = verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert allowed.headers["X-Auth-Request-User"] == "alice"
    assert allowed.headers["X-Ezauth-Authorization"] == "strip"


@pytest.mark.parametrize("header", [basic("alice", "wrong password"), basic("nobody", PASSWORD), "Basic %%%",
                                    "Basic " + base64.b64encode(b"no-colon").decode()])
def test_bad_basic_credentials_get_401_with_the_challenge(api, header):
    denied = verify(api, 401, Authorization=header)
    assert denied.headers["WWW-Authenticate"] == 'Basic realm="ezauth"'


def test_browsers_without_credentials_get_no_challenge(api):
    navigating = verify(api, 401, Accept="text/html,application/xhtml+xml", Sec_Fetch_Mode="navigate")
    assert "WWW-Authenticate" not in navigating.headers and "X-Ezauth-Error" not in navigating.headers
    # In-page requests of a logged-out tab get a challenge no browser answers with a password dialog.
    fetching = verify(api, 401, Accept="*/*", Sec_Fetch_Mode="cors")
    assert fetching.headers["WWW-Authenticate"] == 'Bearer realm="ezauth"'
    assert fetching.headers["X-Ezauth-Error"] == "login_required"


def test_basic_credentials_are_cached_for_a_minute_by_keyed_hash(api, clock, monkeypatch):
    checks = []
    real_check = ezauth.Users.check
    monkeypatch.setattr(ezauth.Users, "check", lambda self, n, p: checks.append(n) or real_check(self, n, p))
    for _ in range(3):
        verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert checks == ["alice"]
    clock.now += 61
    verify(api, 200, Authorization=basic("alice", PASSWORD))
    assert checks == ["alice", "alice"]


def test_basic_cache_keeps_no_password_and_stays_bounded(settings):
    users = ezauth.Users(settings.data_dir / "users")
    cache = ezauth.BasicCache()
    digest = cache.digest("alice", PASSWORD)
    assert digest != ezauth.BasicCache().digest("alice", PASSWORD)  # a random key per process
    cache.put(digest, "alice", users.fingerprint("alice"), T0)
    assert cache.get(digest, users.fingerprint, T0 + 59) == "alice"
    assert cache.get(digest, users.fingerprint, T0 + 60) is None
    assert cache.get(digest, lambda name: "another factor", T0 + 1) is None
    assert PASSWORD not in repr(cache.__dict__)
    for n in range(cache.MAX + 10):
        cache.put(cache.digest("alice", str(n)), "alice", "fp", T0 + 100)
    assert len(cache._entries) <= cache.MAX


def test_a_password_change_ends_cached_basic_credentials(api, clock, settings):
    verify(api, 200, Authorization=basic("alice", PASSWORD))
    ezauth.Users(settings.data_dir / "users").set_password("alice", "another password")
    clock.now += 1.5
    verify(api, 401, Authorization=basic("alice", PASSWORD))


def test_basic_failures_share_the_login_lockout(api):
    for _ in range(5):
        verify(api, 401, Authorization=basic("alice", "wrong password"))
    verify(api, 401, Authorization=basic("alice", PASSWORD))
    login(api, status=429)


def test_two_factor_users_cannot_use_basic(api, alice_secret):
    verify(api, 401, Authorization=basic("alice", PASSWORD))


def test_basic_users_are_subject_to_the_rules(settings, make_client):
    (settings.data_dir / "rules").write_text("allow alice * /api/\n")
    _, api = make_client(basic_auth=True)
    verify(api, 200, uri="/api/v1/txt2img", host=SD, Authorization=basic("alice", PASSWORD))
    verify(api, 403, uri="/settings", host=SD, Authorization=basic("alice", PASSWORD))


# -- Metrics -------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, (name, text)
    return float(match.group(1))


def test_metrics_are_off_by_default(client):
    client.get("/ezauth/metrics", status=404)


@pytest.mark.parametrize("peer, forwarded, status", [
    ("127.0.0.1", None, 200),
    ("::1", None, 200),
    ("127.0.0.1", "127.0.0.1", 200),
    ("127.0.0.1", "203.0.113.9", 404),  # through nginx: the visitor is the real client
    ("203.0.113.9", None, 404),
    ("10.0.0.5", None, 200),  # a trusted proxy itself (e.g. Prometheus on that host)
])
def test_metrics_only_for_loopback_and_trusted_proxies(make_client, peer, forwarded, status):
    trusted = (*ezauth.DEFAULT_PROXIES, ezauth.ipaddress.ip_network("10.0.0.0/8"))
    _, client = make_client(metrics=True, trusted_proxies=trusted)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    client.get("/ezauth/metrics", headers=headers, extra_environ={"REMOTE_ADDR": peer}, status=status)


def test_metrics_count_what_happened(settings, make_client, clock):
    _, client = make_client(metrics=True, session_ttl=100, max_attempts=3)
    login(client, password="wrong password", status=401)
    login(client)
    verify(client, 200)
    clock.now += 60  # past half the session: renewed
    verify(client, 200)
    ezauth.KeyRing(settings.data_dir / "keys.json", 86400, 86400, clock.now).rotate(clock.now)  # as `rotate` does
    clock.now += 1.5
    client.reset()
    verify(client, 401)
    login(client, "bob", "wrong password", status=401)
    login(client, "bob", "wrong password", status=401)
    login(client, "bob", status=429)
    page = client.get("/ezauth/metrics")
    assert page.content_type == "text/plain"
    text = page.text
    assert metric(text, 'ezauth_logins_total{result="ok"}') == 1
    assert metric(text, 'ezauth_logins_total{result="failed"}') == 3
    assert metric(text, 'ezauth_logins_total{result="locked"}') == 1
    assert metric(text, 'ezauth_verify_total{result="allowed"}') == 2
    assert metric(text, 'ezauth_verify_total{result="denied"}') == 1
    assert metric(text, "ezauth_sessions_renewed_total") == 1
    assert metric(text, "ezauth_key_rotations_total") == 1
    assert metric(text, "ezauth_visits") == 5
    assert metric(text, "process_start_time_seconds") == T0
    for name in ("ezauth_logins_total", "ezauth_verify_total", "ezauth_sessions_renewed_total"):
        assert f"# TYPE {name} counter" in text
    assert "# TYPE ezauth_visits gauge" in text


@pytest.mark.parametrize("env, attr", [("EZAUTH_METRICS", "metrics"), ("EZAUTH_BASIC_AUTH", "basic_auth")])
def test_new_settings_are_off_by_default_and_validated(tmp_path, env, attr):
    assert getattr(ezauth.Settings.from_env({}, env_file=tmp_path / "none"), attr) is False
    assert getattr(ezauth.Settings.from_env({env: "1"}, env_file=tmp_path / "none"), attr) is True
    with pytest.raises(ezauth.SettingsError, match=env):
        ezauth.Settings.from_env({env: "maybe"}, env_file=tmp_path / "none")


# -- Through a real nginx --------------------------------------------------------------------


DOMAIN = "example.test"


def two_subdomains(second_app_port: int) -> callable:
    """Do what the config's comment says: copy the server block per subdomain, changing
    only server_name and the app's address."""
    def edit(site: str) -> str:
        start = site.index("\nserver {")
        block = site[start:]
        assert block.count("server_name _;") == 1
        first = block.replace("server_name _;", f"server_name sd.{DOMAIN};")
        second = re.sub(r"proxy_pass http://127\.0\.0\.1:\d+;", f"proxy_pass http://127.0.0.1:{second_app_port};",
                        block.replace("server_name _;", f"server_name notes.{DOMAIN};"))
        assert second != block.replace("server_name _;", f"server_name notes.{DOMAIN};")
        return site[:start] + first + second
    return edit


def host_get(browser: Browser, host: str, path: str, cookie: str = "", **headers: str) -> Reply:
    sent = {"Host": host, **headers}
    if cookie:
        sent["Cookie"] = cookie
    return browser.request("GET", path, headers=sent)


def post_login_on(browser: Browser, host: str, page: Reply, user: str = "alice", rd: str | None = None) -> Reply:
    """Post the login form of PAGE (served on HOST) with its CSRF cookie and nothing else: the tiny
    browser's jar ignores hosts, so the test says which cookie goes where."""
    csrf_cookie = next(c.split(";")[0] for c in page.set_cookies if c.startswith("ezauth_csrf="))
    fields = {"csrf": parse_page(page.text).hidden["csrf"], "username": user, "password": PASSWORD}
    if rd is not None:
        fields["rd"] = rd
    return browser.request("POST", LOGIN, urlencode(fields).encode(),
                           {"Host": host, "Cookie": csrf_cookie, "Content-Type": "application/x-www-form-urlencoded"})


@pytest.mark.nginx
def test_one_login_covers_two_subdomains_through_nginx(make_stack):
    notes_app = start_stub_app()
    try:
        stack = make_stack(edit=two_subdomains(notes_app.port), EZAUTH_COOKIE_DOMAIN=f".{DOMAIN}")
        browser = stack.browser()
        sd, notes = f"sd.{DOMAIN}", f"notes.{DOMAIN}"
        assert host_get(browser, notes, "/n").status == 302
        page = host_get(browser, sd, LOGIN)
        done = post_login_on(browser, sd, page, rd=f"http://notes.{DOMAIN}/n?x=1")
        assert done.status == 303 and done.location == f"http://notes.{DOMAIN}/n?x=1"
        session = next(c for c in done.set_cookies if c.startswith("ezauth="))
        assert f"Domain={DOMAIN}" in session
        cookie = session.split(";")[0]
        on_notes = host_get(browser, notes, "/n", cookie)
        assert on_notes.echo()["path"] == "/n" and notes_app.seen == ["/n"]
        assert echo_header(on_notes.echo(), "X-Auth-Request-User") == ["alice"]
        assert host_get(browser, sd, "/s", cookie).echo()["path"] == "/s"
        assert post_login_on(browser, sd, page, rd="http://evil.example/n").location == "/"
        assert post_login_on(browser, sd, page, rd=f"http://{DOMAIN}.evil.example/").location == "/"
        out = host_get(browser, notes, "/ezauth/logout", cookie)
        cleared = [c for c in out.set_cookies if c.startswith("ezauth=;")]
        assert len(cleared) == 2 and any(f"Domain={DOMAIN}" in c for c in cleared)
    finally:
        notes_app.close()


@pytest.mark.nginx
def test_rules_show_the_friendly_403_page_through_nginx(make_stack):
    stack = make_stack(users=("alice", "bob"))
    (stack.ezauth.data_dir / "rules").write_text(f"allow alice * /\nallow bob sd.{DOMAIN} /\n")
    browser = stack.browser()
    done = post_login_on(browser, f"sd.{DOMAIN}", host_get(browser, f"sd.{DOMAIN}", LOGIN), user="bob")
    cookie = next(c for c in done.set_cookies if c.startswith("ezauth=")).split(";")[0]
    # ezauth rereads its files at most once a second: ask it directly (never reaching the app) until
    # the new rules decide.
    asked = {"Cookie": cookie, "X-Original-URI": "/x", "X-Original-Host": f"notes.{DOMAIN}"}
    assert wait_until(lambda: http_call(stack.ezauth.port, "GET", VERIFY, headers=asked).status == 403)
    assert host_get(browser, f"sd.{DOMAIN}", "/x", cookie).echo()["path"] == "/x"
    refused = host_get(browser, f"notes.{DOMAIN}", "/x", cookie)
    assert refused.status == 403
    assert ezauth.PAGE_TEXT["en"]["forbidden_text"] in refused.text
    assert stack.app.seen == ["/x"]


@pytest.mark.nginx
def test_basic_auth_through_nginx_keeps_the_password_from_the_app(make_stack):
    stack = make_stack(EZAUTH_BASIC_AUTH="1")
    browser = stack.browser()
    ok = browser.get("/api/v1", Authorization=basic("alice", PASSWORD))
    assert echo_header(ok.echo(), "X-Auth-Request-User") == ["alice"]
    assert echo_header(ok.echo(), "Authorization") == []
    wrong = browser.get("/api/v1", Authorization=basic("alice", "wrong password"))
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"] == 'Basic realm="ezauth"'
    assert browser.get("/api/v1").status == 302  # a browser still gets the login page
    assert stack.app.seen == ["/api/v1"]


@pytest.mark.nginx
def test_the_apps_own_authorization_header_still_reaches_it(make_stack):
    stack = make_stack(EZAUTH_BASIC_AUTH="1")
    browser = stack.browser()
    login_through_nginx(browser)
    echo = browser.get("/api", Authorization="Bearer app-token").echo()
    assert echo_header(echo, "Authorization") == ["Bearer app-token"]


def test_metrics_reach_a_scraper_on_loopback(server_factory):
    server = server_factory(EZAUTH_METRICS="1")
    reply = http_call(server.port, "GET", "/ezauth/metrics")
    assert reply.status == 200, reply.text
    assert metric(reply.text, 'ezauth_verify_total{result="allowed"}') == 0
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")


# -- The code step in a real browser --------------------------------------------------------


@pytest.mark.browser
def test_code_step_in_a_real_browser_is_focused_accessible_and_logs_in(chromium, lenient_server):
    server = lenient_server
    enrolled = run_cli("totp", "alice", data_dir=server.data_dir)
    secret = parse_qs(urlsplit(re.search(r"otpauth://\S+", enrolled.stdout).group()).query)["secret"][0]
    secret_bytes = base64.b32decode(secret + "=" * (-len(secret) % 8))
    # The server rereads its files at most once a second: wait until the password alone stops logging
    # alice in (a code page, 200, instead of a session, 303).
    assert wait_until(lambda: real_login(server.port, csrf=CSRF, status="*").status == 200)
    with open_page(chromium, server, bypass_csp=True) as (page, watch):
        page.goto(login_url(server, "/ezauth/healthz"))
        assert submit(page, "alice", PASSWORD).status == 200
        expect(page.locator("#code")).to_be_focused()
        expect(page.locator("#password")).to_be_hidden()
        page.fill("#code", "000000")
        with page.expect_navigation() as nav:
            page.press("#code", "Enter")
        assert nav.value.status == 401
        expect(page.get_by_role("alert")).to_contain_text(ezauth.PAGE_TEXT["en"]["msg_wrong_code"])
        if AXE.exists():
            finish_animations(page)  # mid-animation colours are not what anyone reads
            violations = run_axe(page)
            assert [(v["id"], v["impact"]) for v in violations] == []
        page.fill("#code", ezauth.totp(secret_bytes, time.time()))
        with page.expect_navigation() as nav:
            page.press("#code", "Enter")
        assert urlsplit(page.url).path == "/ezauth/healthz"
        watch.assert_clean()
