"""Shared fixtures for the suites that run ezauth as a real process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EZAUTH = HERE / "ezauth.py"
PASSWORD = "correct horse battery"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tool(name: str, flag: str, hint: str) -> str:
    """Path of a tool; skip without it, or fail when the CI flag says it must be there."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    message = f"{name} not found; install it with: apt-get install -y {hint}"
    if os.environ.get(flag) == "1":
        pytest.fail(f"{message} ({flag}=1 says this suite must run)")
    pytest.skip(message)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child ezauth: no EZAUTH_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZAUTH_")}
    env.update(extra)
    return env


def run_cli(*args: str, data_dir: Path, stdin: str | None = None, env: dict | None = None,
            cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `python ezauth.py ARGS --data-dir DATA_DIR` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(EZAUTH), *args, "--data-dir", str(data_dir)],
        input=stdin, capture_output=True, text=True, timeout=timeout,
        env=env or clean_env(), cwd=cwd or data_dir.parent,
    )


def add_user(data_dir: Path, name: str, password: str = PASSWORD) -> None:
    """Create or update a user through the real CLI."""
    done = run_cli("passwd", name, "--password-stdin", data_dir=data_dir, stdin=password + "\n")
    assert done.returncode == 0, done.stderr


class FakeClock:
    """Time that only moves when a test says so (ezauth takes any callable as its clock)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(time.time())) if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ezauth/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.02)
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
def server_factory(tmp_path):
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
