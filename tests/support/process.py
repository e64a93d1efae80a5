"""Real ezauth processes: the CLI, `python ezauth.py serve` on a free port, and plain HTTP to it."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import pty
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from urllib.parse import urlencode

import ezauth
from tests.support.basics import (
    EZAUTH,
    HERE,
    LOGIN,
    PASSWORD,
    SESSION_NAMES,
    VERIFY,
    clean_env,
    form_field,
    free_port,
    parse_set_cookie,
    readme_section,
    require_tool,
    wait_until,
)

# -- The command line -----------------------------------------------------------------------


def run_cli(*args: str, data_dir: Path | None = None, stdin: str | None = None, env: dict | None = None,
            cwd: Path | None = None, timeout: float = 30, script: Path = EZAUTH) -> subprocess.CompletedProcess:
    """Run `python ezauth.py ARGS --data-dir DATA_DIR` (SCRIPT: another copy of ezauth.py) and return
    the finished process. Without DATA_DIR (nginx-config and doctor take none) it runs in the checkout."""
    data_flag = [] if data_dir is None else ["--data-dir", str(data_dir)]
    return subprocess.run(
        [sys.executable, str(script), *args, *data_flag],
        input=stdin, capture_output=True, text=True, timeout=timeout,
        env=env or clean_env(), cwd=cwd or (HERE if data_dir is None else data_dir.parent),
    )


@contextlib.contextmanager
def cli_on_a_terminal(*args: str, data_dir: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """`python ezauth.py ARGS --data-dir DATA_DIR` on a pseudo-terminal (its standard input, output and
    error), as when typed by hand: (the process, the terminal's reading end); both end afterwards."""
    reader, writer = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(EZAUTH), *args, "--data-dir", str(data_dir)], stdin=writer,
                            stdout=writer, stderr=writer, env=clean_env(), cwd=data_dir.parent, start_new_session=True)
    os.close(writer)
    try:
        yield proc, reader
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(reader)


def terminal_output_until(reader: int, marker: str, timeout: float = 15) -> str:
    """What the terminal showed, up to MARKER (bounded by TIMEOUT)."""
    seen, deadline = "", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([reader], [], [], 0.2)
        if ready:
            seen += os.read(reader, 65536).decode(errors="replace")
    assert marker in seen, seen
    return seen


OTPAUTH_SECRET_RE = re.compile(r"otpauth://totp/\S*\?secret=([A-Z2-7]{32})&")


def secret_printed(output: str) -> bytes:
    """The two-factor secret of the otpauth:// URI the totp command printed."""
    found = OTPAUTH_SECRET_RE.search(output)
    assert found, output
    return base64.b32decode(found[1] + "=" * (-len(found[1]) % 8))


