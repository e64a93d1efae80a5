#!/usr/bin/env python3
"""bench: what ezauth's verify costs behind a real nginx, measured with wrk on this machine.

One run starts, under a private temporary directory and on loopback only:
  * ezauth's built-in server (`python ezauth.py serve`) and `gunicorn ezauth:app`, sharing one
    data dir with one user, created with `python ezauth.py passwd NAME --password-stdin`;
  * for each row, an nginx (1 worker by default) running the SHIPPED nginx.conf.example, with
    only its literal addresses replaced (127.0.0.1:2424 ezauth, 127.0.0.1:7860 the app,
    `listen 80`) and, per row, the auth step swapped or the `# ezauth-cache` lines uncommented.
    The "app" is a server block in that same nginx answering `return 200` with a 1 KiB body,
    so the app itself costs next to nothing and every row measures the auth step.
It logs in through the login form (via nginx), checks that the app is refused without the
cookie and served with it, then runs wrk over every row and prints one table: req/s, p50/p99,
non-2xx, CPU per request of nginx and of the backend, and the ratio to the no-auth row.
Everything it starts is stopped by process group at the end, also on failure or Ctrl-C.

    python bench/bench.py                    # 10 s per row, 32 connections, median of 3 rounds
    python bench/bench.py --smoke            # ~1 s per row; exits non-zero if any row fails

Needs nginx (with auth_request: Debian's nginx-light/nginx), wrk and openssl; gunicorn is
optional (its rows are skipped without it). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import html.parser
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EZAUTH = REPO / "ezauth.py"
SHIPPED_CONF = REPO / "nginx.conf.example"
LOOPBACK = "127.0.0.1"
USERNAME, PASSWORD = "bench", "bench-password-1"
APP_PATH = "/app/"
BODY_BYTES = 1024
APP_BODY = ("ezauth bench app body " * (BODY_BYTES // 22 + 1))[:BODY_BYTES]
GUNICORN_ARGS = "-k gthread -w 2 --threads 4 --keep-alive 75"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # Debian puts it in sbin, often not on a user's PATH
STOP_GRACE_S = 5.0
HTTP_TIMEOUT_S = 5.0

# Counts every answer outside 2xx (wrk itself counts only >= 400, so a 302 to the login page
# would slip through) and prints one machine-readable line when the run ends.
WRK_LUA = r"""
wrk.headers = wrk.headers or {}
%(headers)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0 end
function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("non2xx") end
  local e = summary.errors
  io.write(string.format("BENCH requests=%%d duration_us=%%d non2xx=%%d errors=%%d"
    .. " p50_us=%%d p99_us=%%d max_us=%%d\n", summary.requests, summary.duration, bad,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99),
    latency.max))
end
"""


class BenchError(Exception):
    """A setup step or a check failed; the message says which."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: what wrk hits and through which nginx variant."""

    label: str
    auth: str  # "none", "basic", "request" (auth_request through nginx) or "direct" (no nginx)
    backend: str = ""  # "builtin" or "gunicorn"
    cache: bool = False


ROWS = (
    Row("no auth (ceiling)", "none"),
    Row("auth_basic (apr1)", "basic"),
    Row("auth_request, built-in", "request", "builtin"),
    Row("auth_request, built-in + cache", "request", "builtin", cache=True),
    Row("auth_request, gunicorn", "request", "gunicorn"),
    Row("auth_request, gunicorn + cache", "request", "gunicorn", cache=True),
    Row("verify direct, built-in", "direct", "builtin"),
    Row("verify direct, gunicorn", "direct", "gunicorn"),
)


