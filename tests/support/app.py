"""The app in-process through WebTest: a client behind nginx on loopback, logging in, verify."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import webtest

import ezauth
from tests.support.basics import (
    ACCOUNT,
    FORWARDED,
    HEALTHZ,
    LOGIN,
    LOGOUT,
    PASSWORD,
    SESSION_NAMES,
    TRUSTED_PEER,
    VERIFY,
    FakeClock,
    form_field,
    parse_page,
    token_of,
    write_users,
)

# -- The app in-process, through WebTest --------------------------------------------------------


def new_client(app: ezauth.EzauthApp) -> webtest.TestApp:
    """A fresh browser (own cookie jar) behind nginx on loopback."""
    return webtest.TestApp(app, extra_environ=TRUSTED_PEER)


def build(data_dir: Path, clock: FakeClock | None = None, **overrides) -> tuple[ezauth.EzauthApp, webtest.TestApp]:
    """An app on DATA_DIR (alice and bob, cheap hashes, unless a users file is there) and a client.

    The clock defaults to the real time frozen, so a real server may later share the data dir.
    """
    if not (data_dir / "users").exists():
        write_users(data_dir, alice=PASSWORD, bob=PASSWORD)
    app = ezauth.make_app(replace(ezauth.Settings(data_dir=data_dir), **overrides), clock=clock or FakeClock())
    return app, new_client(app)

def login(client: webtest.TestApp, username: str = "alice", password: str = PASSWORD, *, rd: str | None = None,
          remember: bool = False, status: int | str = 303, csrf: str | None = None,
          base: str = "http://localhost", headers: dict | None = None, extra_environ: dict | None = None,
          send_csrf_cookie: bool = False) -> webtest.TestResponse:
    """Post the login form, check STATUS ("*": any) and return the answer.

    By default like a browser: load the page (with ?rd=RD) and post the CSRF token and return target
    it holds. With csrf=TOKEN: post at once, TOKEN as both cookie and field and RD as given (default
    "/"), so no visit is counted and a hostile RD reaches the POST unchanged.
    """
    headers = dict(headers or {})
    if csrf is None:
        query = f"?rd={quote(rd, safe='')}" if rd is not None else ""
        page = client.get(f"{base}{LOGIN}{query}", headers=headers, extra_environ=extra_environ, status=200)
        form = {"csrf": form_field(page.text, "csrf"), "rd": form_field(page.text, "rd")}
        if send_csrf_cookie:  # the cookie jar keeps a Secure cookie away from http:// URLs
            name = next(v for k, v in page.headerlist if k == "Set-Cookie").partition("=")[0]
            headers["Cookie"] = f"{name}={form['csrf']}"
    else:  # both names: ezauth reads the one of the request's scheme
        form = {"csrf": csrf, "rd": "/" if rd is None else rd}
        headers = {"Cookie": f"ezauth_csrf={csrf}; __Host-ezauth_csrf={csrf}", **headers}
    form.update(username=username, password=password)
    if remember:
        form["remember"] = "1"
    reply = client.post(f"{base}{LOGIN}", form, headers=headers, extra_environ=extra_environ, status="*")
    assert status == "*" or reply.status_int == status, f"{reply.status} for {username!r} rd={form['rd']!r}"
    return reply


def cookie_header(response: webtest.TestResponse, name: str | None = None) -> str | None:
    """The Set-Cookie header value for cookie NAME (the session cookie under any of its names), or None."""
    names = SESSION_NAMES if name is None else (name,)
    found = [v for k, v in response.headerlist if k == "Set-Cookie" and v.partition("=")[0] in names]
    assert len(found) <= 1, found
    return found[0] if found else None


def logout(client: webtest.TestApp, base: str = "http://localhost", status: int = 303,
           **headers: str) -> webtest.TestResponse:
    """Log out as a browser does: open the logout page, press its button (a POST with its CSRF token)."""
    page = client.get(f"{base}{LOGOUT}", headers=headers, status=200)
    csrf = form_field(page.text, "csrf")
    if "Cookie" in headers:  # a Cookie header of the test's own replaces the jar: add the page's CSRF cookie
        name = next((v.partition("=")[0] for k, v in page.headerlist if k == "Set-Cookie"), "ezauth_csrf")
        headers = {**headers, "Cookie": f"{headers['Cookie']}; {name}={csrf}"}
    return client.post(f"{base}{LOGOUT}", {"csrf": csrf}, headers=headers, status=status)


def session_token(client: webtest.TestApp, username: str = "alice", password: str = PASSWORD, **how) -> str:
    """Log in (as `login` does, HOW passed on) and return the new session token."""
    return token_of(cookie_header(login(client, username, password, **how)))


def verify(client: webtest.TestApp, status: int | str, token: str | None = None, *, uri: str | None = None,
           host: str | None = None, **headers: str) -> webtest.TestResponse:
    """GET /ezauth/verify as nginx's auth_request sends it and check STATUS ("*": any).

    TOKEN goes in as the session cookie, URI and HOST as X-Original-URI and X-Original-Host (and HOST
    as Host too, unless given); the other HEADERS as given, `_` in a name read as `-` (X_Forwarded_For=...).
    """
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if host is not None and token is None and "Cookie" not in sent:
        token = client.cookies.get("ezauth")  # the jar keeps it for its own host, not for HOST
    if token is not None:
        sent["Cookie"] = f"ezauth={token}"
    if uri is not None:
        sent["X-Original-URI"] = uri
    if host is not None:  # nginx sends the request line's host and, as Host, the header's: the same host
        sent["X-Original-Host"] = host
        sent.setdefault("Host", host)
    return client.get(VERIFY, headers=sent, status=status)


# -- The account page ----------------------------------------------------------------------------


def tick(clock: FakeClock, *clients: webtest.TestApp) -> None:
    """Let just over a second pass and send one request to each worker: each reloads what others wrote."""
    clock.advance(1.1)
    for client in clients:
        client.get(HEALTHZ, status=200)


def change(client: webtest.TestApp, action: str, status: int = 303, *, csrf: str | None = None,
           headers: dict[str, str] | None = None, **fields: str) -> webtest.TestResponse:
    """POST one change to the account page with the page's CSRF token (or CSRF), check STATUS."""
    headers = {**FORWARDED, **(headers or {})}
    if csrf is None:
        csrf = form_field(client.get(ACCOUNT, headers=headers, status=200).text, "csrf")
    reply = client.post(ACCOUNT, {"csrf": csrf, "action": action, **fields}, headers=headers, status="*")
    assert reply.status_int == status, f"{action}: {reply.status}: {error_text(reply.text)!r}"
    return reply


