"""Hostile input against ezauth: return targets, forged tokens, injection, path traversal, abuse.

Pure-HTTP corpora run here through WebTest (fast, in-process); the cases about sockets, worker
processes and the real log format run against `python ezauth.py serve` in
tests/process/test_security.py. Through-nginx cases live in tests/nginx/.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import statistics
import time
import urllib.parse
from pathlib import Path

import jwt
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

import ezauth
from tests.support.app import build, login, new_client, session_token, verify
from tests.support.basics import (
    CSRF,
    PASSWORD,
    TRAVERSALS,
    FakeClock,
    PageParser,
    assert_nothing_leaked,
    b64,
    basic,
    events,
    fail2ban_lines,
    fail2ban_re,
    forge,
    parse_page,
    traversal_setup,
    write_users,
)

HOST = "localhost"


# -- Helpers -------------------------------------------------------------------------------


def forwarded_for(address: str) -> dict[str, str]:
    """The WSGI environ entry for an X-Forwarded-For header (the peer stays nginx on loopback)."""
    return {"HTTP_X_FORWARDED_FOR": address}


def assert_no_injected_markup(body: str) -> PageParser:
    """The page holds only ezauth's own markup: no inline script, no event handlers, no frames."""
    page = parse_page(body)
    for tag, attrs in page.tags:
        assert tag not in ("iframe", "object", "embed", "svg", "base", "meta") or (
            tag == "meta" and set(attrs) <= {"charset", "name", "content"}
        ) or (tag == "svg" and "onload" not in attrs), (tag, attrs)
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        if tag == "script":
            assert (attrs.get("src") or "").startswith("/ezauth/static/"), attrs
        if tag == "img":
            assert (attrs.get("src") or "").startswith("/ezauth/static/"), attrs
    return page


def browser_view(url: str) -> str:
    """Roughly what a browser makes of a Location value: it drops tab/CR/LF, trims C0 controls and
    spaces, and reads '\\' as '/' in http(s) URLs."""
    url = re.sub(r"[\t\r\n]", "", url).strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
                                                 "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b"
                                                 "\x1c\x1d\x1e\x1f ")
    return url.replace("\\", "/")


def assert_stays_on_site(location: str, host: str = HOST, cookie_domain: str = "") -> None:
    """A Location ezauth may send: '/', a path starting with a single '/', or (only with a cookie
    domain) an http(s) URL whose host is under that domain."""
    assert ezauth.TARGET_CHARS_RE.fullmatch(location), f"control, space or non-ASCII in {location!r}"
    assert "\\" not in location, location
    if location.startswith("/"):
        assert not location.startswith("//"), location
    else:
        parts = urllib.parse.urlsplit(location)
        assert cookie_domain, f"absolute Location {location!r} without a cookie domain"
        assert parts.scheme in ("http", "https") and "@" not in parts.netloc, location
        assert ezauth.host_under(parts.hostname or "", cookie_domain), location
    landed = urllib.parse.urlsplit(urllib.parse.urljoin(f"https://{host}/start/here", browser_view(location)))
    assert landed.scheme in ("http", "https"), location
    assert landed.hostname == host or (cookie_domain and ezauth.host_under(landed.hostname or "", cookie_domain)), \
        f"{location!r} lands on {landed.hostname!r}"


# -- Return targets --------------------------------------------------------------------------

HOSTILE_TARGETS = [
    # protocol-relative and slash/backslash mixes
    "//evil.example", "///evil.example", "////evil.example", "//evil.example:443/app", "//", "/\\evil.example",
    "\\/evil.example", "\\\\evil.example", "/\\/evil.example", "\\evil.example", "/\\\\evil.example",
    # absolute URLs elsewhere, mixed-case schemes, odd schemes
    "https://evil.example", "http://evil.example/app?a=1", "HTTPS://evil.example", "hTtPs://EVIL.example/",
    "https:evil.example", "http:/evil.example", "https:///evil.example", "https:/\\evil.example",
    "ftp://evil.example", "mailto:x@evil.example",
    # javascript: and data:
    "javascript:alert(1)", "JaVaScRiPt:alert(document.domain)", "javascript://%0aalert(1)",
    "javascript:/*//*/alert(1)", "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==", "vbscript:msgbox(1)",
    # userinfo and delimiter tricks
    "https://localhost@evil.example", "https://localhost:80@evil.example/", "//localhost@evil.example",
    "http://evil.example\\@localhost", "https://evil.example#@localhost", "https://evil.example?@localhost",
    "http://[::1]@evil.example", "http://localhost:abc@evil.example", "https://evil.example%2f@localhost",
    "http://localhost%2f@evil.example", "https://localhost%40evil.example", "https://localhost.evil.example",
    "http://localhost:80%2f%2fevil.example",
    # percent-encoded and double-encoded slashes and dots
    "%2f%2fevil.example", "%2F%2Fevil.example", "%252f%252fevil.example", "%5c%5cevil.example",
    "//%65vil.example", "/%2f%2fevil.example", "/%5cevil.example", "/..//evil.example",
    "/%2e%2e//evil.example", "%2e%2e//evil.example", "https://localhost/..//evil.example",
    # tabs, newlines, NUL, spaces inside the scheme or the slashes
    "java\tscript:alert(1)", "java\nscript:alert(1)", "https:\t//evil.example", "ht\ntps://evil.example",
    "/\t/evil.example", "/\n/evil.example", "/\r/evil.example", " //evil.example", "\x00//evil.example",
    "\x0b//evil.example", "%00//evil.example", "/%09/evil.example",
    # CR/LF header injection
    "/app\r\nLocation: https://evil.example", "/app\r\nSet-Cookie: ezauth=forged",
    "/%0d%0aSet-Cookie:%20ezauth=forged", "%0d%0aLocation:%20https://evil.example",
    # unicode look-alikes
    "https://ⓔvil.example", "//evil。example", "/／evil.example", "／／evil.example", "/\u2215evil.example",
    "https://evil.example\u2044@localhost", "\u3002//evil.example", "/\uff3cevil.example",
    # overlong input and login loops
    "/" + "a" * 5000, "https://localhost/" + "a" * 3000, "//evil.example/" + "a" * 3000,
    "/ezauth/login?rd=//evil.example", "/ezauth/logout",
]