def cli_totp(data_dir: Path, user: str = "alice") -> tuple[bytes, str]:
    """`totp USER --code-stdin` through the real CLI as a script drives it: read the secret it prints,
    then write the code an app would show now. (The secret, and everything it printed.)"""
    proc = subprocess.Popen([sys.executable, str(EZAUTH), "totp", user, "--code-stdin", "--data-dir", str(data_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=data_dir.parent)
    try:
        seen = ""
        while not OTPAUTH_SECRET_RE.search(seen):  # the secret comes before it reads anything
            line = proc.stdout.readline()
            assert line, (seen, proc.stderr.read())
            seen += line
        secret = secret_printed(seen)
        out, err = proc.communicate(f"{ezauth.totp(secret, time.time())}\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    return secret, seen + out


def copy_ezauth(where: Path) -> Path:
    """ezauth.py with its pages and static files copied into WHERE, as a new install would have them
    (the data dir defaults to WHERE/ezauth-data, never the checkout's): the copy's ezauth.py."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ("ezauth.py", "login.html", "account.html", "nginx.conf.example"):
        shutil.copy2(HERE / name, where / name)
    shutil.copytree(HERE / "static", where / "static")
    return where / "ezauth.py"


def data_dir_line(done: subprocess.CompletedProcess) -> str:
    """The data dir a command said on stderr that it used (its first line), or "" when it named none."""
    first = done.stderr.partition("\n")[0]
    return first.removeprefix("ezauth: data dir ") if first.startswith("ezauth: data dir ") else ""


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


# -- The real server ----------------------------------------------------------------------------


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

    def cookie(self, name: str | None = None) -> str | None:
        """The value this answer sets for cookie NAME (the session cookie under any of its names), or None."""
        names = SESSION_NAMES if name is None else (name,)
        return next((value for n, value, _ in map(parse_set_cookie, self.set_cookies) if n in names), None)

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
              *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None, timeout: float = 30,
              source: str | None = None) -> Reply:
    """One request on a fresh connection (HTTPS with a TLS context; from the loopback address SOURCE
    when given, e.g. 127.0.0.2 for a second client), closed afterwards."""
    bind = (source, 0) if source else None
    conn = (http.client.HTTPSConnection(host, port, timeout=timeout, context=tls, source_address=bind) if tls
            else http.client.HTTPConnection(host, port, timeout=timeout, source_address=bind))
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


# -- The doctor --------------------------------------------------------------------------------------

DOCTOR_LINE_RE = re.compile(r"^(OK|WARN|FAIL) {2,4}(\S.*)$")
DOCTOR_SUMMARY_RE = re.compile(r"^doctor: (\d+) OK, (\d+) WARN, (\d+) FAIL for (\S+)$")


def run_doctor(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `python ezauth.py doctor URL ARGS` and check the shape of what it printed: one finding a
    line, then the summary, whose counts match the lines and whose verdict matches the exit code."""
    done = run_cli("doctor", url, *args, stdin=stdin, timeout=120)
    if done.returncode == 2:
        return done
    *lines, summary = done.stdout.splitlines()
    assert all(DOCTOR_LINE_RE.match(line) for line in lines), done.stdout
    counts = DOCTOR_SUMMARY_RE.fullmatch(summary)
    assert counts is not None, done.stdout
    found = [DOCTOR_LINE_RE.match(line)[1] for line in lines]
    assert [int(n) for n in counts.groups()[:3]] == [found.count(level) for level in ("OK", "WARN", "FAIL")]
    assert done.returncode == (1 if "FAIL" in found else 0), done.stdout
    return done


def findings(done: subprocess.CompletedProcess, level: str | None = None) -> list[str]:
    """The finding lines printed (of one LEVEL), without the summary."""
    found = done.stdout.splitlines()[:-1]
    return [line for line in found if level is None or line.startswith(f"{level} ")]



# -- The README's systemd units -------------------------------------------------------------------------


def readme_units(section: str) -> dict[str, str]:
    """The systemd units the README's SECTION writes out: file name -> text."""
    return dict(re.findall(r"^`/etc/systemd/system/([\w.-]+)`:\n\n```ini\n(.*?)```", readme_section(section),
                           re.M | re.S))


def verify_units(units: dict[str, str], where: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on UNITS with /opt/ezauth's paths filled in for this checkout, as an
    install would have them. Skips without systemd-analyze, saying how to install it; fails instead
    under EZAUTH_REQUIRE_NGINX=1, which CI sets."""
    analyze = require_tool("systemd-analyze", "EZAUTH_REQUIRE_NGINX", "systemd")
    for name, text in units.items():
        text = text.replace("/opt/ezauth/.venv/bin/python", sys.executable)
        text = text.replace("/opt/ezauth/ezauth.py", str(EZAUTH)).replace("/opt/ezauth", str(HERE))
        (where / name).write_text(text)
    return subprocess.run([analyze, "verify", *(str(where / name) for name in units)], capture_output=True,
                          text=True, timeout=60)


# -- Crowds of raw connections (the built-in server under pressure) ----------------------------

UNTRUSTED = "127.0.0.2"  # a client that is not a trusted proxy: the per-address cap applies to it
HALF_HEAD = b"GET /ezauth/healthz HTTP/1.1\r\nHost: ezauth.test\r\n"  # a request head that never ends


def connect(port: int, source: str = UNTRUSTED, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the server on 127.0.0.1 from the loopback address SOURCE."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def refusals(server: Server) -> list[str]:
    return re.findall(r"event=connection_refused .*", server.log())


@dataclass
class Crowd:
    """Many client connections read together: what each received, and when the server closed it."""

    socks: list[socket.socket]
    received: dict[socket.socket, bytes] = field(default_factory=dict)
    closed_at: dict[socket.socket, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        for sock in self.socks:
            self.received[sock] = b""
            self.selector.register(sock, selectors.EVENT_READ)

    def add(self, sock: socket.socket) -> None:
        self.socks.append(sock)
        self.received[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)

    @property
    def still_open(self) -> list[socket.socket]:
        return [sock for sock in self.socks if sock not in self.closed_at]

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read every connection until DONE() holds or TIMEOUT passes; DONE()'s last value."""
        deadline = time.monotonic() + timeout
        while not done() and (left := deadline - time.monotonic()) > 0 and self.still_open:
            for key, _ in self.selector.select(left):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    chunk = b""
                if chunk:
                    self.received[sock] += chunk
                else:
                    self.closed_at[sock] = time.monotonic()
                    self.selector.unregister(sock)
        return done()

    def close(self) -> None:
        self.selector.close()
        for sock in self.socks:
            sock.close()