def error_text(page: str) -> str:
    found = re.search(r'<p class="bubble">(.*?)</p>', page, re.DOTALL)
    return html.unescape(found.group(1)).strip() if found else ""


def new_token_on(page: str) -> str:
    """The token the page shows once (the value of <input id="new-token">)."""
    shown = [attrs.get("value") or "" for tag, attrs in parse_page(page).tags
             if tag == "input" and attrs.get("id") == "new-token"]
    assert len(shown) == 1, "no new token on the page"
    return shown[0]


def notice_text(page: str) -> str:
    found = re.search(r'<p class="notice" id="account-notice" role="status">(.*?)</p>', page, re.DOTALL)
    return html.unescape(found.group(1)).strip() if found else ""


def enrollment_on(page: str) -> tuple[bytes, str, str]:
    """(secret, otpauth URI, enrollment field) of the two-factor set-up the page shows."""
    secret = re.search(r'<code id="totp-secret">([A-Z2-7]+)</code>', page)
    uri = re.search(r'<code id="totp-uri">([^<]*)</code>', page)
    assert secret and uri, "no two-factor set-up on the page"
    text = secret.group(1)
    return base64.b32decode(text + "=" * (-len(text) % 8)), html.unescape(uri.group(1)), form_field(page, "enrollment")


def other_code(code: str) -> str:
    return "000000" if code != "000000" else "111111"
