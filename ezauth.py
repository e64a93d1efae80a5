"""ezauth: a login page in front of your self-hosted web apps, for nginx's auth_request.

nginx asks ezauth's verify endpoint, on every request to the app, whether the visitor may go on.
ezauth answers from a signed session cookie (an HS256 JWT, keys rotated daily), an API token or
HTTP Basic, and the access rules: 200 with the user's name, 401 with the login page's URL, or 403.
Around that: the login page (a second factor, a lockout for guessers), an account page (see and
end your sessions; your password, second factor and API tokens), and a command line for users,
tokens, sessions, keys, the nginx config and a check of the whole setup (doctor). What it keeps
lives in a data dir beside this file. It serves HTTP itself (`python ezauth.py`) or runs under
gunicorn (`gunicorn ezauth:app`).

Needs Python 3.11+ and PyJWT; optional: bcrypt (bcrypt lines in the users file) and segno (the QR
code that sets up a second factor). The docs are README.md beside this file: setup, nginx,
settings, security, troubleshooting, and how this file is laid out; `python ezauth.py --help`
lists every command and setting.

Sections, top to bottom; each uses only those above it (a section is a `# -- Name --` banner):

    Basics                   imports, version, PREFIX, the logger, logval, warn_once
    Settings                 the settings table -> the frozen Settings; .env files, --help
    Files                    locked, write_atomic, line files, WatchedFile (reread on change)
    Passwords and users      hash_password, check_password, HashGate (scrypt in turn), Users
    Tokens                   KeyRing (daily keys), decode_token: one decoder for every kind
    Shared databases         SharedDatabase: SQLite shared by every worker and the CLI
    Sessions                 SessionRegistry (who is logged in where, what ended), Sessions
    Visit counter            VisitCounter
    Login throttle           Throttle (the lockout), client_block
    Second factor            TOTP codes, TotpStore
    Access rules             Rules, path_readings, AccessRules (the rules file)
    API clients              HTTP Basic (parse_basic, BasicCache) and API tokens (ApiTokens)
    Metrics                  Metrics: the Prometheus counters
    Stores                   Stores.open: the data dir, opened and refreshed together
    HTTP plumbing            Request, Response, Refused, CookiePolicy, safe_return_target
    Page text and fragments  data only: PAGE_TEXT (en, zh-CN) and the HTML fragments
    Pages                    load_template, render (the one escaping point), Pages
    Handlers                 Flow (what flows share), LoginFlow, AccountFlow, SmallRoutes
    Verify                   Verify: what nginx asks on every request
    Application              EzauthApp (the WSGI callable), make_app (the one route table)
    HTTP server              parser, serializer, Routing, Phase, Pool, Connection, HTTPServer
    Doctor                   `python ezauth.py doctor`: the checks of a site and of nginx -T
    CLI                      the commands, the parser, main(), and `app` for gunicorn

One verify from start to finish, on the built-in server (gunicorn calls EzauthApp.__call__, which
calls respond):

    Connection.process -> Connection.read_head -> parse_head -> build_environ
    -> Connection.answer -> EzauthApp.answers_inline -> HTTPServer.respond -> EzauthApp.respond
    -> Stores.refresh -> EzauthApp.dispatch -> Verify.verify -> CookiePolicy.read -> split_cookies
    -> Sessions.check -> read_token -> Verify.grant_session -> Sessions.renew -> Verify.grant
    -> Verify.one_host -> Verify.ruled_in -> Rules.allows_every -> Verify.allowed
    -> serialize_response -> Connection.reply -> Connection.send

No disk on the way: Sessions.check decodes a token (read_token) only the first time it comes,
and the ended sessions are a set in memory that Stores.refresh reloads at most once a second.
"""

# -- Basics ---------------------------------------------------------------------------------

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import enum
import fcntl
import functools
import getpass
import hashlib
import hmac
import html
import http.client
import http.cookiejar
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import struct
import subprocess  # nosec B404  # only the doctor's `nginx -T`
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import Field, dataclass, field, fields, replace
from email.message import Message
from email.utils import formatdate
from html.parser import HTMLParser
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import jwt

__version__ = "1.0.0"

HERE = Path(__file__).resolve().parent
PREFIX = "/ezauth"
log = logging.getLogger("ezauth")

Clock = Callable[[], float]
R = TypeVar("R")


def logval(value: str, limit: int | None = 80) -> str:
    """A log field that cannot break the line or forge another field. What a client sends is cut at
    LIMIT characters; what the machine says (a command, an error naming a file) is whole: None."""
    if re.fullmatch(r"[A-Za-z0-9._@+:/-]+", value) and (limit is None or len(value) <= limit):
        return value
    return json.dumps(value[:limit], ensure_ascii=True)


_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log MESSAGE the first time KEY comes up in this process, never again."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


# -- Settings -------------------------------------------------------------------------------
# Each setting is declared once, as a field of Settings whose metadata holds its parser, check
# and help text. That one table drives the environment and .env reading, the `serve` flags and
# the settings list in --help (and a test holds the README's table to it).

ENV_FILE = ".env"
DATA_DIR_NAME = "ezauth-data"
LEGACY_IGNORED = ("SECRET_KEY", "LAST_UPDATED")  # from the original blog post's .env
COOKIE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
DOMAIN_RE = re.compile(r"\.?([a-z0-9-]{1,63}\.)*[a-z0-9-]{1,63}")
LANGS = ("en", "zh-CN")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A bad setting; the message names it."""


@dataclass(frozen=True)
class Spec:
    """How one setting is read, checked and explained."""

    help: str
    parse: Callable[[str, str], Any]  # (variable, raw text) -> value, or SettingsError naming it
    check: Callable[[Any], str] | None = None  # the value -> "" when fine, else what is wrong
    shown: str = ""  # the default as --help and the README show it, when not the value itself


def spec(help: str, parse: Callable[[str, str], Any], check: Callable[[Any], str] | None = None,
         shown: str = "") -> dict[str, Spec]:
    """The metadata that makes a field of Settings a setting."""
    return {"spec": Spec(help, parse, check, shown)}


def parse_int(name: str, raw: str) -> int:
    if not re.fullmatch(r"\s*-?[0-9]{1,12}\s*", raw):
        raise SettingsError(f"{name}: {raw!r} is not a whole number")
    return int(raw)


def parse_bool(name: str, raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: {raw!r} is not 1 or 0")


def parse_networks(name: str, raw: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",")
                     if part.strip())
    except ValueError as err:
        raise SettingsError(f"{name}: {err}") from None


def ip_in(address: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether ADDRESS (IPv4-mapped IPv6 read as the IPv4 it maps) lies in one of NETWORKS."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def parse_text(name: str, raw: str) -> str:
    return raw


def parse_word(name: str, raw: str) -> str:
    return raw.strip()


def parse_lower(name: str, raw: str) -> str:
    return raw.strip().lower()


def parse_lang(name: str, raw: str) -> str:
    return "zh-CN" if raw.strip().lower() in ("zh", "zh-cn", "zh_cn", "zh-hans") else raw.strip()


def parse_path(name: str, raw: str) -> Path:
    return Path(raw.strip())


def check_port(port: int) -> str:
    return "" if 0 <= port <= 65535 else f"{port} is not a port number (0-65535)"


def check_positive(value: int) -> str:
    return "" if value >= 1 else f"must be at least 1, got {value}"


def check_cookie_name(name: str) -> str:
    if COOKIE_NAME_RE.fullmatch(name):
        return ""
    return f"{name!r} is not a cookie name (letters, digits, _ and -)"


def check_domain(domain: str) -> str:
    return "" if not domain or DOMAIN_RE.fullmatch(domain) else f"{domain!r} is not a domain name"


def check_secure(value: str) -> str:
    return "" if value in ("auto", "1", "0") else f"{value!r} is not auto, 1 or 0"


def check_lang(lang: str) -> str:
    return "" if not lang or lang in LANGS else f"{lang!r} is not one of {', '.join(LANGS)}"


def check_text(text: str) -> str:
    return "" if len(text) <= 300 else "longer than 300 characters"


def check_proxy_headers(value: str) -> str:
    return "" if value in PROXY_HEADERS else f"{value!r} is not one of {', '.join(PROXY_HEADERS)}"


def parse_portal(name: str, raw: str) -> str:
    """A portal address as scheme://host[:port], without a path; SettingsError otherwise."""
    try:
        parts = urllib.parse.urlsplit(raw.strip())
        _ = parts.port
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or "@" in parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise SettingsError(f"{name}: {raw!r} is not an address like https://auth.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def host_under(host: str, domain: str) -> bool:
    """True when HOST is DOMAIN or one of its subdomains."""
    domain = domain.lstrip(".").lower()
    return bool(domain) and (host == domain or host.endswith("." + domain))


def check_bool(value: object) -> str:
    return "" if isinstance(value, bool) else f"{value!r} is not 1 or 0"


DEFAULT_PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
# The headers that name the request a proxy asks verify about: (URI, host, port), by family.
PROXY_HEADERS = {"original": ("X-Original-URI", "X-Original-Host", "X-Original-Port"),
                 "forwarded": ("X-Forwarded-Uri", "X-Forwarded-Host", "X-Forwarded-Port")}


@dataclass(frozen=True)
class Settings:
    """Every knob ezauth has, validated once at construction."""

    host: str = field(default="127.0.0.1", metadata=spec(
        "address to listen on (`::` for IPv6 and IPv4)", parse_word))
    port: int = field(default=2424, metadata=spec(
        "port to listen on", parse_int, check_port))
    data_dir: Path = field(default=HERE / DATA_DIR_NAME, metadata=spec(
        "where all state lives: by default the folder ezauth-data beside ezauth.py, wherever a "
        "command runs", parse_path, shown=DATA_DIR_NAME))
    session_ttl: int = field(default=1800, metadata=spec(
        "a session ends after this many seconds without use (renewed while in use)", parse_int,
        check_positive))
    remember_ttl: int = field(default=2592000, metadata=spec(
        "lifetime of a session with 'remember me' (30 days)", parse_int, check_positive))
    session_max_age: int = field(default=2592000, metadata=spec(
        "a session ends this long after its login however much it is used, remember me included "
        "(30 days)", parse_int, check_positive))
    rotate_every: int = field(default=86400, metadata=spec(
        "make a new signing key this often", parse_int, check_positive))
    trusted_proxies: tuple[IPNetwork, ...] = field(default=DEFAULT_PROXIES, metadata=spec(
        "IPs/CIDRs whose X-Forwarded-For, X-Real-IP and X-Forwarded-Proto are believed",
        parse_networks, shown="127.0.0.1,::1"))
    max_attempts: int = field(default=5, metadata=spec(
        "failed logins allowed per client IP and per user name ...", parse_int, check_positive))
    lockout_window: int = field(default=300, metadata=spec(
        "... within this window ...", parse_int, check_positive))
    lockout_time: int = field(default=300, metadata=spec(
        "... before further attempts get 429 for this long", parse_int, check_positive))
    cookie_name: str = field(default="ezauth", metadata=spec(
        "session cookie name (change the two maps in the nginx config too)", parse_word,
        check_cookie_name))
    cookie_domain: str = field(default="", metadata=spec(
        "e.g. `.example.com` for one login across subdomains (unset: host-only)", parse_lower,
        check_domain, shown="unset"))
    cookie_secure: str = field(default="auto", metadata=spec(
        "`auto`: Secure when the request came over https; `1` always; `0` never", parse_lower,
        check_secure))
    title: str = field(default="", metadata=spec(
        "title of the login page, shown as text (unset: a friendly default)", parse_text,
        check_text, shown="unset"))
    subtitle: str = field(default="", metadata=spec(
        "line under the title, shown as text (unset: a friendly default)", parse_text, check_text,
        shown="unset"))
    slogan: str = field(default="", metadata=spec(
        "small print under the form, shown as text (unset: a friendly default)", parse_text,
        check_text, shown="unset"))
    lang: str = field(default="", metadata=spec(
        "`en` or `zh-CN` (unset: from the browser)", parse_lang, check_lang, shown="unset"))
    counter: bool = field(default=True, metadata=spec(
        "`0` turns the visit counter off: nothing counted, no counter.txt, no line under the login "
        "form", parse_bool, check_bool))
    access_log: bool = field(default=False, metadata=spec(
        "`1` logs every request; a verify's line names the host, path (no query) and user nginx "
        "asked about", parse_bool, check_bool))
    metrics: bool = field(default=False, metadata=spec(
        "`1` serves Prometheus metrics at /ezauth/metrics to loopback and trusted proxies",
        parse_bool, check_bool))
    basic_auth: bool = field(default=False, metadata=spec(
        "`1` lets API clients send `Authorization: Basic`", parse_bool, check_bool))
    proxy_headers: str = field(default="original", metadata=spec(
        "how the proxy names the request it asks about: `original` (nginx: X-Original-URI, -Host, "
        "-Port) or `forwarded` (Caddy, Traefik: X-Forwarded-Uri, -Host, -Port); the other family "
        "is never read", parse_lower, check_proxy_headers))
    portal: str = field(default="", metadata=spec(
        "the login pages' own address, e.g. `https://auth.example.com` (with "
        "EZAUTH_COOKIE_DOMAIN): every ezauth page on an app's host sends the visitor there",
        parse_portal, shown="unset"))
    # From an old .env, not a setting:
    legacy_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Whether EZAUTH_DATA_DIR or --data-dir named the data dir (not a setting). When neither did, a
    # ./ezauth-data where a command runs that is not the default stops it (check_data_dir).
    data_dir_named: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        for item, spec in setting_specs():
            problem = spec.check(getattr(self, item.name)) if spec.check else ""
            if problem:
                raise SettingsError(f"{variable(item)}: {problem}")
        if self.portal and not host_under(urllib.parse.urlsplit(self.portal).hostname or "",
                                          self.cookie_domain):
            raise SettingsError(f"EZAUTH_PORTAL: {self.portal} is not under EZAUTH_COOKIE_DOMAIN "
                                f"({self.cookie_domain or 'unset'}), so its cookie would not "
                                "reach the apps")
        if self.session_max_age < self.session_ttl:
            raise SettingsError(f"EZAUTH_SESSION_MAX_AGE: {self.session_max_age} is below "
                                f"EZAUTH_SESSION_TTL ({self.session_ttl}); a session could never "
                                "last its idle time")

    @property
    def longest_ttl(self) -> int:
        return max(self.session_ttl, self.remember_ttl)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None, env_file: Path | None = None) -> Settings:
        """Flags override environment variables, which override the .env files (read_env_files);
        ENV_FILE names the one .env file to read instead."""
        environ = os.environ if environ is None else environ
        dotenv = read_env_file(env_file) if env_file else read_env_files()
        merged = {**dotenv, **{k: v for k, v in environ.items() if k.startswith("EZAUTH_")}}
        values: dict[str, Any] = {}
        for item, spec in setting_specs():
            if merged.get(variable(item), "") != "":
                values[item.name] = spec.parse(variable(item), merged[variable(item)])
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        values["legacy_users"] = legacy_users(dotenv)
        values["data_dir_named"] = "data_dir" in values
        known = {variable(item) for item, _ in setting_specs()}
        for name in sorted(k for k in merged if k.startswith("EZAUTH_") and k not in known):
            log.warning("event=setting_unknown name=%s note=ignored_see_python_ezauth.py_--help",
                        logval(name))
        ignored = [key for key in LEGACY_IGNORED if key in dotenv]
        if ignored:
            log.warning("event=legacy_env_ignored keys=%s "
                        "note=the_key_ring_in_the_data_dir_replaces_them",
                        ",".join(ignored))
        return cls(**values)


def setting_specs() -> list[tuple[Field[Any], Spec]]:
    """The settings table: each field of Settings that is a setting, with its spec."""
    return [(item, item.metadata["spec"]) for item in fields(Settings) if "spec" in item.metadata]


def variable(item: Field[Any]) -> str:
    """The environment variable of a setting: EZAUTH_ and its name in capitals."""
    return f"EZAUTH_{item.name.upper()}"


def shown_default(item: Field[Any], spec: Spec) -> str:
    """A setting's default as --help and the README show it."""
    if spec.shown:
        return spec.shown
    return str(int(item.default)) if isinstance(item.default, bool) else str(item.default)


def settings_help() -> str:
    """Every setting with its variable and default, for --help."""
    lines = ["settings (flags of `serve` override EZAUTH_* variables, which override the .env "
             "beside ezauth.py and, over it, the working directory's):"]
    for item, spec in setting_specs():
        lines.append(f"  {variable(item):<24} {shown_default(item, spec):<14} {spec.help}")
    return "\n".join(lines)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file; comments, blanks and lines without '=' are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: cannot read it ({err})") from None
    values = {}
    for line in text.splitlines():
        line = line.strip()
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_env_files() -> dict[str, str]:
    """The .env beside ezauth.py, overridden variable by variable by the working directory's when
    that is another file. One beside ezauth.py that cannot be read stops (SettingsError): it is the
    install's own. The working directory's only warns: a command run from a folder it cannot read
    (`sudo -u ezauth ...` from your home) still knows its settings."""
    values = read_env_file(HERE / ENV_FILE)
    try:
        here = Path.cwd() / ENV_FILE
    except OSError:  # the working directory was removed
        return values
    with contextlib.suppress(OSError):
        if here.samefile(HERE / ENV_FILE):
            return values
    try:
        return {**values, **read_env_file(here)}
    except SettingsError as err:
        log.warning("event=env_file_unreadable error=%s action=ignored",
                    logval(str(err), limit=None))
        return values


def legacy_users(dotenv: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The one user of a .env from the original blog post, as ((name, password),) or ()."""
    name, password = dotenv.get("chat_username", ""), dotenv.get("password", "")
    return ((name, password),) if name and password else ()


# -- Files ----------------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """A file in the data dir that cannot be read or written right now: a full disk, a read-only
    mount, a lock held too long, a permission. The operation fails closed (503 for a request, exit 1
    for the CLI) and the next one tries the file again: no store ever carries on in private memory,
    where it would forget what the CLI and the other workers wrote."""

    def __init__(self, path: Path, error: object) -> None:
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, str(error)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on PATH.lock: every writer of PATH in every process takes it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace PATH with DATA so a reader, or a crash, only ever sees the old or the new file."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's; we hold the lock
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def rewrite_lines(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    """Apply CHANGE to PATH's lines under its lock. Lines stay bytes, so ones we cannot parse
    survive. StoreUnavailable when the file cannot be read or written: the change is not made."""
    try:
        with locked(path):
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                lines = []
            new = change(lines)
            if new != lines:
                write_atomic(path, b"".join(line + b"\n" for line in new))
    except OSError as err:
        raise StoreUnavailable(path, err.strerror or err) from None


def line_name(line: bytes) -> str:
    """The NAME of a `NAME:...` line."""
    return line.strip().partition(b":")[0].decode("utf-8", "replace")


def put_named_line(path: Path, name: str, line: bytes) -> None:
    """Replace NAME's line in PATH, or add it."""
    rewrite_lines(path, lambda lines: [ln for ln in lines if line_name(ln) != name] + [line])


def drop_named_line(path: Path, name: str) -> bool:
    """Remove NAME's line from PATH; False when there was none."""
    found = []

    def drop(lines: list[bytes]) -> list[bytes]:
        kept = [ln for ln in lines if line_name(ln) != name]
        found.append(len(kept) != len(lines))
        return kept

    rewrite_lines(path, drop)
    return found[0]


def move_aside(path: Path, now: float) -> Path:
    """Rename a file we cannot use to NAME.corrupt-TIME, keeping it for a human to look at."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    os.replace(path, target)
    return target


Stamp = tuple[int, int, int, int]
# The stamp of a file not looked at yet: never equal to a real one, nor to None.
NOT_READ: tuple[()] = ()


def file_stamp(path: Path) -> Stamp | None:
    """What changes whenever PATH is replaced, edited or chmod-ed; None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


class WatchedFile:
    """A file in the data dir that is reread when it changes (at most as often as load() is called).
    A version that cannot be read or understood is logged once and skipped: the owner keeps the last
    good one. With FAIL_CLOSED, an unusable file with no good version before it (e.g. at start-up)
    counts as an empty one, which for access rules means nobody is let in."""

    event = "file"

    def __init__(self, path: Path, fail_closed: bool = False) -> None:
        self.path, self.fail_closed = path, fail_closed
        self._stamp: Stamp | tuple[()] | None = NOT_READ
        self._bad_stamp: Stamp | tuple[()] | None = NOT_READ
        self._holds_a_file = False

    def load(self) -> None:
        """Reread the file if it changed since the last look."""
        try:
            self.read_if_changed()
        except (OSError, ValueError) as err:
            stamp = file_stamp(self.path)
            if stamp == self._bad_stamp:
                return  # logged once per bad version, not every second
            self._bad_stamp = stamp
            action = "keeping_the_last_good_version"
            if self.fail_closed and not self._holds_a_file:
                self.use(b"")
                action = "treating_it_as_empty"
            kind = "unreadable" if isinstance(err, OSError) else "rejected"
            log.error("event=%s_%s path=%s error=%s action=%s", self.event, kind, self.path,
                      logval(str(err), limit=None), action)

    def read_if_changed(self) -> None:
        """As load(), but raises for a version it cannot read (OSError) or parse (ValueError)."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        self.use(self.path.read_bytes() if stamp is not None else None)
        self._stamp, self._holds_a_file = stamp, stamp is not None

    def reload(self) -> None:
        """Read the file now, not when its stamp next changes (this process just wrote it)."""
        self._stamp = NOT_READ
        self.load()

    def wrote(self) -> None:
        """This process just wrote the file and uses what it wrote: no need to read it back."""
        self._stamp, self._holds_a_file = file_stamp(self.path), True

    def use(self, data: bytes | None) -> None:
        """Take in a new version (None: there is no file); ValueError if it makes no sense."""
        raise NotImplementedError


def private_secret(path: Path, now: float) -> bytes:
    """32 random bytes kept in PATH, made on first use under its lock so every worker shares them; a
    damaged file is moved aside and replaced."""
    with locked(path):
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            secret = b""
        if len(secret) == 32:
            return secret
        if secret:
            log.error("event=secret_corrupt path=%s moved_to=%s action=new_secret", path,
                      move_aside(path, now))
        secret = secrets.token_bytes(32)
        write_atomic(path, secret)
        return secret


def prepare_data_dir(path: Path) -> None:
    """Create the data dir private to its owner."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)


def require_writable(path: Path) -> None:
    """StoreUnavailable naming PATH unless a file can be made, written to the disk and removed
    there: a server that could not record a login, a lockout or a logout must not start."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ezauth-write-test.", dir=path)
        try:
            os.write(fd, b"ezauth\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        reason = f"the data dir cannot be written ({err.strerror or err})"
        raise StoreUnavailable(path, reason) from None


# -- Passwords and users --------------------------------------------------------------------

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSWORD = 8
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * n * r * p, dklen=32)


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  salt: bytes | None = None) -> str:
    """A self-describing scrypt hash: scrypt:N:r:p$salt$hash, so the cost can be raised later."""
    salt = secrets.token_bytes(16) if salt is None else salt
    return f"scrypt:{n}:{r}:{p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def check_password(password: str, encoded: str) -> bool:
    """True when PASSWORD matches ENCODED; a malformed or unsupported hash never matches."""
    if encoded.startswith(("$2a$", "$2b$", "$2y$")):
        return _check_bcrypt(password, encoded)
    try:
        method, salt, digest = encoded.split("$")
        kind, *costs = method.split(":")
        n, r, p = (int(cost) for cost in costs)
        salt_raw, digest_raw = _unb64(salt), _unb64(digest)
    except ValueError:
        return False
    if kind != "scrypt" or not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32
                                and 1 <= p <= 16):
        return False
    return hmac.compare_digest(_scrypt(password, salt_raw, n, r, p), digest_raw)


def _check_bcrypt(password: str, encoded: str) -> bool:
    try:
        import bcrypt
    except ImportError:
        return False
    try:
        return bool(bcrypt.checkpw(password.encode("utf-8", "surrogatepass"),
                                   encoded.encode("ascii")))
    except ValueError:
        return False


def bcrypt_available() -> bool:
    try:
        import bcrypt  # noqa: F401
    except ImportError:
        return False
    return True


# Costs the same scrypt as a real check, so an unknown user answers as slowly as a known one.
DUMMY_HASH = f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}${_b64(bytes(16))}${_b64(bytes(32))}"


def legacy_hash(name: str, password: str) -> str:
    """The hash of a password from the original blog post's .env, the same in every worker and after
    every restart (a salt derived from the name), so its sessions survive both."""
    seed = f"ezauth legacy .env user {name}".encode()
    return hash_password(password, salt=hashlib.sha256(seed).digest()[:16])


def credential_fingerprint(encoded: str) -> str:
    """A short digest of a stored hash; sessions carry it and die when the password changes."""
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def parse_users(data: bytes) -> dict[str, str]:
    """name -> hash from a users file; bad lines are logged by number and skipped."""
    users = {}
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            stripped = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            log.warning("event=users_line_skipped line=%d reason=not_utf8", number)
            continue
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, encoded = stripped.partition(":")
        if not sep or not NAME_RE.fullmatch(name) or not encoded:
            log.warning("event=users_line_skipped line=%d reason=malformed", number)
        elif encoded.startswith("$2") and not bcrypt_available():
            log.warning("event=users_line_skipped line=%d user=%s reason=bcrypt_not_installed",
                        number, name)
        elif not encoded.startswith(("scrypt:", "$2a$", "$2b$", "$2y$")):
            log.warning("event=users_line_skipped line=%d user=%s reason=unknown_hash",
                        number, name)
        else:
            users[name] = encoded
    return users


class Users(WatchedFile):
    """The users file (name:hash lines), reloaded when it changes; writes keep every other line."""

    event = "users"

    def __init__(self, path: Path, extra: Mapping[str, str] | None = None) -> None:
        self._extra = dict(extra or {})
        self._hashes: dict[str, str] = dict(self._extra)
        self._fingerprints: dict[str, str] = {}
        super().__init__(path)
        self.load()

    def use(self, data: bytes | None) -> None:
        hashes = {**self._extra, **parse_users(data or b"")}
        self._fingerprints = {name: credential_fingerprint(h) for name, h in hashes.items()}
        self._hashes = hashes

    def names(self) -> list[str]:
        return sorted(self._hashes)

    def fingerprint(self, name: str) -> str | None:
        return self._fingerprints.get(name)

    def check(self, name: str, password: str) -> bool:
        """Check a password in the same time whether or not the user exists."""
        encoded = self._hashes.get(name)
        matched = check_password(password, encoded or DUMMY_HASH)
        return matched and encoded is not None

    def set_password(self, name: str, password: str) -> None:
        """Create the user or replace their hash; their existing sessions end."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid user name (letters, digits, . _ @ + -; "
                             "up to 64)")
        put_named_line(self.path, name, f"{name}:{hash_password(password)}".encode())
        self.reload()

    def delete(self, name: str) -> bool:
        """Remove the user; False when there was no such user in the file."""
        found = drop_named_line(self.path, name)
        self.reload()
        return found

    def create_first_admin(self) -> str | None:
        """On a first start (no users, no users file), create admin and return its password."""
        if self._hashes:
            return None
        with locked(self.path):
            self.load()
            if self._hashes or (file_stamp(self.path) or (0, 0, 0))[2] > 0:
                return None  # never replace a users file we merely failed to understand
            password = secrets.token_urlsafe(16)
            write_atomic(self.path, f"admin:{hash_password(password)}\n".encode())
        self.reload()
        return password


# At most this many password checks run at once in a process: scrypt holds a core for ~0.1 s, and
# more at once only make every check slower, a real user's included.
HASH_SLOTS = 2


class HashGate:
    """Every password check a request makes passes this gate: at most SLOTS run at once. Waiting
    clients take turns: each has a line of its own and the lines are served round robin, so a flood
    from one network holds one place in the rotation, never the whole queue (how many checks one
    client has in flight at all, the lockout limits). Unknown user names are checked against a dummy
    hash through the same gate, so they cost what known ones cost."""

    def __init__(self, slots: int = HASH_SLOTS) -> None:
        self.slots = slots
        self._changed = threading.Condition()
        self._running = 0
        self._lines: dict[str, deque[object]] = {}  # client -> its waiting checks, oldest first
        self._turns: deque[str] = deque()  # the clients with a line, in the order they are served
        self._admitted: set[object] = set()

    @property
    def waiting(self) -> int:
        """How many checks wait for a slot."""
        with self._changed:
            return sum(len(line) for line in self._lines.values())

    def run(self, client: str, check: Callable[[], R]) -> R:
        """CHECK's result, run when CLIENT's turn comes."""
        self._enter(client)
        try:
            return check()
        finally:
            self._leave()

    def _enter(self, client: str) -> None:
        with self._changed:
            if self._running < self.slots and not self._turns:
                self._running += 1
                return
            ticket = object()
            if client not in self._lines:
                self._lines[client] = deque()
                self._turns.append(client)
            self._lines[client].append(ticket)
            while ticket not in self._admitted:
                self._changed.wait()
            self._admitted.discard(ticket)

    def _leave(self) -> None:
        """Hand the slot to the first waiting check of the client whose turn it is, or free it."""
        with self._changed:
            if not self._turns:
                self._running -= 1
                return
            turn = self._turns.popleft()
            line = self._lines[turn]
            self._admitted.add(line.popleft())
            if line:
                self._turns.append(turn)  # the back of the rotation: every other client goes first
            else:
                del self._lines[turn]
            self._changed.notify_all()


# -- Tokens ---------------------------------------------------------------------------------
# Signing keys, and the two kinds of token they sign: sessions (the cookie) and pending logins
# (a right password still owing its second-factor code). One decoder checks both.

# A new key is only used for signing this long after it is written, so every worker has
# reloaded it (they look once a second) before any token signed with it reaches them.
PUBLISH_DELAY = 3.0
REFRESH_EVERY = 1.0
KID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: bytes = field(repr=False)
    created: float
    signs_from: float


def new_key(now: float, signs_from: float) -> SigningKey:
    return SigningKey(secrets.token_urlsafe(9), secrets.token_bytes(32), now, signs_from)


def parse_keyring(text: str) -> tuple[SigningKey, ...]:
    """Keys from the key ring file, oldest first; ValueError if anything is off."""
    try:
        entries = json.loads(text)["keys"]
        keys = tuple(SigningKey(e["kid"], _unb64(e["secret"]), float(e["created"]),
                                float(e["signs_from"])) for e in entries)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as err:
        raise ValueError(f"not a key ring ({err.__class__.__name__})") from None
    if not keys or any(not KID_RE.fullmatch(k.kid) or len(k.secret) < 32 for k in keys):
        raise ValueError("no keys, or a key with a bad id or shorter than 32 bytes")
    return tuple(sorted(keys, key=lambda k: k.signs_from))


def dump_keyring(keys: Iterable[SigningKey]) -> bytes:
    entries = [{"kid": k.kid, "secret": _b64(k.secret), "created": k.created,
                "signs_from": k.signs_from} for k in keys]
    return (json.dumps({"keys": entries}, indent=1) + "\n").encode()


def keys_to_keep(keys: tuple[SigningKey, ...], now: float,
                 longest_ttl: int) -> tuple[SigningKey, ...]:
    """Drop a key only once every token it could have signed has expired."""
    kept = [k for k, successor in itertools.pairwise(keys)
            if successor.signs_from + longest_ttl + PUBLISH_DELAY > now]
    return (*kept, keys[-1])


class KeyRing(WatchedFile):
    """HS256 keys in keys.json: the newest published key signs, every kept key verifies."""

    event = "keyring"

    def __init__(self, path: Path, rotate_every: int, longest_ttl: int, now: float) -> None:
        self.rotate_every, self.longest_ttl = rotate_every, longest_ttl
        self.keys: tuple[SigningKey, ...] = ()
        self._by_kid: dict[str, SigningKey] = {}
        self._retry_rotation_at = 0.0
        super().__init__(path)
        self._open(now)

    def use(self, data: bytes | None) -> None:
        if data is not None:  # a ring deleted while running: keep signing with what we have
            self._use(parse_keyring(data.decode("utf-8")))

    def _open(self, now: float) -> None:
        try:
            with locked(self.path):
                self._load_or_replace(now)
        except OSError as err:  # no lock to take: carry on with the keys every worker shares
            with contextlib.suppress(OSError, ValueError):
                self.read_if_changed()
            if self.keys:
                log.warning("event=keyring_readonly error=%s action=using_loaded_keys",
                            logval(str(err), limit=None))
                return
            if file_stamp(self.path) is not None:
                raise  # a ring we may not read (EACCES) is not a corrupt one: never replace it
            # No ring to share and none can be written: a key of our own would sign sessions no
            # other worker accepts and a restart forgets, so refuse to start instead.
            raise StoreUnavailable(self.path, err.strerror or err) from None

    def _load_or_replace(self, now: float) -> None:
        try:
            self.read_if_changed()
        except (ValueError, IsADirectoryError) as err:  # not a key ring; EACCES and the like go up
            aside = move_aside(self.path, now)
            log.error("event=keyring_corrupt moved_to=%s error=%s action=new_key_ring "
                      "note=sessions_signed_by_the_lost_keys_have_ended", aside,
                      logval(str(err), limit=None))
        if not self.keys:
            self._write((new_key(now, now),))

    def _use(self, keys: tuple[SigningKey, ...]) -> None:
        self._by_kid = {k.kid: k for k in keys}
        self.keys = keys

    def _write(self, keys: tuple[SigningKey, ...]) -> None:
        write_atomic(self.path, dump_keyring(keys))
        self._use(keys)
        self.wrote()

    def refresh(self, now: float) -> None:
        """Pick up changes from other processes, and rotate when the newest key is old enough."""
        self.load()
        if now - self.keys[-1].created >= self.rotate_every and now >= self._retry_rotation_at:
            self.rotate(now, only_if_due=True)

    def rotate(self, now: float, only_if_due: bool = False) -> SigningKey | None:
        """Add a new signing key (used from now + PUBLISH_DELAY) and drop retired ones."""
        try:
            with locked(self.path):
                self.read_if_changed()
                if only_if_due and now - self.keys[-1].created < self.rotate_every:
                    return None
                key = new_key(now, now + PUBLISH_DELAY)
                self._write((*keys_to_keep(self.keys, now, self.longest_ttl), key))
        except (OSError, ValueError) as err:
            self._retry_rotation_at = now + 60
            log.error("event=rotation_failed error=%s action=keeping_current_keys",
                      logval(str(err), limit=None))
            return None
        log.info("event=key_rotated kid=%s signs_from=%d", key.kid, key.signs_from)
        return key

    def signer(self, now: float) -> SigningKey:
        """The newest key already published to every worker."""
        for key in reversed(self.keys):
            if key.signs_from <= now:
                return key
        return self.keys[0]

    def get(self, kid: object) -> SigningKey | None:
        return self._by_kid.get(kid) if isinstance(kid, str) else None