# -- Settings --------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(
        description="Measure ezauth's verify through the shipped nginx config against no auth and auth_basic.",
        epilog="DURATION, CONNS, THREADS, REPS, WARMUP, NGINX_WORKERS, GUNICORN_ARGS and NGINX_CONF can also be "
               "given as environment variables.")
    parser.add_argument("--duration", default=env.get("DURATION", "10s"), help="wrk time per row (10s)")
    parser.add_argument("--conns", type=int, default=int(env.get("CONNS", "32")), help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=int(env.get("THREADS", "2")), help="wrk threads (2)")
    parser.add_argument("--reps", type=int, default=int(env.get("REPS", "3")),
                        help="rounds over all rows; the table shows medians (3)")
    parser.add_argument("--warmup", default=env.get("WARMUP", "1s"), help="wrk warm-up per row, 0 = none (1s)")
    parser.add_argument("--nginx-workers", type=int, default=int(env.get("NGINX_WORKERS", "1")),
                        help="nginx worker_processes (1)")
    parser.add_argument("--gunicorn-args", default=env.get("GUNICORN_ARGS", GUNICORN_ARGS),
                        help=f"gunicorn worker settings ({GUNICORN_ARGS})")
    parser.add_argument("--conf", type=Path, default=Path(env.get("NGINX_CONF", str(SHIPPED_CONF))),
                        help="the nginx config to measure (default: the shipped nginx.conf.example)")
    parser.add_argument("--only", default="", help="comma-separated row numbers to run, e.g. 1,3,4")
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: every row ~1 s, one round, no warm-up; non-zero exit if any row fails")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--json", default="", help="also write every measurement to this JSON file")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.reps, args.warmup = "1s", 1, "0"
    if not re.fullmatch(r"\d+[smh]?", args.duration) or not re.fullmatch(r"\d+[smh]?", args.warmup):
        parser.error("--duration and --warmup look like 10s, 2m or 0")
    if min(args.conns, args.threads, args.reps, args.nginx_workers) < 1:
        parser.error("--conns, --threads, --reps and --nginx-workers must be at least 1")
    args.threads = min(args.threads, args.conns)
    return args


# -- Processes -------------------------------------------------------------------------------

class Supervisor:
    """Starts processes, each in a new process group, and stops exactly those groups."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs: object) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the whole group, SIGKILL it after a grace period."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and group_alive(proc):
            time.sleep(0.02)
        if group_alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


def group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def group_cpu_seconds(group: int) -> float:
    """User+system CPU seconds used so far by the live processes of one process group."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == group:  # pgrp, utime, stime: fields 5, 14, 15 of proc(5)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(value) for value in fields[1:4]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, name: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode} (see its log)")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if ready():
                return
        time.sleep(0.05)
    raise BenchError(f"{name} did not come up within {timeout:.0f} s")


# -- HTTP ------------------------------------------------------------------------------------

def fetch(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
          body: bytes | None = None) -> http.client.HTTPResponse:
    """One request on a fresh connection; the response is read completely."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.data = response.read()  # type: ignore[attr-defined]
        return response
    finally:
        conn.close()


class HiddenInputs(html.parser.HTMLParser):
    """The hidden fields (the CSRF token) of the login form."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "input" and attributes.get("type") == "hidden" and attributes.get("name"):
            self.fields[attributes["name"] or ""] = attributes.get("value") or ""


def cookies_set(response: http.client.HTTPResponse) -> dict[str, str]:
    pairs = (value.split(";", 1)[0].strip().partition("=") for value in response.headers.get_all("Set-Cookie") or [])
    return {name: value for name, _, value in pairs if value}


def log_in(front_port: int) -> str:
    """Log in through nginx like a browser: GET the form, POST it back; returns the session cookie."""
    page = fetch(front_port, "/ezauth/login?rd=/app/")
    if page.status != 200:
        raise BenchError(f"GET /ezauth/login through nginx answered {page.status}")
    jar = cookies_set(page)
    form = HiddenInputs()
    form.feed(page.data.decode("utf-8", "replace"))  # type: ignore[attr-defined]
    fields = {**form.fields, "username": USERNAME, "password": PASSWORD}
    answer = fetch(front_port, "/ezauth/login", {
        "Content-Type": "application/x-www-form-urlencoded",
        "Cookie": "; ".join(f"{name}={value}" for name, value in jar.items()),
    }, "POST", urllib.parse.urlencode(fields).encode())
    session = cookies_set(answer).get("ezauth")
    if answer.status != 303 or not session:
        raise BenchError(f"login POST answered {answer.status} without a session cookie: {answer.data[:200]!r}")  # type: ignore[attr-defined]
    return f"ezauth={session}"


