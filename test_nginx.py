"""ezauth behind a real nginx running nginx.conf.example, driven over loopback HTTP only."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest

from conftest import EZAUTH, PASSWORD, Server, add_user, clean_env, free_port, require_tool, start_server

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "nginx.conf.example"
EZAUTH_ADDR, APP_ADDR, LISTEN = "127.0.0.1:2424", "127.0.0.1:7860", "listen 80;"
CACHE_MARK = "# ezauth-cache"
CACHE_DIR = "/run/nginx-ezauth-cache"
TARGET = "/app/?a=1&b=2&c=%2F"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- Stub app: echoes what nginx sent it, speaks a little websocket ------------------------

def read_exact(stream: BinaryIO, size: int) -> bytes:
    """Exactly `size` bytes from a stream, or EOFError."""
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"wanted {size} bytes, got {len(data)}")
    return data


def encode_frame(payload: bytes, masked: bool, opcode: int = 1) -> bytes:
    """One final RFC 6455 frame; clients must mask, servers must not."""
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes([0x80 | opcode, mask_bit | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, mask_bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([0x80 | opcode, mask_bit | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_frame(stream: BinaryIO) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one frame."""
    first, second = read_exact(stream, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", read_exact(stream, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", read_exact(stream, 8))[0]
    key = read_exact(stream, 4) if second & 0x80 else b""
    payload = read_exact(stream, size)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode(), usedforsecurity=False).digest()).decode()


class StubHandler(BaseHTTPRequestHandler):
    """Answers every request with JSON: method, raw path, headers, body length."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.echo_websocket()
            return
        remaining, body_length = int(self.headers.get("Content-Length") or 0), 0
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)
            body_length += len(chunk)
        payload = json.dumps({"app": "stub", "method": self.command, "path": self.path,
                              "headers": list(self.headers.items()), "body_length": body_length}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_POST = do_PUT = do_HEAD = do_GET

    def echo_websocket(self) -> None:
        accept = websocket_accept(self.headers["Sec-WebSocket-Key"])
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        self.wfile.flush()
        opcode, payload = read_frame(self.rfile)
        self.wfile.write(encode_frame(payload, masked=False, opcode=opcode))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class StubApp:
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def seen(self) -> list[str]:
        return self.server.seen

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_stub_app() -> StubApp:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.daemon_threads = True
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return StubApp(server, thread)


# -- nginx ----------------------------------------------------------------------------------

def render_example(ezauth_port: int, app_port: int, nginx_port: int, cache_dir: Path | None = None) -> str:
    """The example with only the addresses and the listen port replaced (+ the cache turned on)."""
    text = EXAMPLE.read_text()
    for literal in (EZAUTH_ADDR, APP_ADDR, LISTEN):
        assert literal in text, f"nginx.conf.example lost the literal {literal!r}"
    text = (text.replace(EZAUTH_ADDR, f"127.0.0.1:{ezauth_port}")
                .replace(APP_ADDR, f"127.0.0.1:{app_port}")
                .replace(LISTEN, f"listen 127.0.0.1:{nginx_port};"))
    if cache_dir is not None:
        text = enable_cache(text).replace(CACHE_DIR, str(cache_dir))
    return text


def enable_cache(text: str) -> str:
    """Uncomment every line carrying the cache marker: drop the `#` at its first non-space."""
    lines = text.splitlines(keepends=True)
    marked = [i for i, line in enumerate(lines) if CACHE_MARK in line]
    assert len(marked) >= 2, "the auth cache lines are not marked"
    for i in marked:
        assert lines[i].lstrip().startswith("#"), f"cache line is on by default: {lines[i]!r}"
        lines[i] = re.sub(r"^(\s*)#", r"\1", lines[i], count=1)
    assert any(line.lstrip().startswith("proxy_cache_path ") for line in lines)
    return "".join(lines)


def write_prefix(prefix: Path, site: str) -> Path:
    """A private nginx prefix whose top-level nginx.conf includes `site` inside http { }."""
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "ezauth.conf").write_text(site)
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/tmp/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root the workers would drop to `nobody`, who cannot enter pytest's private temp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/logs/access.log;
    default_type application/octet-stream;
{temp_paths}
    include {prefix}/ezauth.conf;
}}
""")
    return conf


