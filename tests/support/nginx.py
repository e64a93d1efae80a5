"""nginx running nginx.conf.example: the config rendered for test ports, a private nginx, the stub
app behind it (with websocket framing), a tiny cookie-keeping browser, and whole stacks."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.support.basics import (
    EXAMPLE,
    LOGIN,
    LOGOUT,
    PASSWORD,
    SESSION_NAMES,
    free_port,
    parse_page,
    parse_set_cookie,
    wait_until,
)
from tests.support.process import Reply, Server, add_user, http_call, start_server

# -- nginx running nginx.conf.example ----------------------------------------------------------

EZAUTH_ADDR, APP_ADDR, LISTEN = "127.0.0.1:2424", "127.0.0.1:7860", "listen 80;"
CACHE_MARK = "# ezauth-cache"
CACHE_DIR = "/run/nginx-ezauth-cache"
TARGET = "/app/?a=1&b=2&c=%2F"
DOMAIN = "example.test"  # the cookie domain of the single sign-on tests: sd.example.test and the like
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
    """The protected app: answers every request with JSON (method, raw path, headers, body length),
    or with the HTML page a test put at that path (an app's page and its scripts), and echoes
    websocket frames until the client closes."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.echo_websocket()
            return
        if self.path in self.server.pages:
            self.send_page(self.server.pages[self.path])
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

    def send_page(self, html: str) -> None:
        body = html.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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

    @property
    def pages(self) -> dict[str, str]:
        """Path -> HTML the app serves there (a test's own page, scripts and all)."""
        return self.server.pages

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_stub_app() -> StubApp:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.daemon_threads = True
    server.seen, server.pages = [], {}
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

    def cookie(self, name: str | None = None) -> str | None:
        """The value of cookie NAME in the jar (the session cookie under any of its names)."""
        names = SESSION_NAMES if name is None else (name,)
        return next((v for (n, _), v in self.jar.items() if n in names), None)

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

    def post_form(self, path: str, fields: dict[str, str], **headers: str) -> Reply:
        return self.request("POST", path, urlencode(fields).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded", **headers})

    def logout(self, **headers: str) -> Reply:
        """Log out as a person does: open the logout page and press its button (a POST with the
        page's CSRF token); HEADERS go with both, e.g. Host."""
        page = self.request("GET", LOGOUT, headers=headers)
        assert page.status == 200, (page.status, page.text[:300])
        return self.post_form(LOGOUT, {"csrf": parse_page(page.text).hidden["csrf"]}, **headers)


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
                cache: bool = False, edit: Callable[[str], str] | None = None, main: str = "", rules: str = "",
                **env: str) -> Stack:
    """Start a stack under ROOT (users with PASSWORD, access RULES if given, the auth cache on if asked,
    the site EDITed); CLEANUP stops it."""
    app = start_stub_app()
    cleanup.callback(app.close)
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    for name in users:
        add_user(data_dir, name)
    if rules:
        (data_dir / "rules").write_text(rules)
    ezauth_server = start_server(data_dir, **env)
    cleanup.callback(ezauth_server.stop)
    port = free_port()
    site = render_example(ezauth_server.port, app.port, port, root / "auth-cache" if cache else None)
    site = edit(site) if edit else site
    nginx = start_nginx(nginx_bin, root / "nginx", site, port, main)
    cleanup.callback(nginx.stop)
    return Stack(app, ezauth_server, nginx, cleanup)

