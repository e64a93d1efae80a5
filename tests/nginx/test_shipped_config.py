"""ezauth behind a real nginx running nginx.conf.example, driven over loopback HTTP only."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import jwt
import pytest

from tests.support.basics import (
    EXAMPLE,
    EZAUTH,
    PASSWORD,
    basic,
    clean_env,
    free_port,
    parse_page,
    parse_set_cookie,
    require_tool,
)
from tests.support.nginx import (
    LISTEN,
    TARGET,
    Browser,
    Stack,
    echo_header,
    enable_https,
    encode_frame,
    login_target,
    login_through_nginx,
    make_certificate,
    nginx_command,
    read_frame,
    render_example,
    websocket_handshake,
    write_prefix,
)
from tests.support.process import Reply

# -- fixtures ---------------------------------------------------------------------------------

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


def test_a_3_kb_url_that_encoding_triples_lands_on_the_login_page_then_the_account_page(stack):
    """Percent-encoded in the login URL header, it outgrew nginx's 4 KiB proxy_buffer_size: nginx's 503."""
    browser = stack.browser()
    long_url = "/app/" + "(" * 3000  # each "(" is "%28" in the header
    first = browser.get(long_url)
    assert (first.status, first.location) == (302, "/ezauth/login"), (first.status, first.text[:200])
    done = login_through_nginx(stack.browser(), target=long_url)
    assert done.location == "/ezauth/account"  # the default page: the return target did not fit
    assert browser.get(long_url).status == 302 and "upstream sent too big header" not in stack.nginx.log()
    shorter = "/app/" + "(" * 900  # still fits: the visitor comes back to it
    assert login_target(browser.get(shorter).location) == shorter
    assert login_through_nginx(stack.browser(), target=shorter).location == shorter


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
    echo = alice.get("/", X_Auth_Request_User="admin", X_Forwarded_User="admin", Remote_User="admin").echo()
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
    assert echo_header(echo, "X-Forwarded-User") == ["alice"]
    assert echo_header(echo, "Remote-User") == ["alice"]


@pytest.mark.parametrize("cookie, app_sees", [
    ("{t}", None),
    ("{t}; theme=dark", "theme=dark"),
    ("theme=dark; {t}", "theme=dark"),
    ("a=1; {t}; b=2", "a=1; b=2"),
    ("a=1;{t};b=2", "a=1; b=2"),  # verify hands nginx the header rewritten, "; " between cookies
    ("myezauth=x; {t}; ezauth_csrf=y", "myezauth=x"),  # the CSRF cookie is ezauth's too
    ("{t}; a=1; {t}", "a=1"),
    ("__Host-ezauth=z; {t}; __Secure-ezauth=w; __Host-ezauth_csrf=v; c=3", "c=3"),  # every name it may use
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
    out = browser.logout()
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

def test_https_variant_redirects_http_and_marks_the_cookie_secure(make_stack, tmp_path):
    openssl = require_tool("openssl", "EZAUTH_REQUIRE_NGINX", "openssl")
    cert, key = make_certificate(openssl, tmp_path)
    tls_port = free_port()
    stack = make_stack(edit=lambda site: enable_https(site, cert, key, tls_port))
    plain = stack.browser().get(TARGET)
    assert (plain.status, plain.location) == (301, f"https://127.0.0.1{TARGET}")
    # http:// typed against the https port (a router forwarding 8443): the same host AND port, over https.
    typo = Browser(tls_port).get(TARGET, Host=f"127.0.0.1:{tls_port}")
    assert (typo.status, typo.location) == (301, f"https://127.0.0.1:{tls_port}{TARGET}")
    browser = Browser(tls_port, tls=ssl.create_default_context(cafile=str(cert)))
    done = login_through_nginx(browser)
    (cookie,) = [c for c in done.set_cookies if c.startswith("__Host-ezauth=")]  # https: the prefixed name
    assert "secure" in parse_set_cookie(cookie)[2]
    echo = browser.get(done.location).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Forwarded-Proto") == ["https"]
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]


# -- real apps behind it: the host with its port, scripts, lockouts, websockets after logout ------

def test_the_app_gets_the_host_as_the_browser_sent_it_port_included(stack, alice):
    """Gradio builds its file URLs from Host, Jupyter checks Origin against it: $host drops the port."""
    echo = alice.get("/app/", Host=f"127.0.0.1:{stack.nginx.port}").echo()
    assert echo_header(echo, "Host") == [f"127.0.0.1:{stack.nginx.port}"]
    named = alice.get("/app/", Host="SD.Example.com:8443").echo()
    assert echo_header(named, "Host") == ["SD.Example.com:8443"]


def test_an_http10_request_without_host_still_gives_the_app_a_host(stack, alice):
    with socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=10) as sock:
        sock.sendall(f"GET /app/ HTTP/1.0\r\nCookie: ezauth={alice.cookie()}\r\n\r\n".encode())
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    body = reply.split(b"\r\n\r\n", 1)[1]
    assert echo_header(json.loads(body), "Host"), reply[:200]


@pytest.mark.parametrize("headers", [
    {"Accept": "*/*", "Sec-Fetch-Mode": "cors"},  # fetch() in an open tab after logout
    {"Accept": "text/event-stream", "Sec-Fetch-Mode": "cors"},  # Gradio's server-sent events
    {"Accept": "application/json"},  # gradio_client, requests
    {"Accept": "*/*"},  # curl
    {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"},
    {"Accept": "text/html,*/*", "Sec-Fetch-Mode": "no-cors"},
])
def test_scripts_and_in_page_requests_get_a_json_401_not_a_login_page(stack, headers):
    before = len(stack.app.seen)
    # Only these headers: a browser navigating would also send Sec-Fetch-Mode: navigate.
    reply = Browser(stack.nginx.port).request("GET", "/config?x=1", headers={"Sec-Fetch-Mode": "", **headers})
    assert reply.status == 401, (reply.status, reply.text[:200])
    assert reply.headers["Content-Type"].startswith("application/json")
    assert json.loads(reply.body) == {"error": "login_required", "login": "/ezauth/login?rd=%2Fconfig%3Fx%3D1"}
    assert reply.headers["X-Ezauth-Login"] == "/ezauth/login?rd=%2Fconfig%3Fx%3D1"
    assert reply.headers.get_all("WWW-Authenticate") == ['Bearer realm="ezauth"']
    assert len(stack.app.seen) == before


def test_a_browser_opening_a_page_still_gets_the_login_page(stack):
    reply = Browser(stack.nginx.port).get("/config?x=1")
    assert (reply.status, login_target(reply.location)) == (302, "/config?x=1")
    assert reply.headers.get_all("WWW-Authenticate") is None


def test_a_locked_out_basic_client_gets_429_with_retry_after_and_one_challenge(make_stack):
    stack = make_stack(EZAUTH_BASIC_AUTH="1", EZAUTH_MAX_ATTEMPTS="2")
    client = Browser(stack.nginx.port)
    wrong = {"Authorization": basic("alice", "wrong password"), "Accept": "*/*", "Sec-Fetch-Mode": ""}
    for _ in range(2):
        reply = client.request("GET", "/sdapi/v1/options", headers=wrong)
        assert reply.status == 401 and reply.headers.get_all("WWW-Authenticate") == ['Basic realm="ezauth"']
        assert json.loads(reply.body)["error"] == "wrong_credentials"
    right = {**wrong, "Authorization": basic("alice", PASSWORD)}
    locked = client.request("GET", "/sdapi/v1/options", headers=right)
    assert locked.status == 429, (locked.status, locked.text)
    assert 1 <= int(locked.headers["Retry-After"]) <= 300
    assert json.loads(locked.body)["error"] == "too_many_attempts"
    assert stack.app.seen == []


def test_reloading_nginx_ends_a_websocket_opened_before_logout(make_stack):
    """nginx checks a websocket once, when it opens. The documented mitigation: after a logout that
    matters, reload nginx with worker_shutdown_timeout set, and every open websocket is cut off."""
    stack = make_stack(main="worker_shutdown_timeout 1s;\n")
    browser = stack.browser()
    login_through_nginx(browser)
    cookie = f"ezauth={browser.cookie()}"
    status, _, sock = websocket_handshake(stack.nginx.port, "/api/kernels/1/channels", cookie)
    with sock:
        assert status.split()[1] == "101", status
        stream = sock.makefile("rb")
        sock.sendall(encode_frame(b"before logout", masked=True))
        assert read_frame(stream) == (1, b"before logout")
        browser.logout()
        sock.sendall(encode_frame(b"after logout", masked=True))
        assert read_frame(stream) == (1, b"after logout"), "the open socket outlives logout (documented)"
        stack.nginx.reload()
        sock.settimeout(10)
        closed_at = time.monotonic()
        assert sock.recv(1) == b"", "the socket is cut off by the reload"
        assert time.monotonic() - closed_at < 8
    status, _, again = websocket_handshake(stack.nginx.port, "/api/kernels/1/channels", cookie)
    again.close()
    assert status.split()[1] in ("302", "401"), status


def test_the_websocket_lifetime_is_said_plainly_in_the_readme_and_the_config():
    readme = (EXAMPLE.parent / "README.md").read_text()
    assert "An open websocket outlives logout" in readme and "worker_shutdown_timeout 10s;" in readme
    assert "worker_shutdown_timeout 10s;" in EXAMPLE.read_text()


@pytest.mark.parametrize("listen, expected", [("8080", "listen 8080;"), ("127.0.0.1:8080", "listen 127.0.0.1:8080;"),
                                              ("[::]:8443", "listen [::]:8443;")])
def test_nginx_config_takes_an_address_and_the_ezauth_address(nginx_bin, tmp_path, listen, expected):
    done = subprocess.run([sys.executable, str(EZAUTH), "nginx-config", "--app", "http://127.0.0.1:9999",
                           "--listen", listen, "--ezauth", "127.0.0.1:2500"],
                          capture_output=True, text=True, timeout=30, env=clean_env(EZAUTH_PORT="3000"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first_line = done.stdout.splitlines()[0]
    assert first_line.startswith("#") and "127.0.0.1:2500" in first_line and "--ezauth" in first_line
    assert expected in done.stdout and "server 127.0.0.1:2500;" in done.stdout and "3000" not in done.stdout
    checked = nginx_t(nginx_bin, tmp_path / "prefix", done.stdout)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("ezauth_at, upstream", [
    ("2425", "server 127.0.0.1:2425;"), ("http://[::1]:2425", "server [::1]:2425;"),
    ("unix:/run/ezauth/ezauth.sock", "server unix:/run/ezauth/ezauth.sock;"),
])
def test_nginx_config_reads_the_ezauth_address_in_every_form(tmp_path, ezauth_at, upstream):
    done = subprocess.run([sys.executable, str(EZAUTH), "nginx-config", "--app", "127.0.0.1:7860", "--listen", "80",
                           "--ezauth", ezauth_at], capture_output=True, text=True, timeout=30, env=clean_env(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert upstream in done.stdout


def test_nginx_config_says_where_the_ezauth_address_came_from_without_the_flag(tmp_path):
    (tmp_path / ".env").write_text("EZAUTH_PORT=2600\n")
    done = subprocess.run([sys.executable, str(EZAUTH), "nginx-config", "--app", "127.0.0.1:7860", "--listen", "80"],
                          capture_output=True, text=True, timeout=30, env=clean_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    first_line = done.stdout.splitlines()[0]
    assert "127.0.0.1:2600" in first_line and "EZAUTH_PORT" in first_line


@pytest.mark.parametrize("args", [("--listen", "8080x"), ("--listen", "1.2.3:80"), ("--listen", "70000"),
                                  ("--listen", "[zz]:80"), ("--ezauth", "ftp://h:1"), ("--ezauth", "host")])
def test_nginx_config_refuses_bad_addresses_before_printing_anything(tmp_path, args):
    flags = {"--listen": "80", "--ezauth": "2424"}
    flags[args[0]] = args[1]
    done = subprocess.run([sys.executable, str(EZAUTH), "nginx-config", "--app", "127.0.0.1:7860",
                           *[item for pair in flags.items() for item in pair]],
                          capture_output=True, text=True, timeout=30, env=clean_env(), cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == "" and args[0] in done.stderr