def nginx_command(nginx: str, prefix: Path, *args: str) -> list[str]:
    return [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
            "-e", str(prefix / "logs" / "error.log"), *args]


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc); empty elsewhere."""
    found: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in path.read_text().split()]
    return found


@dataclass
class Nginx:
    prefix: Path
    port: int
    proc: subprocess.Popen

    def log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        workers = child_pids(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_nginx(nginx: str, prefix: Path, site: str, port: int) -> Nginx:
    """Run nginx in the foreground on `port` and wait until it accepts connections."""
    write_prefix(prefix, site)
    with open(prefix / "logs" / "stderr.log", "ab") as out:
        proc = subprocess.Popen(nginx_command(nginx, prefix, "-g", "daemon off;"), stdout=out, stderr=out)
    server = Nginx(prefix, port, proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return server
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"nginx did not listen on {port}:\n{server.log()}")


# -- A tiny browser: keeps cookies by path, never follows redirects ----------------------

@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def echo(self) -> dict:
        """The stub app's echo; fails unless this reply really came from the app."""
        assert self.status == 200, (self.status, self.text[:300])
        data = json.loads(self.body)
        assert data["app"] == "stub"
        return data


def echo_header(echo: dict, name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    """(name, value, lower-cased attributes) of one Set-Cookie header."""
    first, *rest = header.split(";")
    name, _, value = first.strip().partition("=")
    attrs = {}
    for part in rest:
        key, _, val = part.strip().partition("=")
        attrs[key.lower()] = val
    return name, value, attrs


def cookie_is_gone(attrs: dict[str, str]) -> bool:
    if "max-age" in attrs:
        return int(attrs["max-age"] or 0) <= 0
    if "expires" in attrs:
        return parsedate_to_datetime(attrs["expires"]).timestamp() <= time.time()
    return False


@dataclass
class Browser:
    port: int
    tls: ssl.SSLContext | None = None
    jar: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, path) -> value

    def cookie(self, name: str = "ezauth") -> str | None:
        return next((v for (n, _), v in self.jar.items() if n == name), None)

    def cookie_header(self, path: str) -> str:
        pairs = sorted(((p, n, v) for (n, p), v in self.jar.items()
                        if path.startswith(p.rstrip("/") + "/") or path == p), key=lambda t: -len(t[0]))
        return "; ".join(f"{n}={v}" for _, n, v in pairs)

    def keep(self, headers: list[str]) -> None:
        for header in headers:
            name, value, attrs = parse_set_cookie(header)
            slot = (name, attrs.get("path") or "/")
            if cookie_is_gone(attrs):
                self.jar.pop(slot, None)
            else:
                self.jar[slot] = value

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        headers = dict(headers or {})
        cookie = self.cookie_header(urlsplit(path).path)
        if cookie and "Cookie" not in headers:
            headers["Cookie"] = cookie
        conn = (http.client.HTTPSConnection("127.0.0.1", self.port, timeout=15, context=self.tls) if self.tls
                else http.client.HTTPConnection("127.0.0.1", self.port, timeout=15))
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()
        self.keep(reply.set_cookies)
        return reply

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})

    def post_form(self, path: str, fields: dict[str, str]) -> Reply:
        return self.request("POST", path, urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})


class FormParser(HTMLParser):
    """The login form's action and input fields; every /ezauth/static/ URL of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.action, self.fields, self.assets = "", {}, set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = attr.get("action", "")
        if tag == "input" and attr.get("type") == "hidden":
            self.fields[attr["name"]] = attr.get("value", "")
        for key in ("src", "href"):
            if attr.get(key, "").startswith("/ezauth/static/"):
                self.assets.add(attr[key])


def parse_page(html: str) -> FormParser:
    parser = FormParser()
    parser.feed(html)
    return parser


def login_target(location: str) -> str:
    """The `rd` return target of a redirect to the login page."""
    parts = urlsplit(location)
    assert parts.path == "/ezauth/login", location
    return parse_qs(parts.query)["rd"][0]


def log_in(browser: Browser, user: str = "alice", target: str = TARGET) -> Reply:
    """Walk the real flow: protected URL, login page, form POST. Returns the POST's reply."""
    first = browser.get(target)
    assert first.status == 302, (first.status, first.text[:300])
    page = browser.get(first.location)
    assert page.status == 200, page.text[:300]
    form = parse_page(page.text)
    assert form.action and "csrf" in form.fields
    done = browser.post_form(form.action, {**form.fields, "username": user, "password": PASSWORD})
    assert done.status == 303, (done.status, done.text[:500])
    assert browser.cookie(), done.set_cookies
    return done