def test_corpus_is_big_enough():
    assert len(HOSTILE_TARGETS) >= 40
    assert len(set(HOSTILE_TARGETS)) == len(HOSTILE_TARGETS)


@pytest.mark.parametrize("target", HOSTILE_TARGETS, ids=range(len(HOSTILE_TARGETS)))
def test_hostile_target_in_the_login_page_query_stays_on_site(client, target):
    page = client.get("/ezauth/login", params={"rd": target}, status=200)
    rd = assert_no_injected_markup(page.text).fields["rd"]
    assert_stays_on_site(rd)


@pytest.mark.parametrize("target", HOSTILE_TARGETS, ids=range(len(HOSTILE_TARGETS)))
def test_hostile_target_in_the_login_form_never_redirects_off_site(client, target):
    reply = login(client, rd=target, csrf=CSRF)
    assert_stays_on_site(reply.headers["Location"])
    assert "evil" not in reply.headers["Location"].lower() or reply.headers["Location"].startswith("/")


@pytest.mark.parametrize("target, host", [
    ("https://evil.example", "evil.example"),            # the Host header is attacker-chosen too
    ("https://localhost.evil.example/x", "localhost.evil.example"),
])
def test_host_header_matching_the_target_still_gives_a_relative_location(client, target, host):
    reply = login(client, rd=target, csrf=CSRF, headers={"Host": host})
    assert reply.headers["Location"].startswith("/") and not reply.headers["Location"].startswith("//")


DOMAIN_TARGETS = [
    "https://example.com.evil.net/", "https://evilexample.com/", "https://app.example.com@evil.net/",
    "https://evil.net\\.example.com/", "https://evil.net/.example.com", "https://evil.net?.example.com",
    "https://evil.net#.example.com", "https://evil.net%2f.example.com/", "https://evil.net%00.example.com/",
    "javascript://app.example.com/%0aalert(1)", "//evil.net/app.example.com", "https://example.com:evil.net/",
    "https://[::1].example.com/", "https://xn--evil.example.com@evil.net/",
]


@pytest.mark.parametrize("target", DOMAIN_TARGETS, ids=range(len(DOMAIN_TARGETS)))
def test_hostile_target_with_a_cookie_domain_stays_under_it(make_client, target):
    _, client = make_client(cookie_domain="example.com")
    page = client.get("/ezauth/login", params={"rd": target}, headers={"Host": "app.example.com"}, status=200)
    assert_stays_on_site(parse_page(page.text).fields["rd"], "app.example.com", "example.com")
    reply = login(client, rd=target, csrf=CSRF, headers={"Host": "app.example.com"})
    assert_stays_on_site(reply.headers["Location"], "app.example.com", "example.com")


def test_wanted_targets_survive_exactly(client):
    """The corpus is not passing by sending everyone to '/'."""
    for target in ("/app/?a=1&b=2&c=%2F", "/a/b;c?d=e#f", "http://localhost/x?y=1"):
        location = login(client, rd=target, csrf=CSRF).headers["Location"]
        assert location == urllib.parse.urlsplit(target)._replace(scheme="", netloc="").geturl() or location == target


URL_PIECES = st.sampled_from([
    "/", "//", "\\", "http:", "https:", "HTTPS:", "javascript:", "data:", "evil.example", "localhost",
    "app.example.com", ".example.com", "example.com", "@", ":", "?", "#", "%2f", "%5c", "%2e", ".", "..",
    "\t", "\n", "\r", " ", "\x00", "[::1]", "ⓔ", "。", "／", ":80", "%40", "%00", "a", "ezauth/login",
])
TARGETS = st.one_of(st.text(max_size=80), st.lists(URL_PIECES, max_size=10).map("".join))


@given(target=TARGETS)
@hyp_settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_string_gives_a_same_site_target_or_slash(target):
    assert_stays_on_site(ezauth.safe_return_target(target, HOST))
    assert_stays_on_site(ezauth.safe_return_target(target, "app.example.com", "example.com"),
                         "app.example.com", "example.com")


# -- Token attacks ---------------------------------------------------------------------------


def claims_for(app: ezauth.EzauthApp, user: str = "alice", **changes) -> dict:
    now = int(app.clock())
    claims = {"sub": user, "iat": now, "exp": now + 600, "fp": app.stores.users.fingerprint(user) or "x", "rem": 0,
              "sid": "forged-session-id-000", "auth_time": now}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not ...}


def signed(app: ezauth.EzauthApp, claims: dict | bytes, key: bytes | None = None, alg: str = "HS256",
           **header) -> str:
    """A JWS signed by hand, so headers PyJWT would refuse to write (a non-string kid) can be sent."""
    signer = app.stores.keys.signer(app.clock())
    return forge({"alg": alg, "typ": "JWT", "kid": signer.kid, **header}, claims, key or signer.secret,
                 "sha" + alg.removeprefix("HS"))


def unsigned(header: dict, claims: dict, signature: str = "") -> str:
    return f"{b64(json.dumps(header))}.{b64(json.dumps(claims))}.{signature}"


def kid_of(app) -> str:
    return app.stores.keys.signer(app.clock()).kid


def deleted_user(app, client):
    token = signed(app, claims_for(app, "bob"))
    verify(client, 200, token)
    app.stores.users.delete("bob")
    return token


def stale_fingerprint(app, client):
    token = signed(app, claims_for(app))
    verify(client, 200, token)
    write_users(app.settings.data_dir, alice="a new password", bob=PASSWORD)
    app.stores.users.load()
    return token


def tampered_payload(app, client):
    header, _, signature = signed(app, claims_for(app)).split(".")
    return f"{header}.{b64(json.dumps(claims_for(app, 'bob')))}.{signature}"


def retired_key(app, client):
    token = signed(app, claims_for(app))
    kept = app.stores.keys.keys[-1]
    app.stores.keys.rotate(app.clock())
    app.stores.keys._write(tuple(k for k in app.stores.keys.keys if k.kid != kept.kid))  # as after its retirement
    return token


