"""Shared test helpers, each defined once; test files take them with `from conftest import ...`.

Sections, in dependency order: basics (paths, the clock, polling), users files, pages and cookies,
the app in-process through WebTest, real ezauth processes, nginx running nginx.conf.example, and
Chromium. No test file imports another. Playwright is imported only inside the Chromium helpers,
so everything else collects and runs without it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.message import Message
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NoReturn, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
import webtest

import ezauth

if TYPE_CHECKING:
    from playwright.sync_api import Browser as Chromium
    from playwright.sync_api import Page, Response

# -- Basics: paths, constants, the clock, polling ---------------------------------------------

HERE = Path(__file__).resolve().parent
EZAUTH = HERE / "ezauth.py"
EXAMPLE = HERE / "nginx.conf.example"
PASSWORD = "correct horse battery"  # every test user's password unless a test says otherwise
CSRF = "c" * 43  # any value works as long as the cookie and the form field agree
T0 = 1_800_000_000.0  # the fake clock's start
LOGIN = "/ezauth/login"
VERIFY = "/ezauth/verify"
TRUSTED_PEER = {"REMOTE_ADDR": "127.0.0.1"}  # nginx on loopback, the default trusted proxy

T = TypeVar("T")


class FakeClock:
    """Time that only moves when a test says so (ezauth takes any callable as its clock)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Call PREDICATE until it returns something truthy or TIMEOUT seconds pass; return its last result.

    How a test waits for another process (a file it rereads, a port it opens): poll, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()) and time.monotonic() < deadline:
        time.sleep(interval)
    return result


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing(message: str, flag: str) -> NoReturn:
    """Skip the test, or fail it when the CI flag (EZAUTH_REQUIRE_NGINX / _BROWSER = 1) says it must run."""
    if os.environ.get(flag) == "1":
        pytest.fail(f"{message} ({flag}=1 says this suite must run)")
    pytest.skip(message)


def require_tool(name: str, flag: str, hint: str) -> str:
    """Path of a tool; skip without it, or fail when the CI flag says it must be there."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    missing(f"{name} not found; install it with: apt-get install -y {hint}", flag)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child ezauth: no EZAUTH_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZAUTH_")}
    env.update(extra)
    return env


# -- Users files ------------------------------------------------------------------------------

CHEAP_N = 16  # scrypt cost for test users; the cost travels in the hash, so checks stay fast


def cheap_hash(password: str = PASSWORD) -> str:
    """A valid scrypt hash at a tiny cost (n=16 instead of 2**15), so corpora of logins stay fast."""
    return ezauth.hash_password(password, n=CHEAP_N)


def write_users(data_dir: Path, text: str | bytes = "", /, **users: str) -> Path:
    """DATA_DIR/users holding TEXT as given, then a NAME:cheap-hash line for each NAME=PASSWORD.

    Written as a new inode, as ezauth's own writes make, so a running app sees the change.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    raw = text.encode() if isinstance(text, str) else text
    raw += "".join(f"{name}:{cheap_hash(password)}\n" for name, password in users.items()).encode()
    return atomic_write(data_dir / "users", raw)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write PATH as a new inode, as ezauth's own writes do, so a watching ezauth never reads half a file."""
    staged = path.with_name(f".{path.name}.staged")
    staged.write_bytes(data.encode() if isinstance(data, str) else data)
    return staged.replace(path)


