"""Helpers every layer uses: paths, constants, the clock, polling, skipping for a missing tool,
users files, and reading pages, cookies, tokens and log lines. Nothing here starts a process."""

from __future__ import annotations

import base64
import functools
import hmac
import html
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

import ezauth

# -- Paths, constants, the clock, polling, a missing tool -------------------------------------

HERE = Path(__file__).resolve().parents[2]  # the checkout: tests/support/basics.py -> .
EZAUTH = HERE / "ezauth.py"
EXAMPLE = HERE / "nginx.conf.example"
PASSWORD = "correct horse battery"  # every test user's password unless a test says otherwise
CSRF = "c" * 43  # any value works as long as the cookie and the form field agree
T0 = 1_800_000_000.0  # the fake clock's start
LOGIN = "/ezauth/login"
VERIFY = "/ezauth/verify"
ACCOUNT = "/ezauth/account"
LOGOUT = "/ezauth/logout"
HEALTHZ = "/ezauth/healthz"
SESSION_NAMES = ("ezauth", "__Host-ezauth", "__Secure-ezauth")  # plain http, https, https with a cookie domain
TRUSTED_PEER = {"REMOTE_ADDR": "127.0.0.1"}  # nginx on loopback, the default trusted proxy
CLIENT_IP = "203.0.113.7"
FORWARDED = {"X-Forwarded-For": CLIENT_IP}  # what nginx adds for a visitor from CLIENT_IP
NEW_PASSWORD = "a brand new horse battery"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/17.5 Mobile/15E148 Safari/604.1")
TEXT = ezauth.PAGE_TEXT["en"]
LAG = 1.0  # the documented bound: every worker refuses an ended session or a revoked token this soon

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
    missing(f"{name} not found; install it with: sudo apt-get install -y {hint}", flag)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child ezauth: no EZAUTH_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZAUTH_")}
    env.update(extra)
    return env


# -- Users files and the other files of a data dir --------------------------------------------

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


def counter_value(data_dir: Path) -> int | None:
    """The visit counter file's number (None before the first visit); it must hold nothing else."""
    path = data_dir / "counter.txt"
    if not path.exists():
        return None
    text = path.read_bytes()
    assert re.fullmatch(rb"\d+\n", text), f"counter file holds {text!r}"
    return int(text)


def assert_keyring_valid(data_dir: Path) -> tuple[ezauth.SigningKey, ...]:
    keys = ezauth.parse_keyring((data_dir / "keys.json").read_text(encoding="utf-8"))
    assert keys
    return keys


def corrupt_files(data_dir: Path) -> list[str]:
    """The files ezauth moved aside as damaged."""
    return sorted(p.name for p in data_dir.iterdir() if ".corrupt-" in p.name)


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


def visits_pattern() -> re.Pattern:
    """The English page footer's visit count sentence, the count as group 1."""
    sentence = html.escape(ezauth.PAGE_TEXT["en"]["msg_visits"].format(count="\x00"), quote=True)
    return re.compile(re.escape(sentence).replace("\x00", r"([\d,]+)"))


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


def sid_of(token: str) -> str:
    """The session id a session token carries (read unchecked: the test got the token from ezauth)."""
    return jwt_parts(token)[1]["sid"]


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def readme_section(title: str) -> str:
    """The README's `## TITLE` section, up to the next `## ` heading."""
    return (HERE / "README.md").read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shown_time(when: float) -> str:
    """A time as the account page and the CLI show it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


def basic(name: str, password: str) -> str:
    """An `Authorization: Basic` value."""
    return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()


def forge(header: dict, claims: dict | bytes, secret: bytes, digest: str = "sha256") -> str:
    """A JWT signed by hand, for headers PyJWT itself refuses to write; CLAIMS as bytes go in raw."""
    body = claims if isinstance(claims, bytes) else json.dumps(claims)
    signing_input = f"{b64(json.dumps(header))}.{b64(body)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


def metric(text: str, name: str) -> float:
    """The value of metric NAME (labels included) in the Prometheus text TEXT."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, (name, text)
    return float(match.group(1))


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


# -- Hostile input shared by the in-process and the real-server suites ---------------------------------

TRAVERSALS = [
    "../ezauth.py", "../../ezauth.py", "..%2fezauth.py", "..%2F..%2Fezauth.py", "%2e%2e/ezauth.py",
    "%2e%2e%2fezauth.py", "%252e%252e%252fezauth.py", "..\\ezauth.py", "..%5cezauth.py", ".%2e/ezauth.py",
    "....//ezauth.py", "/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", "login.css/../../ezauth.py",
    "login.css%00.txt", "login.css%2f..%2f..%2fezauth.py", "./login.css", ".htaccess", "..", ".", "",
    "%c0%ae%c0%ae/ezauth.py", "%uff0e%uff0e/ezauth.py", "../data/users", "../../outside/secret.css",
    "leak.css", "users.txt", "keys.json", "secret-dir.css", "subdir/inner.css",
]


def traversal_setup(tmp_path: Path, data_dir: Path) -> str:
    """An outside secret and a data-dir static/ holding symlinks that point out of it."""
    secret = "TOPSECRET-" + "x" * 8
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.css").write_text(secret)
    static = data_dir / "static"
    static.mkdir(exist_ok=True)
    (static / "own.css").write_text("body{}")  # a real file: data-dir static/ works at all
    (static / "leak.css").symlink_to(outside / "secret.css")
    (static / "users.txt").symlink_to(data_dir / "users")
    (static / "keys.json").symlink_to(data_dir / "keys.json")
    (static / "secret-dir.css").symlink_to(outside, target_is_directory=True)
    (static / "subdir").mkdir(exist_ok=True)
    (static / "subdir" / "inner.css").write_text("p{}")
    return secret


def assert_nothing_leaked(status: int, body: bytes, secret: str) -> None:
    assert status in (400, 404), status
    for marker in (secret.encode(), b"def make_app", b"scrypt:", b'"secret"', b"root:"):
        assert marker not in body