MAX_TOKEN = 4096
CLOCK_SKEW = 30
PENDING_TTL = 300  # how long the code step may take after the right password
SESSION, PENDING, ENROLL = "session", "totp", "enroll"  # what a token is for: one key for each
ENROLL_TTL = 600  # how long the account page's two-factor set-up may take
PURPOSE_LABELS = {PENDING: b"ezauth totp pending", ENROLL: b"ezauth totp enrolment"}
SID_RE = re.compile(r"[A-Za-z0-9_-]{16,43}")


class InvalidSession(Exception):
    """A token that must not let anyone in; the message says why."""


@dataclass(frozen=True)
class Session:
    user: str
    fingerprint: str
    kid: str
    issued: int
    expires: int
    remember: bool
    sid: str  # the session's id in the registry; renewed tokens keep it
    auth_time: int  # when the password was entered; renewals end EZAUTH_SESSION_MAX_AGE after it

    @property
    def renew_at(self) -> float:
        return self.issued + (self.expires - self.issued) / 2


def token_secret(key: SigningKey, purpose: str) -> bytes:
    """Sessions are signed with the ring key, the other kinds with keys derived from it: no kind
    can ever pass as another."""
    if purpose == SESSION:
        return key.secret
    return hmac.new(key.secret, PURPOSE_LABELS[purpose], hashlib.sha256).digest()


def issue_token(session: Session, key: SigningKey) -> str:
    """Sign SESSION as an HS256 JWT with KEY's id in the header."""
    claims = {"sub": session.user, "iat": session.issued, "exp": session.expires,
              "fp": session.fingerprint, "rem": int(session.remember), "sid": session.sid,
              "auth_time": session.auth_time}
    return jwt.encode(claims, token_secret(key, SESSION), algorithm="HS256",
                      headers={"kid": key.kid})


def issue_pending(user: str, fingerprint: str, remember: bool, key: SigningKey, now: float) -> str:
    """A short-lived token saying: this user gave the right password and owes a code."""
    claims = {"sub": user, "fp": fingerprint, "rem": int(remember), "pur": PENDING,
              "iat": int(now), "exp": int(now) + PENDING_TTL}
    return jwt.encode(claims, token_secret(key, PENDING), algorithm="HS256",
                      headers={"kid": key.kid})


def issue_enrollment(user: str, fingerprint: str, secret: bytes, key: SigningKey,
                     now: float) -> str:
    """A short-lived token carrying a new second-factor secret until its first code confirms it."""
    secret_text = base64.b32encode(secret).decode()
    claims = {"sub": user, "fp": fingerprint, "pur": ENROLL, "sec": secret_text,
              "iat": int(now), "exp": int(now) + ENROLL_TTL}
    return jwt.encode(claims, token_secret(key, ENROLL), algorithm="HS256",
                      headers={"kid": key.kid})


def decode_token(token: str, keys: KeyRing, now: float, purpose: str) -> tuple[dict[str, Any], str]:
    """(claims, key id) of a TOKEN made for PURPOSE, or InvalidSession. The one decoder of both
    kinds: length capped, key looked up by `kid`, algorithm pinned to HS256, every time check
    against NOW."""
    if len(token) > MAX_TOKEN:
        raise InvalidSession("too long")
    try:
        key = keys.get(jwt.get_unverified_header(token).get("kid"))
        if key is None:
            raise InvalidSession("unknown key id")
        claims = jwt.decode(token, token_secret(key, purpose), algorithms=["HS256"],
                            options={"require": ["sub", "iat", "exp"], "verify_exp": False,
                                     "verify_iat": False, "verify_nbf": False})
    except jwt.InvalidTokenError as err:
        raise InvalidSession(err.__class__.__name__) from None
    check_claims(claims, now, purpose)
    return claims, key.kid


def check_claims(claims: dict[str, Any], now: float, purpose: str) -> None:
    """InvalidSession unless CLAIMS are of the right kind and valid at NOW (within CLOCK_SKEW)."""
    sub, iat, exp, fp = claims.get("sub"), claims.get("iat"), claims.get("exp"), claims.get("fp")
    if claims.get("pur", SESSION) != purpose:
        raise InvalidSession("made for something else")
    if purpose == SESSION and not (isinstance(claims.get("sid"), str)
                                   and SID_RE.fullmatch(claims["sid"])):
        raise InvalidSession("no session id")
    if not (isinstance(sub, str) and isinstance(fp, str)):
        raise InvalidSession("bad subject or fingerprint")
    if (not (isinstance(iat, int) and isinstance(exp, int)) or isinstance(iat, bool)
            or isinstance(exp, bool)):
        raise InvalidSession("bad times")
    if purpose == SESSION and not (type(claims.get("auth_time")) is int
                                   and claims["auth_time"] <= iat):
        raise InvalidSession("no login time")
    if exp <= now:
        raise InvalidSession("expired")
    nbf = claims.get("nbf", iat)
    if iat > now + CLOCK_SKEW or not isinstance(nbf, (int, float)) or nbf > now + CLOCK_SKEW:
        raise InvalidSession("not yet valid")


def read_token(token: str, keys: KeyRing, now: float) -> Session:
    """The session in TOKEN, or InvalidSession."""
    claims, kid = decode_token(token, keys, now, SESSION)
    return Session(claims["sub"], claims["fp"], kid, claims["iat"], claims["exp"],
                   bool(claims.get("rem")), claims["sid"], claims["auth_time"])


def read_pending(token: str, keys: KeyRing, now: float) -> tuple[str, str, bool]:
    """(user, fingerprint, remember) from a pending login's token, or InvalidSession."""
    claims, _ = decode_token(token, keys, now, PENDING)
    return claims["sub"], claims["fp"], bool(claims.get("rem"))


def read_enrollment(token: str, keys: KeyRing, now: float) -> tuple[str, str, bytes]:
    """(user, fingerprint, secret) from an enrollment token, or InvalidSession."""
    claims, _ = decode_token(token, keys, now, ENROLL)
    try:
        return claims["sub"], claims["fp"], base64.b32decode(str(claims.get("sec")))
    except (binascii.Error, ValueError):
        raise InvalidSession("no secret") from None


# -- Shared databases -----------------------------------------------------------------------


def corrupt_database(err: sqlite3.DatabaseError) -> bool:
    return "not a database" in str(err) or "malformed" in str(err)


DB_TIMEOUT = 10.0  # a transaction waits this long for another process's, then fails closed


class SharedDatabase:
    """An SQLite file in the data dir that every worker process shares. Each transaction takes the
    write lock first (BEGIN IMMEDIATE); a damaged file, at start-up or later, is moved aside and
    started afresh. One that cannot be read or written (disk full, read-only, locked longer than
    DB_TIMEOUT) raises StoreUnavailable, and the next transaction tries the file again."""

    def __init__(self, path: Path, schema: str, event: str, now: float, wal: bool = False,
                 created: Callable[[sqlite3.Connection, float], object] | None = None) -> None:
        # CREATED runs in every database made anew: the first, and one that replaces a damaged or
        # deleted file (which forgot what the old one held).
        self.path, self.schema, self.event = path, schema, event
        self.wal, self.created = wal, created
        self._watcher: sqlite3.Connection | None = None
        self._watched: int | None = None  # the inode the watcher has open
        self._version: int | None = None
        self._lock = threading.Lock()
        try:
            self._init_file(now)
        except (sqlite3.OperationalError, OSError) as err:
            raise StoreUnavailable(self.path, err) from None

    def _init_file(self, now: float) -> None:
        try:
            with contextlib.closing(self.connect()) as db:
                fresh = not db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
                db.executescript(self.schema)
                if fresh and self.created:
                    self.created(db, now)
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)
        except sqlite3.DatabaseError as err:
            if not corrupt_database(err):
                raise
            self._replace_corrupt(now)

    def _replace_corrupt(self, now: float) -> None:
        """Move a damaged database aside and start anew (once, whichever worker sees it first)."""
        with locked(self.path):
            with (contextlib.suppress(sqlite3.DatabaseError),
                  contextlib.closing(self.connect()) as db):
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return  # another worker has already replaced it
            moved = move_aside(self.path, now)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            log.error("event=%s_corrupt moved_to=%s action=new_empty_database", self.event, moved)
            with contextlib.closing(self.connect()) as db:
                db.executescript(self.schema)
                if self.created:
                    self.created(db, now)

    def read_if_changed(self, read: Callable[[sqlite3.Connection], None]) -> None:
        """Call READ when some connection has committed since the last look. The look is one PRAGMA
        on a connection kept for it, so the once-a-second refresh stays cheap; a file replaced
        meanwhile (damaged and started afresh, or deleted) is opened anew. StoreUnavailable when the
        file cannot be read; the next look opens it afresh."""
        try:
            inode = os.stat(self.path).st_ino
            if self._watcher is None or inode != self._watched:
                self._close_watcher()
                self._watcher, self._watched = self.connect(), inode
            version = self._watcher.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:
                read(self._watcher)
                self._version = version
        except (sqlite3.Error, OSError) as err:
            self._close_watcher()
            raise StoreUnavailable(self.path, err) from None

    def _close_watcher(self) -> None:
        watcher, self._watcher, self._version = self._watcher, None, None
        if watcher is not None:
            watcher.close()

    def connect(self) -> sqlite3.Connection:
        """A connection of its own for the caller."""
        db = sqlite3.connect(self.path, timeout=DB_TIMEOUT, isolation_level=None,
                             check_same_thread=False)
        if self.wal:  # readers (verify's once-a-second look) never wait for a writer
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA journal_size_limit=1048576")  # the log shrinks after a checkpoint
        return db

    def run(self, work: Callable[[sqlite3.Connection], R], now: float) -> R:
        """WORK in one write transaction; a database damaged or deleted meanwhile is made anew."""
        with self._lock:
            try:
                return self._transaction(work)
            except sqlite3.DatabaseError as err:
                # Damaged, or deleted by hand: made anew below.
                if not (corrupt_database(err) or "no such table" in str(err)):
                    if isinstance(err, sqlite3.OperationalError):
                        raise StoreUnavailable(self.path, err) from None
                    raise
            try:
                self._init_file(now)
                return self._transaction(work)
            except (sqlite3.OperationalError, OSError) as err:
                raise StoreUnavailable(self.path, err) from None

    def _transaction(self, work: Callable[[sqlite3.Connection], R]) -> R:
        with contextlib.closing(self.connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # after a full disk SQLite rolled back
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the file and empty it, so its size never depends on when
        SQLite's own checkpoint last ran. It never waits: a worker reading or writing just now
        leaves it to the next flush (False)."""
        if not self.wal:
            return True
        try:
            with contextlib.closing(self.connect()) as db:
                db.execute("PRAGMA busy_timeout = 0")
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as err:
            raise StoreUnavailable(self.path, err) from None
        return not busy


# -- Sessions -------------------------------------------------------------------------------
# Every session token carries a random session id. The registry (sessions.sqlite3, shared by
# every worker) records each session, and when and why it ended. Verify touches no disk: it
# looks the id up in a set of ended sessions that is reloaded once a second, and notes "last
# seen" in memory for a background write once a minute.

# A browser holds at most two: host-only, and one for EZAUTH_COOKIE_DOMAIN. Trying thousands
# would cost the one thread that answers every verify 30 ms a request.
MAX_SESSION_COOKIES = 2
SEEN_EVERY = 60.0  # last seen (and a renewed expiry) reach the registry this coarsely
AGENT_BROWSERS = (("Edg/", "Edge"), ("OPR/", "Opera"), ("Firefox/", "Firefox"),
                  ("Chrome/", "Chrome"), ("Safari/", "Safari"), ("curl/", "curl"),
                  ("python-requests", "Python requests"), ("python-httpx", "Python httpx"),
                  ("Wget/", "Wget"))
AGENT_SYSTEMS = (("Android", "Android"), ("iPhone", "iOS"), ("iPad", "iPadOS"),
                 ("CrOS", "ChromeOS"), ("Windows", "Windows"), ("Mac OS X", "macOS"),
                 ("Macintosh", "macOS"), ("Linux", "Linux"))


def describe_agent(agent: str) -> str:
    """A short browser/OS summary of a User-Agent: "Firefox on Linux", "Safari on iOS"."""
    browser = next((name for mark, name in AGENT_BROWSERS if mark in agent), "")
    system = next((name for mark, name in AGENT_SYSTEMS if mark in agent), "")
    if browser and system:
        return f"{browser} on {system}"
    return browser or system or "unknown"


@dataclass(frozen=True)
class SessionRecord:
    """One row of the registry."""

    sid: str
    user: str
    created: float
    last_seen: float
    ip: str
    agent: str
    remember: bool
    expires: float
    ended: float | None
    reason: str


class SessionRegistry:
    """All workers' sessions, in SQLite; in memory only ended ids and unwritten last-seen times."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS sessions (sid TEXT PRIMARY KEY, user TEXT NOT NULL,"
              " fp TEXT NOT NULL, created REAL NOT NULL, last_seen REAL NOT NULL, ip TEXT NOT NULL,"
              " agent TEXT NOT NULL, remember INTEGER NOT NULL, expires REAL NOT NULL, ended REAL,"
              " reason TEXT NOT NULL DEFAULT '', ttl REAL NOT NULL DEFAULT 0);"
              "CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);"
              "CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);"
              # When this database began: a damaged or deleted one was replaced by an empty one that
              # knows no ended session, so no session that logged in before it may go on.
              "CREATE TABLE IF NOT EXISTS epoch (started REAL NOT NULL);")

    def __init__(self, db: SharedDatabase) -> None:
        self.db = db
        self.ended: frozenset[str] = frozenset()
        self.epoch = 0.0  # sessions that logged in before it are void
        self._seen: dict[str, tuple[float, str, float]] = {}  # sid -> (when, ip, expires), to write
        self._seen_at: dict[str, float] = {}

    @staticmethod
    def begin_epoch(db: sqlite3.Connection, now: float) -> None:
        """Mark a new, empty database's beginning (whole seconds, as a session's auth_time: a login
        in the same second as the database stays valid)."""
        db.execute("INSERT INTO epoch VALUES (?)", (int(now),))

    def start(self, session: Session, ip: str, agent: str, now: float) -> None:
        """Record a session that has just begun (its password was entered now)."""
        self.db.run(lambda db: db.execute(
            "INSERT OR REPLACE INTO sessions (sid, user, fp, created, last_seen, ip, agent, "
            "remember, expires, ttl) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (session.sid, session.user, session.fingerprint, now, now, ip, describe_agent(agent),
             int(session.remember), session.expires, session.expires - session.issued)), now)

    def end(self, sids: Iterable[str], reason: str, now: float) -> int:
        """End these sessions; how many were live. An ended session is remembered until every token
        it can have (renewals included, whichever worker made them) has expired: NOW plus its
        lifetime."""
        ended = [sid for sid in sids if sid]
        count = self.db.run(lambda db: sum(db.execute(
            "UPDATE sessions SET ended = ?, reason = ?, expires = MAX(expires, ? + ttl)"
            " WHERE sid = ? AND ended IS NULL", (now, reason, now, sid)).rowcount
            for sid in ended), now)
        self.ended = self.ended | frozenset(ended)
        return count

    def end_token(self, session: Session, reason: str, now: float) -> None:
        """End the session of a token in hand, even if the registry has lost its row (a logout)."""
        self.db.run(lambda db: db.execute(
            "INSERT OR IGNORE INTO sessions (sid, user, fp, created, last_seen, ip, agent, "
            "remember, expires, ttl) VALUES (?, ?, ?, ?, ?, '', '', ?, ?, ?)",
            (session.sid, session.user, session.fingerprint, session.issued, now,
             int(session.remember), session.expires, session.expires - session.issued)), now)
        self.end([session.sid], reason, now)

    def end_user(self, user: str, reason: str, now: float, keep: str = "") -> int:
        """End every live session of USER but KEEP (this device); how many ended."""
        return self.end([r.sid for r in self.live(now, user) if r.sid != keep], reason, now)

    def live(self, now: float, user: str | None = None) -> list[SessionRecord]:
        """Sessions that have neither ended nor expired, newest first."""
        return [self._record(row) for row in self.db.run(lambda db: db.execute(
            "SELECT sid, user, created, last_seen, ip, agent, remember, expires, ended, reason"
            " FROM sessions WHERE ended IS NULL AND expires > ? AND (? IS NULL OR user = ?)"
            " ORDER BY created DESC",
            (now, user, user)).fetchall(), now)]

    def get(self, sid: str, now: float) -> SessionRecord | None:
        rows = self.db.run(lambda db: db.execute(
            "SELECT sid, user, created, last_seen, ip, agent, remember, expires, ended, reason"
            " FROM sessions WHERE sid = ?", (sid,)).fetchall(), now)
        return self._record(rows[0]) if rows else None

    def refingerprint(self, sid: str, fingerprint: str, now: float) -> None:
        self.db.run(lambda db: db.execute("UPDATE sessions SET fp = ? WHERE sid = ?",
                                          (fingerprint, sid)), now)

    def stale(self, sid: str, now: float) -> bool:
        """Whether a verify of SID should note it as seen (at most once per SEEN_EVERY)."""
        return now - self._seen_at.get(sid, 0.0) >= SEEN_EVERY

    def seen(self, sid: str, now: float, ip: str, expires: float) -> None:
        """Note SID as used now (memory only; `flush` writes it)."""
        self._seen_at[sid] = now
        self._seen[sid] = (now, ip, expires)

    def reload(self, db: sqlite3.Connection, now: float) -> None:
        """Take in which sessions other workers (or the CLI) have ended."""
        rows = db.execute("SELECT sid FROM sessions WHERE ended IS NOT NULL AND expires > ?",
                          (now,)).fetchall()
        self.ended = frozenset(row[0] for row in rows)
        self.epoch = float(db.execute("SELECT COALESCE(MAX(started), 0) FROM epoch").fetchone()[0])

    def flush(self, now: float) -> None:
        """Write the noted last-seen times, and forget sessions whose tokens have expired anyway."""
        seen, self._seen = self._seen, {}
        self._seen_at = {sid: at for sid, at in self._seen_at.items() if now - at < SEEN_EVERY}

        def work(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE sessions SET last_seen = ?, ip = ?, expires = MAX(expires, ?) "
                           "WHERE sid = ?",
                           [(at, ip, expires, sid) for sid, (at, ip, expires) in seen.items()])
            # A session another worker renewed may lack its new expiry here yet: hence a margin.
            db.execute("DELETE FROM sessions WHERE expires <= ?", (now - 2 * SEEN_EVERY,))
        try:
            self.db.run(work, now)
        except StoreUnavailable:
            self._seen = {**seen, **self._seen}  # written by the next flush instead of lost
            raise

    @staticmethod
    def _record(row: tuple[Any, ...]) -> SessionRecord:
        sid, user, created, last_seen, ip, agent, remember, expires, ended, reason = row
        return SessionRecord(sid, user, created, last_seen, ip, agent, bool(remember), expires,
                             ended, reason)


class Sessions:
    """Issues and checks sessions; remembers verified tokens, so a repeat skips JWT decoding."""

    MAX_CACHED = 10_000

    def __init__(self, users: Users, keys: KeyRing, registry: SessionRegistry, session_ttl: int,
                 remember_ttl: int, max_age: int) -> None:
        self.users, self.keys, self.registry = users, keys, registry
        self.session_ttl, self.remember_ttl, self.max_age = session_ttl, remember_ttl, max_age
        self._verified: dict[str, Session] = {}

    def start(self, user: str, now: float, remember: bool, ip: str = "",
              agent: str = "") -> tuple[str, Session]:
        """A new session for USER, recorded in the registry, and its token."""
        sid = secrets.token_hex(16)  # hex: no leading "-"
        token, session = self.sign(user, now, remember, sid, int(now))
        self.registry.start(session, ip, agent, now)
        return token, session

    def sign(self, user: str, now: float, remember: bool, sid: str,
             auth_time: int) -> tuple[str, Session]:
        """A token for session SID, signed by the current key, good for a whole lifetime from NOW
        but never past its login time (AUTH_TIME) plus the absolute lifetime."""
        key = self.keys.signer(now)
        session = Session(user, self.users.fingerprint(user) or "", key.kid, int(now),
                          self.expiry(now, remember, auth_time), remember, sid, auth_time)
        return issue_token(session, key), session

    def expiry(self, now: float, remember: bool, auth_time: int) -> int:
        """When a token signed NOW expires: a lifetime on, never past login + absolute lifetime."""
        return min(int(now) + (self.remember_ttl if remember else self.session_ttl),
                   auth_time + self.max_age)

    def check(self, token: str, now: float) -> Session | None:
        """The live session in TOKEN, or None. A cached answer is rechecked against the user, the
        key and the ended sessions."""
        session = self._verified.get(token)
        if session is None:
            try:
                session = read_token(token, self.keys, now)
            except InvalidSession:
                return None
            self._remember(token, session, now)
        if (session.expires <= now or self.keys.get(session.kid) is None
                or session.sid in self.registry.ended
                or self.users.fingerprint(session.user) != session.fingerprint
                or session.auth_time + self.max_age <= now
                or session.auth_time < self.registry.epoch):
            return None
        return session

    def renew(self, session: Session, now: float) -> tuple[str, Session] | None:
        """A fresh token for the same session once it is past half its lifetime, else None (also
        when the absolute lifetime leaves nothing to add)."""
        if (now < session.renew_at
                or self.expiry(now, session.remember, session.auth_time) <= session.expires):
            return None
        return self.sign(session.user, now, session.remember, session.sid, session.auth_time)

    def _remember(self, token: str, session: Session, now: float) -> None:
        if len(self._verified) >= self.MAX_CACHED:
            live = {t: s for t, s in list(self._verified.items()) if s.expires > now}
            self._verified = live if len(live) < self.MAX_CACHED // 2 else {}
        self._verified[token] = session


# -- Visit counter --------------------------------------------------------------------------


# ASCII digits only ("²".isdigit()), and fewer than int() refuses.
COUNT_RE = re.compile(r"[0-9]{1,18}")
COUNTER_SYNC_EVERY = 60.0  # a power cut loses at most this long of views; a kill -9 loses none


class VisitCounter:
    """Page views as decimal text in a file, exact across threads and processes. A view rewrites the
    digits in place under the file's own lock: no new file, no fsync per view (the count only grows,
    so the new digits always cover the old ones); the file reaches the disk once a minute. Turned
    off (ON false), it counts nothing and never touches the file."""

    def __init__(self, path: Path, clock: Clock, on: bool = True) -> None:
        self.path, self.clock, self.on = path, clock, on
        self._synced = clock()

    def increment(self) -> int | None:
        """Count one visit and return the new total; None when off, or (logged) when the file
        cannot be used."""
        if not self.on:
            return None
        try:
            for _ in range(3):  # None: the file was moved aside under us; count in the new one
                count = self._increment()
                if count is not None:
                    return count
            raise OSError(f"{self.path} kept being replaced")
        except OSError as err:
            log.warning("event=counter_skipped error=%s", logval(str(err)))
            return None

    def current(self) -> int | None:
        """The count without adding a visit; None when off or when it cannot be read."""
        if not self.on:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never half of a rewrite
            text = os.pread(fd, 64, 0).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)
        return int(text) if COUNT_RE.fullmatch(text) else None

    def _open(self) -> int:
        """The counter file, made with "0" in it the first time: never an empty one, even when its
        first writer is killed half-way (a half-made `.counter.txt.new` is simply made again)."""
        with contextlib.suppress(FileNotFoundError):
            return os.open(self.path, os.O_RDWR)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # one creator at a time, in every process
            if not self.path.exists():
                fresh = self.path.with_name(f".{self.path.name}.new")
                fresh.write_bytes(b"0\n")
                os.replace(fresh, self.path)
        finally:
            os.close(dir_fd)
        return os.open(self.path, os.O_RDWR)

    def _increment(self) -> int | None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not self._still_the_file(fd):
                return None
            old = os.pread(fd, 64, 0)
            count = self._parse(old)
            if count is None:
                return None
            new = f"{count + 1}\n".encode()
            os.pwrite(fd, new, 0)
            if len(new) < len(old):
                os.ftruncate(fd, len(new))  # only after leading zeros someone typed in
            now = self.clock()
            if now - self._synced >= COUNTER_SYNC_EVERY:
                self._synced = now
                os.fsync(fd)
            return count + 1
        finally:
            os.close(fd)

    def _still_the_file(self, fd: int) -> bool:
        """False when the file was moved aside as corrupt while we waited for its lock."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _parse(self, raw: bytes) -> int | None:
        """The count in RAW; a corrupt file is moved aside (None)."""
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            text = "?"
        if COUNT_RE.fullmatch(text):
            return int(text)
        aside = move_aside(self.path, self.clock())
        log.error("event=counter_corrupt moved_to=%s action=restart_from_zero", aside)
        return None


# -- Login throttle -------------------------------------------------------------------------


def client_block(address: str) -> str:
    """The addresses one client can rotate through, as one key: an IPv6 client's /64 (every home and
    server gets a whole /64), an IPv4 client's address; an IPv4-mapped IPv6 address is its IPv4
    one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Attempt:
    """A login attempt reserved in the throttle before the password is checked."""

    row_ids: tuple[int, ...] = ()
    retry_after: int = 0
    busy: bool = False  # not locked out: other checks in flight fill the limit for a moment
    at: float = 0.0

    @property
    def locked(self) -> bool:
        return self.retry_after > 0


BUSY_WAIT = 5.0  # a right password waits this long for checks in flight rather than being refused
BUSY_POLL = 0.05  # how often a waiting check looks again for other workers' checks


class Throttle:
    """Failed logins per client IP and per user name, in SQLite so every worker shares them.

    An attempt is recorded *before* the password is checked, in the same transaction that
    checks the limit, so parallel guesses from several processes cannot exceed it.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS attempts (key TEXT NOT NULL, at REAL NOT NULL,"
              " pending INTEGER NOT NULL);"
              "CREATE INDEX IF NOT EXISTS attempts_key ON attempts (key, at);"
              "CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, until REAL NOT NULL);")

    def __init__(self, path: Path, max_attempts: int, window: int, lockout: int,
                 now: float) -> None:
        self.max_attempts, self.window, self.lockout = max_attempts, window, lockout
        self.db = SharedDatabase(path, self.SCHEMA, "throttle", now)
        self._settled = threading.Condition()  # a check here finished: waiting ones look again

    def begin(self, keys: list[str], now: float, wait: float = BUSY_WAIT) -> Attempt:
        """Reserve one attempt for every key, or say how long to wait.

        Failures and checks still in flight both count toward the limit, so parallel guesses
        cannot exceed it; only failures lock a key out, so parallel right passwords never do.
        When checks in flight fill the limit, wait (up to WAIT seconds) for them to finish.
        """
        give_up = time.monotonic() + wait
        attempt = self._reserve(keys, now)
        while attempt.busy and time.monotonic() < give_up:
            with self._settled:  # woken by this process's checks; other workers' are polled
                self._settled.wait(min(BUSY_POLL, max(0.0, give_up - time.monotonic())))
            attempt = self._reserve(keys, now)
        return attempt

    def _reserve(self, keys: list[str], now: float) -> Attempt:
        def work(db: sqlite3.Connection) -> Attempt:
            db.execute("DELETE FROM attempts WHERE at <= ?", (now - self.window,))
            db.execute("DELETE FROM locks WHERE until <= ?", (now,))
            until = max((row[0] for key in keys
                         for row in db.execute("SELECT until FROM locks WHERE key = ?", (key,))),
                         default=None)
            if until is not None:
                return Attempt(retry_after=max(1, math.ceil(until - now)))
            for key in keys:
                failures, in_flight = self._counts(db, key)
                if failures >= self.max_attempts:
                    self._lock_out(db, key, now)
                    return Attempt(retry_after=self.lockout)
                if failures + in_flight >= self.max_attempts:
                    return Attempt(retry_after=1, busy=True)
            insert = "INSERT INTO attempts VALUES (?, ?, 1)"
            ids = tuple(cast(int, db.execute(insert, (key, now)).lastrowid) for key in keys)
            return Attempt(row_ids=ids, at=now)
        return self.db.run(work, now)

    def succeeded(self, attempt: Attempt) -> None:
        """A right password: its reservation does not count as a failure."""
        self.db.run(lambda db: db.executemany("DELETE FROM attempts WHERE rowid = ?",
                                            [(rowid,) for rowid in attempt.row_ids]), attempt.at)
        self._settle()

    def _settle(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def failed(self, attempt: Attempt, now: float) -> None:
        """A wrong password: its reservation becomes a failure; a key out of attempts is locked."""
        def work(db: sqlite3.Connection) -> None:
            for rowid in attempt.row_ids:
                db.execute("UPDATE attempts SET pending = 0 WHERE rowid = ?", (rowid,))
                for (key,) in db.execute("SELECT key FROM attempts WHERE rowid = ?",
                                         (rowid,)).fetchall():
                    if self._counts(db, key)[0] >= self.max_attempts:
                        self._lock_out(db, key, now)
        self.db.run(work, now)
        self._settle()

    def _counts(self, db: sqlite3.Connection, key: str) -> tuple[int, int]:
        """(failures, checks in flight) for KEY within the window."""
        rows = dict(db.execute("SELECT pending, COUNT(*) FROM attempts WHERE key = ? "
                               "GROUP BY pending", (key,)))
        return rows.get(0, 0), rows.get(1, 0)

    def _lock_out(self, db: sqlite3.Connection, key: str, now: float) -> None:
        """Lock KEY out; the failures that did it are spent, so it starts afresh afterwards."""
        db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?)", (key, now + self.lockout))
        db.execute("DELETE FROM attempts WHERE key = ? AND pending = 0", (key,))


# -- Second factor (TOTP) -------------------------------------------------------------------

TOTP_STEP = 30
TOTP_DIGITS = 6
CODE_RE = re.compile(r"[0-9]{6}")


def hotp(secret: bytes, counter: int, digits: int = TOTP_DIGITS) -> str:
    """RFC 4226: HMAC-SHA1 of the counter, dynamically truncated to DIGITS decimal digits."""
    digest = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def totp(secret: bytes, now: float, digits: int = TOTP_DIGITS, step: int = TOTP_STEP) -> str:
    """RFC 6238: the HOTP code of the time step NOW falls in."""
    return hotp(secret, int(now // step), digits)


def totp_uri(name: str, secret: bytes, issuer: str = "ezauth") -> str:
    """The otpauth:// URI authenticator apps read (usually from a QR code)."""
    label = urllib.parse.quote(f"{issuer}:{name}", safe="")
    query = urllib.parse.urlencode({"secret": base64.b32encode(secret).decode().rstrip("="),
                                    "issuer": issuer, "algorithm": "SHA1", "digits": TOTP_DIGITS,
                                    "period": TOTP_STEP})
    return f"otpauth://totp/{label}?{query}"


