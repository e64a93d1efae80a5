"""ezauth behind a real nginx running nginx.conf.example, driven over loopback HTTP only."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import jwt
import pytest

from conftest import (
    EXAMPLE,
    EZAUTH,
    LISTEN,
    TARGET,
    Browser,
    Reply,
    Stack,
    build_stack,
    clean_env,
    echo_header,
    encode_frame,
    free_port,
    login_target,
    login_through_nginx,
    nginx_command,
    parse_page,
    parse_set_cookie,
    read_frame,
    render_example,
    require_tool,
    websocket_handshake,
    write_prefix,
)

pytestmark = pytest.mark.nginx


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(nginx_bin, tmp_path_factory) -> Iterator[Stack]:
    """One shared stack with users alice and bob."""
    with contextlib.ExitStack() as cleanup:
        yield build_stack(nginx_bin, tmp_path_factory.mktemp("stack"), cleanup, users=("alice", "bob"))


@pytest.fixture
def browser(stack) -> Browser:
    return stack.browser()


@pytest.fixture(scope="module")
def alice(stack) -> Browser:
    """A browser logged in as alice."""
    browser = stack.browser()
    login_through_nginx(browser)
    return browser


# -- 1. the config itself ----------------------------------------------------------------------

def nginx_t(nginx_bin: str, prefix: Path, site: str) -> subprocess.CompletedProcess:
    write_prefix(prefix, site)
    return subprocess.run(nginx_command(nginx_bin, prefix, "-t"), capture_output=True, text=True, timeout=30)


def test_example_passes_nginx_t_as_shipped(nginx_bin, tmp_path):
    done = nginx_t(nginx_bin, tmp_path, EXAMPLE.read_text())
    assert done.returncode == 0, done.stderr


def test_example_with_auth_cache_on_passes_nginx_t(nginx_bin, tmp_path):
    done = nginx_t(nginx_bin, tmp_path, render_example(2424, 7860, 8080, tmp_path / "cache"))
    assert done.returncode == 0, done.stderr


def test_auth_cache_is_off_as_shipped():
    active = [line for line in EXAMPLE.read_text().splitlines()
              if re.match(r"\s*proxy_cache(_path|_key|_valid)?\s", line)]
    assert active == []


def test_nginx_config_command_renders_a_valid_config(nginx_bin, tmp_path):
    done = subprocess.run([sys.executable, str(EZAUTH), "nginx-config", "--app", "http://127.0.0.1:9999",
                           "--listen", "8081", "--server-name", "sd.example.com"],
                          capture_output=True, text=True, timeout=30, env=clean_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    site = done.stdout
    assert "proxy_pass http://127.0.0.1:9999;" in site
    assert "listen 8081;" in site and LISTEN not in site
    assert "server_name sd.example.com;" in site and "server_name _;" not in site
    checked = nginx_t(nginx_bin, tmp_path / "prefix", site)
    assert checked.returncode == 0, checked.stderr


# -- 2. not logged in --------------------------------------------------------------------------

def test_unauthenticated_request_redirects_to_login_keeping_the_exact_url(browser):
    reply = browser.get(TARGET)
    assert reply.status == 302
    assert reply.location.startswith("/ezauth/login?")
    assert login_target(reply.location) == TARGET
    assert "expired" not in parse_qs(urlsplit(reply.location).query)


def test_bad_cookie_redirects_to_login_marked_expired(browser):
    reply = browser.get(TARGET, Cookie="ezauth=not-a-token")
    assert reply.status == 302
    assert login_target(reply.location) == TARGET
    assert parse_qs(urlsplit(reply.location).query)["expired"] == ["1"]


def test_login_page_and_its_static_assets_load_without_a_session(browser):
    page = browser.get(browser.get(TARGET).location)
    assert page.status == 200
    form = parse_page(page.text)
    assert form.fields["rd"] == TARGET
    assert form.assets, "the login page references no /ezauth/static/ files"
    pending, loaded = list(form.assets), set()
    while pending:
        url = pending.pop()
        if url in loaded:
            continue
        loaded.add(url)
        reply = Browser(browser.port).get(url)
        assert reply.status == 200, url
        if url.endswith(".css"):
            for ref in re.findall(r"url\(\s*['\"]?([^'\")]+)", reply.text):
                if not ref.startswith(("data:", "#")):
                    pending.append(urljoin(url, ref))


def test_the_app_is_never_reached_without_a_session(stack, browser):
    before = len(stack.app.seen)
    for path in ("/", "/app/", "/EZAUTH/verify", "/_ezauth_verify/x", "/static/x.js"):
        assert browser.get(path).status == 302, path
    # nginx's own slash redirect for the /ezauth/ prefix location, not the app.
    assert (browser.get("/ezauth").status, browser.get("/ezauth").location) == (301, "/ezauth/")
    assert len(stack.app.seen) == before


# -- 3. logging in -------------------------------------------------------------------------------

def test_login_lands_on_the_original_url_and_the_app_sees_the_user(stack):
    browser = stack.browser()
    done = login_through_nginx(browser)
    assert done.location == TARGET
    echo = browser.get(done.location).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
    assert echo_header(echo, "X-Forwarded-User") == ["alice"]
    # Design: the app never receives the ezauth session cookie (nor any other cookie here).
    assert echo_header(echo, "Cookie") == []


def test_session_cookie_is_httponly_and_not_secure_over_plain_http(stack):
    browser = stack.browser()
    done = login_through_nginx(browser)
    (cookie,) = [c for c in done.set_cookies if c.startswith("ezauth=")]
    _, _, attrs = parse_set_cookie(cookie)
    assert "httponly" in attrs and attrs["path"] == "/"
    assert "secure" not in attrs


def test_each_user_is_named_to_the_app(stack):
    browser = stack.browser()
    login_through_nginx(browser, user="bob")
    assert echo_header(browser.get("/whoami").echo(), "X-Auth-Request-User") == ["bob"]


def test_identity_headers_sent_by_the_client_are_replaced(alice):
    echo = alice.get("/", X_Auth_Request_User="admin", X_Forwarded_User="admin").echo()
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
    assert echo_header(echo, "X-Forwarded-User") == ["alice"]


@pytest.mark.parametrize("cookie, app_sees", [
    ("{t}", None),
    ("{t}; theme=dark", "theme=dark"),
    ("theme=dark; {t}", "theme=dark"),
    ("a=1; {t}; b=2", "a=1; b=2"),
    ("a=1;{t};b=2", "a=1;b=2"),
    ("myezauth=x; {t}; ezauth_csrf=y", "myezauth=x; ezauth_csrf=y"),
    ("{t}; a=1; {t}", "a=1"),
])
def test_app_gets_every_cookie_but_the_session(alice, cookie, app_sees):
    header = cookie.replace("{t}", f"ezauth={alice.cookie()}")
    echo = alice.get("/", Cookie=header).echo()
    assert echo_header(echo, "Cookie") == ([app_sees] if app_sees else [])


def test_upload_with_a_session_reaches_the_app(alice):
    body = os.urandom(3 << 20)
    reply = alice.request("POST", "/upload?x=1", body, {"Content-Type": "application/octet-stream"})
    echo = reply.echo()
    assert (echo["method"], echo["body_length"]) == ("POST", len(body))
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]


@pytest.mark.parametrize("path, size", [("/upload", 51 << 20), ("/ezauth/login", 1 << 20)])
def test_oversized_bodies_are_refused_by_nginx(stack, alice, path, size):
    sock = socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=10)
    with sock:  # only the declared length is sent: nginx must answer before reading a byte
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nCookie: ezauth={alice.cookie()}\r\n"
                      f"Content-Length: {size}\r\n\r\n").encode())
        assert sock.recv(4096).split(b"\r\n", 1)[0].split()[1] == b"413"


def test_post_without_a_session_never_reaches_the_app(stack, browser):
    before = len(stack.app.seen)
    reply = browser.request("POST", "/upload", b"x" * 1000, {"Content-Type": "application/octet-stream"})
    assert reply.status == 302
    assert len(stack.app.seen) == before


# -- 4. verify is internal -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/ezauth/verify", "/ezauth/verify?x=1", "/ezauth//verify",
                                  "/ezauth/%76erify", "/ezauth/./verify", "/_ezauth_verify"])
def test_verify_is_404_from_outside(alice, path):
    reply = alice.get(path)
    assert reply.status == 404
    assert "X-Auth-Request-User" not in reply.headers


@pytest.mark.parametrize("path", ["/ezauth/verify/", "/ezauth/static/..%2fverify",
                                  "/ezauth/static/%2e%2e/verify", "/ezauth/verify%3Fx"])
def test_verify_lookalikes_do_not_answer_as_verify(alice, path):
    reply = alice.get(path)
    assert reply.status != 200
    assert "X-Auth-Request-User" not in reply.headers


# -- 5. websockets ------------------------------------------------------------------------------

def test_websocket_with_a_session_upgrades_and_echoes(stack, alice):
    status, headers, sock = websocket_handshake(stack.nginx.port, "/queue/join?x=1", f"ezauth={alice.cookie()}")
    with sock:
        assert status.split()[1] == "101", status
        assert headers["sec-websocket-accept"] == headers["x-expected-accept"]
        sock.sendall(encode_frame(b"progress 42%", masked=True))
        opcode, payload = read_frame(sock.makefile("rb"))
    assert (opcode, payload) == (1, b"progress 42%")
    assert stack.app.seen[-1] == "/queue/join?x=1"


@pytest.mark.parametrize("cookie", [None, "ezauth=forged"])
def test_websocket_without_a_session_is_refused(stack, cookie):
    before = len(stack.app.seen)
    status, _, sock = websocket_handshake(stack.nginx.port, "/queue/join", cookie)
    sock.close()
    assert status.split()[1] in ("302", "401"), status
    assert len(stack.app.seen) == before


# -- 6. renewal ---------------------------------------------------------------------------------

def test_session_past_half_its_lifetime_is_renewed_through_nginx(make_stack):
    stack = make_stack(EZAUTH_SESSION_TTL="2")
    browser = stack.browser()
    login_through_nginx(browser)
    first = browser.cookie()
    # `iat` is whole seconds, so the login time cannot say when half the 2 s lifetime is past: wait
    # until just past the half counted from the token's own iat, which leaves ~0.9 s before it expires.
    claims = jwt.decode(first, options={"verify_signature": False})
    time.sleep(max(0.0, (claims["iat"] + claims["exp"]) / 2 + 0.05 - time.time()))
    reply = browser.get("/app/")
    assert reply.echo()["path"] == "/app/"
    renewed = [parse_set_cookie(c) for c in reply.set_cookies if c.startswith("ezauth=")]
    assert len(renewed) == 1, reply.set_cookies
    assert renewed[0][1] not in ("", first)
    fresh = Browser(stack.nginx.port)
    assert echo_header(fresh.get("/app/", Cookie=f"ezauth={renewed[0][1]}").echo(),
                       "X-Auth-Request-User") == ["alice"]


def test_fresh_session_gets_no_cookie_from_verify(alice):
    reply = alice.get("/app/")
    assert reply.status == 200
    assert reply.set_cookies == []  # `add_header Set-Cookie` with an empty value adds nothing


# -- 7. logout ------------------------------------------------------------------------------------

def test_logout_then_the_protected_url_redirects_to_login(stack):
    browser = stack.browser()
    login_through_nginx(browser)
    assert browser.get(TARGET).status == 200
    out = browser.get("/ezauth/logout")
    assert out.status == 303
    assert urlsplit(out.location).path == "/ezauth/login"
    assert browser.cookie() is None, out.set_cookies
    again = browser.get(TARGET)
    assert again.status == 302
    assert login_target(again.location) == TARGET


def get_with_cookie(stack: Stack, path: str, cookie: str | None) -> Reply:
    """One request with exactly this Cookie header (or none), from a fresh cookie jar."""
    return Browser(stack.nginx.port).get(path, **({"Cookie": cookie} if cookie else {}))


# -- 8. the optional auth cache -------------------------------------------------------------------

def tamper(token: str) -> str:
    """Change one character in the middle of the signature (the last one may be padding bits)."""
    head, payload, signature = token.split(".")
    i = len(signature) // 2
    swapped = "A" if signature[i] != "A" else "B"
    return f"{head}.{payload}.{signature[:i]}{swapped}{signature[i + 1:]}"


def test_auth_cache_never_lets_an_invalid_session_in(make_stack):
    stack = make_stack(users=("alice", "bob"), cache=True)
    alice, bob = stack.browser(), stack.browser()
    login_through_nginx(alice)
    login_through_nginx(bob, user="bob")
    a, b = alice.cookie(), bob.cookie()
    a_head, _, a_sig = a.split(".")
    b_payload = b.split(".")[1]

    def user_of(cookie: str | None) -> str | None:
        reply = get_with_cookie(stack, "/app/", cookie)
        if reply.status == 302:
            assert login_target(reply.location) == "/app/"
            return None
        return echo_header(reply.echo(), "X-Auth-Request-User")[0]

    assert user_of(f"ezauth={a}") == "alice"  # now cached
    refused = [None, "ezauth=", f"ezauth={tamper(a)}", f"ezauth={tamper(b)}",
               f"ezauth={a_head}.{b_payload}.{a_sig}", f"ezauth={a}x", "ezauth=x"]
    for cookie in refused:
        assert user_of(cookie) is None, cookie
    # A key that reads only the first ezauth cookie would file these under "no session".
    for cookie in (f"ezauth=; ezauth={a}", f"ezauth=x; ezauth={a}"):
        user_of(cookie)
        assert user_of(cookie.split(";")[0]) is None
        assert user_of(None) is None
    assert user_of(f"ezauth={a}") == "alice"
    assert user_of(f"ezauth={b}") == "bob"

    # Proof that the cache really answers: with ezauth gone, only the cached session passes.
    stack.ezauth.stop()
    assert user_of(f"ezauth={a}") == "alice"
    for cookie in (None, f"ezauth={tamper(a)}"):
        reply = get_with_cookie(stack, "/app/", cookie)
        assert reply.status == 503, (cookie, reply.status)
        assert b'"stub"' not in reply.body


# -- 9. ezauth down ---------------------------------------------------------------------------------

def test_protected_urls_fail_closed_while_ezauth_is_down_and_recover(make_stack):
    stack = make_stack()
    browser = stack.browser()
    login_through_nginx(browser)
    assert browser.get(TARGET).echo()["path"] == TARGET
    stack.ezauth.stop()
    before = len(stack.app.seen)
    for cookie in (f"ezauth={browser.cookie()}", None):
        reply = get_with_cookie(stack, TARGET, cookie)
        assert reply.status in (302, 503), reply.status
        assert b'"stub"' not in reply.body
    status, _, sock = websocket_handshake(stack.nginx.port, "/queue/join", f"ezauth={browser.cookie()}")
    sock.close()
    assert status.split()[1] != "101"
    assert browser.get("/ezauth/login").status == 503
    assert len(stack.app.seen) == before

    stack.restart_ezauth()
    echo = browser.get(TARGET).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]


# -- the documented HTTPS variant -------------------------------------------------------------------

def documented_https_lines() -> list[str]:
    """The indented config lines of the HTTPS paragraph in the example's header comment."""
    lines = EXAMPLE.read_text().split("# HTTPS", 1)[1].splitlines()
    found: list[str] = []
    for line in lines:
        if line.startswith("#     "):
            found.append(line[1:].strip())
        elif found:
            break
    assert any(line.startswith("listen 443 ssl") for line in found), found
    return found