def expect(description: str, response: http.client.HTTPResponse, statuses: set[int],
           location: str = "", app_body: bool = False) -> None:
    got_location = response.headers.get("Location") or ""
    body_ok = not app_body or response.data == APP_BODY.encode()  # type: ignore[attr-defined]
    if response.status not in statuses or location not in got_location or not body_ok:
        raise BenchError(f"check failed: {description}: got {response.status} Location={got_location!r} "
                         f"body={response.data[:80]!r}")  # type: ignore[attr-defined]


# What a browser opening a page sends: ezauth answers it with the login page (302); a script
# without these headers gets a JSON 401 instead.
NAVIGATE = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Mode": "navigate"}


def check_row(row: Row, port: int, cookie: str, basic: str) -> None:
    """Before loading a row: it must let the right request in and keep the wrong ones out."""
    if row.auth == "direct":
        expect("verify with the cookie", fetch(port, "/ezauth/verify", {"Cookie": cookie}), {200})
        expect("verify without a cookie", fetch(port, "/ezauth/verify"), {401})
    elif row.auth == "none":
        expect("app without auth", fetch(port, APP_PATH), {200}, app_body=True)
    elif row.auth == "basic":
        expect("auth_basic without credentials", fetch(port, APP_PATH), {401, 302})
        expect("auth_basic with credentials", fetch(port, APP_PATH, {"Authorization": basic}), {200}, app_body=True)
    else:
        expect("app without a cookie", fetch(port, APP_PATH, NAVIGATE), {302}, location="/ezauth/login?rd=")
        expect("a script without a cookie", fetch(port, APP_PATH), {401})
        token = cookie.split("=", 1)[1]
        tampered = {**NAVIGATE, "Cookie": "ezauth=" + token[:-4] + ("BBBB" if token.endswith("AAAA") else "AAAA")}
        expect("app with a tampered cookie", fetch(port, APP_PATH, tampered), {302}, location="expired=1")
        expect("app with the cookie", fetch(port, APP_PATH, {"Cookie": cookie}), {200}, app_body=True)
        # A cached 200 must not let in a request without the cookie.
        expect("app without a cookie, after a 200", fetch(port, APP_PATH, NAVIGATE), {302},
               location="/ezauth/login?rd=")


# -- nginx config ----------------------------------------------------------------------------

def replace_once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) < 1:
        raise BenchError(f"nginx.conf.example has no {old!r} ({what}); update bench/bench.py")
    return text.replace(old, new)


def render_shipped(template: str, row: Row, ports: dict[str, int], work: Path) -> str:
    """The shipped config with its literal addresses replaced and the row's auth step."""
    text = replace_once(template, "127.0.0.1:2424", f"{LOOPBACK}:{ports[row.backend or 'builtin']}", "ezauth")
    text = replace_once(text, "127.0.0.1:7860", f"{LOOPBACK}:{ports['app']}", "the app")
    text, listens = re.subn(r"(?m)^(\s*)listen\s+80;", rf"\g<1>listen {LOOPBACK}:{ports['front']};", text)
    if listens != 1:
        raise BenchError("nginx.conf.example has no single `listen 80;` line; update bench/bench.py")
    auth_line = "auth_request /_ezauth_verify;"
    if row.auth == "none":
        text = replace_once(text, auth_line, "# (bench: no auth)", "the auth_request line")
    elif row.auth == "basic":
        text = replace_once(text, auth_line, f'auth_basic "bench"; auth_basic_user_file {work}/htpasswd;',
                            "the auth_request line")
    if row.cache:
        text, uncommented = re.subn(r"(?m)^(\s*)#\s*(.*#\s*ezauth-cache)\s*$", r"\1\2", text)
        if uncommented < 2:
            raise BenchError("nginx.conf.example has no `# ezauth-cache` lines; update bench/bench.py")
        text = replace_once(text, "/run/nginx-ezauth-cache", str(work / "cache"), "the cache path")
    return text