def matching_step(secret: bytes, code: str, now: float, last_used: int) -> int | None:
    """The unused time step (now, or one either side for clock drift) whose code is CODE."""
    current = int(now // TOTP_STEP)
    for step in (current - 1, current, current + 1):
        if step > last_used and hmac.compare_digest(hotp(secret, step), code):
            return step
    return None


def parse_totp(data: bytes) -> dict[str, tuple[bytes, int] | None]:
    """name -> (secret, last used step); a line we cannot read maps its user to None, which
    no code matches: a damaged line must lock its user out, not drop their second factor."""
    entries: dict[str, tuple[bytes, int] | None] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        secret, _, step = rest.partition(":")
        try:
            entries[name] = (base64.b32decode(secret + "=" * (-len(secret) % 8)), int(step or -1))
        except (binascii.Error, ValueError):
            log.error("event=totp_line_unreadable line=%d user=%s action=code_step_refuses",
                      number, logval(name))
            entries[name] = None
    return entries


class TotpStore(WatchedFile):
    """The totp file (name:base32secret:last_used_step), reloaded when it changes."""

    event = "totp"

    def __init__(self, path: Path) -> None:
        self._entries: dict[str, tuple[bytes, int] | None] = {}
        super().__init__(path)
        self.load()

    def use(self, data: bytes | None) -> None:
        self._entries = parse_totp(data or b"")

    def enrolled(self, name: str) -> bool:
        return name in self._entries

    def enroll(self, name: str, secret: bytes | None = None, used_step: int = -1) -> bytes:
        """Give NAME a second factor: SECRET, or a new one; its code of USED_STEP is spent."""
        secret = secrets.token_bytes(20) if secret is None else secret
        line = f"{name}:{base64.b32encode(secret).decode().rstrip('=')}:{used_step}"
        put_named_line(self.path, name, line.encode())
        self.reload()
        return secret

    def remove(self, name: str) -> bool:
        """Drop NAME's second factor; False when they had none."""
        found = drop_named_line(self.path, name)
        self.reload()
        return found

    def accept(self, name: str, code: str, now: float) -> bool:
        """Check CODE and burn its time step, under the lock, so no worker accepts it twice.
        StoreUnavailable when the step cannot be burnt: replay protection first, and a right code
        is not counted as a wrong one."""
        used: list[int] = []

        def burn(lines: list[bytes]) -> list[bytes]:
            entry = parse_totp(b"\n".join(ln for ln in lines if line_name(ln) == name)).get(name)
            if entry is None or not CODE_RE.fullmatch(code):
                return lines
            step = matching_step(entry[0], code, now, entry[1])
            if step is None:
                return lines
            used.append(step)
            line = f"{name}:{base64.b32encode(entry[0]).decode().rstrip('=')}:{step}".encode()
            return [line if line_name(ln) == name else ln for ln in lines]

        rewrite_lines(self.path, burn)
        self.reload()
        return bool(used)


# -- Access rules ---------------------------------------------------------------------------


ANYONE = "anyone"  # a rule's user that matches every visitor, logged in or not


class Target(NamedTuple):
    """Where a request goes and where it comes from, as a rule judges it besides user and path: the
    host, the port nginx received it on ("" when unknown) and the client's address ("" when no rule
    asks for it)."""

    host: str
    port: str
    client: str


@dataclass(frozen=True)
class Rule:
    allow: bool
    who: str  # a user name, @group, * (every logged-in user) or anyone (every visitor)
    host: str  # a host name, *.domain or *
    port: str  # the port the request came in on, or "" for any
    prefix: str
    networks: tuple[IPNetwork, ...] = ()  # only for clients in these networks; () for every client

    def matches(self, target: Target, path: str, fold: bool) -> bool:
        """Whether this rule speaks for one reading of the path; FOLD compares it as a
        case-insensitive app would."""
        if not (path.lower().startswith(self.prefix.lower()) if fold
                else path.startswith(self.prefix)):
            return False
        if not (self.host in ("*", target.host) or (
                self.host.startswith("*.") and target.host.endswith(self.host[1:]))):
            return False
        return (not self.port or self.port == target.port) and (
            not self.networks or ip_in(target.client, self.networks))


ABSOLUTE_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
READING_WORK_RE = re.compile(r"[%\\;#]|//|/\.")  # what can make two apps read one path differently
ENCODED_SEPARATOR_RE = re.compile(r"%(?![2][fF]|[5][cC])[0-9A-Fa-f]{2}")
PARAMS_RE = re.compile(r";[^/]*")
SLASHES_RE = re.compile(r"/{2,}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Judging every reading of a path costs ~2 us per character once it holds anything an app could read
# differently (a crafted 7 KB path cost one verify 15 ms of the event loop). Such a path longer than
# this is refused unjudged; plain paths of any length are one reading and cost next to nothing.
MAX_JUDGED_PATH = 1024


class PathTooLong(ValueError):
    """A path too long to judge all its readings cheaply: refused, not judged."""


class Rules:
    """Who may reach which host and path: the first matching rule decides, no match denies. A
    visitor who is not logged in (user None) meets only the `anyone` rules."""

    def __init__(self, rules: tuple[Rule, ...], groups: Mapping[str, frozenset[str]]) -> None:
        self.count = len(rules)
        named = {r.who for r in rules if r.who not in ("*", ANYONE) and not r.who.startswith("@")}
        named.update(*groups.values())

        def applies(rule: Rule, user: str) -> bool:
            return rule.who in ("*", ANYONE, user) or (
                rule.who.startswith("@") and user in groups[rule.who[1:]])

        # Each user's own rules, worked out once per load: a check walks only the ones for them.
        self._visitor = tuple(r for r in rules if r.who == ANYONE)
        self._anyone = tuple(r for r in rules if r.who in ("*", ANYONE))
        self._by_user = {user: tuple(r for r in rules if applies(r, user)) for user in named}
        self.public = bool(self._visitor)  # some path or network is open without a login
        self.by_port = any(r.port for r in rules)
        self.by_network = any(r.networks for r in rules)

    def allows(self, user: str | None, target: Target, path: str, fold: bool = False) -> bool:
        """The decision for one reading of the path (FOLD: as a case-insensitive app reads it)."""
        for rule in self._visitor if user is None else self._by_user.get(user, self._anyone):
            if rule.matches(target, path, fold):
                return rule.allow
        return False

    def allows_every(self, user: str | None, target: Target, uri: str) -> bool:
        """True only when every reading of URI's path is allowed: an app that decodes, splits or
        resolves the path differently from these rules must still land somewhere allowed."""
        try:
            readings = path_readings(uri)
        except PathTooLong:
            return False
        if any(CONTROL_RE.search(path) for path in readings):
            return False  # a decoded NUL or line break: no app should get such a path
        return all(self.allows(user, target, path) and self.allows(user, target, path, fold=True)
                   for path in readings)


RULE_HOST_RE = re.compile(r"(\*|(?:\*\.)?[^:]+)(?::([0-9]{1,5}))?")


def parse_rule(number: int, words: list[str]) -> Rule:
    """One `allow|deny WHO HOST[:PORT] /PATH [from CIDR,...]` line; ValueError naming the line."""
    verb, who, host, prefix = words[:4]
    if not (who in ("*", ANYONE) or NAME_RE.fullmatch(who.removeprefix("@"))):
        raise ValueError(f"line {number}: {who!r} is not a user, @group, * or anyone")
    place = RULE_HOST_RE.fullmatch(host.lower())
    if (place is None or not (place[1] == "*" or DOMAIN_RE.fullmatch(place[1].removeprefix("*.")))
            or (place[2] and not 1 <= int(place[2]) <= 65535) or not prefix.startswith("/")):
        raise ValueError(f"line {number}: expected a host (or *), optionally with :PORT, and a "
                         "path starting with /")
    try:
        networks = (tuple(ipaddress.ip_network(n, strict=False)
                          for n in "".join(words[5:]).split(",")) if len(words) > 4 else ())
    except ValueError as err:
        raise ValueError(f"line {number}: after 'from': {err}") from None
    return Rule(verb == "allow", who, place[1], place[2] or "", prefix, networks)


def parse_rules(text: str) -> Rules:
    """Rules from the rules file; ValueError naming the line when anything is off."""
    rules: list[Rule] = []
    groups: dict[str, frozenset[str]] = {}
    used_groups: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "group" and len(words) >= 2 and words[1].endswith(":"):
            name, members = words[1][:-1], words[2:]
            if not NAME_RE.fullmatch(name) or not all(NAME_RE.fullmatch(m) for m in members):
                raise ValueError(f"line {number}: bad group name or member")
            groups[name] = frozenset(members)
        elif words[0] in ("allow", "deny") and (
                len(words) == 4 or (len(words) >= 6 and words[4] == "from")):
            rule = parse_rule(number, words)
            if rule.who.startswith("@"):
                used_groups.setdefault(rule.who[1:], number)
            rules.append(rule)
        else:
            raise ValueError(f"line {number}: expected 'allow|deny WHO HOST[:PORT] /PATH "
                             "[from CIDR,...]' or 'group NAME: USERS'")
    for name, number in used_groups.items():
        if name not in groups:
            raise ValueError(f"line {number}: no group {name!r}")
    return Rules(tuple(rules), groups)


def uri_path(uri: str) -> str:
    """The path of a request URI: origin-form (`/a?b`), or absolute-form (`http://host/a?b`) as a
    client may send it; `///x://` is a path, not a URL."""
    if ABSOLUTE_URI_RE.match(uri):
        try:
            return urllib.parse.urlsplit(uri).path or "/"
        except ValueError:
            return uri
    return uri.partition("?")[0]


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path, with empty segments kept (`/.//x` is `//x`)."""
    if "/." not in path:
        return path  # no dot segment: every one follows a slash
    segments = path.split("/")[1:]
    kept: list[str] = []
    for number, segment in enumerate(segments, 1):
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            if number == len(segments):
                kept.append("")  # `/a/.` is the folder `/a/`
        else:
            kept.append(segment)
    return "/" + "/".join(kept)


def decodings(path: str) -> set[str]:
    """PATH undecoded, percent-decoded once, twice and three times (an app may decode again), and
    decoded once but with %2F and %5C kept (as nginx and many routers do)."""
    found = {path, ENCODED_SEPARATOR_RE.sub(lambda m: urllib.parse.unquote(m.group()), path)}
    for _ in range(3):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        found.add(decoded)
        path = decoded
    return found


def path_readings(uri: str) -> frozenset[str]:
    """Every reasonable reading of an original request URI's path by the app behind nginx: decoded
    or not, `\\` a separator or not, `;params` stripped or not, dot segments resolved or not,
    repeated slashes merged or not, cut at `#` or not. PathTooLong for such a path over
    MAX_JUDGED_PATH."""
    path = uri_path(uri)
    if not READING_WORK_RE.search(path):
        return frozenset((path or "/",))  # nothing any app could read differently: the common case
    if len(path) > MAX_JUDGED_PATH:
        raise PathTooLong(f"{len(path)} characters with readings to judge")
    rooted: set[str] = set()  # many ways to read a path agree on these; each is worked out once
    for decoded in decodings(path) | decodings(path.partition("#")[0]):
        for text in {decoded, decoded.replace("\\", "/")}:
            for unparam in {text, PARAMS_RE.sub("", text)}:
                rooted.add(unparam if unparam.startswith("/") else "/" + unparam)
    readings: set[str] = set()
    for text in rooted:
        merged = SLASHES_RE.sub("/", text)  # before and after dot segments: both orders exist
        resolved = remove_dot_segments(text)
        readings.update((text, merged, resolved, remove_dot_segments(merged),
                         SLASHES_RE.sub("/", resolved)))
    return frozenset(readings)


def rules_path(uri: str) -> str:
    """The canonical reading of a URI's path: decoded, with . and .. and // resolved, so
    /a/../admin, //admin and /%61dmin all read as /admin (path_readings holds this and every other
    reading)."""
    path = uri_path(uri).partition("#")[0]
    for _ in range(3):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    rooted = "/" + path.replace("\\", "/")
    return SLASHES_RE.sub("/", remove_dot_segments(SLASHES_RE.sub("/", rooted)))


def logged_path(uri: str) -> str:
    """The canonical path for a log line, from the URI's first 256 characters: the line shows 80,
    and a refused 7 KB path must not cost verify more to log than to refuse."""
    return rules_path(uri[:256])


class AccessRules(WatchedFile):
    """The rules file, reloaded when it changes. `rules` is None while there is no file: everyone
    in. Fail-closed: a broken edit keeps the rules that worked, and with none to keep nobody gets
    in."""

    event = "rules"

    def __init__(self, path: Path) -> None:
        self.rules: Rules | None = None
        super().__init__(path, fail_closed=True)
        self.load()

    def use(self, data: bytes | None) -> None:
        if data is None:
            if self.rules is not None:
                log.warning("event=rules_removed action=every_user_allowed_everywhere")
            self.rules = None
            return
        self.rules = parse_rules(data.decode("utf-8"))
        log.info("event=rules_loaded rules=%d", self.rules.count)


# -- API clients (HTTP Basic and API tokens) ------------------------------------------------


def parse_basic(header: str) -> tuple[str, str] | None:
    """(name, password) from an `Authorization: Basic` header, or None."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(value) > 1024:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        name, sep, password = decoded.partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (name, password) if sep and name and password else None


def ezauth_credentials(authorization: str, basic_auth: bool) -> bool:
    """Whether an Authorization header is meant for ezauth (an API token, or HTTP Basic when it is
    on), so nginx must keep it from the app; anything else is the app's own."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().startswith(TOKEN_PREFIX)
    if scheme.lower() != "basic":
        return False
    credentials = parse_basic(authorization)
    return basic_auth or (credentials is not None and credentials[1].startswith(TOKEN_PREFIX))


def hashes_a_password(authorization: str) -> bool:
    """Whether verify may have to run scrypt for this header (when HTTP Basic is on): HTTP Basic
    with a password, not a token."""
    if authorization[:6].lower() != "basic ":
        return False
    credentials = parse_basic(authorization)
    return credentials is not None and not credentials[1].startswith(TOKEN_PREFIX)


class BasicCache:
    """API credentials verified in the last TTL seconds, so a script's every call does not pay
    scrypt. Keyed by an HMAC under a random per-process key: the passwords themselves are never
    kept."""

    TTL = 60
    MAX = 1000

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, str, float]] = {}

    def digest(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, f"{name}:{password}".encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def get(self, digest: bytes, factors: Callable[[str], str | None], now: float) -> str | None:
        """The user these credentials proved lately, if none of their factors has changed since."""
        entry = self._entries.get(digest)
        if entry is None or entry[2] <= now or factors(entry[0]) != entry[1]:
            return None
        return entry[0]

    def put(self, digest: bytes, name: str, fingerprint: str, now: float) -> None:
        """Remember NAME for a minute, with the FINGERPRINT of all their factors (see `get`)."""
        if len(self._entries) >= self.MAX:
            self._entries = {d: e for d, e in list(self._entries.items()) if e[2] > now}
            if len(self._entries) >= self.MAX:
                self._entries = {}
        self._entries[digest] = (name, fingerprint, now + self.TTL)


# The prefix that marks an API token; it is no secret (ruff S105 and bandit B105 think it is).
TOKEN_PREFIX = "ezt_"  # noqa: S105  # nosec B105
API_TOKEN_RE = re.compile(r"ezt_[A-Za-z0-9_-]{43}")  # 256 random bits
TOKEN_LABEL_RE = re.compile(r"[^\x00-\x1f\x7f]{1,60}")
TOKEN_PATH_RE = re.compile(r"/[\x21-\x7e]{0,199}")


@dataclass(frozen=True)
class ApiToken:
    """A token for scripts; only its secret's SHA-256 is stored (256 random bits need no scrypt)."""

    id: str
    user: str
    label: str
    created: float
    expires: float | None
    paths: tuple[str, ...]  # path prefixes it is limited to; none: everywhere its user may go
    last_used: float | None = None

    def allows(self, uri: str) -> bool:
        """Whether every reading of URI's path lies under one of the token's prefixes."""
        if not self.paths:
            return True
        try:
            readings = path_readings(uri)
        except PathTooLong:
            return False
        return all(any(reading.startswith(prefix) for prefix in self.paths) for reading in readings)


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiTokens:
    """API tokens in the shared registry; verify finds them in memory (reloaded once a second)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL,"
              " digest TEXT NOT NULL UNIQUE, label TEXT NOT NULL, created REAL NOT NULL,"
              " expires REAL, paths TEXT NOT NULL, last_used REAL);")

    def __init__(self, db: SharedDatabase) -> None:
        self.db = db
        self._by_digest: dict[str, ApiToken] = {}
        self._used: dict[str, float] = {}

    def add(self, user: str, label: str, now: float, days: int | None = None,
            paths: Iterable[str] = ()) -> tuple[ApiToken, str]:
        """A new token for USER and its secret, which is shown once and stored only as a digest."""
        paths = tuple(paths)
        if not TOKEN_LABEL_RE.fullmatch(label) or not all(
                TOKEN_PATH_RE.fullmatch(p) for p in paths):
            raise ValueError("a label of 1-60 characters, and paths that start with /")
        if days is not None and not 1 <= days <= 3650:
            raise ValueError("a token lasts 1 to 3650 days")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = ApiToken(secrets.token_hex(6), user, label, now,
                         now + days * 86400 if days else None, paths)
        row = (token.id, user, token_digest(secret), label, now, token.expires, json.dumps(paths))
        self.db.run(lambda db: db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                                          row), now)
        self._by_digest[token_digest(secret)] = token
        return token, secret

    def revoke_user(self, user: str, now: float) -> int:
        """Delete every token of USER (a new user of the same name must not inherit them)."""
        gone = self.db.run(lambda db: db.execute("DELETE FROM tokens WHERE user = ?",
                                                 (user,)).rowcount, now)
        self._by_digest = {d: t for d, t in self._by_digest.items() if t.user != user}
        return int(gone)

    def revoke(self, token_id: str, now: float, user: str | None = None) -> bool:
        """Delete a token (only USER's, when given); False when there was none."""
        gone = self.db.run(lambda db: db.execute(
            "DELETE FROM tokens WHERE id = ? AND (? IS NULL OR user = ?)",
            (token_id, user, user)).rowcount, now)
        self._by_digest = {d: t for d, t in self._by_digest.items() if t.id != token_id or not gone}
        return bool(gone)

    def list(self, now: float, user: str | None = None) -> list[ApiToken]:
        return [self._token(row) for row in self.db.run(lambda db: db.execute(
            "SELECT id, user, label, created, expires, paths, last_used FROM tokens"
            " WHERE ? IS NULL OR user = ? ORDER BY created", (user, user)).fetchall(), now)]

    def check(self, secret: str, now: float) -> ApiToken | None:
        """The live token whose secret this is, or None."""
        token = (self._by_digest.get(token_digest(secret)) if API_TOKEN_RE.fullmatch(secret)
                 else None)
        if token is None or (token.expires is not None and token.expires <= now):
            return None
        return token

    def used(self, token: ApiToken, now: float) -> None:
        """Note TOKEN as used now (memory only; `flush` writes it, coarsely)."""
        self._used[token.id] = now

    def reload(self, db: sqlite3.Connection) -> None:
        """Take in tokens added or revoked by other workers or the CLI."""
        rows = db.execute("SELECT digest, id, user, label, created, expires, paths, "
                          "last_used FROM tokens").fetchall()
        self._by_digest = {row[0]: self._token(row[1:]) for row in rows}

    def flush(self, now: float) -> None:
        used, self._used = self._used, {}
        try:
            self.db.run(lambda db: db.executemany(
                "UPDATE tokens SET last_used = MAX(COALESCE(last_used, 0), ?) WHERE id = ?",
                [(at, token_id) for token_id, at in used.items()]), now)
        except StoreUnavailable:
            self._used = {**used, **self._used}  # written by the next flush instead of lost
            raise

    @staticmethod
    def _token(row: tuple[Any, ...]) -> ApiToken:
        token_id, user, label, created, expires, paths, last_used = row
        return ApiToken(token_id, user, label, created, expires, tuple(json.loads(paths)),
                        last_used)


# -- Metrics --------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Counts for /ezauth/metrics. Plain ints bumped without a lock (verify must stay cheap), so
    they are per process (each gunicorn worker counts its own) and a rare race may lose one."""

    started: float
    logins_ok: int = 0
    logins_failed: int = 0
    logins_locked: int = 0
    verify_allowed: int = 0
    verify_denied: int = 0
    sessions_renewed: int = 0
    key_rotations: int = 0

    def render(self, visits: int | None, hashes_waiting: int) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        lines = ["# HELP ezauth_logins_total Login attempts (form and HTTP Basic) by outcome.",
                 "# TYPE ezauth_logins_total counter"]
        lines += [f'ezauth_logins_total{{result="{r}"}} {getattr(self, f"logins_{r}")}'
                  for r in ("ok", "failed", "locked")]
        lines += ["# HELP ezauth_verify_total Verify answers to nginx by outcome.",
                  "# TYPE ezauth_verify_total counter",
                  f'ezauth_verify_total{{result="allowed"}} {self.verify_allowed}',
                  f'ezauth_verify_total{{result="denied"}} {self.verify_denied}']
        for name, value, text in (
                ("ezauth_sessions_renewed_total", self.sessions_renewed,
                 "Sessions renewed past half their life."),
                ("ezauth_key_rotations_total", self.key_rotations,
                 "New signing keys this process picked up.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        waiting = "ezauth_password_checks_waiting"
        lines += [f"# HELP {waiting} Password checks waiting for the hash gate.",
                  f"# TYPE {waiting} gauge", f"{waiting} {hashes_waiting}"]
        if visits is not None:
            lines += ["# HELP ezauth_visits The login page visit counter.",
                      "# TYPE ezauth_visits gauge", f"ezauth_visits {visits}"]
        lines += ["# HELP process_start_time_seconds Start time of the process since the epoch.",
                  "# TYPE process_start_time_seconds gauge",
                  f"process_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"


# -- Stores ---------------------------------------------------------------------------------


FLUSH_EVERY = 60.0  # how often last-seen times reach the registry
LOOK_EVERY = 0.1  # how often an unknown API token may make a worker look at the registry early
# Verify trusts its last look at the registry this long when it cannot look again (a disk error, a
# file replaced by hand); after that it refuses everyone (503) rather than miss a revocation made
# meanwhile, until a look succeeds.
REGISTRY_GRACE = 5.0


def open_sessions_database(data_dir: Path, now: float) -> SharedDatabase:
    """sessions.sqlite3: the session registry and API tokens, shared by all workers and the CLI."""
    return SharedDatabase(data_dir / "sessions.sqlite3", SessionRegistry.SCHEMA + ApiTokens.SCHEMA,
                          "sessions", now, wal=True, created=SessionRegistry.begin_epoch)


@dataclass
class Stores:
    """Everything in the data dir, opened together and refreshed together."""

    users: Users
    keys: KeyRing
    registry: SessionRegistry
    sessions: Sessions
    tokens: ApiTokens
    counter: VisitCounter
    throttle: Throttle
    totp: TotpStore
    rules: AccessRules
    name_key: bytes = field(repr=False)
    _next_refresh: float = 0.0
    _next_flush: float = 0.0
    _next_look: float = 0.0
    _registry_read: float = 0.0  # when the registry was last looked at
    _registry_state: str = "ok"  # or "failing" (within the grace), or "refusing" (past it)
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock)
    _flushing: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, settings: Settings, clock: Clock) -> Stores:
        data, now = settings.data_dir, clock()
        prepare_data_dir(data)
        require_writable(data)
        users = Users(data / "users",
                      {name: legacy_hash(name, pw) for name, pw in settings.legacy_users})
        keys = KeyRing(data / "keys.json", settings.rotate_every, settings.longest_ttl, now)
        shared = open_sessions_database(data, now)
        registry = SessionRegistry(shared)
        sessions = Sessions(users, keys, registry, settings.session_ttl, settings.remember_ttl,
                            settings.session_max_age)
        counter = VisitCounter(data / "counter.txt", clock, settings.counter)
        stores = cls(users, keys, registry, sessions, ApiTokens(shared), counter,
                     Throttle(data / "throttle.sqlite3", settings.max_attempts,
                              settings.lockout_window, settings.lockout_time, now),
                     TotpStore(data / "totp"), AccessRules(data / "rules"),
                     private_secret(data / "names.key", now))
        stores.look_at_registry(now)
        return stores

    def refresh(self, now: float) -> int:
        """At most once a second, pick up what the CLI or other workers changed; returns how many
        new signing keys this brought (for the metrics). Once a minute, last-seen times are written
        by a thread of their own, never by the request that happens to pass."""
        if now < self._next_refresh or not self._refresh_lock.acquire(blocking=False):
            return 0
        try:
            self._next_refresh = now + REFRESH_EVERY
            signer = self.keys.keys[-1].kid
            for watched in (self.users, self.totp, self.rules):
                watched.load()
            self.keys.refresh(now)
            self.look_at_registry(now)
            if now >= self._next_flush:
                self._next_flush = now + FLUSH_EVERY
                threading.Thread(target=self.flush, args=(now,), name="ezauth-flush",
                                 daemon=True).start()
            return int(self.keys.keys[-1].kid != signer)
        finally:
            self._refresh_lock.release()

    def look_again(self, secret: str, now: float) -> ApiToken | None:
        """A token this worker does not know yet may have just been made (the CLI, another worker):
        look at the registry now rather than at the next refresh. Cheap when nothing changed (one
        PRAGMA on shared memory, no read of the file), and at most every LOOK_EVERY seconds, so a
        stream of made-up tokens costs no more than the refresh."""
        if (not API_TOKEN_RE.fullmatch(secret) or now < self._next_look
                or not self._refresh_lock.acquire(blocking=False)):
            return None
        try:
            self._next_look = now + LOOK_EVERY
            self.registry.db.read_if_changed(lambda db: self._reload_registry(db, now))
        except StoreUnavailable:
            return None  # the once-a-second look logs it and decides what verify does
        finally:
            self._refresh_lock.release()
        return self.tokens.check(secret, now)

    def _reload_registry(self, db: sqlite3.Connection, now: float) -> None:
        self.registry.reload(db, now)
        self.tokens.reload(db)

    def look_at_registry(self, now: float) -> None:
        """Take in sessions ended and tokens revoked elsewhere; a look that fails is logged when the
        failures begin, when they outlast REGISTRY_GRACE (verify refuses from then on) and when they
        end."""
        try:
            self.registry.db.read_if_changed(lambda db: self._reload_registry(db, now))
        except StoreUnavailable as err:
            state = "refusing" if now - self._registry_read > REGISTRY_GRACE else "failing"
            if state != self._registry_state:
                action = ("verify_refuses_everyone" if state == "refusing"
                          else f"verify_refuses_after_{REGISTRY_GRACE:.0f}s")
                log.error("event=sessions_unreadable error=%s action=%s", logval(err.error), action)
                self._registry_state = state
            return
        if self._registry_state != "ok":
            log.warning("event=sessions_readable_again action=verify_answers_again")
        self._registry_read, self._registry_state = now, "ok"

    def registry_stale(self, now: float) -> bool:
        """Whether verify's view of ended sessions and revoked tokens is too old to trust (no I/O):
        the last look failed and the last good one is over REGISTRY_GRACE old. Only a failed look
        counts, so a look that another thread is making right now never makes verify refuse."""
        return self._registry_state != "ok" and now - self._registry_read > REGISTRY_GRACE

    def flush(self, now: float) -> None:
        """Write what verify only noted in memory: last seen, last used; forget expired sessions;
        then checkpoint the write-ahead log."""
        if not self._flushing.acquire(blocking=False):
            return
        try:
            self.registry.flush(now)
            self.tokens.flush(now)
            self.registry.db.checkpoint()
        except StoreUnavailable as err:
            log.error("event=sessions_flush_failed error=%s action=retry_at_the_next_flush",
                      logval(str(err)))
        finally:
            self._flushing.release()

    def log_name(self, name: str) -> str:
        """NAME as log lines and the lockout hold it: a user's own name, but anything else (a
        password typed into the name field, say) only as a keyed hash that tells repeats apart and
        reveals nothing."""
        if self.users.fingerprint(name) is not None:
            return name
        return "hash:" + hmac.new(self.name_key, name.encode("utf-8", "surrogatepass"),
                                  hashlib.sha256).hexdigest()[:16]

    def factors(self, name: str) -> str | None:
        """What proves NAME: their password hash and whether they have a second factor."""
        fingerprint = self.users.fingerprint(name)
        return None if fingerprint is None else f"{fingerprint}:{int(self.totp.enrolled(name))}"


# -- HTTP plumbing --------------------------------------------------------------------------

MAX_FORM = 16 * 1024
MAX_QUERY_FIELDS = 50
MAX_TARGET = 2048
TARGET_CHARS_RE = re.compile(r"[\x21-\x7e]+")
SECURITY_HEADERS = [
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
]
# Looked up by number: an enum lookup per response costs 0.5 us.
STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


@dataclass
class Response:
    """What a handler returns: status, headers and body; the app adds Content-Length."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        return STATUS_LINES[self.status]


def text_response(status: int, text: str, *headers: tuple[str, str]) -> Response:
    return Response(status, text.encode() + b"\n",
                    [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"),
                     *headers])


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def valid_ip(text: str) -> bool:
    """An IPv4 or IPv6 address without a scope id (`fe80::1%x ip=6.6.6.6` is not an address)."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def bare_host(host: str) -> str:
    """A host as ezauth compares hosts: lower case, without its port, brackets or a trailing dot."""
    if re.search(r"(^|[^:]):\d*$|\]:\d*$", host):
        host = host.rpartition(":")[0]
    return host.strip("[]").lower().rstrip(".")


@functools.lru_cache(maxsize=1024)
def peer_trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    """ip_in for a connection's peer, remembered: nginx's few addresses come on every verify."""
    return ip_in(peer, trusted)


# Remembered: a browser sends the same Cookie header on every request of a page until its session
# is renewed, and this split was a fifth of a verify. 128 headers: 2 MiB at nginx's 8 KiB a header
# line, 8 MiB at most (the built-in server's 32 KiB head).
@functools.lru_cache(maxsize=128)
def split_cookies(header: str,
                  names: frozenset[str]) -> tuple[Mapping[str, tuple[str, ...]], str]:
    """The values of the cookies called one of NAMES in a Cookie header, in the order sent, and the
    header without them. `ezauth =x` counts as an ezauth cookie, as Python's and most apps' cookie
    parsers read it."""
    found: dict[str, tuple[str, ...]] = {}
    kept = []
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        name = key.strip()
        if sep and name in names:
            found[name] = (*found.get(name, ()), value.strip().strip('"'))
        elif name or value:
            kept.append(part.strip())
    return types.MappingProxyType(found), "; ".join(kept)


def cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie NAME in a Cookie header, in order (read as split_cookies reads)."""
    if name not in header:
        return []
    values = []
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            values.append(value.strip().strip('"'))
    return values


@functools.cache
def header_key(name: str) -> str:
    """The environ key of a header ezauth reads (a handful of names, so remembered)."""
    return "HTTP_" + name.upper().replace("-", "_")


class Original(NamedTuple):
    """The request a proxy asks verify about, as its headers name it ("" for what they lack)."""

    uri: str
    host: str
    port: str


NO_ORIGINAL = Original("", "", "")


class Request:
    """A thin read-only view of the WSGI environ."""

    __slots__ = ("_trusted", "environ", "method", "path")

    def __init__(self, environ: dict[str, Any], trusted: tuple[IPNetwork, ...]) -> None:
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.path = environ.get("PATH_INFO", "") or "/"
        self._trusted = trusted

    def header(self, name: str) -> str:
        return str(self.environ.get(header_key(name), ""))

    def original(self, names: tuple[str, str, str]) -> Original:
        """The request a trusted proxy asks about, from its family of headers NAMES (URI, host,
        port; see PROXY_HEADERS); nothing from anyone else, and never from the other family."""
        if not self.from_trusted_proxy:
            return NO_ORIGINAL
        uri, host, port = (self.header(name) for name in names)
        return Original(uri, host, port)

    def query(self, name: str) -> str:
        """The first value of NAME in the query string; ValueError for one with too many fields."""
        values = urllib.parse.parse_qs(str(self.environ.get("QUERY_STRING", "")),
                                       max_num_fields=MAX_QUERY_FIELDS)
        return values.get(name, [""])[0]

    def cookies(self, name: str) -> list[str]:
        return cookie_values(self.environ.get("HTTP_COOKIE", ""), name)

    @property
    def host(self) -> str:
        return bare_host(self.header("Host") or self.environ.get("SERVER_NAME", ""))

    @property
    def from_trusted_proxy(self) -> bool:
        """A trusted proxy, or a peer on a unix socket (gunicorn --bind unix:...), which only a
        local proxy can reach: gunicorn gives such a peer an empty REMOTE_ADDR (or the socket's
        path)."""
        peer = self.environ.get("REMOTE_ADDR")
        if peer == "" or (isinstance(peer, str) and peer.startswith("/")):
            return True
        return peer_trusted(peer or "", self._trusted)

    @property
    def is_https(self) -> bool:
        if self.environ.get("wsgi.url_scheme") == "https":
            return True
        proto = self.environ.get("HTTP_X_FORWARDED_PROTO")  # every verify asks: no work for http
        if not proto:
            return False
        return str(proto).split(",")[0].strip().lower() == "https" and self.from_trusted_proxy

    @property
    def client_ip(self) -> str:
        """The visitor's address: forwarding headers count only when the peer is a trusted proxy."""
        peer = self.environ.get("REMOTE_ADDR") or ""
        client = self._forwarded_client(peer) if self.from_trusted_proxy else peer
        if valid_ip(client):
            return str(ipaddress.ip_address(client))
        warn_once("client_ip_unknown",
                  "event=client_ip_unknown peer=%s note=clients_share_one_lockout_and_"
                  "fail2ban_cannot_ban_them_make_the_proxy_send_X-Forwarded-For", logval(peer))
        return "unknown"

    def _forwarded_client(self, peer: str) -> str:
        """The rightmost X-Forwarded-For hop that is no trusted proxy (or X-Real-IP without one)."""
        hops = [h.strip() for h in self.header("X-Forwarded-For").split(",") if h.strip()]
        client = peer
        for hop in reversed(hops):
            if not valid_ip(hop):
                break
            client = hop
            if not ip_in(hop, self._trusted):
                break
        if not hops and valid_ip(self.header("X-Real-IP").strip()):
            client = self.header("X-Real-IP").strip()
        return client


def _same_site_path(path: str) -> str:
    # `/.//evil.example` is `//evil.example` once a browser or an app resolves its dot segments.
    try:
        readings = path_readings(path)
    except PathTooLong:
        return "/"
    if (not path.startswith("/") or path.startswith("//")
            or any(reading.startswith("//") for reading in readings)):
        return "/"
    if rules_path(path).startswith((f"{PREFIX}/login", f"{PREFIX}/logout")):
        return "/"
    return path


def safe_return_target(target: str, host: str = "", cookie_domain: str = "") -> str:
    """Where to go after login: a same-site path (or a URL under the cookie domain), else '/'."""
    if (not target or len(target) > MAX_TARGET or not TARGET_CHARS_RE.fullmatch(target)
            or "\\" in target):
        return "/"
    if target.startswith("/"):
        return _same_site_path(target)
    try:
        parts = urllib.parse.urlsplit(target)
        hostname, _ = parts.hostname, parts.port
    except ValueError:
        return "/"
    if parts.scheme.lower() not in ("http", "https") or not hostname or "@" in parts.netloc:
        return "/"
    path = _same_site_path((parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                           + (f"#{parts.fragment}" if parts.fragment else ""))
    if hostname == host.lower():
        return path
    if cookie_domain and host_under(hostname, cookie_domain):
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"
    return "/"


# nginx reads verify's status line and headers into proxy_buffer_size (4 KiB by default) and turns
# a 401 that outgrows it into its 503 page. The login URL gets at most this much of it: the status
# line and the other headers (WWW-Authenticate, X-Ezauth-Error, Date, a cookie) fit in the rest.
MAX_LOGIN_URL = 3072


def login_url(original_uri: str, expired: bool, portal: str = "") -> str:
    """The login page URL (on the PORTAL, when there is one) that returns the visitor to
    ORIGINAL_URI; without the return target when it would not fit MAX_LOGIN_URL (the login still
    works and lands on the default page)."""
    query = {"rd": original_uri} if original_uri and len(original_uri) <= MAX_LOGIN_URL else {}
    if expired:
        query["expired"] = "1"
    url = f"{portal}{PREFIX}/login?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote,
                                                              safe="")
    if len(url) > MAX_LOGIN_URL and original_uri:  # percent-encoding can triple a target
        return login_url("", expired, portal)
    return url.removesuffix("?")


def return_target(request: Request, names: tuple[str, str, str], portal: str) -> str:
    """Where the login page sends the visitor back to: the URI the proxy asked about (in its family
    of headers NAMES); a whole URL when the login pages live on a PORTAL host of their own."""
    original = request.original(names)
    if not portal or not original.uri.startswith("/"):
        return original.uri
    host = original.host if names is PROXY_HEADERS["forwarded"] else request.header("Host")
    return f"{'https' if request.is_https else 'http'}://{host}{original.uri}" if host else ""


def navigates(request: Request) -> bool:
    """A browser navigating to a page, which gets the login page; scripts and in-page requests
    (fetch, XHR, EventSource) get a 401 they can understand instead of a redirect to HTML."""
    mode = request.header("Sec-Fetch-Mode")
    if mode:
        return mode == "navigate"
    return not request.header("X-Requested-With") and "text/html" in request.header("Accept")


def top_level_navigation(request: Request) -> bool:
    """Whether a browser that sends Fetch Metadata is opening this as a page of its own (not a
    fetch(), an XHR, an iframe or an image); a client without it (curl, an old browser) is judged as
    before."""
    dest = request.header("Sec-Fetch-Dest")
    return not dest or dest == "document"


def same_origin_post(request: Request) -> bool:
    """Whether a browser that sends Fetch Metadata posts from a page of this origin (or the user
    typed it: `none`); another site, even a sibling subdomain (`same-site`), may not make changes
    here."""
    site = request.header("Sec-Fetch-Site")
    return not site or site in ("same-origin", "none")


def make_cookie(name: str, value: str, *, secure: bool, domain: str = "",
                max_age: int | None = None, path: str = "/") -> str:
    """A Set-Cookie value: always HttpOnly and SameSite=Lax."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if domain:
        parts.append(f"Domain={domain.lstrip('.')}")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


HOST_PREFIX, SECURE_PREFIX = "__Host-", "__Secure-"


class SessionCookies(NamedTuple):
    """What verify reads from a Cookie header in one pass: the session tokens under the name the
    request may use, and the header without any of ezauth's cookies for the app (None when it held
    none, so nginx passes it on as it came)."""

    tokens: tuple[str, ...]
    app_cookie: str | None


NO_COOKIES = SessionCookies((), None)


@dataclass(frozen=True)
class CookieNames:
    """The names of ezauth's two cookies for one kind of request, and the CSRF cookie's path."""

    session: str
    csrf: str
    csrf_path: str


class CookiePolicy:
    """Which cookies ezauth sets and reads for a request. Over https they carry a prefix that the
    browser lets only a secure response of this very host (`__Host-`), or of a secure page under
    EZAUTH_COOKIE_DOMAIN (`__Secure-`), set: a cookie tossed in over plain http (another port of the
    same host) is never read as ezauth's, and a plain-http login never collides with an https
    one."""

    def __init__(self, name: str, domain: str, secure: str) -> None:
        self.domain, self.always_secure, self.never_secure = domain, secure == "1", secure == "0"
        self.plain = CookieNames(name, f"{name}_csrf", f"{PREFIX}/")
        self.prefixed = CookieNames(f"{SECURE_PREFIX if domain else HOST_PREFIX}{name}",
                                    f"{HOST_PREFIX}{name}_csrf",
                                    "/")  # a __Host- cookie must have Path=/
        self.owned = frozenset((name, f"{name}_csrf", f"{HOST_PREFIX}{name}",
                                f"{SECURE_PREFIX}{name}", f"{HOST_PREFIX}{name}_csrf"))
        self.base = name

    def secure(self, request: Request) -> bool:
        """Whether REQUEST's cookies are Secure (and so prefixed): over https, or always with 1."""
        return self.always_secure or (not self.never_secure and request.is_https)

    def names(self, request: Request) -> CookieNames:
        return self.prefixed if self.secure(request) else self.plain

    def read(self, request: Request) -> SessionCookies:
        """REQUEST's session tokens: under the prefixed name, which only a secure response can have
        set, and under the plain name only where ezauth itself sets plain ones (never over
        https)."""
        header = request.environ.get("HTTP_COOKIE", "")
        if self.base not in header:
            return NO_COOKIES
        found, rest = split_cookies(header, self.owned)
        tokens = found.get(self.prefixed.session, ())
        if not self.secure(request):
            tokens = tokens + found.get(self.plain.session, ())
        return SessionCookies(tokens, rest)

    def session(self, request: Request, token: str, max_age: int | None) -> tuple[str, str]:
        """Set-Cookie for a session token (a browser session's cookie when MAX_AGE is None)."""
        secure = self.secure(request)
        name = self.prefixed.session if secure else self.plain.session
        domain = self.domain if not secure or name.startswith(SECURE_PREFIX) else ""
        return "Set-Cookie", make_cookie(name, token, secure=secure, domain=domain, max_age=max_age)

    def clear_session(self, request: Request) -> list[tuple[str, str]]:
        """Set-Cookie headers that remove every session cookie this kind of request may carry."""
        secure = self.secure(request)
        name = self.prefixed.session if secure else self.plain.session
        clear = [("Set-Cookie", make_cookie(name, "", secure=secure, max_age=0))]
        if self.domain:  # a __Host- cookie has no Domain, but then there is no domain either
            clear.append(("Set-Cookie",
                          make_cookie(name, "", secure=secure, domain=self.domain, max_age=0)))
        return clear