# -- websocket client -----------------------------------------------------------------------

def websocket_handshake(port: int, path: str, cookie: str | None) -> tuple[str, dict[str, str], socket.socket]:
    """Send an upgrade request; (status line, headers, socket positioned after the headers)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(4096)
        if not chunk:
            break
        raw += chunk
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    headers["x-expected-accept"] = websocket_accept(key)
    return head[0], headers, sock


# -- fixtures ---------------------------------------------------------------------------------

@dataclass
class Stack:
    """Stub app + ezauth + nginx (running the example), and how to stop them all."""

    app: StubApp
    ezauth: Server
    nginx: Nginx
    cleanup: contextlib.ExitStack

    def browser(self) -> Browser:
        return Browser(self.nginx.port)

    def restart_ezauth(self) -> None:
        """Start ezauth again on the same port and data dir."""
        self.ezauth = start_server(self.ezauth.data_dir, port=self.ezauth.port, **self.ezauth.extra_env)
        self.cleanup.callback(self.ezauth.stop)


def build_stack(nginx_bin: str, root: Path, cleanup: contextlib.ExitStack, users: tuple = ("alice",),
                cache: bool = False, edit: Callable[[str], str] | None = None, **env: str) -> Stack:
    app = start_stub_app()
    cleanup.callback(app.close)
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    for name in users:
        add_user(data_dir, name)
    ezauth = start_server(data_dir, **env)
    cleanup.callback(ezauth.stop)
    port = free_port()
    site = render_example(ezauth.port, app.port, port, root / "auth-cache" if cache else None)
    site = edit(site) if edit else site
    nginx = start_nginx(nginx_bin, root / "nginx", site, port)
    cleanup.callback(nginx.stop)
    return Stack(app, ezauth, nginx, cleanup)


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    return require_tool("nginx", "EZAUTH_REQUIRE_NGINX", "nginx-light")


@pytest.fixture(scope="module")
def stack(nginx_bin, tmp_path_factory) -> Iterator[Stack]:
    """One shared stack with users alice and bob."""
    with contextlib.ExitStack() as cleanup:
        yield build_stack(nginx_bin, tmp_path_factory.mktemp("stack"), cleanup, users=("alice", "bob"))


@pytest.fixture
def make_stack(nginx_bin, tmp_path) -> Iterator:
    """Private stacks for tests that stop ezauth or change its settings."""
    with contextlib.ExitStack() as cleanup:
        count = iter(range(100))
        yield lambda **kw: build_stack(nginx_bin, tmp_path / f"stack{next(count)}", cleanup, **kw)


@pytest.fixture
def browser(stack) -> Browser:
    return stack.browser()


@pytest.fixture(scope="module")
def alice(stack) -> Browser:
    """A browser logged in as alice."""
    browser = stack.browser()
    log_in(browser)
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
    done = log_in(browser)
    assert done.location == TARGET
    echo = browser.get(done.location).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
    assert echo_header(echo, "X-Forwarded-User") == ["alice"]
    # Design: the app never receives the ezauth session cookie (nor any other cookie here).
    assert echo_header(echo, "Cookie") == []


def test_session_cookie_is_httponly_and_not_secure_over_plain_http(stack):
    browser = stack.browser()
    done = log_in(browser)
    (cookie,) = [c for c in done.set_cookies if c.startswith("ezauth=")]
    _, _, attrs = parse_set_cookie(cookie)
    assert "httponly" in attrs and attrs["path"] == "/"
    assert "secure" not in attrs


def test_each_user_is_named_to_the_app(stack):
    browser = stack.browser()
    log_in(browser, user="bob")
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
    time.sleep(1.02 - time.time() % 1)  # log in just after a whole second: `iat` may be truncated
    log_in(browser)
    first = browser.cookie()
    time.sleep(1.1)
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
    log_in(browser)
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
    log_in(alice)
    log_in(bob, user="bob")
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
    log_in(browser)
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
    done = log_in(browser)
    (cookie,) = [c for c in done.set_cookies if c.startswith("ezauth=")]
    assert "secure" in parse_set_cookie(cookie)[2]
    echo = browser.get(done.location).echo()
    assert echo["path"] == TARGET
    assert echo_header(echo, "X-Forwarded-Proto") == ["https"]
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
