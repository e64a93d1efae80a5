"""The household's box through a real nginx (issues 16 and 19): two apps on two ports and two
names from one `nginx-config` command, each with its own people whatever the Host header says;
https with a certificate made here; the login pages on a portal host of their own; `anyone` and
`from` lines with the auth cache off and on; the proxy's other family of headers ignored; the app
never sees ezauth's cookies; and one host for the rules and the app."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.basics import LOGIN, PASSWORD, free_port, parse_page, require_tool
from tests.support.nginx import (
    TARGET,
    Browser,
    Nginx,
    StubApp,
    echo_header,
    login_through_nginx,
    make_certificate,
    nginx_command,
    start_nginx,
    start_stub_app,
    write_prefix,
)
from tests.support.process import Server, add_user, http_call, run_cli, start_server


@pytest.fixture
def box(tmp_path) -> Iterator[Callable[..., Server]]:
    """ezauth on a data dir with alice and bob (and RULES, when given), stopped afterwards."""
    with contextlib.ExitStack() as cleanup:
        def start(rules: str = "", **env: str) -> Server:
            data = tmp_path / "data"
            for name in ("alice", "bob"):
                add_user(data, name)
            if rules:
                (data / "rules").write_text(rules)
            server = start_server(data, **env)
            cleanup.callback(server.stop)
            return server
        yield start


@pytest.fixture
def apps() -> Iterator[Callable[[], StubApp]]:
    with contextlib.ExitStack() as cleanup:
        def start() -> StubApp:
            app = start_stub_app()
            cleanup.callback(app.close)
            return app
        yield start


@pytest.fixture
def nginx_with(nginx_bin, tmp_path) -> Iterator[Callable[[str, int], Nginx]]:
    """Run a rendered config (waiting for PORT), stopped afterwards."""
    with contextlib.ExitStack() as cleanup:
        def start(site: str, port: int) -> Nginx:
            nginx = start_nginx(nginx_bin, tmp_path / f"nginx{port}", site, port)
            cleanup.callback(nginx.stop)
            return nginx
        yield start


def rendered(ezauth: Server, *flags: str) -> str:
    """`python ezauth.py nginx-config FLAGS` for this ezauth: the config a user would paste."""
    done = run_cli("nginx-config", *flags, "--ezauth", f"127.0.0.1:{ezauth.port}")
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- Several apps, each its own people -----------------------------------------------------------


def test_two_apps_on_two_ports_from_one_command_each_with_its_own_people(box, apps, nginx_with):
    gradio, jupyter = apps(), apps()
    gradio_port, jupyter_port = free_port(), free_port()
    ezauth = box(f"allow alice * /\nallow bob *:{gradio_port} /\n")
    site = rendered(ezauth, "--app", f"http://127.0.0.1:{gradio.port}", "--listen", f"127.0.0.1:{gradio_port}",
                    "--server-name", "box", "--app", f"http://127.0.0.1:{jupyter.port}", "--listen",
                    f"127.0.0.1:{jupyter_port}", "--server-name", "box.example.test")
    assert site.count("upstream ezauth {") == 1 and site.count("\nserver {") == 2
    nginx_with(site, gradio_port)

    bob = Browser(gradio_port)
    login_through_nginx(bob, "bob", "/gradio")
    assert bob.get("/gradio").echo()["path"] == "/gradio"
    on_jupyter = Browser(jupyter_port, jar=bob.jar)  # cookies know no ports: the same session
    for host in (None, f"box:{gradio_port}", f"127.0.0.1:{gradio_port}"):  # a forged Host changes nothing
        refused = on_jupyter.get("/lab", **({"Host": host} if host else {}))
        assert refused.status == 403 and refused.app_echo() is None, (host, refused.status, refused.text[:200])
    assert jupyter.seen == []

    alice = Browser(jupyter_port)
    login_through_nginx(alice, "alice", "/lab")
    assert alice.get("/lab").echo()["path"] == "/lab"
    assert Browser(gradio_port, jar=alice.jar).get("/gradio").echo()["path"] == "/gradio"


def test_an_app_added_later_uses_the_shared_part_written_once(box, apps, nginx_with):
    first, second = apps(), apps()
    first_port, second_port = free_port(), free_port()
    ezauth = box()
    shared = rendered(ezauth, "--part", "shared")
    one = rendered(ezauth, "--part", "apps", "--app", f"http://127.0.0.1:{first.port}", "--listen",
                   f"127.0.0.1:{first_port}")
    two = rendered(ezauth, "--part", "apps", "--app", f"http://127.0.0.1:{second.port}", "--listen",
                   f"127.0.0.1:{second_port}")
    assert "upstream ezauth" in shared and "upstream ezauth" not in one + two and "server {" not in shared
    nginx_with(shared + one + two, first_port)  # three files included side by side
    for port in (first_port, second_port):
        browser = Browser(port)
        login_through_nginx(browser, "alice", "/x")
        assert browser.get("/x").echo()["path"] == "/x"


# -- https from the same command -----------------------------------------------------------------


def test_https_from_nginx_config_with_a_certificate_made_here(box, apps, nginx_with, tmp_path):
    cert, key = make_certificate(require_tool("openssl", "EZAUTH_REQUIRE_NGINX", "openssl"), tmp_path)
    app, tls_port, http_port = apps(), free_port(), free_port()
    ezauth = box()
    site = rendered(ezauth, "--tls-cert", str(cert), "--tls-key", str(key), "--app", f"http://127.0.0.1:{app.port}",
                    "--listen", f"127.0.0.1:{tls_port}", "--server-name", "127.0.0.1")
    assert f"listen 127.0.0.1:{tls_port} ssl;" in site
    site = site.replace("    listen 80;\n", f"    listen 127.0.0.1:{http_port};\n")  # port 80 is not ours here
    nginx_with(site, tls_port)

    plain = http_call(http_port, "GET", TARGET)
    assert (plain.status, plain.location) == (301, f"https://127.0.0.1:{tls_port}{TARGET}")
    typo = http_call(tls_port, "GET", TARGET)  # http:// typed against the https port
    assert (typo.status, typo.location) == (301, f"https://127.0.0.1:{tls_port}{TARGET}")
    browser = Browser(tls_port, tls=ssl.create_default_context(cafile=str(cert)))
    done = login_through_nginx(browser)
    session = [c for c in done.set_cookies if c.startswith("__Host-ezauth=")]
    assert len(session) == 1 and "Secure" in session[0] and "Domain" not in session[0]
    assert browser.get(TARGET).echo()["path"] == TARGET
    replay = Browser(tls_port, tls=browser.tls)  # over https the plain name is no session at all
    assert replay.get(TARGET, Cookie=f"ezauth={browser.cookie()}").status == 302


def test_listen_443_without_a_certificate_is_refused_saying_what_to_add():
    done = run_cli("nginx-config", "--app", "http://127.0.0.1:7860", "--listen", "443")
    assert done.returncode == 1 and done.stdout == ""
    assert "port 443 is for https; add --tls-cert FILE --tls-key FILE" in done.stderr


# -- The portal: the login pages on a host of their own ------------------------------------------


def test_the_portal_serves_every_ezauth_page_and_sends_the_visitor_back(box, apps, nginx_with):
    app, port = apps(), free_port()
    portal, app_host = f"auth.example.test:{port}", f"notebook.example.test:{port}"
    ezauth = box(EZAUTH_COOKIE_DOMAIN=".example.test", EZAUTH_PORTAL=f"http://{portal}")
    site = rendered(ezauth, "--listen", f"127.0.0.1:{port}", "--app", f"http://127.0.0.1:{app.port}",
                    "--server-name", "notebook.example.test", "--portal", "auth.example.test")
    nginx_with(site, port)
    browser = Browser(port)

    first = browser.get("/cell?a=1", Host=app_host)
    parts = urlsplit(first.location)
    assert first.status == 302 and (parts.netloc, parts.path) == (portal, LOGIN), first.location
    assert parse_qs(parts.query)["rd"] == [f"http://{app_host}/cell?a=1"]
    for path in (LOGIN, "/ezauth/account", "/ezauth/logout"):  # no ezauth page on the app's host
        moved = browser.get(path, Host=app_host)
        assert (moved.status, moved.location) == (303, f"http://{portal}{path}"), path
    page = browser.get(f"{parts.path}?{parts.query}", Host=portal)
    form = parse_page(page.text)
    done = browser.post_form(form.action, {**form.hidden, "username": "alice", "password": PASSWORD}, Host=portal)
    assert (done.status, done.location) == (303, f"http://{app_host}/cell?a=1")
    assert any("Domain=example.test" in c for c in done.set_cookies)
    assert echo_header(browser.get("/cell?a=1", Host=app_host).echo(), "X-Auth-Request-User") == ["alice"]
    posted = browser.post_form("/ezauth/logout", {"csrf": form.hidden["csrf"]}, Host=app_host)
    assert posted.status == 403  # the app's host makes no change, not even a logout
    assert browser.get("/", Host=portal).location == "/ezauth/account"
    assert browser.logout(Host=portal).status == 303
    assert browser.get("/cell", Host=app_host).status == 302


# -- anyone and from, with the auth cache off and on ----------------------------------------------


def anonymous(port: int, path: str, source: str = "127.0.0.1", **headers: str) -> int:
    """A browser without a session opening PATH, from the loopback address SOURCE: the status it gets."""
    sent = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
            **{k.replace("_", "-"): v for k, v in headers.items()}}
    return http_call(port, "GET", path, headers=sent, source=source).status


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "auth-cache"])
def test_anyone_and_from_lines_open_exactly_what_they_say(make_stack, cache):
    rules = ("allow anyone * /public/\nallow anyone * /lan/ from 127.0.0.1/32\nallow @family * / from 127.0.0.1/32\n"
             "group family: bob\nallow alice * /\n")
    stack = make_stack(users=("alice", "bob"), cache=cache, rules=rules)
    port = stack.nginx.port
    for _ in range(2):  # the second round may come from the auth cache
        assert anonymous(port, "/public/x") == 200 and anonymous(port, "/public/x", "127.0.0.2") == 200
        assert anonymous(port, "/lan/x") == 200
        assert anonymous(port, "/lan/x", "127.0.0.2") == 302  # not from that network: the login page
        assert anonymous(port, "/lan/x", "127.0.0.2", X_Forwarded_For="127.0.0.1") == 302
        assert anonymous(port, "/private") == 302  # nothing is public without a line
    public = http_call(port, "GET", "/public/x").echo()
    assert echo_header(public, "X-Auth-Request-User") == []  # nobody logged in: no user header
    alice = stack.browser()
    login_through_nginx(alice, "alice", "/private")
    assert echo_header(alice.get("/public/x").echo(), "X-Auth-Request-User") == ["alice"]
    bob = stack.browser()
    login_through_nginx(bob, "bob", "/home")
    cookie = f"ezauth={bob.cookie()}"
    assert http_call(port, "GET", "/home", headers={"Cookie": cookie}).status == 200
    away = http_call(port, "GET", "/home", headers={"Cookie": cookie}, source="127.0.0.2")
    assert away.status == 403 and away.app_echo() is None  # the family, outside the home network


# -- The other family of proxy headers -----------------------------------------------------------


def test_a_client_cannot_choose_the_path_the_rules_judge(make_stack):
    stack = make_stack(rules="deny alice * /admin\nallow alice * /\n")
    browser = stack.browser()
    login_through_nginx(browser, "alice", "/x")
    assert browser.get("/x", X_Forwarded_Uri="/admin/x", X_Original_URI="/admin/x").echo()["path"] == "/x"
    for spoof in ({"X-Forwarded-Uri": "/x"}, {"X-Original-URI": "/x"},
                  {"X-Forwarded-Uri": "/x", "X-Forwarded-Host": "a"}):
        refused = browser.request("GET", "/admin/y", headers=spoof)
        assert refused.status == 403 and refused.app_echo() is None, spoof
    assert "/admin/y" not in stack.app.seen


def test_verify_told_the_wrong_family_refuses_instead_of_judging_slash(make_stack):
    """ezauth told `forwarded` behind the shipped nginx config (which sends X-Original-*) gets no URI:
    with rules it lets nobody in and says why, rather than judging every request as `/`."""
    stack = make_stack(rules="allow alice * /\n", EZAUTH_PROXY_HEADERS="forwarded")
    browser = stack.browser()
    login_through_nginx(browser, "alice", "/x")
    refused = browser.get("/x", X_Forwarded_Uri="/x")  # a client's copy is cleared by nginx all the same
    assert refused.status == 403 and refused.app_echo() is None
    assert "event=no_original_uri" in stack.ezauth.log()


# -- The app never sees ezauth's cookies; one host for rules and app ---------------------------------


def test_the_app_gets_the_cookie_header_without_any_of_ezauths_cookies(stack):
    browser = stack.browser()
    login_through_nginx(browser, "alice", "/c")
    jar = (f"a=1; __Host-ezauth=stale; ezauth ={browser.cookie()}; ezauth_csrf=c1; __Host-ezauth_csrf=c2; "
           f"__Secure-ezauth=tossed; b=2")
    echo = browser.get("/c", Cookie=jar).echo()
    assert echo_header(echo, "Cookie") == ["a=1; b=2"]
    only_ours = browser.get("/c", Cookie=f"ezauth={browser.cookie()}").echo()
    assert echo_header(only_ours, "Cookie") == []
    theirs = browser.request("GET", "/c", headers={"Authorization": "Bearer app-token", "Cookie": "theme=dark"})
    assert theirs.status == 302  # no session: the app's own cookie alone lets nobody in


def test_a_request_line_host_and_a_host_header_that_differ_are_refused(make_stack):
    stack = make_stack(rules="allow alice public.example.test /\n")
    browser = stack.browser()
    login_through_nginx(browser, "alice", "/x")
    cookie = f"ezauth={browser.cookie()}"
    with socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=10) as sock:
        sock.sendall(f"GET http://public.example.test/x HTTP/1.1\r\nHost: private.example.test\r\nCookie: {cookie}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    assert stack.app.seen == [] and b'"app": "stub"' not in answer
    assert "reason=host_mismatch" in stack.ezauth.log()
    ok = http_call(stack.nginx.port, "GET", "/x", headers={"Host": "public.example.test", "Cookie": cookie})
    assert ok.echo()["path"] == "/x"


def test_nginx_t_accepts_every_shape_nginx_config_writes(nginx_bin, tmp_path):
    cert, key = make_certificate(require_tool("openssl", "EZAUTH_REQUIRE_NGINX", "openssl"), tmp_path)
    shapes = {
        "one": ["--app", "http://127.0.0.1:7860"],
        "two": ["--app", "http://127.0.0.1:7860", "--listen", "8080", "--app", "http://127.0.0.1:8888",
                "--listen", "[::]:8081"],
        "tls-portal": ["--tls-cert", str(cert), "--tls-key", str(key), "--app", "http://127.0.0.1:7860",
                       "--server-name", "sd.example.test", "--app", "http://127.0.0.1:8888", "--server-name",
                       "nb.example.test", "--listen", "8443", "--portal", "auth.example.test"],
    }
    for name, flags in shapes.items():
        done = run_cli("nginx-config", *flags)
        assert done.returncode == 0, done.stderr
        write_prefix(tmp_path / name, done.stdout)
        checked = subprocess.run(nginx_command(nginx_bin, tmp_path / name, "-t"), capture_output=True, text=True,
                                 timeout=30)
        assert checked.returncode == 0, (name, checked.stderr)


def test_an_app_with_big_cookies_still_gets_them_through_verify(stack):
    """Verify hands the app's Cookie header back to nginx: a 7 KB one (nginx takes lines up to 8 KB)
    must fit the verify answer's buffer, never turn into the sign-in-unavailable page."""
    browser = stack.browser()
    login_through_nginx(browser, "alice", "/big")
    big = "; ".join(f"app{n}={'x' * 60}" for n in range(100))
    assert len(big) > 6000
    echo = browser.get("/big", Cookie=f"{big}; ezauth={browser.cookie()}").echo()
    assert echo_header(echo, "Cookie") == [big]