def choose_lang(accept_language: str, forced: str = "") -> str:
    """zh-CN when the browser prefers Chinese, else English; a setting overrides both."""
    if forced:
        return forced
    best, best_q = "en", 0.0
    for part in accept_language.split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        try:
            q = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            continue
        tag = tag.strip().lower()
        lang = ("zh-CN" if tag.startswith("zh")
                else "en" if tag.startswith("en") or tag == "*" else None)
        if lang and q > best_q:
            best, best_q = lang, q
    return best


def content_length(environ: Mapping[str, Any]) -> int | None:
    raw = environ.get("CONTENT_LENGTH") or "0"
    return int(raw) if re.fullmatch(r"[0-9]{1,18}", raw) else None


def read_form(environ: dict[str, Any]) -> dict[str, str] | None:
    """The urlencoded form in the body (already size-checked), or None when it cannot be decoded."""
    if not environ.get("CONTENT_TYPE", "").lower().startswith("application/x-www-form-urlencoded"):
        return None
    length = content_length(environ) or 0
    body = environ["wsgi.input"].read(length) if length else b""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                       encoding="utf-8", errors="strict", max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return None
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


@dataclass(frozen=True)
class FormState:
    """What the login form keeps between tries: the name, the return target, the checkbox and, in
    the code step, the pending login."""

    username: str = ""
    rd: str = "/"
    remember: bool = False
    pending: str = ""


class Refused(Exception):
    """A login that did not succeed: its status, the message to show (a PAGE_TEXT key), the form to
    show it on, and for a lockout how long to wait. Turned into a page in one place."""

    def __init__(self, status: int, message: str, state: FormState = FormState(),
                 retry_after: int = 0) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.state, self.retry_after = state, retry_after


# -- Page text and fragments ----------------------------------------------------------------
# Data only: every word the pages show, in English and Simplified Chinese (the same keys in both),
# and the pieces of HTML the Pages section fills in. Translating or restyling happens here; the
# login and account pages themselves are login.html and account.html (a copy in the data dir wins).

PAGE_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "t_username": "Username",
        # A form label, not a password (bandit B105):
        "t_password": "Password",  # nosec B105
        "t_remember": "Remember me",
        "t_submit": "Log in",
        "t_theme": "Dark theme",
        "default_title": "Welcome back",
        "default_subtitle": "This place is private. Please log in.",
        "default_slogan": "Quiet servers, happy cats.",
        "msg_wrong": "Wrong username or password.",
        "msg_locked": "Too many attempts. Try again in {wait}.",
        "wait_second": "{n} second",
        "wait_seconds": "{n} seconds",
        "wait_minute": "{n} minute",
        "wait_minutes": "{n} minutes",
        "msg_expired": "Your session has expired. Please log in again.",
        "msg_csrf": "This form has expired. Please try again.",
        "msg_bad_form": "The form could not be read. Please try again.",
        "msg_missing": "Please enter your username and password.",
        "msg_too_large": "That was far too much to type into a login form.",
        "msg_visits": "This page has been visited {count} times.",
        "t_code": "6-digit code from your authenticator app",
        "msg_wrong_code": "Wrong code. Try the newest one from your app.",
        "forbidden_title": "Not for you",
        "forbidden_text": "You are logged in, but this page is not open to your account.",
        "forbidden_home": "Go to the start page",
        "forbidden_switch": "Log in as someone else",
        "t_account": "Your account",
        "msg_signed_in": "You are logged in as {user}.",
        "t_open_app": "Open the app",
        "t_logout": "Log out",
        "t_sessions": "Where you are logged in",
        "t_device": "Device",
        "t_ip": "IP address",
        "t_last_seen": "Last seen",
        "t_created": "Created",
        "t_end": "End",
        "t_end_others": "Log out everywhere else",
        "t_this_device": "(this device)",
        "t_change_password": "Change password",
        "t_current_password": "Current password",
        "t_new_password": "New password (at least 8 characters)",
        "t_new_password_again": "New password again",
        "t_two_factor": "Two-factor login",
        "t_totp_is_off": "Off: your password alone logs you in.",
        "t_totp_turn_on": "Turn on",
        "t_totp_scan": "Scan this code with an authenticator app (or type in the secret), then "
                       "enter the 6-digit code it shows.",
        "t_totp_secret": "Secret:",
        "t_totp_qr": "QR code for your authenticator app",
        "t_totp_confirm": "Confirm and turn on",
        "t_totp_is_on": "On: after your password you are asked for a code from your app.",
        "t_totp_turn_off": "Turn off",
        "t_api_tokens": "API tokens",
        "t_api_token": "API token",
        "t_label": "Label",
        "t_last_used": "Last used",
        "t_expires": "Expires",
        "t_scope": "Paths",
        "t_revoke": "Revoke",
        "t_token_days": "Expires after this many days (empty: never)",
        "t_token_paths": "Only under these paths, separated by spaces (empty: everywhere)",
        "t_confirm_password": "Current password",
        "t_create_token": "Create token",
        "t_token_once": "Your new token. It is shown only this once: copy it now.",
        "t_copy": "Copy",
        "t_confirm_note": "Creating an API token, changing your password and turning two-factor "
                          "login on or off each need your current password. Ending sessions and "
                          "revoking tokens do not.",
        "t_keep_tokens": "Keep my API tokens working (otherwise they are revoked)",
        "t_end_all": "Log out everywhere, this browser too",
        "t_end_all_hint": "Also revokes your API tokens. Use it if a cookie may have been copied.",
        "logout_question": "Log out of this browser?",
        "msg_not_signed_in": "You are not logged in.",
        "word_never": "never",
        "word_everywhere": "everywhere",
        "msg_no_tokens": "No tokens yet.",
        "msg_password_changed": "Password changed. Every other session has ended. API tokens "
                                "revoked: {count}.",
        "msg_password_changed_kept": "Password changed. Every other session has ended; your API "
                                     "tokens still work.",
        "msg_session_ended": "That session has ended.",
        "msg_others_ended": "You are logged out everywhere else.",
        "msg_totp_on": "Two-factor login is on.",
        "msg_totp_off": "Two-factor login is off.",
        "msg_totp_already_on": "Two-factor login is already on. Turn it off first, with a current "
                               "code.",
        "msg_token_revoked": "The token is revoked.",
        "msg_confirm_needed": "Enter your current password to make this change.",
        "msg_wrong_current": "That is not your current password.",
        "msg_password_short": "The new password needs at least 8 characters.",
        "msg_password_mismatch": "The two new passwords differ.",
        "msg_bad_token": "A token needs a label (up to 60 characters), 1 to 3650 days, and paths "
                         "that start with /.",
        "msg_gone": "That no longer exists.",
        "msg_too_slow": "That took too long. Please start again.",
    },
    "zh-CN": {
        "t_username": "用户名",
        # A form label, not a password (bandit B105):
        "t_password": "密码",  # nosec B105
        "t_remember": "记住我",
        "t_submit": "登录",
        "t_theme": "深色主题",
        "default_title": "欢迎回来",
        "default_subtitle": "这里是私人空间，请先登录。",
        "default_slogan": "服务器安静，猫咪开心。",
        "msg_wrong": "用户名或密码错误。",
        "msg_locked": "尝试次数过多，请在 {wait}后重试。",
        "wait_second": "{n} 秒",
        "wait_seconds": "{n} 秒",
        "wait_minute": "{n} 分钟",
        "wait_minutes": "{n} 分钟",
        "msg_expired": "会话已过期，请重新登录。",
        "msg_csrf": "表单已过期，请重试。",
        "msg_bad_form": "无法读取表单，请重试。",
        "msg_missing": "请输入用户名和密码。",
        "msg_too_large": "登录表单里的内容太多了。",
        "msg_visits": "本页已被访问 {count} 次。",
        "t_code": "身份验证器应用中的 6 位验证码",
        "msg_wrong_code": "验证码错误，请使用应用中最新的验证码。",
        "forbidden_title": "无权访问",
        "forbidden_text": "你已登录，但你的账号无权访问此页面。",
        "forbidden_home": "返回首页",
        "forbidden_switch": "切换账号登录",
        "t_account": "你的账号",
        "msg_signed_in": "你已登录为 {user}。",
        "t_open_app": "打开应用",
        "t_logout": "退出登录",
        "t_sessions": "已登录的设备",
        "t_device": "设备",
        "t_ip": "IP 地址",
        "t_last_seen": "最近活动",
        "t_created": "登录时间",
        "t_end": "结束",
        "t_end_others": "退出其他所有设备",
        "t_this_device": "（本设备）",
        "t_change_password": "修改密码",
        "t_current_password": "当前密码",
        "t_new_password": "新密码（至少 8 个字符）",
        "t_new_password_again": "再次输入新密码",
        "t_two_factor": "两步验证",
        "t_totp_is_off": "未开启：只需密码即可登录。",
        "t_totp_turn_on": "开启",
        "t_totp_scan": "用身份验证器应用扫描此二维码（或输入密钥），然后输入它显示的 6 位验证码。",
        "t_totp_secret": "密钥：",
        "t_totp_qr": "身份验证器应用的二维码",
        "t_totp_confirm": "确认并开启",
        "t_totp_is_on": "已开启：输入密码后还需输入应用中的验证码。",
        "t_totp_turn_off": "关闭",
        "t_api_tokens": "API 令牌",
        "t_api_token": "API 令牌",
        "t_label": "名称",
        "t_last_used": "最近使用",
        "t_expires": "过期时间",
        "t_scope": "路径",
        "t_revoke": "吊销",
        "t_token_days": "有效天数（留空：永不过期）",
        "t_token_paths": "仅限这些路径，用空格分隔（留空：全部）",
        "t_confirm_password": "当前密码",
        "t_create_token": "创建令牌",
        "t_token_once": "新令牌只显示这一次，请立即复制。",
        "t_copy": "复制",
        "t_confirm_note": "创建 API 令牌、修改密码以及开启或关闭两步验证，每次都需要输入当前密码。"
                          "结束会话和吊销令牌则不需要。",
        "t_keep_tokens": "保留我的 API 令牌（否则将被吊销）",
        "t_end_all": "退出所有设备（包括本浏览器）",
        "t_end_all_hint": "同时吊销你的所有 API 令牌。如果 Cookie 可能已被复制，请使用此项。",
        "logout_question": "要在此浏览器上退出登录吗？",
        "msg_not_signed_in": "你尚未登录。",
        "word_never": "从未",
        "word_everywhere": "全部",
        "msg_no_tokens": "还没有令牌。",
        "msg_password_changed": "密码已修改，其他所有会话均已结束。已吊销的 API 令牌：{count} 个。",
        "msg_password_changed_kept": "密码已修改，其他所有会话均已结束；你的 API 令牌仍然有效。",
        "msg_session_ended": "该会话已结束。",
        "msg_others_ended": "已退出其他所有设备。",
        "msg_totp_on": "两步验证已开启。",
        "msg_totp_off": "两步验证已关闭。",
        "msg_totp_already_on": "两步验证已经开启。请先用当前验证码将其关闭。",
        "msg_token_revoked": "令牌已吊销。",
        "msg_confirm_needed": "请输入当前密码以完成此更改。",
        "msg_wrong_current": "当前密码不正确。",
        "msg_password_short": "新密码至少需要 8 个字符。",
        "msg_password_mismatch": "两次输入的新密码不一致。",
        "msg_bad_token": "令牌需要名称（最多 60 个字符）、1 到 3650 天的有效期，且路径以 / 开头。",
        "msg_gone": "该项已不存在。",
        "msg_too_slow": "操作超时，请重新开始。",
    },
}
PAGE_FIELDS = ("lang", "title", "subtitle", "slogan", "static", "action", "csrf", "rd", "username",
               "remember", "error", "error_state", "footer", "password_step", "code_step",
               "pending")
ACCOUNT_FIELDS = ("lang", "title", "static", "prefix", "action", "csrf", "user", "signed_in",
                  "error", "error_state", "notice", "new_token", "session_rows", "totp",
                  "token_rows")
# The frame of ezauth's small pages: the head, the card, and the cat with what went wrong.
SMALL_PAGE_TOP = """<!doctype html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>$tab_title</title>
<script src="$static/theme.js"></script>
<link rel="stylesheet" href="$static/login.css">
</head>
<body>
<main class="card" data-state="$error_state">
  <h1>$heading</h1>
  <div class="oops" role="alert">
    <img class="cat" src="$static/cat.svg" alt="" width="96" height="96">
    <p class="bubble">$error</p>
  </div>
"""
SMALL_PAGE_END = """</main>
</body>
</html>
"""
# The page nginx shows (error_page 403) when access rules keep a logged-in user out.
FORBIDDEN_PAGE = string.Template(SMALL_PAGE_TOP + """\
  <p class="links"><a href="/">$home</a> · <a href="$logout">$switch</a></p>
""" + SMALL_PAGE_END)
# GET /ezauth/logout: logging out is a POST with the CSRF token; this page holds the button.
LOGOUT_PAGE = string.Template(SMALL_PAGE_TOP + """\
  <p class="subtitle" id="signed-in">$signed_in</p>
  <form method="post" action="$action" class="form">
    <input type="hidden" name="csrf" value="$csrf">
    <button type="submit" class="submit" id="logout">$t_logout</button>
  </form>
  <p class="links"><a href="/">$t_open_app</a></p>
""" + SMALL_PAGE_END)


# Pieces of the account page, each rendered through `render` (so escaped there) and then
# placed into the page as Markup. A cell's data-label names its column on a phone, where each row
# stands alone (login.css); a <time> shows UTC until login.js puts it in the browser's own zone.
SESSION_ROW = string.Template(
    '<tr$current><td data-label="$t_device">$agent$here</td><td data-label="$t_ip">$ip</td>'
    '<td data-label="$t_last_seen">$last_seen</td><td data-label="$t_created">$created</td>'
    '<td class="end">$end</td></tr>')
TIME = string.Template('<time datetime="$iso">$shown</time>')
THIS_DEVICE = string.Template(' <strong class="here">$t_this_device</strong>')
POST_BUTTON = string.Template(
    '<form method="post" action="$action" class="inline">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="action" value="$what">'
    '<input type="hidden" name="$name" value="$value">'
    '<button type="submit" class="button quiet small">$label</button></form>')
TOKEN_ROW = string.Template(
    '<tr><td data-label="$t_label">$label</td><td data-label="$t_created">$created</td>'
    '<td data-label="$t_last_used">$last_used</td><td data-label="$t_expires">$expires</td>'
    '<td data-label="$t_scope">$scope</td><td class="end">$revoke</td></tr>')
EMPTY_ROW = string.Template('<tr><td colspan="$columns" class="muted">$text</td></tr>')
NEW_TOKEN = string.Template(
    '<div class="new-token"><p>$t_token_once</p>'
    '<input id="new-token" type="text" readonly value="$secret" aria-label="$t_api_token">'
    '<button type="button" class="button quiet copy" data-copy="new-token" hidden>'
    "$t_copy</button></div>")
CONFIRM_FIELD = string.Template(
    '<div class="field"><label for="$id">$t_confirm_password</label>'
    '<input id="$id" name="current" type="password" autocomplete="current-password" required>'
    '</div>')
CODE_FIELD = string.Template(
    '<div class="field"><label for="$id">$t_code</label>'
    '<input id="$id" name="code" type="text" inputmode="numeric" pattern="[0-9]{6}" maxlength="6" '
    'autocomplete="one-time-code" required></div>')
TOTP_OFF = string.Template(
    '    <p>$t_totp_is_off</p>\n'
    '    <form method="post" action="$action" class="form" id="totp-form">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="action" value="totp_begin">'
    '<button type="submit" class="submit">$t_totp_turn_on</button></form>')
TOTP_ENROLL = string.Template(
    '    <p>$t_totp_scan</p>\n'
    '    $qr<p class="secret">$t_totp_secret <code id="totp-secret">$secret</code></p>'
    '<p class="uri"><code id="totp-uri">$uri</code></p>\n'
    '    <form method="post" action="$action" class="form" id="totp-form">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="action" value="totp_confirm">'
    '<input type="hidden" name="enrollment" value="$enrollment">$code$confirm'
    '<button type="submit" class="submit">$t_totp_confirm</button></form>')
TOTP_ON = string.Template(
    '    <p>$t_totp_is_on</p>\n'
    '    <form method="post" action="$action" class="form" id="totp-form">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="action" value="totp_off">'
    '$code$confirm<button type="submit" class="submit">$t_totp_turn_off</button></form>')
QR_IMAGE = string.Template(
    '<img class="qr" src="$src" alt="$t_totp_qr" width="$size" height="$size">')


# -- Pages ----------------------------------------------------------------------------------


def load_template(data_dir: Path, name: str = "login.html",
                  fields: Iterable[str] = PAGE_FIELDS) -> string.Template:
    """NAME from the data dir if there is one, else the shipped one; placeholders checked now."""
    path = data_dir / name
    if not path.is_file():
        path = HERE / name
    template = string.Template(path.read_text(encoding="utf-8"))
    known = set(fields) | {k for k in PAGE_TEXT["en"] if k.startswith("t_")}
    unknown = set(template.get_identifiers()) - known
    if unknown or not template.is_valid():
        raise SettingsError(f"{path}: unknown or broken placeholders: "
                            f"{', '.join(sorted(unknown)) or '$'}")
    return template


class Markup(str):
    """HTML that came out of `render`: placed into a page as it is, not escaped again."""


def render(template: string.Template, lang: str, values: Mapping[str, Any]) -> Markup:
    """TEMPLATE filled in with the page texts of LANG and VALUES, every value HTML-escaped here and
    nowhere else (Markup is already the output of this function)."""
    text = {k: v for k, v in PAGE_TEXT[lang].items() if k.startswith("t_")}
    merged = {**text, **values, "lang": lang}
    escaped = {k: v if isinstance(v, Markup) else html.escape(str(v), quote=True)
               for k, v in merged.items()}
    return Markup(template.substitute(escaped))


def render_page(template: string.Template, lang: str, values: Mapping[str, Any]) -> bytes:
    """A whole page, as the bytes of the response."""
    return render(template, lang, values).encode()


def wait_text(lang: str, seconds: int) -> str:
    """How long a lockout lasts, in words: "1 minute", "5 minutes", "45 seconds"."""
    if seconds < 60:
        return PAGE_TEXT[lang]["wait_second" if seconds == 1 else "wait_seconds"].format(n=seconds)
    minutes = math.ceil(seconds / 60)
    return PAGE_TEXT[lang]["wait_minute" if minutes == 1 else "wait_minutes"].format(n=minutes)


ACCOUNT = f"{PREFIX}/account"


def format_time(when: float | None, lang: str) -> str:
    """A moment as the account page shows it: "2026-12-01 09:30 UTC"."""
    if when is None:
        return PAGE_TEXT[lang]["word_never"]
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))


def time_element(when: float | None, lang: str) -> Markup | str:
    """A moment on the account page: a <time> the browser can show in its own zone, or "never"."""
    if when is None:
        return PAGE_TEXT[lang]["word_never"]
    return render(TIME, lang, {"iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                               "shown": format_time(when, lang)})


def qr_data_uri(text: str) -> tuple[str, int] | None:
    """TEXT as a QR code, an SVG image drawn on the server with segno (an optional package), as a
    data: URI and its size in pixels; None without segno."""
    try:
        import segno
    except ImportError:
        return None
    code = segno.make(text, error="m")
    return code.svg_data_uri(scale=4, border=2), int(code.symbol_size(scale=4, border=2)[0])


@dataclass(frozen=True)
class AccountView:
    """What the account page shows: the user's sessions and tokens, their second factor, and the
    outcome of the last change (PAGE_TEXT keys)."""

    user: str
    sid: str  # this device's session
    sessions: tuple[SessionRecord, ...]
    tokens: tuple[ApiToken, ...]
    totp_enrolled: bool
    # While setting up a second factor: (secret, otpauth URI, enrollment token).
    enrollment: tuple[str, str, str] = ("", "", "")
    new_token: str = ""  # shown once, right after it was made
    error: str = ""
    notice: str = ""
    retry_after: int = 0  # with error msg_locked: how long the lockout lasts
    count: int = 0  # with notice msg_password_changed: how many API tokens it revoked


PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "form-action 'self'{extra}; frame-ancestors 'none'; base-uri 'none'")
CSRF_RE = re.compile(r"[A-Za-z0-9_-]{32,64}")


class Pages:
    """ezauth's HTML pages in the visitor's language, with their headers (CSP, no-store) and the
    CSRF cookie: every value goes through render_page, the one escaping point."""

    def __init__(self, settings: Settings, template: string.Template,
                 account_template: string.Template, counter: VisitCounter,
                 cookies: CookiePolicy) -> None:
        self.settings, self.template, self.account_template, self.counter, self.cookies = (
            settings, template, account_template, counter, cookies)
        domain = settings.cookie_domain
        extra_form_action = f" https://*.{domain.lstrip('.')}" if domain else ""
        # Cross-Origin-Opener-Policy: a page of the app that opens one of these in a window gets no
        # handle on it, so a script there cannot read its CSRF token out of the window.
        self.headers = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
                        ("Content-Security-Policy", PAGE_CSP.format(extra=extra_form_action)),
                        ("Cross-Origin-Opener-Policy", "same-origin"), ("Vary", "Accept-Language"),
                        *SECURITY_HEADERS]

    def lang(self, request: Request) -> str:
        return choose_lang(request.header("Accept-Language"), self.settings.lang)

    def message(self, request: Request, key: str, retry_after: int = 0, count: int = 0) -> str:
        lang = self.lang(request)
        return PAGE_TEXT[lang][key].format(wait=wait_text(lang, retry_after), count=count)

    def csrf(self, request: Request) -> tuple[str, list[tuple[str, str]]]:
        """The visitor's CSRF token, and the Set-Cookie header for it when they had none."""
        names = self.cookies.names(request)
        token = next((c for c in request.cookies(names.csrf) if CSRF_RE.fullmatch(c)), "")
        if token:
            return token, []
        token = secrets.token_urlsafe(32)
        return token, [("Set-Cookie",
                        make_cookie(names.csrf, token, secure=self.cookies.secure(request),
                                    path=names.csrf_path))]

    def login(self, request: Request, status: int, state: FormState = FormState(), error: str = "",
              visits: int | None = None, headers: Iterable[tuple[str, str]] = ()) -> Response:
        """The login page. Only a GET counts a visit (VISITS); other answers show the count as it
        is. With a pending login (a two-factor user's right password) it asks for the code
        instead."""
        visits = self.counter.current() if visits is None and request.method == "POST" else visits
        lang, (csrf, csrf_header) = self.lang(request), self.csrf(request)
        text = PAGE_TEXT[lang]
        body = render_page(self.template, lang, {
            "title": self.settings.title or text["default_title"],
            "subtitle": self.settings.subtitle or text["default_subtitle"],
            "slogan": self.settings.slogan or text["default_slogan"],
            "static": f"{PREFIX}/static", "action": f"{PREFIX}/login", "csrf": csrf, "rd": state.rd,
            "username": state.username, "remember": "checked" if state.remember else "",
            "error": error, "error_state": "error" if error else "none",
            "footer": text["msg_visits"].format(count=f"{visits:,}") if visits is not None else "",
            # A disabled fieldset is not validated nor sent: the hidden step cannot block the form.
            "password_step": "disabled hidden" if state.pending else "",
            "code_step": "" if state.pending else "disabled hidden", "pending": state.pending,
        })
        return Response(status, body, [*self.headers, *csrf_header, *headers])

    def refused(self, request: Request, refused: Refused) -> Response:
        """The login page again, saying why the last try did not work."""
        retry = [("Retry-After", str(refused.retry_after))] if refused.retry_after else []
        return self.login(request, refused.status, refused.state,
                          self.message(request, refused.message, refused.retry_after),
                          headers=retry)

    def account(self, request: Request, status: int, view: AccountView) -> Response:
        """The account page: sessions, password, second factor, API tokens."""
        lang, (csrf, csrf_header) = self.lang(request), self.csrf(request)
        form, no_tokens = {"action": ACCOUNT, "csrf": csrf}, PAGE_TEXT[lang]["msg_no_tokens"]
        body = render_page(self.account_template, lang, {
            **form, "title": self.settings.title or PAGE_TEXT[lang]["default_title"],
            "static": f"{PREFIX}/static", "prefix": PREFIX, "user": view.user,
            "signed_in": PAGE_TEXT[lang]["msg_signed_in"].format(user=view.user),
            "error": self.message(request, view.error, view.retry_after) if view.error else "",
            "error_state": "error" if view.error else "none",
            "notice": self.message(request, view.notice, count=view.count) if view.notice else "",
            "new_token": (render(NEW_TOKEN, lang, {"secret": view.new_token}) if view.new_token
                          else Markup()),
            "session_rows": Markup("\n".join(self.session_row(lang, form, r, view.sid)
                                             for r in view.sessions)),
            "totp": self.totp_block(lang, form, view),
            "token_rows": Markup("\n".join(self.token_row(lang, form, t) for t in view.tokens)
                                 or render(EMPTY_ROW, lang, {"columns": 6, "text": no_tokens})),
        })
        retry = [("Retry-After", str(view.retry_after))] if view.retry_after else []
        return Response(status, body, [*self.headers, *csrf_header, *retry])

    @staticmethod
    def session_row(lang: str, form: Mapping[str, str], record: SessionRecord,
                    current: str) -> Markup:
        here = record.sid == current
        end = Markup() if here else render(POST_BUTTON, lang, {
            **form, "what": "end_session", "name": "sid", "value": record.sid,
            "label": PAGE_TEXT[lang]["t_end"]})
        return render(SESSION_ROW, lang, {
            "current": Markup(' class="current"') if here else Markup(), "agent": record.agent,
            "here": render(THIS_DEVICE, lang, {}) if here else Markup(), "ip": record.ip,
            "last_seen": time_element(record.last_seen, lang),
            "created": time_element(record.created, lang), "end": end})

    @staticmethod
    def token_row(lang: str, form: Mapping[str, str], token: ApiToken) -> Markup:
        return render(TOKEN_ROW, lang, {
            "label": token.label, "created": time_element(token.created, lang),
            "last_used": time_element(token.last_used, lang),
            "expires": time_element(token.expires, lang),
            "scope": " ".join(token.paths) or PAGE_TEXT[lang]["word_everywhere"],
            "revoke": render(POST_BUTTON, lang,
                             {**form, "what": "token_revoke", "name": "id", "value": token.id,
                              "label": PAGE_TEXT[lang]["t_revoke"]})})

    @staticmethod
    def totp_block(lang: str, form: Mapping[str, str], view: AccountView) -> Markup:
        confirm = render(CONFIRM_FIELD, lang, {"id": "totp-password"})
        code = render(CODE_FIELD, lang, {"id": "totp-code"})
        if view.totp_enrolled:
            return render(TOTP_ON, lang, {**form, "code": code, "confirm": confirm})
        secret, uri, enrollment = view.enrollment
        if not enrollment:
            return render(TOTP_OFF, lang, form)
        qr = qr_data_uri(uri)
        image = render(QR_IMAGE, lang, {"src": qr[0], "size": qr[1]}) if qr else Markup()
        return render(TOTP_ENROLL, lang, {**form, "qr": image, "secret": secret, "uri": uri,
                                          "enrollment": enrollment, "code": code,
                                          "confirm": confirm})

    def logout(self, request: Request, status: int, user: str, error: str = "") -> Response:
        """The page with the logout button (USER: who is logged in here, if anyone)."""
        lang, (csrf, csrf_header) = self.lang(request), self.csrf(request)
        text = PAGE_TEXT[lang]
        title = self.settings.title or text["default_title"]
        body = render_page(LOGOUT_PAGE, lang, {
            "tab_title": f"{text['t_logout']} · {title}", "heading": text["logout_question"],
            "static": f"{PREFIX}/static",
            "action": f"{PREFIX}/logout", "csrf": csrf, "error": error,
            "error_state": "error" if error else "none",
            "signed_in": (text["msg_signed_in"].format(user=user) if user
                          else text["msg_not_signed_in"])})
        return Response(status, body, [*self.headers, *csrf_header])

    def forbidden(self, request: Request) -> Response:
        """The page nginx shows instead of the app when access rules keep a logged-in user out."""
        lang = self.lang(request)
        text = PAGE_TEXT[lang]
        body = render_page(FORBIDDEN_PAGE, lang, {
            "tab_title": text["forbidden_title"], "heading": text["forbidden_title"],
            "error": text["forbidden_text"], "error_state": "error",
            "home": text["forbidden_home"], "switch": text["forbidden_switch"],
            "logout": f"{self.settings.portal}{PREFIX}/logout", "static": f"{PREFIX}/static"})
        return Response(403, body, self.headers)


# -- Handlers -------------------------------------------------------------------------------
# One class per flow, one method per route (make_app's route table names them): the login page
# with logout, the account page (an admin flow would come next), and the small routes. Verify,
# which nginx calls on every request, has the next section to itself. Flow is what they share.