def enable_https(site: str, cert: Path, key: Path, port: int) -> str:
    """Follow the example's HTTPS instructions, with a test certificate and port."""
    lines = [re.sub(r"^listen 443 ", f"listen 127.0.0.1:{port} ", line) for line in documented_https_lines()]
    lines = [re.sub(r"^(ssl_certificate)\s+\S+;", rf"\1 {cert};", line) for line in lines]
    lines = [re.sub(r"^(ssl_certificate_key)\s+\S+;", rf"\1 {key};", line) for line in lines]
    listen = re.search(r"^\s*listen 127\.0\.0\.1:\d+;\n", site, re.M)
    return site[:listen.end()] + "".join(f"    {line}\n" for line in lines) + site[listen.end():]


def make_certificate(openssl: str, where: Path) -> tuple[Path, Path]:
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_https_variant_redirects_http_and_marks_the_cookie_secure(make_stack, tmp_path):
    openssl = require_tool("openssl", "EZAUTH_REQUIRE_NGINX", "openssl")
    cert, key = make_certificate(openssl, tmp_path)
    tls_port = free_port()
    stack = make_stack(edit=lambda site: enable_https(site, cert, key, tls_port))
    plain = stack.browser().get(TARGET)
    assert (plain.status, plain.location) == (301, f"https://127.0.0.1{TARGET}")
    browser = Browser(tls_port, tls=ssl.create_default_context(cafile=str(cert)))
    done = login_through_nginx(browser)
    (cookie,) = [c for c in done.set_cookies if c.startswith("ezauth=")]
    assert "secure" in parse_set_cookie(cookie)[2]
    echo = browser.get(done.location).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Forwarded-Proto") == ["https"]
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