BAD_TOKENS = {
    "alg-none": lambda app, c: unsigned({"alg": "none", "kid": kid_of(app)}, claims_for(app)),
    "alg-None": lambda app, c: unsigned({"alg": "None", "kid": kid_of(app)}, claims_for(app)),
    "alg-none-with-sig": lambda app, c: unsigned({"alg": "none", "kid": kid_of(app)}, claims_for(app), "AAAA"),
    "alg-hs256-empty-sig": lambda app, c: signed(app, claims_for(app)).rsplit(".", 1)[0] + ".",
    "hs256-wrong-key": lambda app, c: signed(app, claims_for(app), key=b"k" * 32),
    "hs256-empty-key": lambda app, c: signed(app, claims_for(app), key=b"\0" * 32),
    "hs512-right-key": lambda app, c: signed(app, claims_for(app), alg="HS512"),
    "hs384-right-key": lambda app, c: signed(app, claims_for(app), alg="HS384"),
    "rs256-header": lambda app, c: unsigned({"alg": "RS256", "kid": kid_of(app)}, claims_for(app), "AAAA"),
    "jwk-header-own-key": lambda app, c: signed(app, claims_for(app), key=b"a" * 32,
                                                jwk={"kty": "oct", "k": b64(b"a" * 32)}),
    "kid-unknown": lambda app, c: signed(app, claims_for(app), kid="nope"),
    "kid-path": lambda app, c: signed(app, claims_for(app), kid="../../etc/passwd"),
    "kid-abs-path": lambda app, c: signed(app, claims_for(app), kid="/dev/zero"),
    "kid-keys-json": lambda app, c: signed(app, claims_for(app), kid="../keys.json"),
    "kid-huge-under-limit": lambda app, c: signed(app, claims_for(app), kid="A" * 2500),
    "kid-huge-over-limit": lambda app, c: signed(app, claims_for(app), kid="A" * 100_000),
    "kid-int": lambda app, c: signed(app, claims_for(app), kid=1),
    "kid-null": lambda app, c: signed(app, claims_for(app), kid=None),
    "kid-list": lambda app, c: signed(app, claims_for(app), kid=[kid_of(app)]),
    "kid-dict": lambda app, c: signed(app, claims_for(app), kid={"kid": kid_of(app)}),
    "kid-nul": lambda app, c: signed(app, claims_for(app), kid=kid_of(app) + "\0"),
    "kid-missing": lambda app, c: jwt.encode(claims_for(app), app.stores.keys.signer(app.clock()).secret, "HS256"),
    "kid-of-another-key-same-sig": lambda app, c: signed(app, claims_for(app), kid=kid_of(app).swapcase()),
    "retired-key": retired_key,
    "expired": lambda app, c: signed(app, claims_for(app, exp=int(app.clock()) - 1)),
    "expires-now": lambda app, c: signed(app, claims_for(app, exp=int(app.clock()))),
    "expired-long-ago": lambda app, c: signed(app, claims_for(app, iat=1, exp=2)),
    "iat-in-future": lambda app, c: signed(app, claims_for(app, iat=int(app.clock()) + 3600,
                                                           exp=int(app.clock()) + 7200)),
    "nbf-in-future": lambda app, c: signed(app, claims_for(app, nbf=int(app.clock()) + 3600)),
    "nbf-string": lambda app, c: signed(app, claims_for(app, nbf="0")),
    "exp-missing": lambda app, c: signed(app, claims_for(app, exp=...)),
    "iat-missing": lambda app, c: signed(app, claims_for(app, iat=...)),
    "exp-string": lambda app, c: signed(app, claims_for(app, exp="99999999999")),
    "exp-float": lambda app, c: signed(app, claims_for(app, exp=app.clock() + 600.5)),
    "exp-true": lambda app, c: signed(app, claims_for(app, exp=True, iat=False)),
    "exp-list": lambda app, c: signed(app, claims_for(app, exp=[1])),
    "sub-missing": lambda app, c: signed(app, claims_for(app, sub=...)),
    "sub-empty": lambda app, c: signed(app, claims_for(app, sub="")),
    "sub-int": lambda app, c: signed(app, claims_for(app, sub=1)),
    "sub-list": lambda app, c: signed(app, claims_for(app, sub=["alice"])),
    "sub-unknown-user": lambda app, c: signed(app, claims_for(app, "mallory")),
    "sub-other-users-fp": lambda app, c: signed(app, claims_for(app, "mallory",
                                                                fp=app.stores.users.fingerprint("alice"))),
    "sub-case-variant": lambda app, c: signed(app, claims_for(app, "Alice", fp=app.stores.users.fingerprint("alice"))),
    "deleted-user": deleted_user,
    "fp-stale": stale_fingerprint,
    "fp-missing": lambda app, c: signed(app, claims_for(app, fp=...)),
    "fp-wrong": lambda app, c: signed(app, claims_for(app, fp="0" * 16)),
    "fp-int": lambda app, c: signed(app, claims_for(app, fp=0)),
    "payload-not-object": lambda app, c: signed(app, b"[]"),
    "payload-not-json": lambda app, c: signed(app, b"\xff\xfe not json"),
    "payload-deeply-nested": lambda app, c: signed(app, b"[" * 1500 + b"]" * 1500),
    "tampered-payload": tampered_payload,
    "header-not-object": lambda app, c: f"{b64('[]')}.{b64(json.dumps(claims_for(app)))}.AAAA",
    "header-not-json": lambda app, c: b64(b"\xff") + f".{b64(json.dumps(claims_for(app)))}.AAAA",
    "header-deeply-nested": lambda app, c: b64(b"[" * 1200 + b"]" * 1200) + ".e30.AAAA",
    "truncated-signature": lambda app, c: signed(app, claims_for(app))[:-3],
    "truncated-half": lambda app, c: (lambda t: t[: len(t) // 2])(signed(app, claims_for(app))),
    "header-only": lambda app, c: signed(app, claims_for(app)).split(".")[0],
    "two-segments": lambda app, c: ".".join(signed(app, claims_for(app)).split(".")[:2]),
    "four-segments": lambda app, c: signed(app, claims_for(app)) + ".AAAA",
    "garbage": lambda app, c: "garbage",
    "empty": lambda app, c: "",
    "dots": lambda app, c: "..",
    "non-base64": lambda app, c: "!!!.@@@.###",
    "base64-padding": lambda app, c: "====.====.====",
    "latin1-bytes": lambda app, c: "\xe4\xf6.\xfc.\xdf",
    "quoted-garbage": lambda app, c: '"a.b.c"',
    "valid-plus-junk": lambda app, c: signed(app, claims_for(app)) + "x",
    "huge-garbage": lambda app, c: "A" * 50_000,
}


@pytest.mark.parametrize("name", sorted(BAD_TOKENS))
def test_forged_or_broken_token_is_401(service, client, name):
    token = BAD_TOKENS[name](service, client)
    reply = verify(client, "*", token)
    assert reply.status_int == 401, f"{name}: got {reply.status}"
    assert "X-Auth-Request-User" not in reply.headers


def test_control_a_valid_token_is_200(service, client):
    """The attacks above fail for their own reason, not because the helpers make bad tokens."""
    for token in (signed(service, claims_for(service)), session_token(client, csrf=CSRF)):
        reply = verify(client, "*", token)
        assert reply.status_int == 200 and reply.headers["X-Auth-Request-User"] == "alice"


def test_two_same_name_cookies_are_decided_deterministically(service, client):
    alice, bob = session_token(client, "alice", csrf=CSRF), session_token(client, "bob", csrf=CSRF)
    cases = {
        f"ezauth=garbage; ezauth={alice}": (200, "alice"),
        f"ezauth={alice}; ezauth=garbage": (200, "alice"),
        # Two users' sessions in one request: one was tossed in to make the visitor act as someone else.
        f"ezauth={alice}; ezauth={bob}": (401, None),
        f"ezauth={bob}; ezauth={alice}": (401, None),
        "ezauth=garbage; ezauth=also.garbage.x": (401, None),
        f"ezauth={signed(service, claims_for(service), key=b'k' * 32)}; ezauth={alice}": (200, "alice"),
    }
    for cookie, (status, user) in cases.items():
        for _ in range(3):
            reply = verify(client, "*", Cookie=cookie)
            assert (reply.status_int, reply.headers.get("X-Auth-Request-User")) == (status, user), cookie


def test_a_thousand_garbage_cookies_answer_401_quickly(client):
    started = time.monotonic()
    reply = verify(client, "*", Cookie="; ".join(["ezauth=a.b.c"] * 1000))
    assert reply.status_int == 401
    assert time.monotonic() - started < 2


# -- Injection -------------------------------------------------------------------------------

XSS = [
    '"><script>alert(1)</script>',
    "'><img src=x onerror=alert(1)>",
    "</title><script>alert(1)</script>",
    '" autofocus onfocus="alert(1)',
    "' onmouseover='alert(1)",
    "<svg/onload=alert(1)>",
    "</textarea></form><iframe src=//evil.example>",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "${csrf}$rd$$ $t_username",
    "<!--",
    "]]><![CDATA[<script>alert(1)</script>",
]


@pytest.mark.parametrize("payload", XSS, ids=range(len(XSS)))
def test_return_target_reaches_the_page_escaped(client, payload):
    target = "/app?" + payload.replace(" ", "%20")  # a same-site path, so it is kept and echoed
    page = client.get("/ezauth/login", params={"rd": target}, status=200)
    parsed = assert_no_injected_markup(page.text)
    assert parsed.fields["rd"] in (target, "/")
    wrong = login(client, password="wrong password", rd=target, csrf=CSRF, status=401)
    assert assert_no_injected_markup(wrong.text).fields["rd"] in (target, "/")


@pytest.mark.parametrize("payload", XSS, ids=range(len(XSS)))
def test_username_echo_is_escaped_on_every_page_that_keeps_it(client, payload):
    wrong = login(client, payload, "wrong password", csrf=CSRF, status=401)
    assert assert_no_injected_markup(wrong.text).fields["username"] == payload.strip()
    forged = client.post("/ezauth/login", {"username": payload, "password": "x", "csrf": "nope"},
                         headers={"Cookie": f"ezauth_csrf={CSRF}"}, status=403)
    assert assert_no_injected_markup(forged.text).fields["username"] == payload.strip()
    missing = login(client, payload, "", csrf=CSRF, status=400)
    assert assert_no_injected_markup(missing.text).fields["username"] == payload.strip()


def test_username_echo_is_escaped_on_the_lockout_page(make_client):
    _, client = make_client(max_attempts=1)
    payload = XSS[0]
    login(client, payload, "wrong password", csrf=CSRF, status=401)
    locked = login(client, payload, "wrong password", csrf=CSRF, status=429)
    assert assert_no_injected_markup(locked.text).fields["username"] == payload


def test_settings_strings_reach_the_page_escaped(make_client):
    title, subtitle, slogan = XSS[0], XSS[3], XSS[6] + " " + XSS[8]
    _, client = make_client(title=title, subtitle=subtitle, slogan=slogan)
    page = client.get("/ezauth/login", status=200)
    parsed = assert_no_injected_markup(page.text)
    text = "".join(parsed.text)
    for value in (title, subtitle, slogan):
        assert value in text  # shown literally, as text ($ placeholders not expanded either)
        assert html.escape(value, quote=True) in page.text


def test_hostile_csrf_cookie_is_not_reflected(client):
    page = client.get("/ezauth/login", headers={"Cookie": 'ezauth_csrf="><script>alert(1)</script>' + "A" * 40},
                      status=200)
    parsed = assert_no_injected_markup(page.text)
    assert re.fullmatch(r"[A-Za-z0-9_-]{32,64}", parsed.fields["csrf"])


def test_hostile_accept_language_falls_back_to_a_known_language(client):
    page = client.get("/ezauth/login", headers={"Accept-Language": '"><script>alert(1)</script>;q=1'}, status=200)
    assert_no_injected_markup(page.text)
    assert '<html lang="en">' in page.text


@pytest.mark.parametrize("uri", ['/a"><script>alert(1)</script>', "/x%0d%0aSet-Cookie:%20a=b", "//evil.example",
                                 "/p?q=" + "a" * 3000])
def test_original_uri_reaches_the_login_header_encoded(client, uri):
    reply = verify(client, "*", uri=uri)
    login = reply.headers["X-Ezauth-Login"]
    assert login.startswith("/ezauth/login") and re.fullmatch(r"[\x21-\x7e]+", login)
    assert not re.search(r"[<>\"']", login)
    follow = client.get(login, status=200)
    assert_stays_on_site(assert_no_injected_markup(follow.text).fields["rd"])


def test_page_has_no_inline_script_and_a_strict_csp(client):
    page = client.get("/ezauth/login", status=200)
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text)
    csp = page.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'self'" in csp


def test_log_fields_cannot_forge_a_line_or_a_field(client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    login(client, "bob\nX ezauth WARNING event=login_failed user=x ip=6.6.6.6", "nope", csrf=CSRF, status=401)
    login(client, "x ip=6.6.6.6", "nope", csrf=CSRF, status=401)
    lines = [r.getMessage() for r in caplog.records if "login_failed" in r.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line and "\r" not in line
        assert line.endswith(" ip=127.0.0.1")


# -- Path traversal on /ezauth/static/ -------------------------------------------------------

@pytest.mark.parametrize("name", TRAVERSALS, ids=range(len(TRAVERSALS)))
def test_static_path_traversal_is_404(tmp_path, data_dir, client, name):
    secret = traversal_setup(tmp_path, data_dir)
    reply = client.get(f"/ezauth/static/{name}", expect_errors=True)
    assert_nothing_leaked(reply.status_int, reply.body, secret)


def test_static_serves_its_own_files_and_data_dir_overrides(tmp_path, data_dir, client):
    traversal_setup(tmp_path, data_dir)
    assert client.get("/ezauth/static/own.css", status=200).text == "body{}"
    assert client.get("/ezauth/static/login.css", status=200).headers["Content-Type"].startswith("text/css")


# -- Abuse: lockout, client IP, timing -------------------------------------------------------


def test_locked_out_ip_does_not_lock_out_another_ip(make_client):
    _, client = make_client(max_attempts=3)
    attacker = {"HTTP_X_FORWARDED_FOR": "203.0.113.1"}  # peer 127.0.0.1 is a trusted proxy
    for name in ("alice", "bob", "carol"):
        login(client, name, "wrong password", csrf=CSRF, extra_environ=attacker, status=401)
    login(client, "dave", "wrong password", csrf=CSRF, extra_environ=attacker, status=429)
    login(client, "alice", PASSWORD, csrf=CSRF, extra_environ=attacker, status=429)  # the IP is locked for all
    other = {"HTTP_X_FORWARDED_FOR": "198.51.100.2"}
    login(client, "bob", PASSWORD, csrf=CSRF, extra_environ=other, status=303)
    login(client, "dave", "wrong password", csrf=CSRF, extra_environ=other, status=401)


def test_user_guessed_from_many_ips_is_locked_out(make_client):
    _, client = make_client(max_attempts=3)
    for n in range(3):
        login(client, "alice", "wrong password", csrf=CSRF, extra_environ=forwarded_for(f"203.0.113.{n + 1}"),
              status=401)
    for n in range(3, 6):
        reply = login(client, "alice", "wrong password", csrf=CSRF,
                      extra_environ=forwarded_for(f"203.0.113.{n + 1}"), status=429)
        assert int(reply.headers["Retry-After"]) > 0
    login(client, "alice", PASSWORD, csrf=CSRF, extra_environ=forwarded_for("192.0.2.77"), status=429)
    login(client, "bob", PASSWORD, csrf=CSRF, extra_environ=forwarded_for("192.0.2.77"), status=303)


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(make_client, caplog):
    caplog.set_level(logging.INFO, logger="ezauth")
    _, client = make_client(max_attempts=3)
    peer = {"REMOTE_ADDR": "198.51.100.7"}
    for n, name in enumerate(("alice", "bob", "carol")):
        login(client, name, "wrong password", csrf=CSRF, status=401,
              extra_environ={"HTTP_X_FORWARDED_FOR": f"10.0.0.{n}", "HTTP_X_REAL_IP": f"10.1.0.{n}", **peer})
    login(client, "dave", "x", csrf=CSRF, extra_environ={**forwarded_for("10.9.9.9"), **peer}, status=429)
    failed = events(caplog, "login_failed")
    assert failed and all(line.endswith("ip=198.51.100.7") for line in failed)
    reply = login(client, "alice", PASSWORD, csrf=CSRF, status="*",
                  extra_environ={"HTTP_X_FORWARDED_PROTO": "https", "REMOTE_ADDR": "198.51.100.8"})
    assert "Secure" not in reply.headers["Set-Cookie"]


def test_spoofed_forwarded_entries_behind_a_trusted_proxy_do_not_reset_the_count(make_client):
    """nginx appends the real address; what the client put in front of it must not count."""
    _, client = make_client(max_attempts=3)
    for n, name in enumerate(("alice", "bob", "carol")):
        login(client, name, "wrong password", csrf=CSRF, extra_environ=forwarded_for(f"6.6.6.{n}, 203.0.113.5"),
              status=401)
    login(client, "dave", "x", csrf=CSRF, extra_environ=forwarded_for("7.7.7.7, 203.0.113.5"), status=429)


def guesses(client, addresses: list[str]) -> list[int]:
    """A wrong password under a new user name from each address in turn: the statuses."""
    return [login(client, f"user{n}", "wrong password", csrf=CSRF, extra_environ=forwarded_for(address),
                  status="*").status_int for n, address in enumerate(addresses)]


def test_240_guesses_from_240_addresses_of_one_ipv6_64_lock_out_like_one_address(make_client):
    _, rotating = make_client()
    statuses = guesses(rotating, [f"2001:db8:1:2::{n:x}" for n in range(1, 241)])
    _, one_address = make_client(data_dir=rotating.app.settings.data_dir.parent / "other")
    assert statuses == guesses(one_address, ["2001:db8:1:2::1"] * 240) == [401] * 5 + [429] * 235
    login(rotating, "bob", PASSWORD, csrf=CSRF, extra_environ=forwarded_for("2001:db8:1:2:ffff::9"), status=429)
    login(rotating, "bob", PASSWORD, csrf=CSRF, extra_environ=forwarded_for("2001:db8:1:3::1"), status=303)


def test_an_ipv4_mapped_address_shares_the_lockout_of_its_ipv4_address(make_client):
    _, client = make_client(max_attempts=3)
    assert guesses(client, ["203.0.113.9", "::ffff:203.0.113.9", "::ffff:cb00:7109", "203.0.113.9"]) == [
        401, 401, 401, 429]
    assert guesses(client, ["203.0.113.10"]) == [401]  # IPv4 stays per address


def test_every_password_check_of_a_request_goes_through_the_hash_gate(make_client, monkeypatch):
    """The login form, HTTP Basic in verify and the account page's password check, known and unknown
    names alike, each pass the gate once, in the line of the client's network."""
    _, client = make_client(basic_auth=True)
    entered: list[str] = []
    real_run = ezauth.HashGate.run  # the one gate every flow shares; this test's app is the only one
    monkeypatch.setattr(ezauth.HashGate, "run",
                        lambda gate, who, check: (entered.append(who), real_run(gate, who, check))[1])
    v6 = forwarded_for("2001:db8:5:6::77")
    login(client, "alice", "wrong password", csrf=CSRF, extra_environ=v6, status=401)
    login(client, "nobody", "wrong password", csrf=CSRF, extra_environ=v6, status=401)
    client.get("/ezauth/verify", headers={"Authorization": basic("nobody", "wrong password")}, extra_environ=v6,
               status=401)
    assert entered == ["2001:db8:5:6::/64"] * 3
    token = session_token(client, csrf=CSRF)
    client.set_cookie("ezauth", token)
    page = client.get("/ezauth/account", status=200)
    form = {**parse_page(page.text).hidden, "action": "token_create", "label": "x", "current": "wrong password"}
    client.post("/ezauth/account", form, status=401)
    assert entered == ["2001:db8:5:6::/64"] * 3 + ["127.0.0.1"] * 2  # the login, then the account page


def real_cost_client(tmp_path: Path, **overrides):
    """A client on a data dir whose alice has a real-cost hash, like the unknown user's dummy hash."""
    data_dir = tmp_path / "data"
    write_users(data_dir, f"alice:{ezauth.hash_password(PASSWORD)}\n")
    return build(data_dir, **overrides)[1]


def test_every_login_attempt_costs_exactly_one_scrypt_of_the_same_cost(tmp_path, monkeypatch):
    """Uniform timing, counted instead of timed: a known user with a wrong password, an unknown user
    and the right password each run one scrypt, with the same parameters."""
    client = real_cost_client(tmp_path)
    real_scrypt, calls = hashlib.scrypt, []

    def counting_scrypt(password: bytes, **params):
        calls.append((params["n"], params["r"], params["p"]))
        return real_scrypt(password, **params)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    costs = {}
    for name, password, status in (("alice", "wrong password", 401), ("nobody", "wrong password", 401),
                                   ("alice", PASSWORD, 303)):
        calls.clear()
        login(client, name, password, csrf=CSRF, status=status)
        costs[name, password] = list(calls)
    assert all(len(made) == 1 for made in costs.values()), costs
    assert len({made[0] for made in costs.values()}) == 1, costs


@pytest.mark.slow
def test_wrong_password_takes_as_long_for_unknown_and_known_users(tmp_path):
    client = real_cost_client(tmp_path, max_attempts=10_000)
    times: dict[str, list[float]] = {"alice": [], "nobody": []}
    for _ in range(12):
        for name in times:
            started = time.perf_counter()
            login(client, name, "wrong password", csrf=CSRF, status=401)
            times[name].append(time.perf_counter() - started)
    known, unknown = statistics.median(times["alice"]), statistics.median(times["nobody"])
    # Generous: a real leak (skipping scrypt) is 100x; noise on a busy 2-core box is well under 35 %.
    assert abs(known - unknown) < 0.35 * max(known, unknown), (known, unknown)


# -- fail2ban --------------------------------------------------------------------------------

def test_fail2ban_filter_ignores_addresses_hidden_in_user_names(make_client, caplog):
    _, client = make_client(max_attempts=100)
    caplog.set_level(logging.INFO, logger="ezauth")
    names = ["x ip=6.6.6.6", 'x" ip=6.6.6.6', "x\\\" ip=6.6.6.6", "ezauth WARNING event=login_failed user=y ip=6.6.6.6",
             "a" * 200 + " ip=6.6.6.6", "plain.user@example.com"]
    for name in names:
        login(client, name, "wrong password", csrf=CSRF, extra_environ=forwarded_for("203.0.113.44"), status=401)
    lines = fail2ban_lines(caplog)
    assert len(lines) == len(names)
    for line in lines:
        match = fail2ban_re().search(line)
        assert match and match.group("host") == "203.0.113.44", line


# -- The outside review's findings: each fails on the code before the fix ---------------------


def test_verify_tries_at_most_two_session_cookies(service, client, monkeypatch):
    """Thousands of ezauth= cookies cost 30 ms a request on the thread that answers every verify."""
    decoded: list[str] = []
    real_read = ezauth.read_token
    monkeypatch.setattr(ezauth, "read_token", lambda token, *a: decoded.append(token) or real_read(token, *a))
    alice = session_token(client, "alice", csrf=CSRF)
    reply = verify(client, 401, Cookie="; ".join([f"ezauth={n}.{n}.{n}" for n in range(3000)] + [f"ezauth={alice}"]))
    assert decoded == [] and reply.headers["X-Ezauth-Error"] == "too_many_cookies"
    verify(client, 401, Cookie=f"ezauth=a.b.c; ezauth=d.e.f; ezauth={alice}")
    verify(client, 401, Cookie=f"ezauth=x; ezauth=y; ezauth ={alice}")  # a spelling apps also read as ezauth
    assert verify(client, 200, Cookie=f"ezauth=a.b.c; ezauth={alice}").headers["X-Auth-Request-User"] == "alice"


@pytest.mark.parametrize("peer", ["", "/run/ezauth.sock"])
def test_a_unix_socket_peer_is_a_trusted_local_proxy(make_client, caplog, peer):
    """gunicorn --bind unix:... hands the app an empty REMOTE_ADDR: X-Forwarded-For must count, or
    every visitor shares one lockout as ip=unknown and fail2ban has nothing to ban."""
    _, client = make_client(max_attempts=2)
    for _ in range(2):
        login(client, password="wrong password", status=401, csrf=CSRF,
              extra_environ={"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": "203.0.113.7"})
    failed = events(caplog, "login_failed")
    assert len(failed) == 2 and all(line.endswith("ip=203.0.113.7") for line in failed), failed
    login(client, "bob", csrf=CSRF, extra_environ={"REMOTE_ADDR": peer, "HTTP_X_FORWARDED_FOR": "198.51.100.8"})


def test_an_unknown_client_address_is_logged_once(make_client, caplog, monkeypatch):
    monkeypatch.setattr(ezauth, "_warned", set())
    _, client = make_client()
    for _ in range(3):
        login(client, password="wrong password", status=401, csrf=CSRF, extra_environ={"REMOTE_ADDR": ""})
    assert len(events(caplog, "client_ip_unknown")) == 1
    failed = events(caplog, "login_failed")
    assert len(failed) == 3 and all(line.endswith("ip=unknown") for line in failed), failed


def test_legacy_dotenv_user_has_one_fingerprint_in_every_worker_and_after_restarts(tmp_path):
    """A random salt per process made verify flip 401/200 under gunicorn -w 2, and every restart log out."""
    settings = ezauth.Settings(data_dir=tmp_path / "data", legacy_users=(("bob", "blog post password"),))
    first, second = (ezauth.make_app(settings, clock=FakeClock()) for _ in range(2))
    token = session_token(new_client(first), "bob", "blog post password", csrf=CSRF)
    assert first.stores.users.fingerprint("bob") == second.stores.users.fingerprint("bob")
    verify(new_client(second), 200, token)
    assert ezauth.legacy_hash("bob", "another password") != ezauth.legacy_hash("bob", "blog post password")


def test_throttle_damaged_while_running_is_moved_aside_not_500(service, client, caplog):
    login(client, password="wrong password", status=401, csrf=CSRF)
    path = service.settings.data_dir / "throttle.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)  # damaged under the running app
    login(client, password="wrong password", status=401, csrf=CSRF)
    login(client, status=303, csrf=CSRF)
    assert events(caplog, "throttle_corrupt")
    assert list(path.parent.glob("throttle.sqlite3.corrupt-*"))


@pytest.mark.parametrize("text", ["9" * 5000, "²", "12345678901234567890", "-5", "1e3"])
def test_a_counter_file_that_is_no_count_is_moved_aside_not_500(service, client, text):
    path = service.settings.data_dir / "counter.txt"
    path.write_text(text)
    client.get("/ezauth/login", status=200)  # counts a visit: the bad file goes aside, counting restarts
    assert path.read_text() == "1\n"
    assert list(path.parent.glob("counter.txt.corrupt-*"))


def test_too_many_query_fields_on_the_login_page_is_400_not_500(client, caplog):
    query = "&".join(f"f{n}=x" for n in range(ezauth.MAX_QUERY_FIELDS + 1))
    page = client.get(f"/ezauth/login?{query}", status=400)
    assert "could not be read" in page.text and events(caplog, "login_rejected")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_turning_on_two_factor_ends_cached_basic_credentials_at_once(make_client, clock):
    app, client = make_client(basic_auth=True)
    header = {"Authorization": basic("alice", PASSWORD)}
    verify(client, 200, **header)
    app.stores.totp.enroll("alice")
    verify(client, 401, **header)  # no waiting out the 60 s cache


@pytest.mark.parametrize("forwarded", ["fe80::1%x ip=6.6.6.6", "fe80::1%eth0", "::1%lo", "203.0.113.7 ip=6.6.6.6"])
def test_scoped_or_decorated_addresses_are_not_addresses(make_client, caplog, forwarded):
    _, client = make_client()
    login(client, password="wrong password", status=401, csrf=CSRF, extra_environ=forwarded_for(forwarded))
    (line,) = events(caplog, "login_failed")
    assert "6.6.6.6" not in line and "%" not in line and line.endswith("ip=127.0.0.1")


def test_every_logged_value_is_quoted_when_not_plain(make_client, caplog):
    _, client = make_client()
    login(client, 'x" ip=6.6.6.6\nevent=login_ok', "wrong password", status=401, csrf=CSRF)
    verify(client, 401, Cookie="; ".join(["ezauth=a"] * 3), X_Forwarded_For="203.0.113.1")
    assert all("\n" not in record.getMessage() for record in caplog.records)
    (failed,) = events(caplog, "login_failed")
    # No user has such a name, so only its keyed hash is logged: nothing of it can forge a field.
    assert re.fullmatch(r"event=login_failed user=hash:[0-9a-f]{16} ip=127\.0\.0\.1", failed), failed
    (refused,) = events(caplog, "verify_refused")
    assert refused.endswith(" ip=203.0.113.1")


def test_a_right_password_waits_for_checks_in_flight_instead_of_429(make_client, monkeypatch):
    """Five checks in flight from one address filled the limit, and a 6th right password got 429."""
    app, client = make_client()
    throttle = app.stores.throttle
    in_flight = [throttle.begin(["ip:127.0.0.1", f"user:u{n}"], app.clock()) for n in range(5)]
    real_reserve, answers = throttle._reserve, []

    def reserve(keys: list[str], now: float) -> ezauth.Attempt:
        """The checks in flight finish while the right password waits, not before it arrives."""
        attempt = real_reserve(keys, now)
        answers.append(attempt.busy)
        if len(answers) == 1:
            for other in in_flight:
                throttle.succeeded(other)
        return attempt

    monkeypatch.setattr(throttle, "_reserve", reserve)
    login(client, status=303, csrf=CSRF)
    assert answers == [True, False], answers


def test_guesses_stay_bounded_while_right_passwords_wait(make_client):
    _, client = make_client(max_attempts=3)
    for _ in range(3):
        login(client, password="wrong password", status=401, csrf=CSRF)
    login(client, status=429, csrf=CSRF)


def test_a_key_ring_that_cannot_be_read_is_never_moved_aside(tmp_path, monkeypatch, caplog):
    """EACCES is not corruption. As root a chmod does not stop a read, so the error is raised where
    the ring is read."""
    path = tmp_path / "keys.json"
    ring = ezauth.KeyRing(path, 86400, 86400, 1_800_000_000.0)
    good, real_read = path.read_bytes(), Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(PermissionError):  # at start-up: refuse to start, and say why
        ezauth.KeyRing(path, 86400, 86400, 1_800_000_001.0)
    ring.reload()  # while running: keep the keys it has, and log it once
    assert ring.keys and events(caplog, "keyring_unreadable")
    monkeypatch.undo()
    assert path.read_bytes() == good and not list(tmp_path.glob("keys.json.corrupt-*"))


@pytest.mark.parametrize("target", ["/.//evil.example", "/./\\evil.example", "/%2e//evil.example",
                                    "/a/..//evil.example", "/%2F%2Fevil.example", "///evil.example",
                                    "/.%2f/evil.example"])
def test_return_targets_that_normalise_to_another_host_become_slash(target):
    assert ezauth.safe_return_target(target, HOST) == "/"


SD_TARGET = ezauth.Target("sd.example.com", "443", "203.0.113.7")


@pytest.mark.parametrize("uri", [
    "/admin", "/admin/x", "/admin%2f..%2fpublic/x", "/admin\\..\\public/x", "/admin%252f..%252fpublic",
    "/admin%5c..%5cpublic", "/public/../admin", "/public/..%2fadmin", "/public%2f..%2fadmin", "/ADMIN",
    "/Admin/x", "//admin", "/./admin", "/admin;x=1", "/public/%2e%2e/admin", "/public/%252e%252e/admin",
    "/public/..;/admin", "/public#/../admin", "/admin%00", "/public/x%0a/../../admin",
])
def test_rules_allow_only_when_every_reading_of_the_path_is_allowed(uri):
    rules = ezauth.parse_rules("allow * * /public/\ndeny bob * /admin\nallow bob * /\n")
    assert not rules.allows_every("bob", SD_TARGET, uri), uri


@pytest.mark.parametrize("uri", ["/public/x", "/public/a%20b", "/public/%C3%A9t%C3%A9", "/public/x?a=/admin",
                                 "/public/a.b.c/d", "/public/.well-known/x"])
def test_rules_still_allow_ordinary_paths(uri):
    rules = ezauth.parse_rules("allow * * /public/\ndeny bob * /admin\nallow bob * /\n")
    assert rules.allows_every("alice", SD_TARGET, uri), uri


CRAFTED = "/public/" + ("%2e%2E/\\;x//./%252F" * 400)[:7000]  # every kind of reading work, 7 KB of it


def counting(monkeypatch, *names: str) -> dict[str, int]:
    """Count the calls of these ezauth functions from now on (they still run)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(ezauth, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ezauth, name, counted)
    return calls


def test_a_crafted_7_kb_path_costs_verify_no_more_readings_than_a_plain_one(make_client, monkeypatch, caplog):
    """With rules on it cost one verify 12-20 ms of the event loop: 40 ways to read 7 KB, each resolved."""
    caplog.set_level(logging.INFO, logger="ezauth")
    app, client = make_client()
    (app.settings.data_dir / "rules").write_text("allow * * /public/\n")
    token = session_token(client, csrf=CSRF)
    verify(client, 200, token, uri="/public/x")
    calls = counting(monkeypatch, "decodings", "remove_dot_segments")
    verify(client, 403, token, uri=CRAFTED)  # refused unjudged: nginx shows the "not for you" page
    assert calls == {"decodings": 0, "remove_dot_segments": 1}, calls  # the one: the log line's path, 256 chars
    assert events(caplog, "access_denied")[-1].startswith("event=access_denied user=alice ")
    inside = "/public/" + ("a%20b;x//./c\\d%252F" * 100)[:ezauth.MAX_JUDGED_PATH - 8]
    verify(client, 200, token, uri=inside)  # up to the cap: every reading judged, and all stay inside
    assert calls["decodings"] >= 2 and calls["remove_dot_segments"] > 10, calls


@pytest.mark.parametrize("uri", [CRAFTED, "/public/" + "a/../" * 300 + "admin", "/public/" + "%2e" * 400])
def test_paths_too_long_to_judge_are_refused_never_allowed(uri):
    rules = ezauth.parse_rules("allow * * /public/\n")
    assert not rules.allows_every("bob", SD_TARGET, uri)
    assert not ezauth.ApiToken("id", "bob", "x", 0.0, None, ("/public/",)).allows(uri)
    assert ezauth.safe_return_target(uri, "localhost") == "/"
    assert rules.allows_every("bob", SD_TARGET, "/public/" + "a" * 7000)  # plain: one reading, any length


def test_a_return_target_too_long_for_nginx_s_header_buffer_is_left_out_of_the_login_url():
    header = 4096 - 1024  # nginx's proxy_buffer_size, less room for the status line and other headers
    for uri in ("/app/" + "(" * 3000, "/" + "%" * 1100, "/x?" + "a" * 5000):
        assert ezauth.login_url(uri, expired=False) == "/ezauth/login"
        assert ezauth.login_url(uri, expired=True) == "/ezauth/login?expired=1"
    fits = "/app/" + "(" * 900
    assert ezauth.login_url(fits, expired=True).startswith("/ezauth/login?rd=%2Fapp%2F%28%28")
    assert len(ezauth.login_url(fits, expired=True)) <= header == ezauth.MAX_LOGIN_URL