@dataclass(eq=False)
class Flow:
    """What the flows share: their collaborators, built once in make_app (never globals), and the
    steps more than one flow takes. Every password or code check goes reserve (the lockout), then
    password_ok (the hash gate), then refuse or throttle.succeeded; a posted form passes
    read_form_with_csrf; target checks a return target; session_cookie sets a session's cookie."""

    settings: Settings
    stores: Stores
    pages: Pages
    clock: Clock
    metrics: Metrics  # one for every flow
    gate: HashGate  # one for every flow: password checks take turns across all of them
    cookies: CookiePolicy = field(init=False)

    def __post_init__(self) -> None:
        self.cookies = self.pages.cookies

    def reserve(self, request: Request, name: str, now: float, how: str = "",
                state: FormState | None = None) -> Attempt:
        """Reserve a password or code check for this client and user; 429 when locked out."""
        shown = self.stores.log_name(name)
        # IPv6: the client's whole /64.
        keys = [f"ip:{client_block(request.client_ip)}", f"user:{shown.lower()[:64]}"]
        attempt = self.stores.throttle.begin(keys, now)
        if attempt.locked:
            self.metrics.logins_locked += 1
            log.warning("event=%s %suser=%s ip=%s retry_after=%d",
                        "login_busy" if attempt.busy else "login_locked",
                        how, logval(shown), logval(request.client_ip), attempt.retry_after)
            raise Refused(429, "msg_locked", state or FormState(name), attempt.retry_after)
        return attempt

    def password_ok(self, request: Request, name: str, password: str) -> bool:
        """Check NAME's password through the hash gate, in turn with other clients (by network)."""
        return self.gate.run(client_block(request.client_ip),
                             lambda: self.stores.users.check(name, password))

    def refuse(self, request: Request, attempt: Attempt, name: str, now: float,
               how: str = "") -> None:
        """A wrong password or code: it counts toward the lockout and gets the fail2ban log line."""
        self.stores.throttle.failed(attempt, now)
        self.metrics.logins_failed += 1
        log.warning("event=login_failed %suser=%s ip=%s", how, logval(self.stores.log_name(name)),
                    logval(request.client_ip))

    def read_form_with_csrf(self, request: Request) -> dict[str, str]:
        """The posted form, once its size, encoding and CSRF token have passed."""
        length = content_length(request.environ)
        if length is None or length > MAX_FORM:
            log.warning("event=login_rejected reason=body_too_large ip=%s",
                        logval(request.client_ip))
            raise Refused(413, "msg_too_large")
        form = read_form(request.environ)
        if form is None:
            log.warning("event=login_rejected reason=bad_form ip=%s", logval(request.client_ip))
            raise Refused(400, "msg_bad_form")
        sent, names = form.get("csrf", "").encode(), self.cookies.names(request)
        if not sent or not any(hmac.compare_digest(c.encode(), sent)
                               for c in request.cookies(names.csrf)):
            name = form.get("username", "").strip()
            log.warning("event=login_rejected reason=csrf ip=%s user=%s", logval(request.client_ip),
                        logval(self.stores.log_name(name)))
            raise Refused(403, "msg_csrf",
                          FormState(name, self.target(request, form.get("rd", ""))))
        return form

    def target(self, request: Request, raw: str) -> str:
        return safe_return_target(raw, request.host, self.settings.cookie_domain)

    def session_cookie(self, request: Request, token: str, session: Session) -> tuple[str, str]:
        max_age = session.expires - session.issued if session.remember else None
        return self.cookies.session(request, token, max_age)

    def cookie_sessions(self, request: Request, now: float) -> list[Session]:
        """The live sessions in the request's cookies (at most MAX_SESSION_COOKIES looked at)."""
        return [s for t in self.cookies.read(request).tokens[:MAX_SESSION_COOKIES]
                if (s := self.stores.sessions.check(t, now)) is not None]

    def account_session(self, request: Request) -> Session | None:
        return next(iter(self.cookie_sessions(request, self.clock())), None)


class LoginFlow(Flow):
    """The login page and its form (the password, then a two-factor user's code), and logout. A
    login that does not succeed raises Refused, which login_submit turns into the page."""

    def login_page(self, request: Request) -> Response:
        try:
            expired, rd = request.query("expired") == "1", request.query("rd")
        except ValueError:
            log.warning("event=login_rejected reason=bad_query ip=%s", logval(request.client_ip))
            return self.pages.login(request, 400, error=self.pages.message(request, "msg_bad_form"))
        # No return target (the login page opened straight): land where it says who is logged in.
        return self.pages.login(request, 200,
                                FormState(rd=self.target(request, rd) if rd else ACCOUNT),
                                self.pages.message(request, "msg_expired") if expired else "",
                                visits=self.stores.counter.increment())

    def login_submit(self, request: Request) -> Response:
        try:
            form = self.read_form_with_csrf(request)
            rd = self.target(request, form.get("rd", ""))
            if form.get("pending"):
                return self.check_code(request, form["pending"],
                                       form.get("code", "").replace(" ", ""), rd)
            state = FormState(form.get("username", "").strip(), rd,
                              form.get("remember") in ("1", "on", "yes"))
            if not state.username or not form.get("password"):
                raise Refused(400, "msg_missing", state)
            return self.check_login(request, form["password"], state)
        except Refused as refused:
            return self.pages.refused(request, refused)

    def check_login(self, request: Request, password: str, state: FormState) -> Response:
        now, name, stores = self.clock(), state.username, self.stores
        attempt = self.reserve(request, name, now, state=state)
        if not self.password_ok(request, name, password):
            self.refuse(request, attempt, name, now)
            raise Refused(401, "msg_wrong", state)
        stores.throttle.succeeded(attempt)
        if not stores.totp.enrolled(name):
            return self.logged_in(request, name, now, state.rd, state.remember)
        log.info("event=login_code_asked user=%s ip=%s", logval(name), logval(request.client_ip))
        pending = issue_pending(name, stores.users.fingerprint(name) or "", state.remember,
                                stores.keys.signer(now), now)
        return self.pages.login(request, 200, replace(state, pending=pending))

    def check_code(self, request: Request, pending: str, code: str, rd: str) -> Response:
        """The second step: a valid pending login plus a fresh code from the user's app."""
        now, ip, stores = self.clock(), logval(request.client_ip), self.stores
        try:
            name, fingerprint, remember = read_pending(pending, stores.keys, now)
        except InvalidSession as err:
            log.warning("event=login_rejected reason=pending_%s ip=%s", logval(str(err)), ip)
            raise Refused(403, "msg_csrf", FormState(rd=rd)) from None
        if stores.users.fingerprint(name) != fingerprint:
            log.warning("event=login_rejected reason=password_changed user=%s ip=%s",
                        logval(name), ip)
            raise Refused(403, "msg_csrf", FormState(rd=rd))
        attempt = self.reserve(request, name, now, "step=code ",
                               FormState(name, rd, pending=pending))
        if not stores.totp.accept(name, code, now):
            self.refuse(request, attempt, name, now, "step=code ")
            raise Refused(401, "msg_wrong_code", FormState(name, rd, pending=pending))
        stores.throttle.succeeded(attempt)
        return self.logged_in(request, name, now, rd, remember)

    def logged_in(self, request: Request, name: str, now: float, rd: str,
                  remember: bool) -> Response:
        token, session = self.stores.sessions.start(name, now, remember, request.client_ip,
                                                    request.header("User-Agent"))
        self.metrics.logins_ok += 1
        log.info("event=login_ok user=%s ip=%s remember=%d", logval(name),
                 logval(request.client_ip), remember)
        return Response(303, b"", [("Location", rd), self.session_cookie(request, token, session),
                                   ("Cache-Control", "no-store"), *SECURITY_HEADERS])

    def logout_page(self, request: Request) -> Response:
        """A page with a logout button: logging out is a POST with the CSRF token, so a link from
        another site cannot log anyone out, while links here (the forbidden page's) still work."""
        session = self.account_session(request)
        return self.pages.logout(request, 200, session.user if session else "")

    def logout(self, request: Request) -> Response:
        """End the session, not only this browser's cookie: a copied token stops working too."""
        try:
            self.read_form_with_csrf(request)
        except Refused as refused:
            session = self.account_session(request)
            return self.pages.logout(request, refused.status, session.user if session else "",
                                     self.pages.message(request, refused.message))
        now = self.clock()
        sessions = self.cookie_sessions(request, now)
        for session in sessions:
            self.stores.registry.end_token(session, "logout", now)
        log.info("event=logout user=%s ip=%s", logval(sessions[0].user if sessions else "-"),
                 logval(request.client_ip))
        return Response(303, b"", [("Location", f"{PREFIX}/login"),
                                   *self.cookies.clear_session(request),
                                   ("Cache-Control", "no-store")])


ACCOUNT_NOTICES = ("password_changed", "password_changed_kept", "session_ended", "others_ended",
                   "totp_on", "totp_off", "token_revoked")


