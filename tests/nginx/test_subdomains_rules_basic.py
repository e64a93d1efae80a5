"""Through the shipped nginx config: one login for two subdomains (single sign-on), the friendly 403
of the access rules, and HTTP Basic keeping the password from the app."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import ezauth
from tests.support.basics import (
    LOGIN,
    PASSWORD,
    VERIFY,
    basic,
    parse_page,
    wait_until,
)
from tests.support.nginx import DOMAIN, Browser, echo_header, login_through_nginx, start_stub_app
from tests.support.process import Reply, http_call


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
        page = host_get(browser, notes, "/ezauth/logout", cookie)  # the logout page, then its button
        csrf_cookie = next(c.split(";")[0] for c in page.set_cookies if c.startswith("ezauth_csrf="))
        fields = urlencode({"csrf": parse_page(page.text).hidden["csrf"]}).encode()
        out = browser.request("POST", "/ezauth/logout", fields, {
            "Host": notes, "Cookie": f"{cookie}; {csrf_cookie}", "Content-Type": "application/x-www-form-urlencoded"})
        cleared = [c for c in out.set_cookies if c.startswith("ezauth=;")]
        assert len(cleared) == 2 and any(f"Domain={DOMAIN}" in c for c in cleared)
    finally:
        notes_app.close()


def test_rules_show_the_friendly_403_page_through_nginx(make_stack):
    stack = make_stack(users=("alice", "bob"))
    (stack.ezauth.data_dir / "rules").write_text(f"allow alice * /\nallow bob sd.{DOMAIN} /\n")
    browser = stack.browser()
    done = post_login_on(browser, f"sd.{DOMAIN}", host_get(browser, f"sd.{DOMAIN}", LOGIN), user="bob")
    cookie = next(c for c in done.set_cookies if c.startswith("ezauth=")).split(";")[0]
    # ezauth rereads its files at most once a second: ask it directly (never reaching the app) until
    # the new rules decide.
    asked = {"Cookie": cookie, "X-Original-URI": "/x", "X-Original-Host": f"notes.{DOMAIN}", "Host": f"notes.{DOMAIN}"}
    assert wait_until(lambda: http_call(stack.ezauth.port, "GET", VERIFY, headers=asked).status == 403)
    assert host_get(browser, f"sd.{DOMAIN}", "/x", cookie).echo()["path"] == "/x"
    refused = host_get(browser, f"notes.{DOMAIN}", "/x", cookie)
    assert refused.status == 403
    assert ezauth.PAGE_TEXT["en"]["forbidden_text"] in refused.text
    assert stack.app.seen == ["/x"]


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


def test_the_apps_own_authorization_header_still_reaches_it(make_stack):
    stack = make_stack(EZAUTH_BASIC_AUTH="1")
    browser = stack.browser()
    login_through_nginx(browser)
    echo = browser.get("/api", Authorization="Bearer app-token").echo()
    assert echo_header(echo, "Authorization") == ["Bearer app-token"]