def nginx_main_conf(work: Path, app_port: int, workers: int) -> str:
    """The http{} around the shipped config, and the 1 KiB app as a server of the same nginx."""
    temp = "\n".join(f"    {kind}_temp_path {work}/tmp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes {workers};
daemon off;
pid {work}/nginx.pid;
error_log {work}/logs/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
{temp}
    server {{  # the protected app: a fixed {BODY_BYTES}-byte body, costs next to nothing
        listen {LOOPBACK}:{app_port};
        location / {{ return 200 "{APP_BODY}"; }}
    }}
    include {work}/ezauth.conf;
}}
"""


# -- wrk -------------------------------------------------------------------------------------

def wrk_script(work: Path, headers: dict[str, str]) -> Path:
    lines = "\n".join(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items())
    path = work / f"wrk-{abs(hash(tuple(headers.items())))}.lua"
    path.write_text(WRK_LUA % {"headers": lines})
    return path


def run_wrk(args: argparse.Namespace, url: str, script: Path, duration: str,
            groups: dict[str, int]) -> dict[str, float]:
    """One wrk run; rates, latencies, error counts and CPU per request of each process group."""
    argv = ["wrk", "-t", str(args.threads), "-c", str(args.conns), "-d", duration, "--timeout", "10s",
            "-s", str(script), url]
    cpu_before = {name: group_cpu_seconds(pid) for name, pid in groups.items()}
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before, started = machine_cpu_seconds(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    elapsed = time.monotonic() - started
    cpu = {name: group_cpu_seconds(pid) - cpu_before[name] for name, pid in groups.items()}
    machine = machine_cpu_seconds() - machine_before
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk = wrk_after.ru_utime + wrk_after.ru_stime - wrk_before.ru_utime - wrk_before.ru_stime
    match = re.search(r"^BENCH (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not match:
        raise BenchError(f"wrk {url} failed ({done.returncode}): {done.stdout[-500:]}{done.stderr[-500:]}")
    n = {key: float(value) for key, value in (item.split("=") for item in match.group(1).split())}
    requests = n["requests"] or 1
    return {
        "requests": n["requests"], "rps": n["requests"] / (n["duration_us"] / 1e6),
        "p50_ms": n["p50_us"] / 1000, "p99_ms": n["p99_us"] / 1000, "max_ms": n["max_us"] / 1000,
        "non2xx": n["non2xx"], "errors": n["errors"],
        "nginx_us": cpu.get("nginx", 0.0) * 1e6 / requests, "backend_us": cpu.get("backend", 0.0) * 1e6 / requests,
        # CPU neither nginx, the backend nor wrk used, in % of one core: other load on the machine.
        "other_pct": max(0.0, machine - sum(cpu.values()) - wrk) / elapsed * 100,
    }


# -- The run ---------------------------------------------------------------------------------

class Bench:
    """The processes and files of one run."""

    def __init__(self, args: argparse.Namespace, work: Path, supervisor: Supervisor) -> None:
        self.args, self.work, self.sup = args, work, supervisor
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        self.ports = dict(zip(("front", "app", "builtin", "gunicorn"), sorted(ports), strict=True))
        self.backends: dict[str, subprocess.Popen] = {}
        self.cookie = ""
        self.basic = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        self.template = args.conf.read_text(encoding="utf-8")

    def prepare(self) -> None:
        for tool in (NGINX, "wrk", "openssl"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} not found (Debian: apt-get install nginx-light wrk openssl)")
        self.work.chmod(0o711)  # nginx workers drop root and must reach htpasswd and the cache dir
        for name in ("tmp", "data"):
            (self.work / name).mkdir()
        hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=PASSWORD, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        (self.work / "htpasswd").write_text(f"{USERNAME}:{hashed}\n")
        (self.work / "htpasswd").chmod(0o644)
        created = subprocess.run([sys.executable, str(EZAUTH), "passwd", USERNAME, "--password-stdin",
                                  "--data-dir", str(self.work / "data")], input=PASSWORD + "\n", text=True,
                                 capture_output=True, env=self.backend_env(), cwd=self.work, check=False, timeout=30)
        if created.returncode != 0:
            raise BenchError(f"ezauth.py passwd failed: {created.stderr.strip()}")

    def backend_env(self) -> dict[str, str]:
        """The caller's environment without EZAUTH_* settings: the bench measures the defaults."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EZAUTH_")}
        return {**env, "EZAUTH_DATA_DIR": str(self.work / "data"), "PYTHONDONTWRITEBYTECODE": "1"}

    def start_backends(self, want_gunicorn: bool) -> None:
        builtin = self.sup.start("ezauth", [sys.executable, str(EZAUTH), "serve", "--host", LOOPBACK, "--port",
                                            str(self.ports["builtin"])], env=self.backend_env(), cwd=self.work)
        self.wait_healthy(builtin, "builtin")
        self.backends["builtin"] = builtin
        if want_gunicorn:
            argv = [sys.executable, "-m", "gunicorn", *shlex.split(self.args.gunicorn_args),
                    "-b", f"{LOOPBACK}:{self.ports['gunicorn']}", "--pythonpath", str(REPO), "ezauth:app"]
            self.backends["gunicorn"] = self.sup.start("gunicorn", argv, env=self.backend_env(), cwd=self.work)
            self.wait_healthy(self.backends["gunicorn"], "gunicorn")

    def wait_healthy(self, proc: subprocess.Popen, name: str) -> None:
        wait_until(lambda: fetch(self.ports[name], "/ezauth/healthz").status == 200, proc, name)

    def start_nginx(self, row: Row) -> subprocess.Popen:
        conf = self.work / "nginx.conf"
        shutil.rmtree(self.work / "cache", ignore_errors=True)  # every cache row starts cold
        conf.write_text(nginx_main_conf(self.work, self.ports["app"], self.args.nginx_workers))
        (self.work / "ezauth.conf").write_text(render_shipped(self.template, row, self.ports, self.work))
        argv = [NGINX, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "logs/nginx-error.log")]
        tested = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, check=False, timeout=30)
        if tested.returncode != 0:
            raise BenchError(f"nginx rejected the rendered config for {row.label.strip()}: {tested.stderr.strip()}")
        nginx = self.sup.start("nginx", argv)
        wait_until(lambda: fetch(self.ports["front"], "/ezauth/healthz").status in (200, 503), nginx, "nginx")
        return nginx

    def log_in(self) -> None:
        nginx = self.start_nginx(ROWS[2])
        try:
            self.cookie = log_in(self.ports["front"])
        finally:
            self.sup.stop(nginx)

    def measure(self, row: Row, duration: str, warmup: str) -> dict[str, float]:
        """Start the row's nginx (if any), check it, warm it up, load it."""
        nginx = None if row.auth == "direct" else self.start_nginx(row)
        try:
            port = self.ports[row.backend] if nginx is None else self.ports["front"]
            check_row(row, port, self.cookie, self.basic)
            headers = {"basic": {"Authorization": self.basic}, "none": {}}.get(row.auth, {"Cookie": self.cookie})
            if row.auth == "direct":
                headers = {**headers, "X-Original-URI": APP_PATH}
            url = f"http://{LOOPBACK}:{port}{'/ezauth/verify' if nginx is None else APP_PATH}"
            script = wrk_script(self.work, headers)
            groups = {"backend": self.backends[row.backend].pid} if row.backend else {}
            if nginx is not None:
                groups["nginx"] = nginx.pid
            if warmup not in ("0", "0s"):
                run_wrk(self.args, url, script, warmup, groups)
            result = run_wrk(self.args, url, script, duration, groups)
        finally:
            if nginx is not None:
                self.sup.stop(nginx)
        for name, proc in self.backends.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} died during {row.label.strip()} (status {proc.returncode})")
        return result