def run_cli(*args: str, data_dir: Path, stdin: str | None = None, env: dict | None = None,
            cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python ezauth.py ARGS --data-dir DATA_DIR` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(EZAUTH), *args, "--data-dir", str(data_dir)],
        input=stdin, capture_output=True, text=True, timeout=timeout,
        env=env or clean_env(), cwd=cwd or data_dir.parent,
    )


def add_user(data_dir: Path, name: str, password: str = PASSWORD) -> None:
    """Create or update a user through the real CLI (a real-cost hash)."""
    done = run_cli("passwd", name, "--password-stdin", data_dir=data_dir, stdin=password + "\n")
    assert done.returncode == 0, done.stderr


TOKEN_RE = re.compile(r"ezt_[A-Za-z0-9_-]{43}")


def cli_token(data_dir: Path, user: str = "alice", label: str = "script", *options: str) -> tuple[str, str]:
    """`token add USER --label LABEL OPTIONS...` through the real CLI: (the token, its id)."""
    made = run_cli("token", "add", user, "--label", label, *options, data_dir=data_dir)
    assert made.returncode == 0, (options, made.stdout, made.stderr)
    first, second = [*made.stdout.splitlines(), "", ""][:2]
    assert TOKEN_RE.fullmatch(first), made.stdout
    token_id = re.search(rf"\btoken ([0-9a-f]+) for {re.escape(user)}\b", second)
    assert token_id, made.stdout
    return first, token_id.group(1)


# -- Pages, cookies, tokens and log lines -------------------------------------------------------


class PageParser(HTMLParser):
    """Every start tag with its attributes, the text, the form's action, its input values by name
    (`fields`; `hidden` for the hidden ones a browser posts unseen) and every /ezauth/static/ URL."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.action = ""
        self.fields: dict[str, str] = {}
        self.hidden: dict[str, str] = {}
        self.assets: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "form":
            self.action = attributes.get("action") or ""
        name = attributes.get("name")
        if tag == "input" and name:
            self.fields[name] = attributes.get("value") or ""
            if attributes.get("type") == "hidden":
                self.hidden[name] = self.fields[name]
        for key in ("src", "href"):
            if (attributes.get(key) or "").startswith("/ezauth/static/"):
                self.assets.add(attributes[key])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(html: str) -> PageParser:
    parser = PageParser()
    parser.feed(html)
    return parser


def form_field(page_html: str, name: str) -> str:
    """The value of the <input name=NAME> in the page, unescaped."""
    fields = parse_page(page_html).fields
    assert name in fields, f"no {name} field in the page"
    return fields[name]


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    """(name, value, lower-cased attributes) of one Set-Cookie header."""
    first, *rest = header.split(";")
    name, _, value = first.strip().partition("=")
    attrs = {}
    for part in rest:
        key, _, val = part.strip().partition("=")
        attrs[key.lower()] = val
    return name, value, attrs


def cookie_attrs(set_cookie: str) -> dict[str, str]:
    return parse_set_cookie(set_cookie)[2]


def token_of(set_cookie: str) -> str:
    return parse_set_cookie(set_cookie)[1]


def b64(raw: bytes | str) -> str:
    """base64url without padding, as JWTs use it."""
    raw = raw.encode() if isinstance(raw, str) else raw
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def jwt_parts(token: str) -> tuple[dict, dict, str]:
    """(header, claims, signature) of a JWT, unverified: for tests that got the token from ezauth."""
    head, body, signature = token.split(".")
    return json.loads(ezauth._unb64(head)), json.loads(ezauth._unb64(body)), signature


def basic(name: str, password: str) -> str:
    """An `Authorization: Basic` value."""
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def forge(header: dict, claims: dict | bytes, secret: bytes, digest: str = "sha256") -> str:
    """A JWT signed by hand, for headers PyJWT itself refuses to write; CLAIMS as bytes go in raw."""
    body = claims if isinstance(claims, bytes) else json.dumps(claims)
    signing_input = f"{b64(json.dumps(header))}.{b64(body)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    """Messages of the ezauth log records for EVENT."""
    return [r.getMessage() for r in caplog.records
            if r.name == "ezauth" and f"event={event}" in r.getMessage()]


# The filter the README's Security section recommends (filter.d/ezauth.conf, `failregex =` line).
# Only login_failed: each is a real wrong-password check. login_locked is left out on purpose: the
# owner of an account under attack gets it too, from their own address, with the right password.
# The line must end at the real ip field: ezauth JSON-quotes a user name holding anything unusual,
# and the `$` anchor stops a name like 'x ip=6.6.6.6' from choosing the address to ban.
@functools.cache
def fail2ban_re() -> re.Pattern:
    """The README's fail2ban failregex, with <HOST> as the group `host`."""
    failregex = re.search(r"^failregex = (.+)$", (HERE / "README.md").read_text(), re.MULTILINE).group(1)
    return re.compile(failregex.replace("<HOST>", r"(?P<host>\S+)"))


def fail2ban_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The login_failed records formatted as the real server logs them: what fail2ban reads."""
    formatter = logging.Formatter("%(asctime)s ezauth %(levelname)s %(message)s")
    return [formatter.format(r) for r in caplog.records if "event=login_failed" in r.getMessage()]


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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with users alice and bob, both with PASSWORD (cheap hashes)."""
    path = tmp_path / "data"
    write_users(path, alice=PASSWORD, bob=PASSWORD)
    return path


@pytest.fixture
def settings(data_dir: Path) -> ezauth.Settings:
    return ezauth.Settings(data_dir=data_dir)


@pytest.fixture
def service(settings: ezauth.Settings, clock: FakeClock) -> ezauth.EzauthApp:
    return ezauth.make_app(settings, clock=clock)


@pytest.fixture
def client(service: ezauth.EzauthApp) -> webtest.TestApp:
    """A browser behind nginx on loopback (the default trusted proxy)."""
    return new_client(service)


@pytest.fixture
def make_client(settings: ezauth.Settings, clock: FakeClock) -> Callable[..., tuple[ezauth.EzauthApp, webtest.TestApp]]:
    """An app and client for a variant of the settings: make_client(cookie_secure="1") -> (app, client)."""
    def make(**changes) -> tuple[ezauth.EzauthApp, webtest.TestApp]:
        app = ezauth.make_app(replace(settings, **changes), clock=clock)
        return app, new_client(app)
    return make


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
            headers["Cookie"] = f"ezauth_csrf={form['csrf']}"
    else:
        form = {"csrf": csrf, "rd": "/" if rd is None else rd}
        headers = {"Cookie": f"ezauth_csrf={csrf}", **headers}
    form.update(username=username, password=password)
    if remember:
        form["remember"] = "1"
    reply = client.post(f"{base}{LOGIN}", form, headers=headers, extra_environ=extra_environ, status="*")
    assert status == "*" or reply.status_int == status, f"{reply.status} for {username!r} rd={form['rd']!r}"
    return reply


def cookie_header(response: webtest.TestResponse, name: str = "ezauth") -> str | None:
    """The Set-Cookie header value for cookie NAME, or None."""
    found = [v for k, v in response.headerlist if k == "Set-Cookie" and v.startswith(f"{name}=")]
    assert len(found) <= 1
    return found[0] if found else None


def session_token(client: webtest.TestApp, username: str = "alice", password: str = PASSWORD, **how) -> str:
    """Log in (as `login` does, HOW passed on) and return the new session token."""
    return token_of(cookie_header(login(client, username, password, **how)))


def verify(client: webtest.TestApp, status: int | str, token: str | None = None, *, uri: str | None = None,
           host: str | None = None, **headers: str) -> webtest.TestResponse:
    """GET /ezauth/verify as nginx's auth_request sends it and check STATUS ("*": any).

    TOKEN goes in as the session cookie, URI and HOST as X-Original-URI and X-Original-Host; the
    other HEADERS as given, `_` in a name read as `-` (X_Forwarded_For=...).
    """
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        sent["Cookie"] = f"ezauth={token}"
    if uri is not None:
        sent["X-Original-URI"] = uri
    if host is not None:
        sent["X-Original-Host"] = host
    return client.get(VERIFY, headers=sent, status=status)


# -- Real ezauth processes ----------------------------------------------------------------------


@dataclass
class Server:
    """A running `python ezauth.py serve` on a free loopback port."""

    data_dir: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    extra_env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    """Poll /ezauth/healthz until it answers 200 (bounded)."""
    def healthy() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ezauth/healthz", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    if not wait_until(healthy, timeout):
        raise RuntimeError(f"{url} did not become healthy in {timeout}s")


def start_server(data_dir: Path, port: int | None = None, args: tuple = (), **env: str) -> Server:
    """Start the real server as a subprocess and wait until healthz answers."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"ezauth-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(EZAUTH), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data_dir), *args],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(**env), cwd=data_dir.parent,
        )
    server = Server(data_dir, port, proc, log_path, env)
    try:
        wait_healthy(server.url, proc)
    except RuntimeError:
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"ezauth did not start:\n{server.log()}") from None
    return server


@pytest.fixture
def gunicorn_bin() -> str:
    """gunicorn beside this Python (`.venv/bin/pytest` does not put .venv/bin on PATH), or on PATH."""
    found = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or shutil.which("gunicorn")
    if found is None:
        missing("gunicorn is not installed; .venv/bin/pip install -r requirements-test.txt", "EZAUTH_REQUIRE_NGINX")
    return found


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real servers on demand (users=None: alice; {}: none); every one is stopped by PID in teardown."""
    started: list[Server] = []

    def start(data_dir: Path | None = None, users: dict[str, str] | None = None,
              args: tuple = (), **env: str) -> Server:
        data_dir = data_dir or tmp_path / f"data{len(started)}"
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, password in ({"alice": PASSWORD} if users is None else users).items():
            add_user(data_dir, name, password)
        server = start_server(data_dir, args=args, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def live_server(server_factory) -> Server:
    """One real ezauth with user alice / PASSWORD."""
    return server_factory()


@pytest.fixture
def lenient_server(server_factory) -> Server:
    """A real ezauth with alice; generous lockout so several wrong attempts in one test are fine."""
    return server_factory(EZAUTH_MAX_ATTEMPTS="50")


@dataclass
class Reply:
    """One HTTP answer from a real server (ezauth itself, or nginx in front of it)."""

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

    def cookie(self, name: str = "ezauth") -> str | None:
        """The value this answer sets for cookie NAME, or None."""
        return next((value for n, value, _ in map(parse_set_cookie, self.set_cookies) if n == name), None)

    def app_echo(self) -> dict | None:
        """The stub app's echo when this reply came from the app, else None."""
        if self.status != 200:
            return None
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("app") == "stub" else None

    def echo(self) -> dict:
        """The stub app's echo; fails unless this reply really came from the app."""
        data = self.app_echo()
        assert data is not None, (self.status, self.text[:300])
        return data


def http_call(port: int, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
              *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, timeout: float = 30) -> Reply:
    """One request on a fresh connection (HTTPS with a TLS context), closed afterwards."""
    conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=tls) if tls
            else http.client.HTTPConnection(host, port, timeout=timeout))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def real_login(port: int, username: str = "alice", password: str = PASSWORD, *, rd: str = "/",
               ip: str | None = None, csrf: str | None = None, status: int | str = 303) -> Reply:
    """Post the login form to a running server and check STATUS ("*": any); `.cookie()` is the session.

    By default the page is loaded first for its CSRF token, like a browser; with csrf=TOKEN the form
    is posted at once (no visit counted). IP is sent as X-Forwarded-For.
    """
    if csrf is None:
        csrf = form_field(http_call(port, "GET", LOGIN).text, "csrf")
    form = urlencode({"csrf": csrf, "rd": rd, "username": username, "password": password})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"ezauth_csrf={csrf}"}
    if ip is not None:
        headers["X-Forwarded-For"] = ip
    reply = http_call(port, "POST", LOGIN, form, headers)
    assert status == "*" or reply.status == status, (reply.status, username, reply.text[:300])
    return reply


def real_verify(port: int, token: str) -> int:
    """The status a running server's verify gives this session token."""
    return http_call(port, "GET", VERIFY, headers={"Cookie": f"ezauth={token}"}).status


# -- nginx running nginx.conf.example ----------------------------------------------------------

EZAUTH_ADDR, APP_ADDR, LISTEN = "127.0.0.1:2424", "127.0.0.1:7860", "listen 80;"
CACHE_MARK = "# ezauth-cache"
CACHE_DIR = "/run/nginx-ezauth-cache"
TARGET = "/app/?a=1&b=2&c=%2F"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


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


class StubHandler(BaseHTTPRequestHandler):
    """The protected app: answers every request with JSON (method, raw path, headers, body length)
    and echoes websocket frames until the client closes."""

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
        with contextlib.suppress(EOFError, OSError):
            opcode = 0
            while opcode != 8:  # a close frame (echoed) ends it
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


def echo_header(echo: dict, name: str) -> list[str]:
    """Every value of header NAME the stub app received."""
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


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
    """A self-signed certificate for 127.0.0.1 (good for two days) and its key, in WHERE."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def write_prefix(prefix: Path, site: str, main: str = "") -> Path:
    """A private nginx prefix whose top-level nginx.conf includes `site` inside http { } (and MAIN
    lines in its main context, e.g. worker_shutdown_timeout)."""
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "ezauth.conf").write_text(site)
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix / 'tmp' / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root the workers would drop to `nobody`, who cannot enter pytest's private temp dirs.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}{main}worker_processes 1;
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

    def reload(self) -> None:
        """What `systemctl reload nginx` does: new workers; old ones finish (or are cut off)."""
        self.proc.send_signal(signal.SIGHUP)

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


def start_nginx(nginx: str, prefix: Path, site: str, port: int, main: str = "") -> Nginx:
    """Run nginx in the foreground on `port` and wait until it accepts connections."""
    write_prefix(prefix, site, main)
    with open(prefix / "logs" / "stderr.log", "ab") as out:
        proc = subprocess.Popen(nginx_command(nginx, prefix, "-g", "daemon off;"), stdout=out, stderr=out)
    server = Nginx(prefix, port, proc)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    if not wait_until(listening, timeout=10):
        server.stop()
        raise RuntimeError(f"nginx did not listen on {port}:\n{server.log()}")
    return server


def cookie_is_gone(attrs: dict[str, str]) -> bool:
    if "max-age" in attrs:
        return int(attrs["max-age"] or 0) <= 0
    if "expires" in attrs:
        return parsedate_to_datetime(attrs["expires"]).timestamp() <= time.time()
    return False


NAVIGATE = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}  # what a browser sends opening a page


@dataclass
class Browser:
    """A tiny browser over loopback HTTP(S): keeps cookies by path, never follows redirects, and
    sends what a browser opening a page sends (NAVIGATE) unless a request says otherwise."""

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
        headers = {**NAVIGATE, **(headers or {})}
        cookie = self.cookie_header(urlsplit(path).path)
        if cookie and "Cookie" not in headers:
            headers["Cookie"] = cookie
        reply = http_call(self.port, method, path, body, headers, tls=self.tls, timeout=15)
        self.keep(reply.set_cookies)
        return reply

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})

    def post_form(self, path: str, fields: dict[str, str]) -> Reply:
        return self.request("POST", path, urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})


def login_target(location: str) -> str:
    """The `rd` return target of a redirect to the login page."""
    parts = urlsplit(location)
    assert parts.path == LOGIN, location
    return parse_qs(parts.query)["rd"][0]


def login_through_nginx(browser: Browser, user: str = "alice", target: str = TARGET) -> Reply:
    """Walk the real flow through nginx: protected URL, login page, form POST. Returns the POST's reply."""
    first = browser.get(target)
    assert first.status == 302, (first.status, first.text[:300])
    page = browser.get(first.location)
    assert page.status == 200, page.text[:300]
    form = parse_page(page.text)
    assert form.action and "csrf" in form.hidden
    done = browser.post_form(form.action, {**form.hidden, "username": user, "password": PASSWORD})
    assert done.status == 303, (done.status, done.text[:500])
    assert browser.cookie(), done.set_cookies
    return done


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
                cache: bool = False, edit: Callable[[str], str] | None = None, main: str = "",
                **env: str) -> Stack:
    """Start a stack under ROOT (users with PASSWORD, the auth cache on if asked, the site EDITed);
    CLEANUP stops it."""
    app = start_stub_app()
    cleanup.callback(app.close)
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    for name in users:
        add_user(data_dir, name)
    ezauth_server = start_server(data_dir, **env)
    cleanup.callback(ezauth_server.stop)
    port = free_port()
    site = render_example(ezauth_server.port, app.port, port, root / "auth-cache" if cache else None)
    site = edit(site) if edit else site
    nginx = start_nginx(nginx_bin, root / "nginx", site, port, main)
    cleanup.callback(nginx.stop)
    return Stack(app, ezauth_server, nginx, cleanup)


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    return require_tool("nginx", "EZAUTH_REQUIRE_NGINX", "nginx-light")


@pytest.fixture
def make_stack(nginx_bin, tmp_path) -> Iterator[Callable[..., Stack]]:
    """Private stacks (build_stack's options), all stopped in teardown."""
    with contextlib.ExitStack() as cleanup:
        count = iter(range(100))
        yield lambda **kw: build_stack(nginx_bin, tmp_path / f"stack{next(count)}", cleanup, **kw)


# -- Chromium through Playwright (imported only inside these functions) ------------------------

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Nothing but loopback resolves: Chromium otherwise looks up its own services' hosts (seen with strace).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
]
AXE = HERE / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One headless Debian chromium per module through Playwright (never a downloaded browser)."""
    path = require_tool("chromium", "EZAUTH_REQUIRE_BROWSER", "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed; pip install -r requirements-test.txt", "EZAUTH_REQUIRE_BROWSER")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def expect(actual, message: str | None = None):
    """Playwright's expect (assertions that retry until the page gets there), imported when first used."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(actual, message)


class Watch:
    """Everything that went wrong on a page: console errors, page errors, failed or foreign requests."""

    def __init__(self, page: Page, origin: str):
        self.page = page
        self.origin = origin
        self.problems: list[str] = []
        self.responses: list[Response] = []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on("requestfailed", lambda req: self.problems.append(f"failed: {req.url} {req.failure}"))
        page.on("request", self._request)
        page.on("response", self._response)

    def _console(self, msg) -> None:
        # Chromium logs the intended 401 of a wrong password as a console error, and asks for
        # /favicon.ico on the plain-text return target (not our page): both are expected.
        source = urlsplit(msg.location.get("url", "")).path
        expected = (
            (source == LOGIN and msg.text.endswith("status of 401 (Unauthorized)"))
            or (source == "/favicon.ico" and urlsplit(self.page.url).path != LOGIN)
        )
        if msg.type in ("error", "warning") and not expected:
            self.problems.append(f"console {msg.type}: {msg.text}")

    def _request(self, req) -> None:
        parts = urlsplit(req.url)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.problems.append(f"foreign request: {req.url}")

    def _response(self, resp) -> None:
        self.responses.append(resp)
        wrong_password = (resp.status == 401 and resp.request.method == "POST"
                          and urlsplit(resp.url).path == LOGIN)
        if resp.status >= 400 and not wrong_password:
            self.problems.append(f"HTTP {resp.status}: {resp.request.method} {resp.url}")

    def assert_clean(self) -> None:
        assert self.problems == []


@contextlib.contextmanager
def open_page(chromium: Chromium, server: Server, **options) -> Iterator[tuple[Page, Watch]]:
    """A fresh context (empty storage) and page on the server, watched; closed afterwards."""
    options.setdefault("viewport", {"width": 1280, "height": 800})
    context = chromium.new_context(**options)
    try:
        page = context.new_page()
        watch = Watch(page, server.url)
        yield page, watch
    finally:
        context.close()


def login_url(server: Server, target: str | None = None) -> str:
    return server.url + LOGIN + ("" if target is None else "?rd=" + quote(target, safe=""))


def submit(page: Page, username: str, password: str, remember: bool = False) -> Response:
    """Fill the form and press Enter in the password field; the navigation's response."""
    page.fill("#username", username)
    page.fill("#password", password)
    if remember:
        page.check("#remember")
    with page.expect_navigation() as nav:
        page.press("#password", "Enter")
    return nav.value


def finish_animations(page: Page) -> None:
    page.evaluate("Promise.all(document.getAnimations().map((a) => a.finished))")


def run_axe(page: Page) -> list[dict]:
    """axe-core's WCAG 2.1 A/AA and best-practice violations on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations'],"
        " runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})"
    )
    return result["violations"]