class AccountFlow(Flow):
    """The account page: a logged-in user's sessions, password, second factor and API tokens. Each
    change is a POST with the CSRF token, dispatched by its action (ACCOUNT_ACTIONS); a change that
    is refused raises Refused, and account_submit shows why on the page. A lasting change takes the
    current password in the same request (confirm)."""

    def account_page(self, request: Request) -> Response:
        session = self.account_session(request)
        if session is None:
            return self.to_login(request)
        try:
            done, count = request.query("done"), request.query("count")
        except ValueError:
            done = count = ""
        notice = f"msg_{done}" if done in ACCOUNT_NOTICES else ""
        return self.pages.account(request, 200, self.account_view(
            session, notice=notice, count=int(count) if re.fullmatch(r"[0-9]{1,6}", count) else 0))

    def account_submit(self, request: Request) -> Response:
        """A change on the account page: a POST with the CSRF token, dispatched by its action."""
        session = self.account_session(request)
        if session is None:
            return self.to_login(request)
        form: dict[str, str] = {}
        try:
            form = self.read_form_with_csrf(request)
            change = ACCOUNT_ACTIONS.get(form.get("action", ""))
            if change is None:
                raise Refused(400, "msg_bad_form")
            return change(self, request, session, form)
        except Refused as refused:
            log.warning("event=account_refused action=%s reason=%s user=%s ip=%s",
                        logval(form.get("action") or "-"), refused.message, logval(session.user),
                        logval(request.client_ip))
            enrollment = self.enrollment(session, form.get("enrollment", ""))
            view = self.account_view(session, error=refused.message,
                                     retry_after=refused.retry_after, enrollment=enrollment)
            return self.pages.account(request, refused.status, view)

    def to_login(self, request: Request) -> Response:
        """Without a session: to the login page, which comes back here afterwards."""
        return Response(303, b"", [("Location", login_url(ACCOUNT, expired=False)),
                                   ("Cache-Control", "no-store")])

    def account_view(self, session: Session, **outcome: Any) -> AccountView:
        now, stores = self.clock(), self.stores
        return AccountView(session.user, session.sid,
                           tuple(stores.registry.live(now, session.user)),
                           tuple(stores.tokens.list(now, session.user)),
                           stores.totp.enrolled(session.user), **outcome)

    def changed(self, request: Request, session: Session, action: str, notice: str,
                *headers: tuple[str, str], revoked: int | None = None) -> Response:
        """A change made: its log line, and back to the page (a reload does not post it again).
        REVOKED: how many API tokens it revoked, for the line and the page."""
        count = "" if revoked is None else f" tokens_revoked={revoked}"
        log.info("event=account_%s user=%s ip=%s%s", action, logval(session.user),
                 logval(request.client_ip), count)
        query = f"done={notice}" + ("" if revoked is None else f"&count={revoked}")
        return Response(303, b"", [("Location", f"{ACCOUNT}?{query}"),
                                   ("Cache-Control", "no-store"), *headers])

    def confirm(self, request: Request, session: Session, form: Mapping[str, str]) -> None:
        """A lasting change needs the current password in the very request that makes it: a script
        in the app, or a copied cookie, has the session but not the password. A wrong one counts
        toward the lockout like a wrong login."""
        now, password = self.clock(), form.get("current", "")
        if not password:
            raise Refused(403, "msg_confirm_needed")
        attempt = self.reserve(request, session.user, now, "via=account ")
        if not self.password_ok(request, session.user, password):
            self.refuse(request, attempt, session.user, now, "via=account ")
            raise Refused(401, "msg_wrong_current")
        self.stores.throttle.succeeded(attempt)

    def end_session(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        sid = form.get("sid", "")
        live = {r.sid for r in self.stores.registry.live(self.clock(), session.user)}
        if sid == session.sid or sid not in live:
            raise Refused(404, "msg_gone")
        self.stores.registry.end([sid], "ended_from_account", self.clock())
        return self.changed(request, session, "session_ended", "session_ended")

    def end_others(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        self.stores.registry.end_user(session.user, "ended_from_account", self.clock(),
                                      keep=session.sid)
        return self.changed(request, session, "others_ended", "others_ended")

    def end_all(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        """Log out everywhere, this browser too, and revoke every API token: what to press when a
        cookie may have been copied (a copy is a session like any other)."""
        now = self.clock()
        ended = self.stores.registry.end_user(session.user, "ended_everywhere", now)
        revoked = self.stores.tokens.revoke_user(session.user, now)
        log.info("event=account_ended_everywhere user=%s ip=%s sessions=%d tokens_revoked=%d",
                 logval(session.user), logval(request.client_ip), ended, revoked)
        return Response(303, b"", [("Location", f"{PREFIX}/login"),
                                   *self.cookies.clear_session(request),
                                   ("Cache-Control", "no-store")])

    def change_password(self, request: Request, session: Session,
                        form: Mapping[str, str]) -> Response:
        """A new password ends every other session and, unless the user keeps them, revokes their
        API tokens (made with the old password, perhaps by someone who had it); this one goes on."""
        new = form.get("new", "")
        if len(new) < MIN_PASSWORD:
            raise Refused(400, "msg_password_short")
        if not hmac.compare_digest(new.encode(), form.get("again", "").encode()):
            raise Refused(400, "msg_password_mismatch")
        self.confirm(request, session, form)
        now, stores, kept = self.clock(), self.stores, form.get("keep_tokens") in ("1", "on", "yes")
        stores.users.set_password(session.user, new)
        stores.registry.end_user(session.user, "password_changed", now, keep=session.sid)
        revoked = 0 if kept else stores.tokens.revoke_user(session.user, now)
        token, renewed = stores.sessions.sign(session.user, now, session.remember, session.sid,
                                              session.auth_time)
        stores.registry.refingerprint(session.sid, renewed.fingerprint, now)
        stores.registry.seen(session.sid, now, request.client_ip, renewed.expires)
        notice = "password_changed_kept" if kept else "password_changed"
        return self.changed(request, session, "password_changed", notice,
                            self.session_cookie(request, token, renewed), revoked=revoked)

    def totp_begin(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        """Show a new secret (QR code and text); it takes effect only once a code from it is
        confirmed, with the password, so nothing here needs the password yet."""
        if self.stores.totp.enrolled(session.user):
            raise Refused(409, "msg_totp_already_on")
        now, secret = self.clock(), secrets.token_bytes(20)
        enrollment = issue_enrollment(session.user, session.fingerprint, secret,
                                      self.stores.keys.signer(now), now)
        view = self.account_view(session, enrollment=self.enrollment(session, enrollment))
        return self.pages.account(request, 200, view)

    def enrollment(self, session: Session, token: str) -> tuple[str, str, str]:
        """(secret as shown, otpauth URI, TOKEN) of a two-factor set-up still under way for
        SESSION's user, so a mistyped password or code does not make them scan a new secret; else
        empty."""
        try:
            user, fingerprint, secret = read_enrollment(token, self.stores.keys, self.clock())
        except InvalidSession:
            return "", "", ""
        if (user, fingerprint) != (session.user, session.fingerprint):
            return "", "", ""
        return base64.b32encode(secret).decode().rstrip("="), totp_uri(user, secret), token

    def totp_confirm(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        now = self.clock()
        try:
            user, fingerprint, secret = read_enrollment(form.get("enrollment", ""),
                                                        self.stores.keys, now)
        except InvalidSession:
            raise Refused(400, "msg_too_slow") from None
        if (user, fingerprint) != (session.user, session.fingerprint):
            raise Refused(400, "msg_too_slow")
        # A new secret in place of the old needs the old one's code first.
        if self.stores.totp.enrolled(user):
            raise Refused(409, "msg_totp_already_on")
        self.confirm(request, session, form)
        attempt = self.reserve(request, user, now, "step=enroll ")
        step = matching_step(secret, form.get("code", "").replace(" ", ""), now, -1)
        if step is None:
            self.refuse(request, attempt, user, now, "step=enroll ")
            raise Refused(401, "msg_wrong_code")
        self.stores.throttle.succeeded(attempt)
        self.stores.totp.enroll(user, secret, used_step=step)
        return self.changed(request, session, "totp_on", "totp_on")

    def totp_off(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        self.confirm(request, session, form)
        now = self.clock()
        attempt = self.reserve(request, session.user, now, "step=code ")
        if not self.stores.totp.accept(session.user, form.get("code", "").replace(" ", ""), now):
            self.refuse(request, attempt, session.user, now, "step=code ")
            raise Refused(401, "msg_wrong_code")
        self.stores.throttle.succeeded(attempt)
        self.stores.totp.remove(session.user)
        return self.changed(request, session, "totp_off", "totp_off")

    def token_create(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        """A new API token, shown on this page once (never in a URL)."""
        self.confirm(request, session, form)
        days = form.get("days", "").strip()
        try:
            token, secret = self.stores.tokens.add(session.user, form.get("label", "").strip(),
                                                   self.clock(), int(days) if days else None,
                                                   form.get("paths", "").split())
        except ValueError:
            raise Refused(400, "msg_bad_token") from None
        log.info("event=account_token_created user=%s ip=%s token=%s", logval(session.user),
                 logval(request.client_ip), token.id)
        return self.pages.account(request, 200, self.account_view(session, new_token=secret))

    def token_revoke(self, request: Request, session: Session, form: Mapping[str, str]) -> Response:
        if not self.stores.tokens.revoke(form.get("id", ""), self.clock(), user=session.user):
            raise Refused(404, "msg_gone")
        return self.changed(request, session, "token_revoked", "token_revoked")


AccountChange = Callable[[AccountFlow, Request, Session, Mapping[str, str]], Response]
ACCOUNT_ACTIONS: dict[str, AccountChange] = {
    "end_session": AccountFlow.end_session, "end_others": AccountFlow.end_others,
    "end_all": AccountFlow.end_all, "password": AccountFlow.change_password,
    "totp_begin": AccountFlow.totp_begin, "totp_confirm": AccountFlow.totp_confirm,
    "totp_off": AccountFlow.totp_off, "token_create": AccountFlow.token_create,
    "token_revoke": AccountFlow.token_revoke,
}


STATIC_PATH = f"{PREFIX}/static/"  # the static route takes every path under it
STATIC_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"
STATIC_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".webp": "image/webp", ".ico": "image/x-icon", ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8", ".json": "application/json",
}


def find_static(name: str, roots: Iterable[Path]) -> Path | None:
    """The file NAME in the first root that has it; never anything outside those folders."""
    if not STATIC_NAME_RE.fullmatch(name) or Path(name).suffix.lower() not in STATIC_TYPES:
        return None
    for root in roots:
        candidate = root / name
        try:
            resolved = candidate.resolve(strict=True)
            inside = resolved.parent == root.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if inside and resolved.is_file():
            return resolved
    return None


@dataclass(eq=False)
class SmallRoutes(Flow):
    """The routes of no flow: healthz, the forbidden page nginx shows, metrics, static files."""

    static_roots: tuple[Path, ...] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.static_roots = (self.settings.data_dir / "static", HERE / "static")

    def healthz(self, request: Request) -> Response:
        return text_response(200, "ok")

    def forbidden(self, request: Request) -> Response:
        return self.pages.forbidden(request)

    def metrics_page(self, request: Request) -> Response:
        # The visitor as resolved through trusted proxies: via nginx the peer is always loopback.
        client = request.client_ip
        if not self.settings.metrics or not (
                ip_in(client, LOOPBACK) or ip_in(client, self.settings.trusted_proxies)):
            return text_response(404, "not found")
        body = self.metrics.render(self.stores.counter.current(), self.gate.waiting).encode()
        return Response(200, body, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
                                    ("Cache-Control", "no-store")])

    def static(self, request: Request) -> Response:
        path = find_static(request.path[len(STATIC_PATH):], self.static_roots)
        if path is None:
            return text_response(404, "not found")
        st = path.stat()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        headers = [("Content-Type", STATIC_TYPES[path.suffix.lower()]), ("ETag", etag),
                   ("Cache-Control", "public, max-age=3600"),
                   ("Content-Security-Policy", STATIC_CSP), ("X-Content-Type-Options", "nosniff")]
        if request.header("If-None-Match") == etag:
            return Response(304, b"", headers[1:])
        return Response(200, path.read_bytes(), headers)


# -- Verify ---------------------------------------------------------------------------------
# What nginx asks on every request to the app (auth_request): who is this, and may they go where
# they are going? It stands alone, right above the application that routes to it, so a request
# reads from nginx to verify to the answer in one stretch. Cheap by design: no disk, and no scrypt
# but for HTTP Basic with a password (which the server then answers in its thread pool).


@dataclass(eq=False)
class Verify(Flow):
    """200 with the user for a live session cookie, an API token or (when on) HTTP Basic, when the
    access rules let them in; 200 without one for a path the rules make public; else 401, which
    sends a browser to the login page, or 403 when the rules keep a proven user out."""

    basic_cache: BasicCache = field(default_factory=BasicCache)
    proxy_names: tuple[str, str, str] = field(init=False)
    by_nginx: bool = field(init=False)  # the proxy's family of headers is X-Original-* (nginx)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.proxy_names = PROXY_HEADERS[self.settings.proxy_headers]
        self.by_nginx = self.proxy_names is PROXY_HEADERS["original"]

    def verify(self, request: Request) -> Response:
        now = self.clock()
        if self.stores.registry_stale(now):
            return self.blind()
        cookies = self.cookies.read(request)
        tokens = cookies.tokens
        if len(tokens) > MAX_SESSION_COOKIES:
            log.warning("event=verify_refused reason=too_many_session_cookies count=%d ip=%s",
                        len(tokens), logval(request.client_ip))
            return self.deny(request, True, "too_many_cookies")
        sessions = [s for t in tokens if (s := self.stores.sessions.check(t, now)) is not None]
        if len(sessions) > 1 and any(s.user != sessions[0].user for s in sessions):
            # A browser holds one login; two users' sessions mean one was tossed in (by a sibling
            # host under EZAUTH_COOKIE_DOMAIN, say) to make the visitor act as someone else.
            log.warning("event=verify_refused reason=sessions_of_two_users ip=%s",
                        logval(request.client_ip))
            return self.deny(request, True)
        if sessions:
            return self.grant_session(request, sessions[0], now, cookies.app_cookie)
        authorization = request.header("Authorization")
        if (authorization[:7].lower() == "bearer "
                and authorization[7:].strip().startswith(TOKEN_PREFIX)):
            return self.verify_api_token(request, authorization[7:].strip(), None, now, cookies)
        if authorization[:6].lower() == "basic ":
            return self.verify_basic(request, now, cookies)
        return self.public(request, cookies) or self.deny(request, bool(tokens))

    def blind(self) -> Response:
        """503 while the registry is unreadable past its grace: a session ended or a token revoked
        meanwhile would be missed, so nobody gets in (nginx: "sign-in service not available")."""
        self.metrics.verify_denied += 1
        return text_response(503, "the session registry cannot be read; see the ezauth log")

    def grant_session(self, request: Request, session: Session, now: float,
                      app_cookie: str | None) -> Response:
        headers = [("X-Auth-Request-User", session.user), ("Cache-Control", "no-cache")]
        renewed = self.stores.sessions.renew(session, now)
        if renewed:
            self.metrics.sessions_renewed += 1
            headers.append(self.session_cookie(request, *renewed))
        registry = self.stores.registry
        # A renewal's new expiry always reaches the registry.
        if renewed or registry.stale(session.sid, now):
            registry.seen(session.sid, now, request.client_ip,
                          (renewed[1] if renewed else session).expires)
        return self.grant(request, session.user, headers, app_cookie)

    def grant(self, request: Request, user: str, headers: list[tuple[str, str]],
              app_cookie: str | None) -> Response:
        """200 for a proven USER, unless the request's host is in doubt or the rules keep them off
        this host, port and path (403). APP_COOKIE: the app's Cookie header, without ezauth's."""
        if not (self.one_host(request) and self.ruled_in(request, user)):
            return self.forbid()
        return self.allowed(request, headers, app_cookie)

    def forbid(self) -> Response:
        """403 for nginx: a proven user, kept out of this host, port or path."""
        self.metrics.verify_denied += 1
        return Response(403, b"", [("Cache-Control", "no-cache")])

    def allowed(self, request: Request, headers: list[tuple[str, str]],
                app_cookie: str | None) -> Response:
        """200, telling nginx which of the client's credentials and cookies to keep from the app."""
        authorization = request.header("Authorization")
        if authorization and ezauth_credentials(authorization, self.settings.basic_auth):
            headers.append(("X-Ezauth-Authorization", "strip"))  # nginx keeps them from the app
        if app_cookie is not None:  # nginx passes this on instead of the Cookie header (";": ours)
            headers.append(("X-Ezauth-App-Cookie", f";{app_cookie}"))
        self.metrics.verify_allowed += 1
        return Response(200, b"", headers)

    def one_host(self, request: Request) -> bool:
        """Whether the host nginx judged (X-Original-Host: the request line's) is the one the app
        gets (Host): `GET http://public.example.com/` with `Host: private.example.com` is not."""
        original_host = request.header("X-Original-Host") if self.by_nginx else ""
        if (not original_host or original_host == request.header("Host")
                or bare_host(original_host) == request.host):
            return True
        log.warning("event=verify_refused reason=host_mismatch host=%s original_host=%s ip=%s",
                    logval(request.host), logval(original_host), logval(request.client_ip))
        return False

    def ruled_in(self, request: Request, user: str | None, quiet: bool = False) -> bool:
        """Whether the access rules let USER (None: a visitor not logged in) reach the request's
        host, port and path. Rules judge only what the proxy names: without its URI (or a port some
        rule needs) nothing is allowed, never `/` instead. QUIET: no log line for a refusal."""
        rules = self.stores.rules.rules
        if rules is None:
            return True
        original = request.original(self.proxy_names)
        host = original.host or (request.header("Host") if self.by_nginx else "")
        missing = ("uri" if not original.uri else "host" if not host else
                   "port" if rules.by_port and not original.port else "")
        if missing:
            log.warning("event=no_original_%s user=%s ip=%s note=the_proxy_must_send_%s", missing,
                        logval(user or "-"), logval(request.client_ip), "_".join(self.proxy_names))
            return False
        target = Target(bare_host(host), original.port,
                        request.client_ip if rules.by_network else "")
        if rules.allows_every(user, target, original.uri):
            return True
        if not quiet:
            log.info("event=access_denied user=%s host=%s port=%s path=%s", logval(user or "-"),
                     logval(target.host), logval(target.port or "-"),
                     logval(logged_path(original.uri)))
        return False

    def public(self, request: Request, cookies: SessionCookies) -> Response | None:
        """200 without a user where the rules let anyone in (`allow anyone ...`), else None."""
        rules = self.stores.rules.rules
        if rules is None or not rules.public or not (
                self.one_host(request) and self.ruled_in(request, None, True)):
            return None
        return self.allowed(request, [("Cache-Control", "no-cache")], cookies.app_cookie)

    def deny(self, request: Request, had_cookie: bool, error: str = "",
             *headers: tuple[str, str]) -> Response:
        """401 for nginx. A browser navigating is sent to the login page; anything else gets a short
        JSON answer saying ERROR (X-Ezauth-Error), and nginx makes a lockout 429 (Retry-After)."""
        self.metrics.verify_denied += 1
        error = error or ("" if navigates(request) else "login_required")
        challenge = ([("WWW-Authenticate", 'Bearer realm="ezauth"')] if error == "login_required"
                     else [])
        back = return_target(request, self.proxy_names, self.settings.portal)
        login = login_url(back, had_cookie, self.settings.portal)
        return Response(401, b"", [("X-Ezauth-Login", login), ("Cache-Control", "no-cache"),
                                   *([("X-Ezauth-Error", error)] if error else []),
                                   *challenge, *headers])

    def verify_api_token(self, request: Request, secret: str, name: str | None, now: float,
                         cookies: SessionCookies) -> Response:
        """An API token, as a bearer token or as HTTP Basic's password: one SHA-256, no scrypt."""
        token = self.stores.tokens.check(secret, now) or self.stores.look_again(secret, now)
        if (token is None or name not in (None, token.user)
                or self.stores.users.fingerprint(token.user) is None):
            log.warning("event=token_rejected ip=%s", logval(request.client_ip))
            scheme = "Basic" if name is not None else "Bearer"
            return self.deny(request, bool(cookies.tokens), "wrong_credentials",
                             ("WWW-Authenticate", f'{scheme} realm="ezauth"'))
        uri = request.original(self.proxy_names).uri
        if token.paths and not uri:
            log.warning("event=no_original_uri user=%s token=%s ip=%s", logval(token.user),
                        token.id, logval(request.client_ip))
            return self.forbid()
        if not token.allows(uri):
            log.info("event=access_denied user=%s token=%s reason=outside_token_paths",
                     logval(token.user), token.id)
            return self.forbid()
        self.stores.tokens.used(token, now)
        headers = [("X-Auth-Request-User", token.user), ("Cache-Control", "no-cache")]
        return self.grant(request, token.user, headers, cookies.app_cookie)

    def verify_basic(self, request: Request, now: float, cookies: SessionCookies) -> Response:
        """HTTP Basic for API clients: an API token as the password, or (with EZAUTH_BASIC_AUTH) the
        user's password, checked once (scrypt, lockout) and then cached for a minute."""
        credentials = parse_basic(request.header("Authorization"))
        if credentials is not None and credentials[1].startswith(TOKEN_PREFIX):
            return self.verify_api_token(request, credentials[1], credentials[0], now, cookies)
        had_cookie = bool(cookies.tokens)
        if not self.settings.basic_auth:
            return self.deny(request, had_cookie)
        try:
            if credentials is not None:
                digest = self.basic_cache.digest(*credentials)
                user = (self.basic_cache.get(digest, self.stores.factors, now)
                        or self.check_basic(request, *credentials, digest, now))
                if user is not None:
                    headers = [("X-Auth-Request-User", user), ("Cache-Control", "no-cache")]
                    return self.grant(request, user, headers, cookies.app_cookie)
        except Refused as locked:
            return self.deny(request, had_cookie, "too_many_attempts",
                             ("Retry-After", str(locked.retry_after)))
        # WWW-Authenticate only to a client that sent credentials: no password dialog in a browser.
        return self.deny(request, had_cookie, "wrong_credentials",
                         ("WWW-Authenticate", 'Basic realm="ezauth"'))

    def check_basic(self, request: Request, name: str, password: str, digest: bytes,
                    now: float) -> str | None:
        """The user these HTTP Basic credentials prove, or None; Refused (429) while locked out."""
        attempt = self.reserve(request, name, now, "via=basic ")
        if self.basic_cache.get(digest, self.stores.factors, now):  # a parallel request proved it
            self.stores.throttle.succeeded(attempt)
            return name
        # Two-factor users cannot skip their code so (checked after scrypt, to take the same time).
        if not self.password_ok(request, name, password) or self.stores.totp.enrolled(name):
            self.refuse(request, attempt, name, now, "via=basic ")
            return None
        self.stores.throttle.succeeded(attempt)
        self.metrics.logins_ok += 1
        log.info("event=login_ok via=basic user=%s ip=%s", logval(name), logval(request.client_ip))
        self.basic_cache.put(digest, name, self.stores.factors(name) or "", now)
        return name


# -- Application ----------------------------------------------------------------------------

Handler = Callable[[Request], Response]
VERIFY_PATH, HEALTHZ_PATH = f"{PREFIX}/verify", f"{PREFIX}/healthz"


def refused_unless(allowed: Callable[[Request], bool], header: str, refusal: str, message: str,
                   handler: Handler) -> Handler:
    """HANDLER where the browser's Fetch Metadata allows it; else 403 with MESSAGE, and a log line
    with REFUSAL and the HEADER the browser sent."""
    def answer(request: Request) -> Response:
        if allowed(request):
            return handler(request)
        log.warning("%s=%s path=%s ip=%s", refusal, logval(request.header(header)),
                    logval(request.path), logval(request.client_ip))
        return text_response(403, message)
    return answer


def navigation_only(handler: Handler) -> Handler:
    """A GET of a page that holds a token authorizing changes (the CSRF token) shares its origin
    with the app, and any script the app serves could fetch it: answered only to a top-level
    navigation, anything else gets 403 without a token in it."""
    return refused_unless(top_level_navigation, "Sec-Fetch-Dest",
                          "event=page_refused reason=not_a_navigation dest",
                          "ezauth: this page opens only on its own, not inside another page or a "
                          "script", handler)


def on_portal(portal: str, handler: Handler) -> Handler:
    """With a PORTAL, ezauth's pages exist only on that host: an app host (whose scripts are not the
    portal's) sends a page view there, path and query kept, and makes no change itself."""
    if not portal:
        return handler
    portal_host = bare_host(urllib.parse.urlsplit(portal).netloc)

    def answer(request: Request) -> Response:
        if request.host == portal_host:
            return handler(request)
        if request.method in ("GET", "HEAD"):
            query = request.environ.get("QUERY_STRING", "")
            location = f"{portal}{request.path}" + (f"?{query}" if query else "")
            return Response(303, b"", [("Location", location), ("Cache-Control", "no-store")])
        log.warning("event=change_refused reason=not_the_portal host=%s path=%s ip=%s",
                    logval(request.host), logval(request.path), logval(request.client_ip))
        return text_response(403, f"ezauth: changes are made on {portal} only")
    return answer


def same_origin_only(handler: Handler) -> Handler:
    """A POST that changes something: only from a page of this origin, where the browser says so."""
    return refused_unless(same_origin_post, "Sec-Fetch-Site",
                          "event=change_refused reason=cross_site site",
                          "ezauth: changes are accepted only from ezauth's own pages", handler)


class EzauthApp:
    """The WSGI callable: one route table, one catch-all for unexpected errors, and the one place
    that adds Content-Length and drops the body of a HEAD answer."""

    def __init__(self, settings: Settings, stores: Stores, routes: dict[tuple[str, str], Handler],
                 metrics: Metrics, clock: Clock) -> None:
        self.settings, self.stores, self.routes = settings, stores, routes
        self.metrics, self.clock = metrics, clock

    # The seam between the app and the servers. gunicorn (any WSGI server) calls __call__. The
    # built-in server (HTTP server, below) is handed three methods in a Routing (serve, in the CLI,
    # builds it) and calls nothing else of the app. Per request: answers_inline(environ) on its
    # event loop (answer right there, or in the thread pool?), body_limit(environ) before a byte of
    # the body is read, then respond(environ), on the loop or a pool thread; __call__ uses respond.

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., object]) -> list[bytes]:
        status, headers, body = self.respond(environ)
        start_response(status, headers)
        return [body]

    def respond(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        """Status line, headers (Content-Length included) and body of the answer to one request:
        what __call__ hands to any WSGI server, and what the built-in server sends without WSGI's
        detour."""
        request = Request(environ, self.settings.trusted_proxies)
        started = time.monotonic() if self.settings.access_log else 0.0
        try:
            rotated = self.stores.refresh(self.clock())
            if rotated:
                self.metrics.key_rotations += rotated
            response = self.dispatch(request)
        except StoreUnavailable as err:
            # The file whole (logval would cut a long path): the one thing the operator must find.
            log.error("event=store_unavailable method=%s path=%s file=%s error=%s "
                      "action=refused_503", logval(request.method), logval(request.path),
                      json.dumps(str(err.path)), logval(err.error))
            busy = "ezauth cannot save this right now; try again in a minute"
            response = text_response(503, busy, ("Retry-After", "60"))
        except Exception:
            log.exception("event=error method=%s path=%s", logval(request.method),
                          logval(request.path))
            response = text_response(500, "internal error")
        if self.settings.access_log:
            self.log_request(request, response, (time.monotonic() - started) * 1000)
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        return response.status_line, headers, b"" if request.method == "HEAD" else response.body

    def log_request(self, request: Request, response: Response, ms: float) -> None:
        """EZAUTH_ACCESS_LOG's line, whichever server runs the app. A verify's names the request
        nginx asked about: its host, its path without the query string (which may carry tokens)
        and the user it let in, not /ezauth/verify."""
        if request.path != VERIFY_PATH:
            log.info("event=request method=%s path=%s status=%d ip=%s ms=%.1f",
                     logval(request.method), logval(request.path), response.status,
                     logval(request.client_ip), ms)
            return
        original = request.original(PROXY_HEADERS[self.settings.proxy_headers])
        user = next((value for name, value in response.headers if name == "X-Auth-Request-User"),
                    "-")
        log.info("event=verify method=%s host=%s path=%s status=%d user=%s ip=%s ms=%.1f",
                 logval(request.method), logval(bare_host(original.host or request.header("Host"))
                                                or "-"),
                 logval(original.uri.partition("?")[0] or "-"), response.status, logval(user),
                 logval(request.client_ip), ms)

    def answers_inline(self, environ: Mapping[str, Any]) -> bool:
        """Cheap enough for the event loop: healthz, and verify unless it may hash a password."""
        path = environ.get("PATH_INFO")
        if path == HEALTHZ_PATH:
            return True
        if path != VERIFY_PATH:
            return False
        return not (self.settings.basic_auth
                    and hashes_a_password(str(environ.get("HTTP_AUTHORIZATION", ""))))

    def body_limit(self, environ: Mapping[str, Any]) -> int:
        """The largest request body any route reads: the login form."""
        return MAX_FORM

    def dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler:
            return handler(request)
        if request.path.startswith(STATIC_PATH):
            if method != "GET":
                return self.not_allowed(("GET", "HEAD"))
            return self.routes[("GET", STATIC_PATH)](request)
        allowed = sorted({m for m, p in self.routes if p == request.path})
        if allowed:
            return self.not_allowed((*allowed, "HEAD") if "GET" in allowed else allowed)
        return text_response(404, "not found")

    @staticmethod
    def not_allowed(methods: Iterable[str]) -> Response:
        return text_response(405, "method not allowed", ("Allow", ", ".join(methods)))



def make_app(settings: Settings, clock: Clock = time.time) -> EzauthApp:
    """The service: the stores in the data dir, the pages, the flows and the one route table."""
    stores = Stores.open(settings, clock)
    cookies = CookiePolicy(settings.cookie_name, settings.cookie_domain, settings.cookie_secure)
    pages = Pages(settings, load_template(settings.data_dir),
                  load_template(settings.data_dir, "account.html", ACCOUNT_FIELDS),
                  stores.counter, cookies)
    metrics = Metrics(started=clock())
    shared = (settings, stores, pages, clock, metrics, HashGate())  # one of each for every flow
    login, account, small = LoginFlow(*shared), AccountFlow(*shared), SmallRoutes(*shared)
    verify = Verify(*shared)

    def page(handler: Handler) -> Handler:
        return navigation_only(on_portal(settings.portal, handler))

    def change(handler: Handler) -> Handler:
        # A form posts as a navigation; a script's fetch() would read the refusal, and a refused
        # form shows the page again with its CSRF token in it.
        return same_origin_only(navigation_only(on_portal(settings.portal, handler)))

    routes: dict[tuple[str, str], Handler] = {
        ("GET", f"{PREFIX}/login"): page(login.login_page),
        ("POST", f"{PREFIX}/login"): change(login.login_submit),
        # auth_request subrequests keep the method of the request they check.
        **{(method, f"{PREFIX}/verify"): verify.verify
           for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")},
        ("GET", f"{PREFIX}/logout"): page(login.logout_page),
        ("POST", f"{PREFIX}/logout"): change(login.logout),
        ("GET", f"{PREFIX}/healthz"): small.healthz,
        ("GET", f"{PREFIX}/forbidden"): small.forbidden,
        ("GET", ACCOUNT): page(account.account_page),
        ("POST", ACCOUNT): change(account.account_submit),
        ("GET", f"{PREFIX}/metrics"): small.metrics_page,
        ("GET", STATIC_PATH): small.static,  # and every path under it (EzauthApp.dispatch)
    }
    for name, _ in settings.legacy_users:
        log.warning("event=legacy_env_user user=%s "
                    "note=password_from_.env_run_'python ezauth.py passwd %s'",
                    logval(name), logval(name))
    return EzauthApp(settings, stores, routes, metrics, clock)


# -- HTTP server ----------------------------------------------------------------------------
# Our own because wsgiref serves one request per connection. The parsing and the answers' bytes
# are ours and strict, and so is each connection's life: one phase at a time (Phase), at most one
# answer owed, nothing read while it is owed, and a pool of connections per kind of peer that a
# full server takes room from in O(1). asyncio's loop runs it: readiness callbacks, the deadline
# sweep's timer, the hand-off to threads, signals. The section uses nothing above it but `log` and
# `logval`; the app reaches it through the WSGI callable and `Routing`.

WSGIApp = Callable[[dict[str, Any], Callable[..., object]], Iterable[bytes]]
FIRST_BYTE_TIMEOUT = 5.0  # a new connection that says nothing is dropped this soon
HEAD_TIMEOUT = 10.0  # a whole request head must arrive this fast after its first byte
BODY_TIMEOUT = 30.0
WRITE_TIMEOUT = 10.0  # an answer not taken this long after it was ready: the connection is reset
IDLE_TIMEOUT = 75.0  # between requests; longer than nginx's upstream keepalive_timeout (60 s)
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
MAX_BLANK_BYTES = 8  # CR/LF before a request line (RFC 9112 2.2: skip "at least one" empty line)
MAX_CONNECTIONS = 1000  # clients other than trusted proxies, all together ...
MAX_PER_ADDRESS = 64  # ... and per IPv4 address or IPv6 /64 (one host may hold a whole /64)
# On top, kept for trusted proxies (nginx's `keepalive 64` on four workers): they may use every
# connection, but others never take these. Not unlimited: every local process is "trusted" too.
PROXY_CONNECTIONS = 256
ACCEPT_BATCH = 64  # connections taken per wake-up of the listening socket, so the others get a turn
POOL_THREADS = 8
SWEEP_EVERY = 0.25  # how often deadlines are looked at: the timeouts are this much late at most
RECEIVE_SIZE = 64 * 1024
# The flag for an answer the connection closes after: Linux holds it back until the close, which it
# then sends in the same packet (one trip through loopback instead of two, for the client as well).
# Only when nothing the client sent is left unread: closing on unread bytes resets the connection,
# and an answer held back is then never sent.
LAST_WRITE = getattr(socket, "MSG_MORE", 0)
HEAD_END_RE = re.compile(rb"\n\r?\n")  # a literal first byte lets re skip; parse_head strips the \r
BARE_CR_RE = re.compile(rb"\r(?!\n)")
BLANK_LINES_RE = re.compile(rb"(?:\r?\n)*")  # empty lines before a request line; not a lone CR
TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE_RE = re.compile(rf"({TCHARS}) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r?")
BAD_FIELD_LINE_RE = re.compile(rf"\n(?!{TCHARS}:)")
HEAD_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])  # what a head may hold
DIGITS_RE = re.compile(r"[0-9]+")
HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(:[0-9]*)?")


class HTTPError(Exception):
    """A request the server refuses itself (status), then closes the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]


def parse_head(head: bytes) -> RequestHead:
    """The request line and header fields of HEAD (without its blank line), strictly by RFC 9112."""
    head = head.removesuffix(b"\r")  # the CR of the last line's CRLF
    # No NUL or other control bytes anywhere, and no CR that does not end a line.
    if head.translate(None, HEAD_BYTES) or BARE_CR_RE.search(head):
        raise HTTPError(400)
    text = head.decode("latin-1")
    request_line, _, fields = text.partition("\n")
    line = REQUEST_LINE_RE.fullmatch(request_line)
    if line is None:
        raise HTTPError(400)
    method, target, version = line.groups()
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(505)
    # Every field line starts with a token and its colon: no "Name : value", obs-fold or empty name.
    if BAD_FIELD_LINE_RE.search(text, len(request_line)):
        raise HTTPError(400)
    headers = []
    for field_line in fields.split("\n") if fields else ():
        name, _, value = field_line.partition(":")
        headers.append((name, value.strip(" \t\r")))
    if len(headers) > MAX_HEADERS:
        raise HTTPError(431)
    return RequestHead(method, target, version, tuple(headers))


def split_target(target: str) -> tuple[str, str, str | None]:
    """(path, query, authority) of an origin-form or absolute-form target; the authority,
    when there is one, overrides Host (RFC 9112 3.2.2)."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query, None
    if not target.lower().startswith(("http://", "https://")):
        raise HTTPError(400)  # authority-form (CONNECT) and asterisk-form are not served here
    try:
        parts = urllib.parse.urlsplit(target)
        _ = parts.port
    except ValueError:
        raise HTTPError(400) from None
    if not parts.hostname or "@" in parts.netloc or not HOST_RE.fullmatch(parts.netloc):
        raise HTTPError(400)
    return parts.path or "/", parts.query, parts.netloc


ENVIRON_KEYS: dict[str, str] = {}  # header name -> environ key, for the names nginx always sends


def environ_key(name: str) -> str:
    """The environ key of header NAME; "" for a name with "_" (X_Forwarded_For and
    X-Forwarded-For would share one key: the ambiguity is refused by dropping it)."""
    key = "" if "_" in name else name.upper().replace("-", "_")
    key = key if key in ("", "CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}"
    if len(ENVIRON_KEYS) < 256:
        ENVIRON_KEYS[name] = key
    return key


def header_environ(headers: Iterable[tuple[str, str]],
                   environ: dict[str, Any] | None = None) -> dict[str, Any]:
    """HTTP_* keys (PEP 3333) from header fields, put into ENVIRON (a new dict when not given);
    repeats joined once, in linear time."""
    environ = {} if environ is None else environ
    repeated: dict[str, list[str]] = {}
    for name, value in headers:
        key = ENVIRON_KEYS.get(name) or environ_key(name)
        if not key:
            continue
        if key in environ:
            repeated.setdefault(key, [environ[key]]).append(value)
        else:
            environ[key] = value
    for key, values in repeated.items():
        if key in ("HTTP_HOST", "CONTENT_LENGTH", "CONTENT_TYPE"):
            raise HTTPError(400)  # even `Content-Length:`, `Content-Length: 5`: a smuggling classic
        environ[key] = ("; " if key == "HTTP_COOKIE" else ", ").join(values)
    return environ


def build_environ(base: Mapping[str, Any], head: RequestHead,
                  peer: tuple[str, int]) -> dict[str, Any]:
    """A WSGI environ (PEP 3333) for one request; HTTPError for one that must not be answered."""
    path, query, authority = split_target(head.target)
    environ = header_environ(head.headers, dict(base))  # the base holds no HTTP_ or CONTENT_ key
    host = environ.get("HTTP_HOST")  # checked as sent, even when the target's authority replaces it
    if (host is None and head.version == "HTTP/1.1") or (
            host is not None and not HOST_RE.fullmatch(str(host))):
        raise HTTPError(400)
    if authority is not None:
        environ["HTTP_HOST"] = authority
    if "HTTP_TRANSFER_ENCODING" in environ:
        raise HTTPError(400 if "CONTENT_LENGTH" in environ else 411)
    length = str(environ.get("CONTENT_LENGTH", "0"))
    if not DIGITS_RE.fullmatch(length):
        raise HTTPError(400)  # only ASCII digits: "²".isdigit() is true, and int() would take it
    if len(length) > 18:
        raise HTTPError(413)  # more than any route reads, and more digits than int() may take
    environ.update(REQUEST_METHOD=head.method, SERVER_PROTOCOL=head.version, QUERY_STRING=query,
                   PATH_INFO=(urllib.parse.unquote_to_bytes(path).decode("latin-1") if "%" in path
                              else path),
                   REMOTE_ADDR=peer[0], REMOTE_PORT=str(peer[1]))
    return environ


def run_wsgi(app: WSGIApp, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Call a WSGI app and collect its whole response (ezauth's responses are small)."""
    started: list[object] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: object = None) -> Callable[[bytes], None]:
        started[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not started:
        raise RuntimeError("the application did not call start_response")
    return cast(str, started[0]), cast("list[tuple[str, str]]", started[1]), b"".join(chunks)


_date_cache: list[object] = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return cast(str, _date_cache[1])


def serialize_response(status: str, headers: list[tuple[str, str]], body: bytes, keep_alive: bool,
                       head_only: bool) -> bytes:
    """Status line, headers and body as one buffer: one send, so no Nagle/delayed-ACK stall."""
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers]
    # ezauth's app puts Content-Length last; any other WSGI app gets it counted here when missing.
    if not (headers and headers[-1][0] == "Content-Length") and not any(
            name.lower() == "content-length" for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Date: {http_date()}")
    if not keep_alive:
        lines.append("Connection: close")
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("a response header holds a line break")
    head = (text + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def error_bytes(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase
    return serialize_response(f"{status} {phrase}", [("Content-Type", "text/plain; charset=utf-8")],
                              f"{phrase.lower()}\n".encode(), keep_alive=False, head_only=False)


@dataclass(frozen=True)
class Routing:
    """The one seam between the server and the app. Per request the server calls `inline` (answer
    on the event loop, or in the thread pool?), `body_limit` (before any of the body is read) and
    `respond` (the answer without WSGI's start_response detour; without it, the WSGI callable)."""

    inline: Callable[[Mapping[str, Any]], bool]  # cheap enough to answer on the event loop
    body_limit: Callable[[Mapping[str, Any]], int]  # the largest body the route accepts
    respond: Callable[[dict[str, Any]], tuple[str, list[tuple[str, str]], bytes]] | None = None


class Phase(enum.Enum):
    """Where a connection is. Everything the server does with one follows from its phase: whether
    it is read, which deadline it has, whether a full server may drop it (h11 keeps state so)."""

    NEW = "new"  # accepted, not a byte yet
    HEAD = "head"  # part of a request head has come
    BODY = "body"  # a whole head; its body is coming
    ANSWERING = "answering"  # the app works on a request, or its answer waits to be read
    IDLE = "idle"  # between the requests of a kept-alive connection
    CLOSING = "closing"  # the last answer waits for the client to read it; then the socket closes
    CLOSED = "closed"

    __hash__ = object.__hash__  # Enum's own hashes the name in Python; phases are looked up a lot


# A connection is read only in these phases: while an answer is owed nothing more is read, so a
# client that never reads holds at most one answer, an unfinished request and one receive's bytes.
READING = frozenset({Phase.NEW, Phase.HEAD, Phase.BODY, Phase.IDLE})
# A full server drops the cheapest connection, in this order: one that only waits to finish closing,
# then silent ones and half-sent heads (oldest first), the longest idle, a body still on its way.
EVICTION_ORDER = (Phase.CLOSING, Phase.NEW, Phase.HEAD, Phase.IDLE, Phase.BODY)


class Pool:
    """The connections of one kind of peer (trusted proxies, or everyone else): how many, how many
    per address, and each phase's connections in the order they entered it, so the cheapest is
    found in O(1)."""

    def __init__(self) -> None:
        self.count = 0
        self.addresses: dict[str, int] = {}
        self.phases: dict[Phase, OrderedDict[Connection, None]] = {p: OrderedDict() for p in Phase}

    def cheapest(self) -> Connection | None:
        """The connection a full server drops first, if any may be dropped."""
        return next((next(iter(self.phases[p])) for p in EVICTION_ORDER if self.phases[p]), None)

    def add(self, conn: Connection) -> None:
        self.phases[conn.phase][conn] = None
        self.count += 1
        self.addresses[conn.address] = self.addresses.get(conn.address, 0) + 1

    def move(self, conn: Connection, old: Phase, new: Phase) -> None:
        """CONN leaves phase OLD for NEW (the same phase again: it goes to the back of the line)."""
        if old is new:
            self.phases[new].move_to_end(conn)
            return
        del self.phases[old][conn]
        if new is Phase.CLOSED:
            self.count -= 1
            left = self.addresses.pop(conn.address) - 1
            if left:
                self.addresses[conn.address] = left
        else:
            self.phases[new][conn] = None

    def connections(self) -> list[Connection]:
        return [conn for phase in self.phases.values() for conn in phase]


def peer_address(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """A peer's IP (IPv4 also when it came as ::ffff:a.b.c.d to a dual-stack socket) and the address
    it counts as for the per-address limit: an IPv4 address, or an IPv6 /64. The lockout's
    client_block draws the same line; this section keeps its own copy (it uses nothing above it)."""
    ip = ipaddress.ip_address(peer.partition("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, str(ip) if ip.version == 4 else str(ipaddress.ip_network((ip, 64), strict=False))


class Connection:
    """One client connection: its phase, the bytes it sent that are not answered yet, and what the
    socket has not taken yet of the answer owed to it."""

    __slots__ = ("address", "buffer", "deadline", "fd", "out", "peer", "phase", "pool", "reading",
                 "request", "scanned", "server", "sock")

    def __init__(self, server: HTTPServer, sock: socket.socket, peer: tuple[str, int], pool: Pool,
                 address: str) -> None:
        self.server, self.sock, self.fd, self.peer, self.pool, self.address = (
            server, sock, sock.fileno(), peer, pool, address)
        self.phase = Phase.NEW
        self.deadline = server.loop.time() + FIRST_BYTE_TIMEOUT
        self.reading = False  # whether the loop watches the socket (it does in READING phases)
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer has no head end: a dribbled head is searched once
        self.request: tuple[dict[str, Any], int] | None = None  # in BODY: environ, body length
        self.out = b""  # the part of the answers the socket has not taken yet
        pool.add(self)

    def enter(self, phase: Phase, timeout: float) -> None:
        """Move to PHASE, with TIMEOUT seconds to leave it; reading follows the phase."""
        self.pool.move(self, self.phase, phase)
        self.phase = phase
        self.deadline = self.server.loop.time() + timeout
        if (phase in READING) is not self.reading:
            self.reading = not self.reading
            if self.reading:
                self.server.loop.add_reader(self.fd, self.receive)
            else:
                self.server.loop.remove_reader(self.fd)

    # the socket --------------------------------------------------------------------------------

    def receive(self) -> None:
        """Read what the client sent and answer it (the loop calls this when the socket is readable;
        the server calls it once on accept, when the request is there already: listening_socket)."""
        try:
            size = self.sock.recv_into(self.server.receive_buffer)
        except (BlockingIOError, InterruptedError):
            if not self.reading:
                self.enter(self.phase, FIRST_BYTE_TIMEOUT)  # nothing yet: wait for the loop to say
            return
        except OSError:  # reset by the client
            size = 0
        if not size:
            # The client is done sending. Everything whole it sent has been answered (nothing is
            # read while an answer is owed), so what is left is a request it will never finish.
            self.close()
            return
        self.buffer += self.server.receive_buffer[:size]
        self.process()

    def write(self, data: bytes, flags: int = 0) -> None:
        """Send DATA; what the socket does not take now is kept and sent when it can."""
        if self.out:
            self.out += data
            return
        try:
            sent = self.sock.send(data, flags)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # reset by the client
            self.close()
            return
        if sent < len(data):
            self.out = data[sent:]
            self.server.loop.add_writer(self.fd, self.flush)

    def flush(self) -> None:
        """Send more of what is kept (the loop calls this when the socket is writable)."""
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:
            return
        self.server.loop.remove_writer(self.fd)
        if self.phase is Phase.CLOSING:
            self.close()
        elif self.phase is Phase.ANSWERING:
            self.enter(Phase.IDLE, IDLE_TIMEOUT)
            self.process()

    def close(self) -> None:
        """Close now; from this moment the connection no longer counts."""
        if self.phase is Phase.CLOSED:
            return
        if self.out:
            self.server.loop.remove_writer(self.fd)
            self.out = b""
        self.enter(Phase.CLOSED, 0)
        self.sock.close()

    def abort(self, reason: str) -> None:
        """Close with a reset, which drops what the kernel still holds for the client too."""
        log.warning("event=connection_aborted reason=%s ip=%s", reason, logval(self.peer[0]))
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    # requests ----------------------------------------------------------------------------------

    def process(self) -> None:
        """Answer the whole requests in the buffer, in order, until an answer is owed or none is."""
        try:
            while self.phase in READING:
                if self.request is None:
                    self.request = self.read_head()
                    if self.request is None:
                        return
                environ, length = self.request
                if len(self.buffer) < length:
                    return
                self.request = None
                environ["wsgi.input"] = BytesIO(bytes(self.buffer[:length]) if length else b"")
                del self.buffer[:length]
                self.answer(environ)
        except Exception as err:
            self.fail(err)

    def read_head(self) -> tuple[dict[str, Any], int] | None:
        """(environ, body length) of the next request head in the buffer, or None until it is in."""
        if not self.buffer:
            return None
        blank = 0
        if self.buffer[0] in b"\r\n":
            empty = BLANK_LINES_RE.match(self.buffer)
            blank = empty.end() if empty else 0
        if blank > MAX_BLANK_BYTES:
            raise HTTPError(400)
        end = HEAD_END_RE.search(self.buffer, max(self.scanned, blank))
        if end is None:
            if len(self.buffer) > MAX_HEAD:
                raise HTTPError(431)
            self.scanned = max(blank, len(self.buffer) - 2)
            if self.phase is not Phase.HEAD:
                self.enter(Phase.HEAD, HEAD_TIMEOUT)  # from its first byte (blank lines count)
            return None
        if end.start() > MAX_HEAD:
            raise HTTPError(431)
        head = parse_head(bytes(self.buffer[blank:end.start()]))
        del self.buffer[:end.end()]
        self.scanned = 0
        environ = build_environ(self.server.base_environ, head, self.peer)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length and length > self.server.body_limit(environ):
            raise HTTPError(413)  # refused before a byte of it is buffered
        if len(self.buffer) < length:
            self.enter(Phase.BODY, BODY_TIMEOUT)
            expects = str(environ.get("HTTP_EXPECT", "")).lower()
            if head.version == "HTTP/1.1" and expects == "100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return environ, length

    def answer(self, environ: dict[str, Any]) -> None:
        keep_alive = environ["SERVER_PROTOCOL"] == "HTTP/1.1" and "close" not in str(
            environ.get("HTTP_CONNECTION", "")).lower()
        if self.server.inline(environ):
            self.reply(self.server.respond(environ, keep_alive), keep_alive)
            return
        self.enter(Phase.ANSWERING, math.inf)  # the pool's work is ours: no deadline
        done = self.server.loop.run_in_executor(self.server.pool, self.server.respond, environ,
                                                keep_alive)
        done.add_done_callback(functools.partial(self.answered_in_pool, keep_alive))

    def answered_in_pool(self, keep_alive: bool, done: asyncio.Future[bytes]) -> None:
        if self.phase is Phase.CLOSED:
            return
        try:
            data = done.result()
        except Exception as err:
            self.fail(err)
            return
        self.reply(data, keep_alive)
        self.process()

    def reply(self, data: bytes, keep_alive: bool) -> None:
        """Send a request's answer; the last goes out with the close if nothing is left unread."""
        self.send(data, keep_alive, 0 if keep_alive or self.buffer else LAST_WRITE)

    def send(self, data: bytes, keep_alive: bool, flags: int = 0) -> None:
        """Send one answer; until the socket has taken all of it, nothing more is read."""
        self.write(data, flags)
        if self.phase is Phase.CLOSED:
            return
        if self.out:
            self.enter(Phase.ANSWERING if keep_alive else Phase.CLOSING, WRITE_TIMEOUT)
        elif keep_alive:
            self.enter(Phase.IDLE, IDLE_TIMEOUT)
        else:
            self.close()

    def fail(self, err: Exception) -> None:
        """Whatever goes wrong with a request ends its connection (400 or 500), never the server."""
        if not isinstance(err, HTTPError):
            log.error("event=connection_error ip=%s error=%s", logval(self.peer[0]),
                      logval(repr(err)), exc_info=err)
        if self.phase is not Phase.CLOSED:
            status = err.status if isinstance(err, HTTPError) else 500
            self.send(error_bytes(status), keep_alive=False)

    def expire(self) -> None:
        """Past its deadline: 408 for a request still coming, a reset for an answer not taken, else
        just close."""
        if self.phase in (Phase.HEAD, Phase.BODY):
            self.send(error_bytes(408), keep_alive=False)
        elif self.phase in (Phase.ANSWERING, Phase.CLOSING):
            self.abort("write_timeout")
        else:
            self.close()


class HTTPServer:
    """HTTP/1.1 keep-alive server for one WSGI app. One event-loop thread holds every connection
    (idle or slow clients cost no thread) and answers the requests the app calls cheap itself;
    the rest (password hashing, file writes) go to a small thread pool."""

    def __init__(self, sock: socket.socket, app: WSGIApp, routing: Routing, *,
                 trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.listener, self.trusted = sock, tuple(trusted)
        self.inline, self.body_limit = routing.inline, routing.body_limit
        self.answer: Callable[[dict[str, Any]], tuple[str, list[tuple[str, str]], bytes]] = (
            routing.respond or (lambda environ: run_wsgi(app, environ)))
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ezauth-worker")
        self.receive_buffer = memoryview(bytearray(RECEIVE_SIZE))
        self.max_others, self.max_connections = connection_limits()
        self.proxies, self.others = Pool(), Pool()
        self.peers: dict[str, tuple[Pool, str]] = {}  # peer -> its pool, the address it counts as
        host, port = sock.getsockname()[:2]
        self.base_environ: dict[str, Any] = {
            "SERVER_NAME": host, "SERVER_PORT": str(port), "SCRIPT_NAME": "",
            "GATEWAY_INTERFACE": "CGI/1.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        self.loop.add_reader(sock.fileno(), self.accept)
        self.loop.call_later(SWEEP_EVERY, self.sweep)

    def accept(self) -> None:
        """Take the connections waiting on the listening socket (the loop calls this when any)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:  # out of descriptors, say: pause accepting, serve the others
                log.warning("event=accept_failed error=%s", logval(err.strerror or repr(err)))
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(1.0, self.loop.add_reader, self.listener.fileno(), self.accept)
                return
            self.admit(sock, (str(peer[0]), int(peer[1])))

    def admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        pool, address = self.classify(peer[0])
        refusal = self.make_room(pool, address)
        if refusal:
            log.warning("event=connection_refused reason=%s ip=%s", refusal, logval(peer[0]))
            with contextlib.suppress(OSError):
                sock.send(error_bytes(503), socket.MSG_DONTWAIT)
            sock.close()
            return
        sock.setblocking(False)
        Connection(self, sock, peer, pool, address).receive()

    def make_room(self, pool: Pool, address: str) -> str:
        """"" when one more connection of POOL from ADDRESS fits (a full server first drops its
        cheapest connection; never a trusted proxy's for someone else), else why it does not."""
        others = self.others
        if pool is others and others.addresses.get(address, 0) >= MAX_PER_ADDRESS:
            return "per_address_limit"
        if others.count + self.proxies.count < self.max_connections and (
                pool is self.proxies or others.count < self.max_others):
            return ""
        cheapest = others.cheapest() or (self.proxies.cheapest() if pool is self.proxies else None)
        if cheapest is None:
            return "server_full"
        cheapest.close()
        return ""

    def classify(self, peer: str) -> tuple[Pool, str]:
        """The pool of a peer (trusted proxies have their own) and the address it counts as;
        remembered, since every verify through nginx without keep-alive is a new connection."""
        known = self.peers.get(peer)
        if known is None:
            try:
                ip, address = peer_address(peer)
                trusted = any(ip in net for net in self.trusted if net.version == ip.version)
            except ValueError:
                address, trusted = peer, False
            if len(self.peers) >= 4096:
                self.peers.clear()
            known = self.peers[peer] = (self.proxies if trusted else self.others, address)
        return known

    def sweep(self) -> None:
        """Act on connections past their deadline: silent, idle too long, a request too slow, an
        answer not read."""
        now = self.loop.time()
        for pool in (self.proxies, self.others):
            for conn in pool.connections():
                if now >= conn.deadline:
                    conn.expire()
        self.loop.call_later(SWEEP_EVERY, self.sweep)

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.loop.stop)
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for pool in (self.proxies, self.others):
            for conn in pool.connections():
                conn.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def respond(self, environ: dict[str, Any], keep_alive: bool) -> bytes:
        """The whole answer to one request, as bytes (on the loop, or on a pool thread)."""
        status, headers, body = self.answer(environ)
        return serialize_response(status, headers, body, keep_alive,
                                  environ["REQUEST_METHOD"] == "HEAD")


def connection_limits() -> tuple[int, int]:
    """How many connections clients other than trusted proxies may hold, and all together:
    MAX_CONNECTIONS and PROXY_CONNECTIONS more, or less of each when the file-descriptor limit
    cannot be raised that far (then a quarter of what there is stays for trusted proxies)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # 64 for the rest: the data dir's files, the pool's SQLite handles, stdio
    wanted = PROXY_CONNECTIONS + MAX_CONNECTIONS + 64
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft >= wanted:
        return MAX_CONNECTIONS, MAX_CONNECTIONS + PROXY_CONNECTIONS
    room = max(32, soft - 64)
    limits = room - room // 4, room
    log.warning("event=connection_limits_lowered nofile=%d others=%d all=%d", soft, *limits)
    return limits


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket; `::` takes IPv4 too. Linux hands TCP_NODELAY on to every accepted
    socket: each answer goes out in one send, and a pipelined one must not wait for an ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Linux hands over a connection once its first bytes are in (nginx's `listen ...
            # deferred`), so nginx's request is read at once on accept instead of after another
            # trip through the loop; a silent one comes after a second, then has FIRST_BYTE_TIMEOUT.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# -- Doctor ---------------------------------------------------------------------------------
# `python ezauth.py doctor URL` tries the site as a stranger would, and with --nginx reads the
# nginx config that guards it. Every check returns findings, (level, message) pairs, so a test
# can call each one; cmd_doctor prints them. When unsure a check says WARN or FAIL, never OK.

OK, WARN, FAIL = "OK", "WARN", "FAIL"
Finding = tuple[str, str]
USER_HEADERS = ("X-Auth-Request-User", "X-Forwarded-User", "Remote-User")  # nginx.conf.example
PASSES = ("proxy_pass", "fastcgi_pass", "uwsgi_pass", "scgi_pass", "grpc_pass")
VERIFY_PROBES = (f"{PREFIX}/verify", "/_ezauth_verify")  # the second: the shipped internal location
NGINX_FILE_RE = re.compile(r"^# configuration file (.+):$", re.M)
# nginx's own token rules: `#` starts a comment only where a token could start, quotes take
# backslash escapes, `;` and `{` end a word (unless `${`), and `}` closes a block only on its own.
NGINX_TOKEN_RE = re.compile(r"""
      (?P<space>\s+) | (?P<comment>\#[^\n]*) | (?P<special>[;{}])
    | "(?P<double>(?:\\.|[^"\\])*)" | '(?P<single>(?:\\.|[^'\\])*)'
    | (?P<word>(?:\\.|\$\{|[^\s;{}#"'\\])(?:\\.|\$\{|[^\s;{\\])*)
""", re.X | re.S)
NGINX_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}
NGINX_MAX_DEPTH = 32
MAX_ANSWER = 1 << 20
DOCTOR_AGENT = f"ezauth-doctor/{__version__}"
AS_BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8", "Sec-Fetch-Mode": "navigate",
              "Sec-Fetch-Dest": "document", "Sec-Fetch-Site": "none"}
AS_SCRIPT = {"Accept": "*/*"}
REDIRECTS = (301, 302, 303, 307, 308)
LOGOUT_LAG = 8.0  # the optional auth cache says yes to an ended session for up to 6 s (README)


class NginxError(Exception):
    """An nginx config the doctor cannot read; the message says where."""


class NginxToken(NamedTuple):
    text: str
    word: bool  # False for a `;`, `{` or `}` outside quotes
    line: int


@dataclass(frozen=True)
class Directive:
    """One nginx directive, where it is written, and its block (None for a simple directive)."""

    name: str
    args: tuple[str, ...]
    where: str  # file:line
    block: tuple[Directive, ...] | None = None


def nginx_tokens(text: str, name: str) -> Iterator[NginxToken]:
    """The tokens of one config file, each with the line it starts on."""
    pos, line = 0, 1
    while pos < len(text):
        match = NGINX_TOKEN_RE.match(text, pos)
        if match is None:
            raise NginxError(f"{name}:{line}: cannot read {text[pos:pos + 20]!r} (an open quote?)")
        kind = match.lastgroup
        if kind == "special":
            yield NginxToken(match.group(), False, line)
        elif kind in ("double", "single", "word"):
            raw = match.group(kind or "")
            unescaped = re.sub(r"\\(.)", lambda m: NGINX_ESCAPES.get(m[1], m[0]), raw, flags=re.S)
            yield NginxToken(unescaped, True, line)
        line += match.group().count("\n")
        pos = match.end()


class NginxConfig:
    """The output of `nginx -T` read back into directives, each include put where it stands."""

    def __init__(self, dump: str) -> None:
        parts = NGINX_FILE_RE.split(dump)
        self.files = {name: text.removeprefix("\n")
                      for name, text in zip(parts[1::2], parts[2::2], strict=True)}
        if not self.files:
            raise NginxError("no '# configuration file' lines: this is not the output of nginx -T")
        self.main = next(iter(self.files))
        self.placed = {self.main}
        self.root = Directive("", (), f"{self.main}:1", self.read_file(self.main, 0))

    def read_file(self, name: str, depth: int) -> tuple[Directive, ...]:
        if depth > NGINX_MAX_DEPTH:
            raise NginxError(f"{name}: includes nest deeper than {NGINX_MAX_DEPTH}")
        return self.read_block(nginx_tokens(self.files[name], name), name, depth, None)

    def read_block(self, tokens: Iterator[NginxToken], name: str, depth: int,
                   opened: NginxToken | None) -> tuple[Directive, ...]:
        """Directives up to the `}` that closes OPENED (or to the end of the file when None)."""
        found: list[Directive] = []
        words: list[NginxToken] = []
        for token in tokens:
            if token.word:
                words.append(token)
            elif token.text == "}" and opened is not None and not words:
                return tuple(found)
            elif token.text == "}" or not words:
                raise NginxError(f"{name}:{token.line}: unexpected {token.text!r}")
            else:
                head = Directive(words[0].text, tuple(w.text for w in words[1:]),
                                 f"{name}:{words[0].line}")
                if token.text == "{":
                    found.append(replace(head,
                                         block=self.read_block(tokens, name, depth, words[0])))
                elif head.name == "include" and head.args:
                    found += [d for f in self.included(head.args[0])
                              for d in self.read_file(f, depth + 1)]
                else:
                    found.append(head)
                words = []
        if opened is not None or words:
            raise NginxError(f"{name}:{(opened or words[0]).line}: not closed before the end of "
                             "the file")
        return tuple(found)

    def included(self, pattern: str) -> list[str]:
        """The dumped files an include names, in the sorted order nginx reads a glob in."""
        if not pattern.startswith("/"):
            pattern = os.path.join(os.path.dirname(self.main), pattern)
        regex = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                        for c in pattern)
        names = sorted(name for name in self.files if re.fullmatch(regex, name))
        self.placed.update(names)
        return names


def children(level: Directive, name: str) -> list[Directive]:
    return [d for d in level.block or () if d.name == name]


def innermost(chain: tuple[Directive, ...], name: str) -> list[Directive]:
    """The NAME lines in effect at the end of CHAIN (http, server, location...): nginx takes them
    from the innermost level that has any, so a location with one of its own inherits none."""
    for level in reversed(chain):
        if found := children(level, name):
            return found
    return []


def walk_locations(chain: tuple[Directive, ...]) -> Iterator[tuple[Directive, ...]]:
    """Every location under CHAIN's last level, nested ones too, each as its whole chain."""
    for location in children(chain[-1], "location"):
        yield (*chain, location)
        yield from walk_locations((*chain, location))


def server_chains(config: NginxConfig) -> list[tuple[Directive, ...]]:
    return [(config.root, http, server)
            for http in children(config.root, "http") for server in children(http, "server")]


def passes_of(location: Directive) -> list[Directive]:
    """A location's *_pass lines, those inside its `if` blocks included."""
    own = [*(location.block or ()),
           *(d for block in children(location, "if") for d in block.block or ())]
    return [d for d in own if d.name in PASSES and d.args]


def backend(address: str) -> str:
    """The server part of a *_pass address: `ezauth` of http://ezauth/x, unix:/run/a.sock of
    http://unix:/run/a.sock:/x."""
    rest = re.sub(r"^[A-Za-z]+://", "", address)
    if rest.startswith("unix:"):
        return "unix:" + rest[5:].split(":", 1)[0]
    return rest.split("/", 1)[0].lower()


def location_label(location: Directive) -> str:
    return f"location {' '.join(location.args)} ({location.where})"


def server_label(server: tuple[Directive, ...]) -> str:
    names = " ".join(name for line in children(server[-1], "server_name")
                     for name in line.args) or "_"
    return f"server {names} ({server[-1].where})"


def find_location(chain: tuple[Directive, ...], uri: str) -> tuple[Directive, ...] | None:
    """The location nginx picks for URI under CHAIN's last level: an exact match, else the longest
    prefix if it says ^~, else the first matching regex, else the longest prefix (nested ones
    too)."""
    exact = regex = longest = None
    for location in children(chain[-1], "location"):
        mod, path = location.args if len(location.args) == 2 else ("", "".join(location.args))
        if mod == "=" and path == uri:
            exact = exact or location
        elif (mod in ("", "^~") and uri.startswith(path)
              and len(path) > len(longest.args[-1] if longest else "")):
            longest = location
        elif mod in ("~", "~*") and regex is None:
            with contextlib.suppress(re.error):
                regex = location if re.search(path, uri, re.I if mod == "~*" else 0) else None
    if exact is not None:
        return (*chain, exact)
    picked = longest if longest is not None and longest.args[0] == "^~" else regex or longest
    if picked is None:
        return None
    return find_location((*chain, picked), uri) or (*chain, picked)


def auth_uris(server: tuple[Directive, ...]) -> list[str]:
    """The URIs auth_request asks in a server (an http-level line included), `off` left out."""
    levels = [*server[1:], *(chain[-1] for chain in walk_locations(server))]
    return list(dict.fromkeys(line.args[0] for level in levels
                              for line in children(level, "auth_request")
                              if line.args and line.args[0] != "off"))


def auth_targets(config: NginxConfig) -> list[tuple[str, tuple[Directive, ...]]]:
    """Each auth_request URI with the server it is asked in."""
    return [(uri, server) for server in server_chains(config) for uri in auth_uris(server)]


def ezauth_backends(config: NginxConfig) -> set[str]:
    """Where ezauth is: the upstream named ezauth, and what the locations named /ezauth... and
    /_ezauth... pass to. Every other *_pass is an app. (Not whatever auth_request asks: pointed at
    the app by mistake, that would make the app look like ezauth and hide it from every check.)"""
    found = {"ezauth"} if any(u.args == ("ezauth",) for h in children(config.root, "http")
                              for u in children(h, "upstream")) else set()
    for server in server_chains(config):
        for chain in walk_locations(server):
            if chain[-1].args and chain[-1].args[-1].startswith((PREFIX, "/_ezauth")):
                found.update(backend(p.args[0]) for p in passes_of(chain[-1]))
    return found


def serves_app(location: Directive, backends: set[str]) -> bool:
    """Whether a location answers with something of its own: a proxied app, or files from disk.
    ezauth's own pages (under /ezauth/) are public by design, however they are served."""
    if location.args and location.args[-1].startswith(f"{PREFIX}/"):
        return False
    passes = passes_of(location)
    if passes:
        return any(backend(p.args[0]) not in backends for p in passes)
    return not children(location, "return")


def check_auth_request(chain: tuple[Directive, ...]) -> list[Finding]:
    """A location that serves the app must ask ezauth first."""
    label, found = location_label(chain[-1]), []
    lines = innermost(chain, "auth_request")
    if not lines:
        found.append((FAIL,
                      f"nginx: {label} has no auth_request: everything it serves is public. Add "
                      "`auth_request /_ezauth_verify;` and the lines around it from "
                      "nginx.conf.example"))
    elif lines[-1].args == ("off",):
        found.append((FAIL,
                      f"nginx: {label} has `auth_request off` ({lines[-1].where}): everything it "
                      "serves is public"))
    else:
        found.append((OK,
                      f"nginx: {label} asks ezauth first (auth_request "
                      f"{' '.join(lines[-1].args)})"))
    satisfy = innermost(chain, "satisfy")
    if satisfy and satisfy[-1].args == ("any",):
        found.append((WARN,
                      f"nginx: {label} has `satisfy any` ({satisfy[-1].where}): a client that an "
                      "allow line admits skips the login"))
    return found


def check_user_headers(chain: tuple[Directive, ...], backends: set[str]) -> list[Finding]:
    """The app gets the user name from nginx only, never from the client."""
    label, location = location_label(chain[-1]), chain[-1]
    if not any(p.name == "proxy_pass" and backend(p.args[0]) not in backends
               for p in passes_of(location)):
        return [(WARN,
                 f"nginx: {label} does not use proxy_pass: the doctor cannot check which user "
                 "headers it passes on; make sure it sets them itself")]
    sets = {d.args[0].lower(): d for d in innermost(chain, "proxy_set_header") if len(d.args) == 2}
    outer = {d.args[0].lower() for level in chain[:-1] for d in children(level, "proxy_set_header")
             if d.args}
    found: list[Finding] = []
    for header in USER_HEADERS:
        line = sets.get(header.lower())
        if line is None:
            why = (" (an outer level sets it, but a level with proxy_set_header lines of its own "
                   "inherits none)") if header.lower() in outer else ""
            found.append((FAIL,
                          f"nginx: {label} passes a client's own {header} on to the app{why}: add "
                          f"`proxy_set_header {header} $ezauth_user;`"))
        elif "$http_" in line.args[1]:
            found.append((FAIL,
                          f"nginx: {label} copies a client's own header into {header} "
                          f"({line.where})"))
    return found or [(OK, f"nginx: {label} sets {' and '.join(USER_HEADERS)} itself")]


def check_cookie_kept(chain: tuple[Directive, ...]) -> Finding:
    """The app must not get the session cookie: an app that logs headers would leak sessions."""
    label = location_label(chain[-1])
    cookie = next((d for d in innermost(chain, "proxy_set_header")
                   if "".join(d.args[:1]).lower() == "cookie"), None)
    if cookie is None or "$http_cookie" in " ".join(cookie.args[1:]):
        return WARN, (f"nginx: {label} passes the ezauth session cookie to the app: add "
                      "`proxy_set_header Cookie $ezauth_app_cookie;` and its two maps from "
                      "nginx.conf.example")
    return OK, f"nginx: {label} keeps the ezauth session cookie from the app ({cookie.where})"


def check_auth_target(uri: str, server: tuple[Directive, ...], backends: set[str]) -> Finding:
    """What auth_request asks must be internal, and must be ezauth."""
    target = find_location(server, uri)
    if target is None:
        return FAIL, f"nginx: auth_request {uri} matches no location in {server_label(server)}"
    label = location_label(target[-1])
    if not any(backend(p.args[0]) in backends for p in passes_of(target[-1])):
        return FAIL, f"nginx: {label}, which auth_request asks, does not pass to ezauth"
    if not children(target[-1], "internal"):
        return FAIL, (f"nginx: {label}, which auth_request asks, is not internal: clients can call "
                      "it directly. Add `internal;`")
    return OK, f"nginx: {label}, which auth_request asks, is internal and passes to ezauth"


def check_verify_location(server: tuple[Directive, ...], backends: set[str]) -> Finding:
    """A client asking for /ezauth/verify must not reach ezauth's verify."""
    where, chain = server_label(server), find_location(server, f"{PREFIX}/verify")
    if chain is None:
        return OK, f"nginx: {where}: no location passes {PREFIX}/verify to ezauth"
    location = chain[-1]
    if (any(backend(p.args[0]) in backends for p in passes_of(location))
            and not children(location, "internal")):
        return FAIL, (f"nginx: {where}: {PREFIX}/verify from outside reaches ezauth through "
                      f"{location_label(location)}: add "
                      f"`location = {PREFIX}/verify {{ return 404; }}`")
    return OK, (f"nginx: {where}: {PREFIX}/verify from outside goes to "
                f"{location_label(location)}, not to ezauth")


def reachable(location: Directive) -> bool:
    """Whether a client can ask for it by its path: not a named location, not internal."""
    named = location.name == "location" and "".join(location.args[-1:]).startswith("@")
    return not named and not children(location, "internal")


def check_server(server: tuple[Directive, ...], backends: set[str]) -> list[Finding]:
    """Every check of one server block (a block with no location is its own); a block that never
    asks ezauth is only named."""
    chains = list(walk_locations(server)) or ([] if children(server[-1], "return") else [server])
    apps = [chain for chain in chains if serves_app(chain[-1], backends)]
    if not auth_uris(server) and not any(
            backend(p.args[0]) in backends for c in chains for p in passes_of(c[-1])):
        return [(WARN,
                 f"nginx: {server_label(server)} does not use ezauth: whatever it serves is public "
                 "(fine if that is meant)")] if apps else []
    found = [check_verify_location(server, backends)]
    found += [check_auth_target(uri, server, backends) for uri in auth_uris(server)]
    for chain in apps:
        if reachable(chain[-1]):
            found += check_auth_request(chain)
        if passes_of(chain[-1]):
            found += [*check_user_headers(chain, backends), check_cookie_kept(chain)]
    return found


def nginx_findings(config: NginxConfig) -> list[Finding]:
    """Every server block of an `nginx -T` dump, judged."""
    backends, servers = ezauth_backends(config), server_chains(config)
    found = [(OK, f"nginx: read {len(config.files)} files of nginx -T, {len(servers)} server "
                  f"block{'s' * (len(servers) != 1)}")]
    found += [(WARN,
               f"nginx: {name} was dumped by nginx -T but the doctor could not place it (an "
               "include pattern it does not read): not checked") for name in config.files
               if name not in config.placed]
    for server in servers:
        found += check_server(server, backends)
    if not any(auth_uris(server) for server in servers):
        found.append((FAIL, "nginx: no server block has auth_request: nothing is protected"))
    return found


def read_nginx_config(binary: str, dump_file: str | None) -> NginxConfig:
    """The config as `nginx -T` prints it: run now, or saved in DUMP_FILE (`-`: standard input)."""
    if dump_file == "-":
        return NginxConfig(sys.stdin.read())
    if dump_file:
        return NginxConfig(Path(dump_file).read_text(encoding="utf-8", errors="replace"))
    try:  # the admin's own nginx, named on the command line: no shell, no input
        done = subprocess.run(  # noqa: S603  # nosec B603
            [binary, "-T"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NginxError(f"cannot run {binary} -T: {err}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise NginxError(f"`{binary} -T` failed ({last}); run the doctor as root, or save `sudo "
                         "nginx -T` to a file and pass it with --nginx-dump FILE")
    return NginxConfig(done.stdout)


# The site from outside.


class Unreachable(Exception):
    """A request that got no HTTP answer: refused, timed out, or a certificate not trusted."""


def shown(text: str) -> str:
    """A value from the network, safe to print on one line."""
    ascii_text = text[:200].encode("ascii", "backslashreplace").decode()
    return ascii_text.translate({i: "?" for i in (*range(32), 127)})


def unreachable(url: str, err: Exception) -> Unreachable:
    """Why URL got no answer; an untrusted certificate said apart, since it is fixed differently."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return Unreachable(f"cannot check {url}: its certificate is not trusted "
                           f"({reason.verify_message}). Fix the certificate, or name your own CA "
                           "with --ca FILE")
    return Unreachable(f"cannot reach {url}: {shown(str(reason))}")


class Answer(NamedTuple):
    url: str
    status: int
    headers: Message
    body: bytes

    @property
    def location(self) -> str:
        """Where a redirect points, made absolute ("" when it does not redirect)."""
        raw = self.headers.get("Location", "") if self.status in REDIRECTS else ""
        return urllib.parse.urljoin(self.url, raw) if raw else ""

    def said(self) -> str:
        """The status, and where it redirects, for a message: `302 to https://.../`."""
        return f"{self.status} to {shown(self.location)}" if self.location else str(self.status)


class KeepEveryStatus(urllib.request.HTTPErrorProcessor):
    """Every answer handed back as it came: no redirect followed, no exception for a 4xx or 5xx."""

    def http_response(self, request: urllib.request.Request, response: Any) -> Any:
        return response

    https_response = http_response


class Probe:
    """The doctor's HTTP client: a cookie jar, no proxy from the environment, no redirect taken."""

    def __init__(self, tls: ssl.SSLContext, timeout: float) -> None:
        self.tls, self.timeout = tls, timeout
        self.opener = urllib.request.build_opener(
            KeepEveryStatus(), urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=tls),
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def fresh(self) -> Probe:
        """Another client with the same TLS settings and an empty cookie jar."""
        return Probe(self.tls, self.timeout)

    def send(self, url: str, *, browser: bool = True, headers: Mapping[str, str] | None = None,
             form: Mapping[str, str] | None = None) -> Answer:
        """GET URL (POST FORM) as a browser opening a page, or as a script."""
        sent = {"User-Agent": DOCTOR_AGENT, **(AS_BROWSER if browser else AS_SCRIPT),
                **(headers or {})}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            origin = urllib.parse.urlsplit(url)
            sent.update({"Content-Type": "application/x-www-form-urlencoded",
                         "Sec-Fetch-Site": "same-origin",
                         "Origin": f"{origin.scheme}://{origin.netloc}"})
        request = urllib.request.Request(url, data, sent)  # noqa: S310  # only http(s) URLs here
        try:
            with self.opener.open(request, timeout=self.timeout) as reply:
                return Answer(url, reply.status, reply.headers, reply.read(MAX_ANSWER))
        # URLError is an OSError; a Location that is no URL gives a ValueError (InvalidURL).
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise unreachable(url, err) from None


def login_target(answer: Answer) -> str | None:
    """Where ANSWER sends the client to log in, or None when it does not: a redirect to ezauth's
    login page (on any host: a portal host is fine), or the 401 ezauth gives scripts."""
    if answer.location and urllib.parse.urlsplit(answer.location).path == f"{PREFIX}/login":
        return answer.location
    if answer.status == 401 and (answer.headers.get("X-Ezauth-Login")
                                 or b'"login_required"' in answer.body):
        return urllib.parse.urljoin(answer.url,
                                    answer.headers.get("X-Ezauth-Login", f"{PREFIX}/login"))
    return None


def refusal(answer: Answer) -> Finding:
    """How an anonymous request's ANSWER reads: OK only when it is sent to log in."""
    target = login_target(answer)
    if target is not None:
        host = urllib.parse.urlsplit(target).hostname
        other = "" if host == urllib.parse.urlsplit(answer.url).hostname else f" on {host}"
        return OK, f"is sent to the login page{other} ({answer.status})"
    asked, moved = urllib.parse.urlsplit(answer.url), urllib.parse.urlsplit(answer.location)
    if (asked.scheme, moved.scheme, moved.hostname) == ("http", "https", asked.hostname):
        return FAIL, (f"is redirected to https ({answer.said()}), so nothing behind it was "
                      "checked: give the doctor the https:// address")
    if answer.status == 503:
        return FAIL, ("got 503: nginx cannot reach ezauth. Start it (`journalctl -u ezauth` says "
                      "why it stopped) and check the address in `upstream ezauth`")
    if answer.status >= 500:
        return FAIL, (f"got {answer.status}: nginx or ezauth is failing; the nginx error log "
                      "says why")
    if answer.status < 400 or answer.status == 404:
        return FAIL, (f"was answered by the app ({answer.said()}): your app is public. Check that "
                      "the location serving it has auth_request (run the doctor with --nginx on "
                      "the box)")
    return WARN, f"got {answer.status} instead of the login page: check what answers it"


def check_anonymous(probe: Probe, url: str) -> list[Finding]:
    """An anonymous GET, as a browser opening the page and as a script, must be sent to log in."""
    found = []
    for who, browser in (("browser", True), ("script", False)):
        level, text = refusal(probe.send(url, browser=browser))
        found.append((level, f"anonymous GET {url} as a {who} {text}"))
    return found


def check_spoofed(probe: Probe, url: str) -> Finding:
    """User-name headers sent by the client itself must not let it in."""
    spoofed = {name: "admin" for name in USER_HEADERS}
    level, text = refusal(probe.send(url, headers=spoofed))
    return level, f"GET {url} with {', '.join(spoofed)}: admin {text}"


def forged_sessions(now: float) -> list[tuple[str, str]]:
    """Session cookies a forger could make: (what it is, the value)."""
    claims = {"sub": "admin", "iat": int(now), "exp": int(now) + 3600, "fp": "", "rem": 0,
              "sid": secrets.token_hex(16)}
    signed = jwt.encode(claims, secrets.token_bytes(32), algorithm="HS256",
                        headers={"kid": secrets.token_hex(4)})
    none = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{none}.{_b64(json.dumps(claims).encode())}."
    return [("an HS256 JWT signed with a made-up key", signed), ("a JWT with alg none", unsigned),
            ("garbage", "doctor-" + secrets.token_hex(8))]


def session_names(cookie: str) -> tuple[str, ...]:
    """Every name ezauth's session cookie may have: prefixed (over https) or plain."""
    return (f"__Host-{cookie}", f"__Secure-{cookie}", cookie)


def check_forged(probe: Probe, url: str, cookie: str, now: float) -> list[Finding]:
    found = []
    for what, value in forged_sessions(now):
        sent = "; ".join(f"{name}={value}" for name in session_names(cookie))
        level, text = refusal(probe.send(url, headers={"Cookie": sent}))
        found.append((level, f"GET {url} with a forged session cookie ({what}) {text}"))
    return found


def check_verify_hidden(probe: Probe, url: str, path: str) -> Finding:
    """Verify answers nginx only: from outside, its path must not reach it."""
    answer = probe.send(urllib.parse.urljoin(url, path))
    if answer.headers.get("X-Auth-Request-User") or (answer.status == 401
                                                     and answer.headers.get("X-Ezauth-Login")):
        return FAIL, (f"{path} answers from outside as verify does ({answer.status}): clients can "
                      "ask ezauth directly. Make the auth_request location `internal` and keep "
                      f"`location = {PREFIX}/verify {{ return 404; }}`, as in nginx.conf.example")
    if answer.status in (403, 404) or login_target(answer):
        return OK, f"{path} is not reachable from outside ({answer.status})"
    return WARN, f"{path} answers {answer.said()} from outside; expected 404"


def set_cookies(answer: Answer) -> dict[str, tuple[str, bool]]:
    """The cookies an answer sets: name -> (value, whether it is Secure)."""
    found = {}
    for header in answer.headers.get_all("Set-Cookie") or []:
        first, *attributes = header.split(";")
        name, _, value = first.partition("=")
        found[name.strip()] = (value.strip(),
                               any(a.strip().lower() == "secure" for a in attributes))
    return found


def check_secure_pages(probe: Probe, url: str, cookie: str) -> Finding:
    """Over https the login page's cookie must be Secure: then ezauth knows the scheme, and marks
    the session cookie the same way."""
    target = login_target(probe.send(url))
    sent = set_cookies(probe.send(target)) if target else {}
    name = next((n for n in session_names(f"{cookie}_csrf") if n in sent), None)
    if name is None:
        return WARN, ("over https: no login page set a CSRF cookie, so the doctor cannot see "
                      "whether ezauth marks its cookies Secure")
    if not sent[name][1]:
        return FAIL, (f"over https the login page's cookie {name} is not Secure: ezauth does not "
                      "know the request came over https. Keep `proxy_set_header X-Forwarded-Proto "
                      "$scheme;` in location /ezauth/ (or set EZAUTH_COOKIE_SECURE=1 when TLS "
                      "ends before nginx)")
    return OK, f"over https the login page's cookie {name} is Secure"


def check_http_redirect(probe: Probe, url: str, http_port: int) -> Finding:
    """Plain http to the same host must only redirect to https."""
    parts = urllib.parse.urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    plain = urllib.parse.urlunsplit(("http", host + (f":{http_port}" if http_port != 80 else ""),
                                     parts.path, parts.query, ""))
    try:
        answer = probe.send(plain)
    except Unreachable:
        return WARN, (f"nothing answers {plain}: someone typing the bare name gets an error, not "
                      "your site. Add the plain-http redirect from nginx.conf.example (or name "
                      "the port with --http-port)")
    target = urllib.parse.urlsplit(answer.location)
    if target.scheme == "https" and target.hostname == parts.hostname:
        return OK, f"{plain} redirects to https ({answer.said()})"
    return FAIL, (f"{plain} answers {answer.said()} instead of redirecting to https: whatever is "
                  "typed there crosses the network in clear text. Add `if ($scheme = http) { "
                  "return 301 https://$host$request_uri; }`")


def check_plain_http(host: str, port: int) -> Finding:
    """Plain http is only fine on addresses that stay on this machine or network."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        found = set()
    addresses = [ipaddress.ip_address(str(a).split("%")[0]) for a in found]
    if addresses and all(a.is_private or a.is_loopback or a.is_link_local for a in addresses):
        local = ", ".join(sorted(map(str, addresses)))
        return OK, f"plain http to {host}: a local address ({local})"
    return WARN, (f"plain http to {host}, which is not a local address: passwords cross the "
                  "network in clear text. Put https in front (see HTTPS in the README)")


# Logged in, with --user.


class DoctorStop(Exception):
    """A finding after which the login walk cannot go on."""

    def __init__(self, level: str, message: str) -> None:
        super().__init__(message)
        self.finding = (level, message)


class FormReader(HTMLParser):
    """A page's forms: each as its action and the fields a browser would send."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.forms.append((found.get("action", ""), {}))
        elif tag == "input" and self.forms and found.get("name") and (
                found.get("type") not in ("checkbox", "radio") or "checked" in found):
            self.forms[-1][1].setdefault(found["name"], found.get("value", ""))


def page_forms(answer: Answer) -> list[tuple[str, dict[str, str]]]:
    """The forms of an answer's page, actions made absolute."""
    reader = FormReader()
    reader.feed(answer.body.decode("utf-8", "replace"))
    return [(urllib.parse.urljoin(answer.url, action), fields) for action, fields in reader.forms]


@dataclass(frozen=True)
class Login:
    """--user: who logs in, and the only hosts the password may be sent to (URL's, --login-host)."""

    user: str
    password: str = field(repr=False)
    hosts: frozenset[str] = frozenset()


def check_destination(action: str, login: Login) -> None:
    """DoctorStop unless the login form posts where the password may go: a site that redirects the
    doctor elsewhere must not collect it, nor must anyone on the network."""
    where = urllib.parse.urlsplit(action)
    host = where.hostname or ""
    if host not in login.hosts:
        raise DoctorStop(FAIL,
                         f"--user: the login form posts to {shown(host)}, and the doctor sends the "
                         f"password nowhere but {', '.join(sorted(login.hosts))} (--login-host "
                         f"{shown(host)} if it is your login host)")
    if where.scheme != "https" and check_plain_http(host, where.port or 80)[0] != OK:
        raise DoctorStop(WARN,
                         f"--user: not sending a password over plain http to {host}, which is not "
                         "a local address")


def log_in(probe: Probe, url: str, login: Login) -> tuple[str, Answer]:
    """Walk the login as a browser does: URL, the login page it is sent to, the form posted there.
    Returns the login page's URL and the answer to the form."""
    target = login_target(probe.send(url))
    if target is None:
        raise DoctorStop(FAIL,
                         f"--user: {url} does not send to the login page, so the doctor cannot "
                         "log in")
    page = probe.send(target)
    form = next(((a, f) for a, f in page_forms(page) if "password" in f), None)
    if form is None:
        raise DoctorStop(FAIL, f"--user: no login form at {shown(target)} ({page.status})")
    check_destination(form[0], login)
    return target, probe.send(form[0],
                              form={**form[1], "username": login.user, "password": login.password})


def check_landing(done: Answer, url: str, user: str) -> Finding:
    """The login form's answer: back to exactly URL, or why not."""
    if done.status == 401:
        raise DoctorStop(FAIL, f"--user: the login page refused the password of {user} (401)")
    if done.status == 429:
        raise DoctorStop(FAIL,
                         f"--user: {user} is locked out for "
                         f"{done.headers.get('Retry-After', '?')} s")
    if done.status == 200 and any(f.get("pending") for _, f in page_forms(done)):
        raise DoctorStop(WARN,
                         f"--user: {user} has two-factor login and the doctor cannot type a code; "
                         "use a user without it")
    if not done.location:
        raise DoctorStop(FAIL, f"--user: the login form answered {done.status}, not a redirect")
    if done.location != url:
        return FAIL, (f"logged in as {user}, but the login page sent the browser to "
                      f"{shown(done.location)} instead of {url}: the return target was lost")
    return OK, f"logged in as {user}: the login page sent the browser back to exactly {url}"


def session_cookie(done: Answer, cookie: str) -> tuple[str, str, bool]:
    """(name, value, Secure) of the session cookie the login set."""
    names, sent = session_names(cookie), set_cookies(done)
    name = next((n for n in names if sent.get(n, ("", False))[0]), None)
    if name is None:
        raise DoctorStop(FAIL, f"--user: the login set no session cookie ({', '.join(names)})")
    return name, *sent[name]


def check_inside(probe: Probe, url: str, token: str) -> list[Finding]:
    """Logged in: the app answers, and what a client claims about itself does not reach it."""
    answer = probe.send(url)
    if not 200 <= answer.status < 300:
        raise DoctorStop(FAIL, f"logged in, GET {url} got {answer.said()} instead of the app")
    found = [(OK, f"logged in, GET {url} reaches the app ({answer.status})")]
    markers = {name: f"doctor-{secrets.token_hex(8)}" for name in USER_HEADERS}
    echoed = probe.send(url, headers=markers).body
    leaked = [name for name, marker in markers.items() if marker.encode() in echoed]
    if leaked:
        found.append((FAIL,
                      f"logged in, the app got the {' and '.join(leaked)} the client sent (its "
                      "answer shows it): anyone logged in can pose as another user. Set it in "
                      f"nginx: `proxy_set_header {leaked[0]} $ezauth_user;`"))
    else:
        found.append((OK,
                      "logged in, the app's answer does not show a spoofed "
                      f"{' or '.join(USER_HEADERS)} (an app that echoes headers would)"))
    if token.encode() in echoed:
        found.append((WARN,
                      "logged in, the app got the ezauth session cookie (its answer shows it): add "
                      "`proxy_set_header Cookie $ezauth_app_cookie;` and its maps from "
                      "nginx.conf.example"))
    return found


def log_out(probe: Probe, login_page: str) -> Answer | None:
    """Press the logout button: on the account page, or on ezauth's logout page (which logs out
    at once on versions where logout is a GET). None when there is no button to press."""
    account = probe.send(urllib.parse.urljoin(login_page, f"{PREFIX}/account"))
    forms = page_forms(account)
    button = next(((a, f) for a, f in forms if urllib.parse.urlsplit(a).path == f"{PREFIX}/logout"),
                  None)
    if button is None:
        page = probe.send(urllib.parse.urljoin(login_page, f"{PREFIX}/logout"))
        if page.location:
            return page
        forms = page_forms(page)
        button = next(((a, f) for a, f in forms
                       if urllib.parse.urlsplit(a).path == f"{PREFIX}/logout"), None)
    if button is None:
        return None
    csrf = next((f["csrf"] for _, f in forms if f.get("csrf")), "")
    return probe.send(button[0], form={"csrf": csrf, **button[1]})


def check_logout(probe: Probe, url: str, login_page: str, session: str) -> Finding:
    """Logging out must end the session: its cookie (SESSION, `name=value`) no longer gets in."""
    left = log_out(probe, login_page)
    if left is None or not left.location:
        said = left.said() if left else "none found"
        return FAIL, f"could not log out: no logout button took ({said})"
    started = time.monotonic()
    while login_target(after := probe.fresh().send(url, browser=False,
                                                   headers={"Cookie": session})) is None:
        if time.monotonic() - started > LOGOUT_LAG:
            return FAIL, (f"logged out, but the old session cookie still gets in ({after.said()}): "
                          "logout does not end the session")
        time.sleep(0.5)
    waited = time.monotonic() - started
    lag = f" (after {waited:.0f} s: the auth cache)" if waited > 0.5 else ""
    return OK, f"logged out ({left.status}); the old session cookie no longer gets in{lag}"


def check_with_user(probe: Probe, url: str, login: Login, cookie: str) -> Iterator[Finding]:
    """Log in through the real pages, land on exactly URL, reach the app, log out again."""
    try:
        login_page, done = log_in(probe, url, login)
        yield check_landing(done, url, login.user)
        name, token, secure = session_cookie(done, cookie)
    except DoctorStop as stop:
        yield stop.finding
        return
    if url.startswith("https:"):
        yield (OK, f"over https the session cookie {name} is Secure") if secure else (
            FAIL, f"over https the session cookie {name} is not Secure: browsers would send it "
                  "over plain http")
    try:
        yield from check_inside(probe, url, token)
    except DoctorStop as stop:
        yield stop.finding
        log_out(probe, login_page)  # not judged: a session that never got in proves nothing
        return
    yield check_logout(probe, url, login_page, f"{name}={token}")


def check_site(probe: Probe, url: str, cookie: str, probes: Iterable[str], http_port: int,
               now: float) -> Iterator[Finding]:
    """What a stranger can try, one finding at a time (Unreachable when the site is not there)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http":
        yield check_plain_http(parts.hostname or "", parts.port or 80)
    first = check_anonymous(probe, url)
    yield from first
    yield from check_anonymous(probe, urllib.parse.urljoin(url, "ezauth-doctor/deep/path?x=1&y=2"))
    if all(level == OK for level, _ in first):  # else spoofed or forged requests show no more
        yield check_spoofed(probe, url)
        yield from check_forged(probe, url, cookie, now)
    for path in dict.fromkeys(probes):
        yield check_verify_hidden(probe, url, path)
    if parts.scheme == "https":
        yield check_secure_pages(probe.fresh(), url, cookie)
        yield check_http_redirect(probe, url, http_port)


# -- CLI ------------------------------------------------------------------------------------


class CliError(Exception):
    """A failed command; the message is its one-line reason, CODE its exit code."""

    code = 1


class UsageError(CliError):
    """A command given arguments it cannot use, or two data dirs to choose from (exit code 2, like
    argparse's own and a bad setting's)."""

    code = 2


class DataDirUnusable(CliError):
    """A server that cannot use its data dir at start (exit code 3): starting it again changes
    nothing until someone fixes the disk or the permissions, so the README's systemd unit does
    not."""

    code = 3


NO_DATA_DIR = ("nginx-config", "doctor")  # they read no data dir and make none
MAKES_DATA_DIR = ("serve", "passwd")  # the others refuse one that does not exist


def same_dir(one: Path, other: Path) -> bool:
    """Whether ONE and OTHER are the same directory; False when either is missing."""
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def check_data_dir(settings: Settings, make: bool) -> None:
    """Refuse to guess which data dir is meant. A ./ezauth-data here that is not the default beside
    ezauth.py was the data dir before the default moved there: switching silently would look like a
    lost one (or make a new, empty one). A command that only reads or changes one refuses a data dir
    that does not exist, rather than make an empty one under a mistyped name."""
    here, data_dir = Path(DATA_DIR_NAME), settings.data_dir
    if not settings.data_dir_named and os.path.isdir(here) and not same_dir(here, data_dir):
        raise UsageError(f"two data dirs: {here.absolute()} here and {data_dir} beside ezauth.py, "
                         "the default; say which with --data-dir DIR or EZAUTH_DATA_DIR=DIR")
    if not make and not data_dir.is_dir():
        raise CliError(f"no data dir at {data_dir}; name the one ezauth serves from with "
                       "--data-dir DIR or EZAUTH_DATA_DIR=DIR (`serve` and `passwd` make a new "
                       "one)")


def start_service(settings: Settings) -> EzauthApp:
    """make_app for a server about to start (the built-in one, a gunicorn worker): a data dir it
    cannot use stops it with DataDirUnusable, naming the file."""
    try:
        return make_app(settings)
    except StoreUnavailable as err:
        raise DataDirUnusable(f"cannot use {err.path}: {err.error}") from None
    except OSError as err:
        raise DataDirUnusable(f"{err.filename or ''}: {err.strerror or err}") from None


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the built-in server until SIGTERM or Ctrl-C."""
    service = start_service(settings)
    announce_first_admin(service.stores.users, sys.stdout.isatty())
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as err:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: "
                       f"{err.strerror}") from None
    server = HTTPServer(sock, service,
                        Routing(service.answers_inline, service.body_limit, service.respond),
                        trusted=settings.trusted_proxies)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("event=start url=http://%s:%d/ezauth/login data_dir=%s version=%s",
             host, sock.getsockname()[1], settings.data_dir.resolve(), __version__)
    try:
        server.serve_forever()
    finally:
        server.close()
        log.info("event=stop")
    return 0


def this_command() -> str:
    """How to run ezauth the way it runs now, for messages: `.venv/bin/python ezauth.py`."""
    python = sys.executable
    if python.startswith(os.getcwd()):
        python = os.path.relpath(python)
    return f"{python} {os.path.relpath(__file__) if __file__.startswith(os.getcwd()) else __file__}"


def announce_first_admin(users: Users, terminal: bool) -> None:
    """On a first start with no users, create admin and show its password, but only on a terminal:
    under systemd it would land in the journal, readable long after."""
    if not terminal:
        if not users.names():
            log.warning("event=no_users note=nobody_can_log_in_yet command=%s",
                        logval(f"{this_command()} passwd admin", limit=None))
        return
    try:
        password = users.create_first_admin()
    except OSError as err:
        log.error("event=first_admin_failed error=%s", logval(str(err), limit=None))
        return
    if password:
        print("\nezauth: no users yet, so I created one.\n  user:     admin\n  password: "
              f"{password}\n  (shown only this once; only its hash is stored)\n"
              f"Change it with:  {this_command()} passwd admin\n", flush=True)


def read_new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n")
        password = password.removesuffix("\r")
    elif not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password on; pipe it in with --password-stdin")
    else:
        try:
            password = getpass.getpass(f"New password for {args.name}: ")
            if getpass.getpass("Again: ") != password:
                raise CliError("the two passwords differ; nothing changed")
        except EOFError:
            raise CliError("no password given; nothing changed") from None
    if len(password) < MIN_PASSWORD:
        raise CliError(f"passwords need at least {MIN_PASSWORD} characters; nothing changed")
    return password


def open_users(settings: Settings) -> Users:
    return Users(settings.data_dir / "users")


def open_registry(settings: Settings) -> tuple[SessionRegistry, ApiTokens]:
    db = open_sessions_database(settings.data_dir, time.time())
    return SessionRegistry(db), ApiTokens(db)


def cmd_passwd(args: argparse.Namespace, settings: Settings) -> int:
    """Create a user or change their password: their sessions end and, unless --keep-tokens, their
    API tokens are revoked (whoever knew the old password may have made them)."""
    if not NAME_RE.fullmatch(args.name):
        raise CliError(f"{args.name!r} is not a valid user name (letters, digits, . _ @ + -; up "
                       "to 64)")
    password = read_new_password(args)
    prepare_data_dir(settings.data_dir)
    users = open_users(settings)
    existed = users.fingerprint(args.name) is not None
    users.set_password(args.name, password)
    if not existed:
        print(f"created user {args.name}")
        return 0
    registry, tokens = open_registry(settings)
    ended = registry.end_user(args.name, "password_changed", time.time())
    revoked = ("API tokens kept (--keep-tokens)" if args.keep_tokens
               else f"{tokens.revoke_user(args.name, time.time())} API token(s) revoked")
    print(f"changed the password of {args.name}; {ended} session(s) ended, {revoked}")
    return 0


def rules_naming(path: Path, name: str) -> list[str]:
    """Where the rules file still names NAME (a rule's user, a group member), as "line N" notes."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if (words[:1] == ["group"] and name in words[2:]) or (words[:1] in (["allow"], ["deny"])
                                                               and words[1:2] == [name]):
            found.append(f"line {number}")
    return found


def cmd_deluser(args: argparse.Namespace, settings: Settings) -> int:
    """Delete a user and everything of theirs: sessions, API tokens, second factor. A new user of
    the same name starts clean; the rules file is theirs to edit, so it is only pointed out."""
    users = open_users(settings)
    if users.fingerprint(args.name) is None:
        raise CliError(f"no user {args.name!r}")
    # Everything of theirs first, the user last: a failure part-way leaves a user to delete again,
    # never a deleted user whose tokens or second factor come back with a new user of the name.
    registry, tokens = open_registry(settings)
    ended = registry.end_user(args.name, "user_deleted", time.time())
    revoked = tokens.revoke_user(args.name, time.time())
    second_factor = TotpStore(settings.data_dir / "totp").remove(args.name)
    users.delete(args.name)
    print(f"deleted user {args.name}: {ended} session(s) ended, {revoked} API token(s) revoked"
          f"{', second factor removed' if second_factor else ''}")
    lines = rules_naming(settings.data_dir / "rules", args.name)
    if lines:
        print(f"ezauth: warning: {settings.data_dir / 'rules'} still names {args.name} "
              f"({', '.join(lines)}): a new user called {args.name} would get those rules",
              file=sys.stderr)
    return 0


def print_table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width)
                        for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_sessions(args: argparse.Namespace, settings: Settings) -> int:
    """List live sessions, or end one (by id or an unambiguous prefix) or all of a user's."""
    if args.revoke_tokens and not args.end_user:
        raise CliError("--revoke-tokens goes with --end-user NAME")
    (registry, tokens), now = open_registry(settings), time.time()
    if args.end:
        matches = [r for r in registry.live(now) if r.sid.startswith(args.end)]
        if len(matches) != 1 or len(args.end) < 6:
            raise CliError(f"{args.end!r} matches {len(matches)} live sessions; give at least 6 "
                           "characters of one id")
        registry.end([matches[0].sid], "ended_by_admin", now)
        print(f"ended session {matches[0].sid[:8]} of {matches[0].user}; it is refused within a "
              "second")
    elif args.end_user:
        count = registry.end_user(args.end_user, "ended_by_admin", now)
        revoked = (f"; {tokens.revoke_user(args.end_user, now)} API token(s) revoked"
                   if args.revoke_tokens else "")
        print(f"ended {count} session{'s' * (count != 1)} of {args.end_user}{revoked}")
    else:
        print_table(("ID", "USER", "CREATED", "LAST SEEN", "IP", "BROWSER"),
                    ((r.sid[:8], r.user, format_time(r.created, "en"),
                      format_time(r.last_seen, "en"), r.ip, r.agent)
                     for r in registry.live(now, args.name)))
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    """API tokens: add one for a user (shown once), list them, revoke one."""
    tokens, now = open_registry(settings)[1], time.time()
    if args.action == "add":
        if open_users(settings).fingerprint(args.name) is None:
            raise CliError(f"no user {args.name!r}")
        try:
            token, secret = tokens.add(args.name, args.label, now, args.expires, args.path or ())
        except ValueError as err:
            raise CliError(str(err)) from None
        print(f"{secret}\n(token {token.id} for {args.name}; shown only this once, only its "
              "SHA-256 is stored)")
    elif args.action == "list":
        print_table(("ID", "USER", "LABEL", "CREATED", "LAST USED", "EXPIRES", "PATHS"),
                    ((t.id, t.user, t.label, format_time(t.created, "en"),
                      format_time(t.last_used, "en"), format_time(t.expires, "en"),
                      " ".join(t.paths) or "everywhere")
                     for t in tokens.list(now, args.name)))
    elif not tokens.revoke(args.id, now):
        raise CliError(f"no token {args.id!r}")
    else:
        print(f"revoked token {args.id}; it is refused within a second")
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    for name in open_users(settings).names():
        print(name)
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    """Make a new signing key now; running servers start using it within a few seconds."""
    now = time.time()
    keys = KeyRing(settings.data_dir / "keys.json", settings.rotate_every, settings.longest_ttl,
                   now)
    key = keys.rotate(now)
    if key is None:
        raise CliError("could not write the key ring (see the log line above)")
    print(f"new signing key {key.kid}, used from {PUBLISH_DELAY:.0f} s from now; existing "
          "sessions stay valid")
    return 0


def show_secret(name: str, secret: bytes) -> None:
    """A new two-factor secret as an authenticator app takes it: the secret to type (in groups of
    four), the otpauth:// URI, and a QR code when segno is installed."""
    text = base64.b32encode(secret).decode().rstrip("=")
    uri = totp_uri(name, secret)
    print(f"Add this to an authenticator app for {name}: scan the QR code, or type the secret.\n"
          f"  secret: {' '.join(text[i:i + 4] for i in range(0, len(text), 4))}\n  {uri}")
    try:
        import segno
    except ImportError:
        print("(pip install segno to get a QR code here)")
    else:
        segno.make(uri, error="m").terminal(compact=True)
    sys.stdout.flush()  # a script reading the secret writes the code only once it has seen it


def read_code(args: argparse.Namespace) -> str:
    """The code the app shows now: asked on the terminal, or read from standard input
    (--code-stdin)."""
    if args.code_stdin:
        return sys.stdin.readline().strip()
    try:
        return input("The 6-digit code the app shows now: ").strip()
    except EOFError:
        raise CliError("no code given; nothing changed") from None


def cmd_totp(args: argparse.Namespace, settings: Settings) -> int:
    """Turn on two-factor login once a code from the new secret shows the user's app holds it (a new
    secret each time, replacing an old one only then), or --remove it."""
    store = TotpStore(settings.data_dir / "totp")
    if args.remove:
        if not store.remove(args.name):
            raise CliError(f"{args.name!r} has no second factor")
        print(f"removed the second factor of {args.name}; they log in with the password alone")
        return 0
    if open_users(settings).fingerprint(args.name) is None:
        raise CliError(f"no user {args.name!r}; create it first with: {this_command()} passwd "
                       f"{args.name}")
    if not args.code_stdin and not sys.stdin.isatty():
        raise CliError("no terminal to ask for a code on; pipe it in with --code-stdin once the "
                       "secret is printed")
    secret = secrets.token_bytes(20)
    show_secret(args.name, secret)
    if store.enrolled(args.name):
        print(f"{args.name} has a second factor already; a right code from this new secret "
              "replaces it.", flush=True)
    code = read_code(args).replace(" ", "")
    step = matching_step(secret, code, time.time(), -1) if CODE_RE.fullmatch(code) else None
    if step is None:
        raise CliError("that is not this secret's code now (is the phone's clock right?); "
                       "nothing changed")
    store.enroll(args.name, secret, used_step=step)  # the code just typed cannot log anyone in
    print(f"two-factor login is on for {args.name}: after the password, the login page asks for "
          "a code")
    return 0


def listen_address(raw: str) -> str:
    """nginx's `listen` value for --listen: PORT, ADDR:PORT or [IPv6]:PORT; CliError otherwise."""
    match = re.fullmatch(r"(?:(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):)?(\d{1,5})",
                         raw.strip())
    if match is None or not 1 <= int(match.group(2)) <= 65535 or (
            match.group(1) and not valid_ip(match.group(1).strip("[]"))):
        raise CliError(f"--listen {raw!r}: give a port (8080), ADDR:PORT (127.0.0.1:8080) or "
                       "[::]:8080")
    return raw.strip()


def ezauth_address(raw: str) -> str:
    """The upstream `server` of --ezauth: a port, HOST:PORT, http://HOST:PORT or unix:PATH."""
    if raw.startswith("unix:/"):
        return raw
    if re.fullmatch(r"\d{1,5}", raw.strip()):
        raw = f"127.0.0.1:{raw.strip()}"
    parts = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    try:
        if (parts.scheme != "http" or not parts.hostname or parts.port is None
                or parts.path not in ("", "/")):
            raise ValueError
    except ValueError:
        raise CliError(f"--ezauth {raw!r}: give ezauth's address as a port, HOST:PORT, "
                       "http://HOST:PORT or unix:/path/to.sock") from None
    return parts.netloc


SHARED_MARK = "# ---- The shared part:"
APPS_MARK = "# ---- One server block per app"


@dataclass(frozen=True)
class Site:
    """A server block nginx-config writes: an app behind ezauth, or (app "") the portal's host."""

    app: str  # the app's HOST:PORT, or "" for the portal
    listen: str
    server_name: str
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def https(self) -> bool:
        return bool(self.tls_cert)


class InOrder(argparse.Action):
    """Keeps nginx-config's site flags in the order given: the ones after an --app belong to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        namespace.sites = [*(getattr(namespace, "sites", None) or []), (self.dest, values)]


def app_address(raw: str) -> str:
    """HOST:PORT of an --app URL; CliError unless it is http://HOST:PORT."""
    parts = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    try:
        if (parts.scheme != "http" or not parts.hostname or parts.port is None
                or parts.path not in ("", "/")):
            raise ValueError
    except ValueError:
        raise CliError(f"--app {raw!r}: give the app's address as http://HOST:PORT") from None
    return parts.netloc


def site_of(app: str, flags: Mapping[str, str]) -> Site:
    """A Site from one --app (or the portal, APP "") and the flags that apply to it; CliError naming
    what is wrong."""
    cert, key = flags.get("tls_cert", ""), flags.get("tls_key", "")
    if bool(cert) != bool(key):
        raise CliError("--tls-cert and --tls-key go together: give both files, or neither")
    listen = listen_address(flags.get("listen") or ("443" if cert else "80"))
    if not cert and listen.rpartition(":")[2] == "443":
        raise CliError(f"--listen {listen}: port 443 is for https; add --tls-cert FILE --tls-key "
                       "FILE (e.g. /etc/letsencrypt/live/NAME/fullchain.pem and privkey.pem), or "
                       "listen on 80")
    name = flags.get("server_name") or "_"
    if not re.fullmatch(r"[A-Za-z0-9.*_-]+( [A-Za-z0-9.*_-]+)*", name):
        raise CliError(f"--server-name {name!r}: not a server name")
    for path in (cert, key):
        if path and (not path.startswith("/") or re.search(r"[\s;{}\"'$]", path)):
            raise CliError(f"{path!r}: give certificate and key as absolute paths without spaces "
                           "or quotes")
    return Site(app, listen, name, cert, key)


def sites_from(entries: Iterable[tuple[str, str]], portal: str | None) -> list[Site]:
    """The sites of nginx-config's flags, in order (flags before the first --app: defaults)."""
    defaults: dict[str, str] = {}
    apps: list[tuple[str, dict[str, str]]] = []
    for dest, value in entries:
        if dest == "app":
            apps.append((app_address(value), dict(defaults)))
        else:
            (apps[-1][1] if apps else defaults)[dest] = value
    sites = [site_of(app, flags) for app, flags in apps]
    if portal:
        sites.append(site_of("", {**defaults, "server_name": portal}))
    seen = [(s.listen, name) for s in sites for name in s.server_name.split()]
    if len(seen) != len(set(seen)):
        raise CliError("two sites listen on the same address with the same --server-name: give "
                       "each its own")
    return sites


def tls_lines(site: Site) -> str:
    """The https lines of a server block with a certificate."""
    return (f"    ssl_certificate     {site.tls_cert};\n    ssl_certificate_key {site.tls_key};\n"
            "    # http:// typed against this https port: back to https, same host and port.\n"
            "    error_page 497 =301 https://$ezauth_host$request_uri;\n")


def redirect_server(site: Site) -> str:
    """Plain http on port 80 of an https site's name, sent to https."""
    port = site.listen.rpartition(":")[2]
    target = "https://$host" + ("" if port == "443" else f":{port}") + "$request_uri"
    return (f"server {{\n    listen 80;\n    server_name {site.server_name};\n"
            f"    # Plain http: to https.\n    return 301 {target};\n}}\n")


PORTAL_SERVER = """server {
    listen $listen;
    server_name $server_name;
$tls
    absolute_redirect off;

    # The portal: ezauth's login, account and logout pages on a host of their own, so no app's
    # scripts share an origin with them (EZAUTH_PORTAL points here).
    location /ezauth/ {
        proxy_pass http://ezauth;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $$ezauth_host;
        proxy_set_header X-Forwarded-For $$remote_addr;
        proxy_set_header X-Real-IP $$remote_addr;
        proxy_set_header X-Forwarded-Proto $$scheme;
        client_max_body_size 64k;
        error_page 502 504 = @ezauth_down;
    }
    location = /ezauth/verify {
        return 404;
    }
    location @ezauth_down {
        default_type text/plain;
        return 503 "The sign-in service is not available right now. Try again in a moment.\\n";
    }
    location / {
        return 302 /ezauth/account;
    }
}
"""


def render_site(server_block: str, site: Site) -> str:
    """The shipped server block filled in for one app (or the portal), https lines included."""
    if not site.app:
        block = string.Template(PORTAL_SERVER).substitute(
            listen=f"{site.listen} ssl" if site.https else site.listen,
            server_name=site.server_name, tls=tls_lines(site) if site.https else "")
    else:
        block = server_block.replace("127.0.0.1:7860", site.app).replace(
            "    listen 80;\n", f"    listen {site.listen}{' ssl' if site.https else ''};\n")
        block = block.replace("    server_name _;\n", f"    server_name {site.server_name};\n"
                              + (tls_lines(site) if site.https else ""))
    return block + ("\n" + redirect_server(site) if site.https else "")


def render_nginx_config(template: str, sites: list[Site], ezauth: str, part: str = "all") -> str:
    """nginx.conf.example filled in: the shared part once (ezauth's address in its upstream) and/or
    a server block for each site."""
    head, _, rest = template.partition(SHARED_MARK)
    shared, _, apps = rest.partition(APPS_MARK)
    apps_mark, _, server_block = (APPS_MARK + apps).partition("\n")
    shared = (SHARED_MARK + shared).replace("server 127.0.0.1:2424;", f"server {ezauth};")
    blocks = "\n".join(render_site(server_block.lstrip("\n"), site) for site in sites)
    return {"shared": shared, "apps": blocks, "all": f"{head}{shared}{apps_mark}\n\n{blocks}"}[part]


def cmd_nginx_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print the shipped nginx config with this setup's values filled in: the shared part once, and
    a server block per --app (and for --portal)."""
    sites = sites_from(getattr(args, "sites", None) or [], args.portal)
    if args.part != "shared" and not sites:
        raise CliError("give at least one --app http://HOST:PORT (or --part shared for the shared "
                       "part alone)")
    if args.ezauth:
        ezauth, source = ezauth_address(args.ezauth), "--ezauth"
    else:
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        ezauth = f"{host}:{settings.port}"
        source = "EZAUTH_HOST and EZAUTH_PORT; --ezauth to choose"
    template = (HERE / "nginx.conf.example").read_text(encoding="utf-8")
    notes = [f"# Rendered by `python ezauth.py nginx-config`: ezauth at {ezauth} (from {source})."]
    notes += [f"# {s.server_name} on {s.listen}{' (https)' if s.https else ''}: "
              + (f"the app at http://{s.app}" if s.app else "the login portal") for s in sites]
    if args.portal:
        notes.append(f"# For the portal set EZAUTH_PORTAL=https://{args.portal} and "
                     "EZAUTH_COOKIE_DOMAIN (a parent domain of every app and of the portal) "
                     "for ezauth.")
    sys.stdout.write("\n".join(notes) + "\n\n"
                     + render_nginx_config(template, sites, ezauth, args.part))
    return 0


def doctor_url(raw: str) -> str:
    """The doctor's URL argument: http(s), a host, no user info, not one of ezauth's own pages."""
    parts = urllib.parse.urlsplit(raw)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (parts.scheme not in ("http", "https") or not parts.hostname or not port_ok
            or "@" in parts.netloc or re.search(r"[\x00-\x20\x7f]", raw)):
        raise argparse.ArgumentTypeError(f"{raw!r}: give the protected site as http://HOST/... or "
                                         "https://HOST/...")
    if parts.path.startswith(f"{PREFIX}/"):
        raise argparse.ArgumentTypeError(f"{raw!r} is one of ezauth's own pages; give your app's "
                                         "address")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", parts.query, ""))


def seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds (up to 3600)")
    return value


def port_number(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number")
    return int(raw)


def doctor_tls(ca: str | None, insecure: bool) -> ssl.SSLContext:
    """Certificates checked against the system's CAs, or CA; --insecure (a WARN): not at all."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except OSError as err:
        raise UsageError(f"--ca {ca}: {err}") from None
    if insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def read_doctor_password(user: str) -> str:
    """The password of --user: asked on a terminal, else one line of standard input."""
    if sys.stdin.isatty():
        return getpass.getpass(f"Password of {user}: ")
    password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("--user reads the password from one line of standard input, and there "
                         "was none")
    return password


def doctor_findings(args: argparse.Namespace, cookie: str, probe: Probe, login: Login | None,
                    now: float) -> Iterator[Finding]:
    """Every finding of one doctor run, in the order they are printed."""
    if args.insecure:
        yield WARN, ("--insecure: the certificate was not checked; --ca FILE checks it against "
                     "your own CA")
    config, probes = None, list(VERIFY_PROBES)
    if args.nginx or args.nginx_dump:
        try:
            binary = args.nginx_bin or shutil.which("nginx") or "/usr/sbin/nginx"
            config = read_nginx_config(binary, args.nginx_dump)
        except (NginxError, OSError) as err:
            yield FAIL, f"nginx: {err}"
        else:
            probes += [uri for uri, _ in auth_targets(config) if "$" not in uri]
    try:
        yield from check_site(probe, args.url, cookie, probes, args.http_port, now)
        if login is not None:
            yield from check_with_user(probe.fresh(), args.url, login, cookie)
    except Unreachable as err:
        yield FAIL, str(err)
    if config is not None:
        yield from nginx_findings(config)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Try a protected site as a stranger would (--nginx: its nginx config too); 1 on a FAIL."""
    if args.user and args.nginx_dump == "-":
        raise UsageError("--nginx-dump - and --user both read standard input; save the dump to a "
                         "file")
    hosts = frozenset({urllib.parse.urlsplit(args.url).hostname or "",
                       *(h.lower() for h in args.login_host or ())})
    login = Login(args.user, read_doctor_password(args.user), hosts) if args.user else None
    probe = Probe(doctor_tls(args.ca, args.insecure), args.timeout)
    counts = dict.fromkeys((OK, WARN, FAIL), 0)
    for level, message in doctor_findings(args, settings.cookie_name, probe, login, time.time()):
        counts[level] += 1
        print(f"{level:<6}{message}", flush=True)
    print(f"doctor: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL for {args.url}")
    return 1 if counts[FAIL] else 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "serve": serve, "passwd": cmd_passwd, "deluser": cmd_deluser, "users": cmd_users,
    "rotate": cmd_rotate, "nginx-config": cmd_nginx_config, "totp": cmd_totp,
    "sessions": cmd_sessions, "token": cmd_token, "doctor": cmd_doctor,
}


def add_setting_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """A flag for each named setting, from the settings table: --port for EZAUTH_PORT and so on."""
    for item, spec in setting_specs():
        if item.name in names:
            flag, dest = f"--{item.name.replace('_', '-')}", f"setting_{item.name}"
            helptext = f"{spec.help} ({variable(item)}, default {shown_default(item, spec)})"
            helptext = helptext.replace("%", "%%")
            if isinstance(item.default, bool):
                parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                    help=helptext)
            else:
                parser.add_argument(flag, dest=dest, metavar=item.name.upper(), help=helptext)


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, parsed as their variables would be."""
    flags: dict[str, Any] = {}
    for item, spec in setting_specs():
        raw = getattr(args, f"setting_{item.name}", None)
        if raw is not None:
            flag = f"--{item.name.replace('_', '-')}"
            flags[item.name] = (raw if isinstance(raw, bool)
                                else spec.parse(f"{variable(item)} ({flag})", raw))
    return flags


def add_user_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """passwd, deluser, users, totp, sessions: the commands about users and their logins."""
    passwd_p = sub.add_parser("passwd", parents=[common], help="create a user or change a password")
    passwd_p.add_argument("name")
    passwd_p.add_argument("--password-stdin", action="store_true",
                          help="read the password from one line of standard input")
    passwd_p.add_argument("--keep-tokens", action="store_true",
                          help="keep the user's API tokens working (by default a new password "
                               "revokes them)")
    sub.add_parser("deluser", parents=[common], help="delete a user").add_argument("name")
    sub.add_parser("users", parents=[common], help="list users")
    totp_p = sub.add_parser("totp", parents=[common],
                            help="ask NAME for an authenticator code after the password")
    totp_p.add_argument("name")
    totp_how = totp_p.add_mutually_exclusive_group()
    totp_how.add_argument("--code-stdin", action="store_true", help="read the code from one line "
                          "of standard input, written once the secret is printed")
    totp_how.add_argument("--remove", action="store_true",
                          help="log in with the password alone again")
    sessions_p = sub.add_parser("sessions", parents=[common],
                                help="list live sessions (of NAME), or end them")
    sessions_p.add_argument("name", nargs="?")
    ending = sessions_p.add_mutually_exclusive_group()
    ending.add_argument("--end", metavar="ID",
                        help="end one session (its id, or 6+ characters of it)")
    ending.add_argument("--end-user", metavar="NAME", help="end every session of NAME")
    sessions_p.add_argument("--revoke-tokens", action="store_true",
                            help="with --end-user: revoke NAME's API tokens too (a copied cookie "
                                 "or a stolen token)")


def add_token_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """token add, token list, token revoke."""
    token_p = sub.add_parser("token", help="API tokens for scripts: add, list, revoke")
    token_sub = token_p.add_subparsers(dest="action", metavar="add|list|revoke", required=True)
    token_add = token_sub.add_parser("add", parents=[common],
                                     help="make a token for NAME (printed once)")
    token_add.add_argument("name")
    token_add.add_argument("--label", required=True,
                           help="what the token is for, e.g. 'sd api script'")
    token_add.add_argument("--expires", type=int, metavar="DAYS",
                           help="stop working after DAYS days")
    token_add.add_argument("--path", action="append", metavar="PREFIX",
                           help="only under this path (repeatable)")
    token_sub.add_parser("list", parents=[common],
                         help="list tokens (of NAME)").add_argument("name", nargs="?")
    token_sub.add_parser("revoke", parents=[common],
                         help="revoke a token by its id").add_argument("id")


def add_nginx_config_command(sub: Any) -> None:
    """nginx-config: --listen, --server-name, --tls-cert and --tls-key after an --app are that
    app's; before the first --app they are every app's."""
    nginx_p = sub.add_parser(
        "nginx-config", help="print nginx.conf.example filled in, for one app or several",
        epilog="e.g. nginx-config --app http://127.0.0.1:7860 --listen 8080 --app "
               "http://127.0.0.1:8888 --listen 8081")
    nginx_p.add_argument("--app", action=InOrder,
                         help="a protected app, e.g. http://127.0.0.1:7860 (repeatable)")
    nginx_p.add_argument("--listen", action=InOrder,
                         help="where nginx listens for it: a port (80), ADDR:PORT "
                              "(127.0.0.1:8080) or [::]:8080; default 80, or 443 with a "
                              "certificate")
    nginx_p.add_argument("--server-name", action=InOrder,
                         help="nginx server_name, e.g. sd.example.com")
    nginx_p.add_argument("--tls-cert", action=InOrder,
                         help="https: the certificate (fullchain.pem) file")
    nginx_p.add_argument("--tls-key", action=InOrder,
                         help="https: the private key (privkey.pem) file")
    nginx_p.add_argument("--portal", metavar="NAME",
                         help="a server block for the login pages on a host name of their own "
                              "(with EZAUTH_PORTAL and EZAUTH_COOKIE_DOMAIN); uses the defaults' "
                              "--listen and certificate")
    nginx_p.add_argument("--part", choices=("all", "shared", "apps"), default="all",
                         help="print everything (default), only the shared part (once per nginx), "
                              "or only the server blocks (to add an app to an nginx that has the "
                              "shared part)")
    nginx_p.add_argument("--ezauth",
                         help="where ezauth listens: a port, HOST:PORT, http://HOST:PORT or "
                              "unix:/path (default: EZAUTH_HOST and EZAUTH_PORT)")


def add_doctor_command(sub: Any) -> None:
    doctor_p = sub.add_parser("doctor", help="check that a protected site lets nobody in unasked")
    doctor_p.add_argument("url", type=doctor_url, metavar="URL",
                          help="the protected site, e.g. https://sd.example.com/")
    doctor_p.add_argument("--user", metavar="NAME",
                          help="also log in as NAME (the password: one line on standard "
                               "input), land on URL, log out")
    doctor_p.add_argument("--login-host", action="append", metavar="HOST",
                          help="a host of its own that serves the login page (a portal): the only "
                               "host besides URL's that --user sends the password to (repeatable)")
    tls = doctor_p.add_mutually_exclusive_group()
    tls.add_argument("--ca", metavar="FILE",
                     help="trust the CA certificate(s) in FILE, e.g. a self-signed one")
    tls.add_argument("--insecure", action="store_true",
                     help="do not check the certificate (printed as a WARN)")
    doctor_p.add_argument("--http-port", type=port_number, default=80, metavar="PORT",
                          help="where plain http answers, for the redirect check of an https URL "
                               "(default 80)")
    doctor_p.add_argument("--nginx", action="store_true",
                          help="also read the config with `nginx -T` (on the box, as root)")
    doctor_p.add_argument("--nginx-bin", metavar="PATH",
                          help="the nginx to run (default: nginx on PATH, else /usr/sbin/nginx)")
    doctor_p.add_argument("--nginx-dump", metavar="FILE",
                          help="read a saved `nginx -T` (- for standard input) instead "
                               "of running nginx; implies --nginx")
    doctor_p.add_argument("--timeout", type=seconds, default=10.0, metavar="SECONDS",
                          help="per request (default 10)")
    add_setting_flags(doctor_p, ["cookie_name"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ezauth.py", description="Login page and session check for nginx auth_request.",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ezauth {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    add_setting_flags(common, ["data_dir"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_p = sub.add_parser("serve", parents=[common], help="run the server (the default command)")
    add_setting_flags(serve_p,
                      [item.name for item, _ in setting_specs() if item.name != "data_dir"])
    add_user_commands(sub, common)
    add_token_commands(sub, common)
    sub.add_parser("rotate", parents=[common],
                   help="make a new signing key now (sessions stay valid)")
    add_nginx_config_command(sub)
    add_doctor_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes: 0 ok, 1 failure, 2 usage error or bad setting, 3 a server that
    cannot use its data dir."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s ezauth %(levelname)s %(message)s")
    try:
        settings = Settings.from_env(flags=setting_flags(args))
        if args.command not in NO_DATA_DIR:
            check_data_dir(settings, make=args.command in MAKES_DATA_DIR)
        if args.command not in (*NO_DATA_DIR, "serve"):  # serve's start line names it
            print(f"ezauth: data dir {settings.data_dir.resolve()}", file=sys.stderr, flush=True)
        return COMMANDS[args.command](args, settings)
    except SettingsError as err:
        print(f"ezauth: {err}", file=sys.stderr)
        return 2
    except CliError as err:
        print(f"ezauth: {err}", file=sys.stderr)
        return err.code
    except StoreUnavailable as err:
        print(f"ezauth: cannot use {err.path}: {err.error}; this command did not finish, run it "
              "again once that is fixed", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"ezauth: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1


GUNICORN_APP_LOAD_ERROR = 4  # the worker exit code on which gunicorn halts, not starts it again
_service_lock = threading.Lock()


def load_service() -> EzauthApp:
    """The app as gunicorn's worker loads it, from the environment and the .env files, checked as
    `serve` checks its own; its start line names the data dir."""
    settings = Settings.from_env()
    check_data_dir(settings, make=True)
    service = start_service(settings)
    announce_first_admin(service.stores.users, sys.stdout.isatty())
    log.info("event=start server=gunicorn pid=%d data_dir=%s version=%s", os.getpid(),
             settings.data_dir.resolve(), __version__)
    return service


def __getattr__(name: str) -> EzauthApp:
    """`gunicorn 'ezauth:app'`: gunicorn looks `app` up as each worker boots, and it is built then.
    A bad setting, two data dirs to choose from or a data dir that cannot be used stops the worker
    from booting with the one line `serve` would print, and gunicorn halts rather than start workers
    that would answer every request with a 500, or could not record a login."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _service_lock:
        if "app" not in globals():
            logging.basicConfig(level=logging.INFO,
                                format="%(asctime)s ezauth %(levelname)s %(message)s")
            try:
                globals()["app"] = load_service()
            except (SettingsError, CliError) as err:
                print(f"ezauth: {err}", file=sys.stderr, flush=True)
                raise SystemExit(GUNICORN_APP_LOAD_ERROR) from None
    return cast(EzauthApp, globals()["app"])


if __name__ == "__main__":
    sys.exit(main())