def pick_rows(only: str, have_gunicorn: bool) -> list[tuple[int, Row]]:
    chosen = {int(n) for n in only.split(",") if n.strip()} if only else set(range(1, len(ROWS) + 1))
    rows = [(n, row) for n, row in enumerate(ROWS, 1) if n in chosen]
    if not have_gunicorn:
        rows = [(n, row) for n, row in rows if row.backend != "gunicorn"]
    return rows


def summarize(rounds: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Medians over rounds; error counts summed."""
    summary = {}
    for n in rounds[0]:
        runs = [results[n] for results in rounds]
        summary[n] = {key: (sum if key in ("non2xx", "errors", "requests") else statistics.median)(
            [run[key] for run in runs]) for key in runs[0]}
        summary[n]["other_pct"] = max(run["other_pct"] for run in runs)
    return summary


def table(rows: list[tuple[int, Row]], results: dict[int, dict[str, float]], markdown: bool = False) -> str:
    ceiling = results.get(1, {}).get("rps", 0.0)
    head = ["#", "row", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err", "vs no auth",
            "nginx us/req", "backend us/req", "other %"]
    lines = []
    for n, row in rows:
        r = results[n]
        ratio = f"{r['rps'] / ceiling:.3f}" if ceiling and row.auth != "direct" else "-"
        lines.append([str(n), row.label, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['non2xx']:.0f}", f"{r['errors']:.0f}", ratio,
                      f"{r['nginx_us']:.0f}" if row.auth != "direct" else "-",
                      f"{r['backend_us']:.0f}" if row.backend else "-", f"{r['other_pct']:.0f}"])
    if markdown:
        out = ["| " + " | ".join(head[1:]) + " |", "|" + "---|" * (len(head) - 1)]
        out += ["| " + " | ".join(cells[1:]) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(cells[i]) for cells in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*cells) for cells in [head, *lines])


def describe(args: argparse.Namespace, have_gunicorn: bool) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    nginx_version = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False).stderr.strip()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        f"machine: {os.cpu_count()} CPUs ({cpu}), load {load}; {nginx_version}; python {sys.version.split()[0]}",
        f"nginx: {args.conf.name}, worker_processes {args.nginx_workers}; app = nginx `return 200` "
        f"({BODY_BYTES} B body) in the same nginx",
        f"wrk: -t{args.threads} -c{args.conns} -d{args.duration}, warm-up {args.warmup}, "
        f"{args.reps} round(s), medians shown",
        "gunicorn: " + (f"{args.gunicorn_args}" if have_gunicorn else "not installed, rows skipped"),
        "other %: CPU used by anything but nginx, the backend and wrk (% of one core; above ~10 = noisy run)",
    ])


def failures(rows: list[tuple[int, Row]], results: dict[int, dict[str, float]]) -> list[str]:
    return [f"{row.label.strip()}: {r['non2xx']:.0f} non-2xx, {r['errors']:.0f} socket errors"
            for n, row in rows if (r := results[n])["non2xx"] or r["errors"] or not r["requests"]]


def run(args: argparse.Namespace, work: Path, supervisor: Supervisor) -> int:
    have_gunicorn = subprocess.run([sys.executable, "-c", "import gunicorn"], capture_output=True,
                                   check=False).returncode == 0
    rows = pick_rows(args.only, have_gunicorn)
    bench = Bench(args, work, supervisor)
    bench.prepare()
    print(describe(args, have_gunicorn), flush=True)
    bench.start_backends(want_gunicorn=any(row.backend == "gunicorn" for _, row in rows))
    bench.log_in()
    rounds = []
    for number in range(1, args.reps + 1):
        results = {}
        for n, row in rows:
            print(f"bench: round {number}/{args.reps}: {row.label.strip()}", file=sys.stderr, flush=True)
            results[n] = bench.measure(row, args.duration, args.warmup if number == 1 else "0")
        rounds.append(results)
    summary = summarize(rounds)
    print()
    print(table(rows, summary))
    if args.markdown:
        print()
        print(table(rows, summary, markdown=True))
    if args.json:
        everything = {"args": vars(args), "rounds": rounds, "summary": summary}
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))
    failed = failures(rows, summary)
    if failed:
        print("\nFAILED rows (their numbers are not comparable):\n  " + "\n  ".join(failed))
        return 1
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    work = Path(tempfile.mkdtemp(prefix="ezauth-bench."))
    supervisor = Supervisor(work / "logs")
    try:
        (work / "logs").mkdir()
        return run(args, work, supervisor)
    except (BenchError, subprocess.SubprocessError, OSError) as err:
        print(f"bench: FAILED: {err}", file=sys.stderr)
        for log_file in sorted((work / "logs").glob("*.log")):
            tail = log_file.read_text(errors="replace").splitlines()[-8:]
            print(f"bench: last lines of {log_file.name}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        supervisor.stop_all()
        if args.keep_tmp:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
