"""ezauth: login page + JWT cookie + verify endpoint for Nginx auth_request."""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import fcntl
import getpass
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import resource
import secrets
import signal
import socket
import sqlite3
import string
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from typing import NamedTuple, cast

import jwt

__version__ = "1.0.0"

HERE = Path(__file__).resolve().parent
PREFIX = "/ezauth"
log = logging.getLogger("ezauth")

Clock = Callable[[], float]


def logval(value: str) -> str:
    """A log field that cannot break the line or forge another field."""
    if re.fullmatch(r"[A-Za-z0-9._@+:/-]{1,80}", value):
        return value
    return json.dumps(value[:80], ensure_ascii=True)


WSGIApp = Callable[[dict[str, object], Callable[..., object]], Iterable[bytes]]


# -- Settings -------------------------------------------------------------------------------

ENV_FILE = ".env"
LEGACY_IGNORED = ("SECRET_KEY", "LAST_UPDATED")  # from the original blog post's .env
COOKIE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
DOMAIN_RE = re.compile(r"\.?([a-z0-9-]{1,63}\.)*[a-z0-9-]{1,63}")
LANGS = ("en", "zh-CN")


class SettingsError(ValueError):
    """A bad setting; the message names it."""


def _default_proxies() -> tuple:
    return (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class Settings:
    """Every knob ezauth has, validated once at construction."""

    host: str = "127.0.0.1"
    port: int = 2424
    data_dir: Path = Path("ezauth-data")
    session_ttl: int = 1800
    remember_ttl: int = 2592000
    rotate_every: int = 86400
    trusted_proxies: tuple = field(default_factory=_default_proxies)
    max_attempts: int = 5
    lockout_window: int = 300
    lockout_time: int = 300
    cookie_name: str = "ezauth"
    cookie_domain: str = ""
    cookie_secure: str = "auto"
    title: str = ""
    subtitle: str = ""
    slogan: str = ""
    lang: str = ""
    access_log: bool = False
    metrics: bool = False
    basic_auth: bool = False
    legacy_users: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"EZAUTH_PORT: {self.port} is not a port number (0-65535)")
        for name in ("session_ttl", "remember_ttl", "rotate_every", "max_attempts",
                     "lockout_window", "lockout_time"):
            if getattr(self, name) < 1:
                raise SettingsError(f"EZAUTH_{name.upper()}: must be at least 1, got {getattr(self, name)}")
        if not COOKIE_NAME_RE.fullmatch(self.cookie_name):
            raise SettingsError(f"EZAUTH_COOKIE_NAME: {self.cookie_name!r} is not a cookie name "
                                "(letters, digits, _ and -)")
        if self.cookie_domain and not DOMAIN_RE.fullmatch(self.cookie_domain):
            raise SettingsError(f"EZAUTH_COOKIE_DOMAIN: {self.cookie_domain!r} is not a domain name")
        if self.cookie_secure not in ("auto", "1", "0"):
            raise SettingsError(f"EZAUTH_COOKIE_SECURE: {self.cookie_secure!r} is not auto, 1 or 0")
        if self.lang and self.lang not in LANGS:
            raise SettingsError(f"EZAUTH_LANG: {self.lang!r} is not one of {', '.join(LANGS)}")
        for name in ("metrics", "basic_auth"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"EZAUTH_{name.upper()}: {getattr(self, name)!r} is not 1 or 0")

    @property
    def longest_ttl(self) -> int:
        return max(self.session_ttl, self.remember_ttl)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, flags: Mapping | None = None,
                 env_file: Path | None = None) -> Settings:
        """Flags override environment variables, which override a .env file in the working directory."""
        environ = os.environ if environ is None else environ
        dotenv = read_env_file(env_file or Path(ENV_FILE))
        merged = {**dotenv, **{k: v for k, v in environ.items() if k.startswith("EZAUTH_")}}
        values: dict = {}
        for env_name, (attr, parse) in ENV_SETTINGS.items():
            if merged.get(env_name, "") != "":
                values[attr] = parse(env_name, merged[env_name])
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        values["legacy_users"] = legacy_users(dotenv)
        ignored = [key for key in LEGACY_IGNORED if key in dotenv]
        if ignored:
            log.warning("event=legacy_env_ignored keys=%s note=the_key_ring_in_the_data_dir_replaces_them",
                        ",".join(ignored))
        return cls(**values)


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a whole number") from None


def _bool(name: str, raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: {raw!r} is not 1 or 0")


def _networks(name: str, raw: str) -> tuple:
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in raw.split(",") if part.strip())
    except ValueError as err:
        raise SettingsError(f"{name}: {err}") from None


def _text(name: str, raw: str) -> str:
    if len(raw) > 300:
        raise SettingsError(f"{name}: longer than 300 characters")
    return raw


def _lang(name: str, raw: str) -> str:
    return "zh-CN" if raw.strip().lower() in ("zh", "zh-cn", "zh_cn", "zh-hans") else raw.strip()


ENV_SETTINGS: dict[str, tuple[str, Callable]] = {
    "EZAUTH_HOST": ("host", lambda _, raw: raw.strip()),
    "EZAUTH_PORT": ("port", _int),
    "EZAUTH_DATA_DIR": ("data_dir", lambda _, raw: Path(raw)),
    "EZAUTH_SESSION_TTL": ("session_ttl", _int),
    "EZAUTH_REMEMBER_TTL": ("remember_ttl", _int),
    "EZAUTH_ROTATE_EVERY": ("rotate_every", _int),
    "EZAUTH_TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "EZAUTH_MAX_ATTEMPTS": ("max_attempts", _int),
    "EZAUTH_LOCKOUT_WINDOW": ("lockout_window", _int),
    "EZAUTH_LOCKOUT_TIME": ("lockout_time", _int),
    "EZAUTH_COOKIE_NAME": ("cookie_name", lambda _, raw: raw.strip()),
    "EZAUTH_COOKIE_DOMAIN": ("cookie_domain", lambda _, raw: raw.strip().lower()),
    "EZAUTH_COOKIE_SECURE": ("cookie_secure", lambda _, raw: raw.strip().lower()),
    "EZAUTH_TITLE": ("title", _text),
    "EZAUTH_SUBTITLE": ("subtitle", _text),
    "EZAUTH_SLOGAN": ("slogan", _text),
    "EZAUTH_LANG": ("lang", _lang),
    "EZAUTH_ACCESS_LOG": ("access_log", _bool),
    "EZAUTH_METRICS": ("metrics", _bool),
    "EZAUTH_BASIC_AUTH": ("basic_auth", _bool),
}


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


def legacy_users(dotenv: Mapping[str, str]) -> tuple:
    """The one user of a .env from the original blog post, as ((name, password),) or ()."""
    name, password = dotenv.get("chat_username", ""), dotenv.get("password", "")
    return ((name, password),) if name and password else ()


# -- Files ----------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive flock on PATH.lock: every writer of PATH in every process takes it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace PATH with DATA so a reader, or a crash, only ever sees the old or the new file."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer; we hold the lock
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
    """Apply CHANGE to PATH's lines under its lock. Lines stay bytes, so ones we cannot parse survive."""
    with locked(path):
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        new = change(lines)
        if new != lines:
            write_atomic(path, b"".join(line + b"\n" for line in new))


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


class WatchedFile:
    """A file in the data dir that is reread when it changes (at most as often as load() is called)."""

    event = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple | None = ()
        self.load()

    def load(self) -> None:
        """Reread the file if it changed since the last look; keep what we have if it cannot be read."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            data = self.path.read_bytes() if stamp else b""
        except OSError as err:
            log.error("event=%s_unreadable path=%s error=%s", self.event, self.path, logval(str(err)))
            return
        self.use(data)
        self._stamp = stamp

    def reload(self) -> None:
        """Read the file now, not when its stamp next changes (this process just wrote it)."""
        self._stamp = ()
        self.load()

    def use(self, data: bytes) -> None:
        raise NotImplementedError


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


def file_stamp(path: Path) -> tuple | None:
    """What changes whenever PATH is replaced or edited; None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def prepare_data_dir(path: Path) -> None:
    """Create the data dir private to its owner."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)


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
        kind, n, r, p = method.split(":")
        n, r, p = int(n), int(r), int(p)
        salt_raw, digest_raw = _unb64(salt), _unb64(digest)
    except ValueError:
        return False
    if kind != "scrypt" or not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    return hmac.compare_digest(_scrypt(password, salt_raw, n, r, p), digest_raw)


def _check_bcrypt(password: str, encoded: str) -> bool:
    try:
        import bcrypt
    except ImportError:
        return False
    try:
        return bcrypt.checkpw(password.encode("utf-8", "surrogatepass"), encoded.encode("ascii"))
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
    return hash_password(password, salt=hashlib.sha256(f"ezauth legacy .env user {name}".encode()).digest()[:16])


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
            log.warning("event=users_line_skipped line=%d user=%s reason=unknown_hash", number, name)
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

    def use(self, data: bytes) -> None:
        hashes = {**self._extra, **parse_users(data)}
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
            raise ValueError(f"{name!r} is not a valid user name (letters, digits, . _ @ + -; up to 64)")
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


# -- Signing keys ---------------------------------------------------------------------------

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


def keys_to_keep(keys: tuple[SigningKey, ...], now: float, longest_ttl: int) -> tuple[SigningKey, ...]:
    """Drop a key only once every token it could have signed has expired."""
    kept = [k for k, successor in itertools.pairwise(keys)
            if successor.signs_from + longest_ttl + PUBLISH_DELAY > now]
    return (*kept, keys[-1])


class KeyRing:
    """HS256 keys in keys.json: the newest published key signs, every kept key verifies."""

    def __init__(self, path: Path, rotate_every: int, longest_ttl: int, now: float) -> None:
        self.path, self.rotate_every, self.longest_ttl = path, rotate_every, longest_ttl
        self.keys: tuple[SigningKey, ...] = ()
        self._by_kid: dict[str, SigningKey] = {}
        self._stamp: tuple | None = None
        self._retry_rotation_at = 0.0
        self._bad_stamp: tuple | None = None
        self._open(now)

    def _open(self, now: float) -> None:
        try:
            with locked(self.path):
                self._load_or_replace(now)
        except OSError as err:  # a read-only data dir: carry on with the keys that are there
            with contextlib.suppress(OSError, ValueError):
                self._reload()
            if self.keys:
                log.warning("event=keyring_readonly error=%s action=using_loaded_keys", logval(str(err)))
                return
            if file_stamp(self.path) is not None:
                raise  # a ring we may not read (EACCES) is not a corrupt one: never replace it
            log.error("event=keyring_unwritable error=%s action=memory_key note=sessions_end_on_restart",
                      logval(str(err)))
            self._use((new_key(now, now),), None)

    def _load_or_replace(self, now: float) -> None:
        try:
            self._reload()
        except (ValueError, IsADirectoryError) as err:  # not a key ring; EACCES and the like go up
            aside = move_aside(self.path, now)
            log.error("event=keyring_corrupt moved_to=%s error=%s action=new_key_ring "
                      "note=sessions_signed_by_the_lost_keys_have_ended", aside, logval(str(err)))
        if not self.keys:
            self._write((new_key(now, now),))

    def _reload(self) -> None:
        """Load the file if it changed; ValueError if it is not a key ring."""
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return
        self._use(parse_keyring(self.path.read_text(encoding="utf-8")), stamp)

    def _use(self, keys: tuple[SigningKey, ...], stamp: tuple | None) -> None:
        self._by_kid = {k.kid: k for k in keys}
        self.keys, self._stamp = keys, stamp

    def _write(self, keys: tuple[SigningKey, ...]) -> None:
        write_atomic(self.path, dump_keyring(keys))
        self._use(keys, file_stamp(self.path))

    def refresh(self, now: float) -> None:
        """Pick up changes from other processes, and rotate when the newest key is old enough."""
        try:
            self._reload()
        except (OSError, ValueError) as err:
            if file_stamp(self.path) != self._bad_stamp:  # once per bad version, not every second
                self._bad_stamp = file_stamp(self.path)
                log.error("event=keyring_unreadable error=%s action=keeping_loaded_keys", logval(str(err)))
        if now - self.keys[-1].created >= self.rotate_every and now >= self._retry_rotation_at:
            self.rotate(now, only_if_due=True)

    def rotate(self, now: float, only_if_due: bool = False) -> SigningKey | None:
        """Add a new signing key (used from now + PUBLISH_DELAY) and drop retired ones."""
        try:
            with locked(self.path):
                self._reload()
                if only_if_due and now - self.keys[-1].created < self.rotate_every:
                    return None
                key = new_key(now, now + PUBLISH_DELAY)
                self._write((*keys_to_keep(self.keys, now, self.longest_ttl), key))
        except (OSError, ValueError) as err:
            self._retry_rotation_at = now + 60
            log.error("event=rotation_failed error=%s action=keeping_current_keys", logval(str(err)))
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


# -- Sessions -------------------------------------------------------------------------------

MAX_TOKEN = 4096
# A browser holds at most two: host-only, and one for EZAUTH_COOKIE_DOMAIN. Trying thousands
# would cost the one thread that answers every verify 30 ms a request.
MAX_SESSION_COOKIES = 2
CLOCK_SKEW = 30


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

    @property
    def renew_at(self) -> float:
        return self.issued + (self.expires - self.issued) / 2


def issue_token(session: Session, key: SigningKey) -> str:
    """Sign SESSION as an HS256 JWT with KEY's id in the header."""
    claims = {"sub": session.user, "iat": session.issued, "exp": session.expires,
              "fp": session.fingerprint, "rem": int(session.remember)}
    return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.kid})


def read_token(token: str, keys: KeyRing, now: float) -> Session:
    """The session in TOKEN, or InvalidSession; the algorithm is pinned and time is NOW."""
    if len(token) > MAX_TOKEN:
        raise InvalidSession("too long")
    try:
        key = keys.get(jwt.get_unverified_header(token).get("kid"))
        if key is None:
            raise InvalidSession("unknown key id")
        claims = jwt.decode(token, key.secret, algorithms=["HS256"],
                            options={"require": ["sub", "iat", "exp"], "verify_exp": False,
                                     "verify_iat": False, "verify_nbf": False})
    except jwt.InvalidTokenError as err:
        raise InvalidSession(err.__class__.__name__) from None
    return _session_from_claims(claims, key.kid, now)


def _session_from_claims(claims: dict, kid: str, now: float) -> Session:
    sub, iat, exp, fp = claims.get("sub"), claims.get("iat"), claims.get("exp"), claims.get("fp")
    if not (isinstance(sub, str) and isinstance(fp, str)):
        raise InvalidSession("bad subject or fingerprint")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (iat, exp)):
        raise InvalidSession("bad times")
    if exp <= now:
        raise InvalidSession("expired")
    nbf = claims.get("nbf", iat)
    if iat > now + CLOCK_SKEW or not isinstance(nbf, (int, float)) or nbf > now + CLOCK_SKEW:
        raise InvalidSession("not yet valid")
    return Session(sub, fp, kid, iat, exp, bool(claims.get("rem")))


class Sessions:
    """Issues and checks sessions; remembers recently verified tokens so repeats skip JWT decoding."""

    MAX_CACHED = 10_000

    def __init__(self, users: Users, keys: KeyRing, session_ttl: int, remember_ttl: int) -> None:
        self.users, self.keys = users, keys
        self.session_ttl, self.remember_ttl = session_ttl, remember_ttl
        self._verified: dict[str, Session] = {}

    def start(self, user: str, now: float, remember: bool) -> tuple[str, Session]:
        """A new token for USER, signed by the current key."""
        ttl = self.remember_ttl if remember else self.session_ttl
        key = self.keys.signer(now)
        fingerprint = self.users.fingerprint(user) or ""
        session = Session(user, fingerprint, key.kid, int(now), int(now) + ttl, remember)
        return issue_token(session, key), session

    def check(self, token: str, now: float) -> Session | None:
        """The live session in TOKEN, or None. A cached answer is rechecked against the user and key."""
        session = self._verified.get(token)
        if session is None:
            try:
                session = read_token(token, self.keys, now)
            except InvalidSession:
                return None
            self._remember(token, session, now)
        if (session.expires <= now or self.keys.get(session.kid) is None
                or self.users.fingerprint(session.user) != session.fingerprint):
            return None
        return session

    def renew(self, session: Session, now: float) -> tuple[str, Session] | None:
        """A fresh token once SESSION is past half its lifetime, else None."""
        if now < session.renew_at:
            return None
        return self.start(session.user, now, session.remember)

    def _remember(self, token: str, session: Session, now: float) -> None:
        if len(self._verified) >= self.MAX_CACHED:
            live = {t: s for t, s in list(self._verified.items()) if s.expires > now}
            self._verified = live if len(live) < self.MAX_CACHED // 2 else {}
        self._verified[token] = session


# -- Visit counter --------------------------------------------------------------------------


COUNT_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit()), and fewer than int() refuses


class VisitCounter:
    """Page views as decimal text in a file, exact across threads and processes."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path, self.clock = path, clock

    def increment(self) -> int | None:
        """Count one visit and return the new total; None (logged) when the file cannot be used."""
        try:
            with locked(self.path):
                count = self._read() + 1
                write_atomic(self.path, f"{count}\n".encode())
                return count
        except OSError as err:
            log.warning("event=counter_skipped error=%s", logval(str(err)))
            return None

    def current(self) -> int | None:
        """The count without adding a visit; None when it cannot be read."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if COUNT_RE.fullmatch(text) else None

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except UnicodeDecodeError:
            text = "?"
        if COUNT_RE.fullmatch(text):
            return int(text)
        aside = move_aside(self.path, self.clock())
        log.error("event=counter_corrupt moved_to=%s action=restart_from_zero", aside)
        return 0


# -- Login throttle -------------------------------------------------------------------------


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


def corrupt_database(err: sqlite3.DatabaseError) -> bool:
    return "not a database" in str(err) or "malformed" in str(err)


class Throttle:
    """Failed logins per client IP and per user name, in SQLite so every worker shares them.

    An attempt is recorded *before* the password is checked, in the same transaction that
    checks the limit, so parallel guesses from several processes cannot exceed it.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS attempts (key TEXT NOT NULL, at REAL NOT NULL, pending INTEGER NOT NULL);"
              "CREATE INDEX IF NOT EXISTS attempts_key ON attempts (key, at);"
              "CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, until REAL NOT NULL);")

    def __init__(self, path: Path, max_attempts: int, window: int, lockout: int, now: float) -> None:
        self.path, self.max_attempts, self.window, self.lockout = path, max_attempts, window, lockout
        self._memory: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._settled = threading.Condition()  # a check of this process finished: waiting ones look again
        try:
            self._init_file(now)
        except sqlite3.Error as err:
            self._fall_back(err)

    def _init_file(self, now: float) -> None:
        try:
            with contextlib.closing(self._connect()) as db:
                db.executescript(self.SCHEMA)
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)
        except sqlite3.DatabaseError as err:
            if not corrupt_database(err):
                raise
            self._replace_corrupt(now)

    def _replace_corrupt(self, now: float) -> None:
        """Move a damaged database aside and start an empty one (once, whichever worker sees it first)."""
        with locked(self.path):
            with contextlib.suppress(sqlite3.DatabaseError), contextlib.closing(self._connect()) as db:
                db.execute("SELECT COUNT(*) FROM attempts").fetchone()
                return  # another worker has already replaced it
            log.error("event=throttle_corrupt moved_to=%s action=new_empty_database", move_aside(self.path, now))
            with contextlib.closing(self._connect()) as db:
                db.executescript(self.SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
        return sqlite3.connect(self.path, timeout=10, isolation_level=None)

    def _fall_back(self, err: Exception) -> None:
        log.error("event=throttle_unwritable error=%s action=per_process_memory", logval(str(err)))
        self._memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._memory.executescript(self.SCHEMA)

    def _run(self, work: Callable[[sqlite3.Connection], object], now: float) -> object:
        with self._lock:
            try:
                return self._transaction(work)
            except sqlite3.DatabaseError as err:
                if self._memory is not None:
                    raise
                if corrupt_database(err):  # damaged while running: as at start-up
                    self._replace_corrupt(now)
                else:
                    self._fall_back(err)
                return self._transaction(work)

    def _transaction(self, work: Callable[[sqlite3.Connection], object]) -> object:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        finally:
            if db is not self._memory:
                db.close()

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
                         for row in db.execute("SELECT until FROM locks WHERE key = ?", (key,))), default=None)
            if until is not None:
                return Attempt(retry_after=max(1, math.ceil(until - now)))
            for key in keys:
                failures, in_flight = self._counts(db, key)
                if failures >= self.max_attempts:
                    self._lock_out(db, key, now)
                    return Attempt(retry_after=self.lockout)
                if failures + in_flight >= self.max_attempts:
                    return Attempt(retry_after=1, busy=True)
            ids = tuple(db.execute("INSERT INTO attempts VALUES (?, ?, 1)", (key, now)).lastrowid for key in keys)
            return Attempt(row_ids=ids, at=now)
        return cast(Attempt, self._run(work, now))

    def succeeded(self, attempt: Attempt) -> None:
        """A right password: its reservation does not count as a failure."""
        self._run(lambda db: db.executemany("DELETE FROM attempts WHERE rowid = ?",
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
                for (key,) in db.execute("SELECT key FROM attempts WHERE rowid = ?", (rowid,)).fetchall():
                    if self._counts(db, key)[0] >= self.max_attempts:
                        self._lock_out(db, key, now)
        self._run(work, now)
        self._settle()

    def _counts(self, db: sqlite3.Connection, key: str) -> tuple[int, int]:
        """(failures, checks in flight) for KEY within the window."""
        rows = dict(db.execute("SELECT pending, COUNT(*) FROM attempts WHERE key = ? GROUP BY pending", (key,)))
        return rows.get(0, 0), rows.get(1, 0)

    def _lock_out(self, db: sqlite3.Connection, key: str, now: float) -> None:
        """Lock KEY out; the failures that did it are spent, so it starts afresh afterwards."""
        db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?)", (key, now + self.lockout))
        db.execute("DELETE FROM attempts WHERE key = ? AND pending = 0", (key,))


# -- Second factor (TOTP) -------------------------------------------------------------------

TOTP_STEP = 30
TOTP_DIGITS = 6
PENDING_TTL = 300  # how long the code step may take after the right password
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
    query = urllib.parse.urlencode({"secret": base64.b32encode(secret).decode().rstrip("="), "issuer": issuer,
                                    "algorithm": "SHA1", "digits": TOTP_DIGITS, "period": TOTP_STEP})
    return f"otpauth://totp/{label}?{query}"


def matching_step(secret: bytes, code: str, now: float, last_used: int) -> int | None:
    """The time step (now, or one either side for clock drift) whose code is CODE and not used yet."""
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
            log.error("event=totp_line_unreadable line=%d user=%s action=code_step_refuses", number, logval(name))
            entries[name] = None
    return entries


class TotpStore(WatchedFile):
    """The totp file (name:base32secret:last_used_step), reloaded when it changes."""

    event = "totp"

    def __init__(self, path: Path) -> None:
        self._entries: dict[str, tuple[bytes, int] | None] = {}
        super().__init__(path)

    def use(self, data: bytes) -> None:
        self._entries = parse_totp(data)

    def enrolled(self, name: str) -> bool:
        return name in self._entries

    def enroll(self, name: str) -> bytes:
        """A new secret for NAME, replacing any old one."""
        secret = secrets.token_bytes(20)
        put_named_line(self.path, name, f"{name}:{base64.b32encode(secret).decode().rstrip('=')}:-1".encode())
        self.reload()
        return secret

    def remove(self, name: str) -> bool:
        """Drop NAME's second factor; False when they had none."""
        found = drop_named_line(self.path, name)
        self.reload()
        return found

    def accept(self, name: str, code: str, now: float) -> bool:
        """Check CODE and burn its time step, under the lock, so no worker accepts it twice.
        A code that cannot be burnt (read-only data dir) is refused: replay protection first."""
        used: list[int] = []

        def burn(lines: list[bytes]) -> list[bytes]:
            entry = parse_totp(b"\n".join(ln for ln in lines if line_name(ln) == name)).get(name)
            step = matching_step(entry[0], code, now, entry[1]) if entry and CODE_RE.fullmatch(code) else None
            if step is None:
                return lines
            used.append(step)
            line = f"{name}:{base64.b32encode(entry[0]).decode().rstrip('=')}:{step}".encode()
            return [line if line_name(ln) == name else ln for ln in lines]

        try:
            rewrite_lines(self.path, burn)
        except OSError as err:
            log.error("event=totp_unwritable error=%s action=code_refused", logval(str(err)))
            return False
        self.reload()
        return bool(used)


def _pending_secret(key: SigningKey) -> bytes:
    # Derived, not the ring key itself: a pending login can never pass as a session, nor a session as one.
    return hmac.new(key.secret, b"ezauth totp pending", hashlib.sha256).digest()


def issue_pending(user: str, fingerprint: str, remember: bool, key: SigningKey, now: float) -> str:
    """A short-lived token saying: this user gave the right password and owes a code."""
    claims = {"sub": user, "fp": fingerprint, "rem": int(remember), "pur": "totp",
              "iat": int(now), "exp": int(now) + PENDING_TTL}
    return jwt.encode(claims, _pending_secret(key), algorithm="HS256", headers={"kid": key.kid})


def read_pending(token: str, keys: KeyRing, now: float) -> tuple[str, str, bool]:
    """(user, fingerprint, remember) from a pending token, or InvalidSession."""
    if len(token) > MAX_TOKEN:
        raise InvalidSession("too long")
    try:
        key = keys.get(jwt.get_unverified_header(token).get("kid"))
        if key is None:
            raise InvalidSession("unknown key id")
        claims = jwt.decode(token, _pending_secret(key), algorithms=["HS256"],
                            options={"require": ["sub", "iat", "exp"], "verify_exp": False, "verify_iat": False})
    except jwt.InvalidTokenError as err:
        raise InvalidSession(err.__class__.__name__) from None
    user, fp, exp = claims.get("sub"), claims.get("fp"), claims.get("exp")
    if claims.get("pur") != "totp" or not isinstance(user, str) or not isinstance(fp, str):
        raise InvalidSession("not a pending login")
    if not isinstance(exp, int) or exp <= now:
        raise InvalidSession("expired")
    return user, fp, bool(claims.get("rem"))


# -- Access rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    allow: bool
    who: str  # a user name, @group or *
    host: str  # a host name, *.domain or *
    prefix: str


READING_WORK_RE = re.compile(r"[%\\\\;#]|//|/\.")  # what can make two apps read one path differently
ENCODED_SEPARATOR_RE = re.compile(r"%(?![2][fF]|[5][cC])[0-9A-Fa-f]{2}")
PARAMS_RE = re.compile(r";[^/]*")
SLASHES_RE = re.compile(r"/{2,}")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Rules:
    """Who may reach which host and path: the first matching rule decides, no match denies."""

    def __init__(self, rules: tuple[Rule, ...], groups: Mapping[str, frozenset[str]]) -> None:
        self.count = len(rules)
        named = {r.who for r in rules if r.who != "*" and not r.who.startswith("@")}
        named.update(*groups.values())

        def applies(rule: Rule, user: str) -> bool:
            return rule.who in ("*", user) or (rule.who.startswith("@") and user in groups[rule.who[1:]])

        # Each user's own list, worked out once per load, so a check only walks the rules that concern them.
        self._anyone = tuple(r for r in rules if r.who == "*")
        self._by_user = {user: tuple(r for r in rules if applies(r, user)) for user in named}

    def allows(self, user: str, host: str, path: str, fold: bool = False) -> bool:
        """The decision for one reading of the path; FOLD compares it as a case-insensitive app would."""
        for rule in self._by_user.get(user, self._anyone):
            matched = path.lower().startswith(rule.prefix.lower()) if fold else path.startswith(rule.prefix)
            if matched and (rule.host in ("*", host) or (
                    rule.host.startswith("*.") and host.endswith(rule.host[1:]))):
                return rule.allow
        return False

    def allows_every(self, user: str, host: str, uri: str) -> bool:
        """True only when every reading of URI's path is allowed: an app that decodes, splits or
        resolves the path differently from these rules must still land somewhere allowed."""
        readings = path_readings(uri)
        if any(CONTROL_RE.search(path) for path in readings):
            return False  # a decoded NUL or line break: no app should get such a path
        return all(self.allows(user, host, path) and self.allows(user, host, path, fold=True) for path in readings)


def parse_rules(text: str) -> Rules:
    """Rules from the rules file; ValueError naming the line when anything is off."""
    rules, groups, used_groups = [], {}, {}
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "group" and len(words) >= 2 and words[1].endswith(":"):
            name, members = words[1][:-1], words[2:]
            if not NAME_RE.fullmatch(name) or not all(NAME_RE.fullmatch(m) for m in members):
                raise ValueError(f"line {number}: bad group name or member")
            groups[name] = frozenset(members)
        elif words[0] in ("allow", "deny") and len(words) == 4:
            _, who, host, prefix = words
            name = who.removeprefix("@")
            if not (who == "*" or NAME_RE.fullmatch(name)):
                raise ValueError(f"line {number}: {who!r} is not a user, @group or *")
            if not (host == "*" or DOMAIN_RE.fullmatch(host.lower().removeprefix("*."))) or not prefix.startswith("/"):
                raise ValueError(f"line {number}: expected a host (or *) and a path starting with /")
            if who.startswith("@"):
                used_groups.setdefault(name, number)
            rules.append(Rule(words[0] == "allow", who, host.lower(), prefix))
        else:
            raise ValueError(f"line {number}: expected 'allow|deny WHO HOST /PATH' or 'group NAME: USERS'")
    for name, number in used_groups.items():
        if name not in groups:
            raise ValueError(f"line {number}: no group {name!r}")
    return Rules(tuple(rules), groups)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `.` and `..` resolved, empty segments kept (`/.//x` is `//x`)."""
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
    """Every reasonable reading of an original request URI's path by the app behind nginx: decoded or
    not, `\\` a separator or not, `;params` stripped or not, dot segments resolved or not, repeated
    slashes merged or not, cut at `#` or not."""
    path = urllib.parse.urlsplit(uri).path if "://" in uri else uri.partition("?")[0]
    if not READING_WORK_RE.search(path):
        return frozenset((path or "/",))  # nothing any app could read differently: the common case
    readings: set[str] = set()
    for decoded in decodings(path) | decodings(path.partition("#")[0]):
        for text in {decoded, decoded.replace("\\", "/")}:
            for unparam in {text, PARAMS_RE.sub("", text)}:
                rooted = unparam if unparam.startswith("/") else "/" + unparam
                for resolved in {rooted, remove_dot_segments(rooted)}:
                    readings.update((resolved, SLASHES_RE.sub("/", resolved)))
    return frozenset(readings)


def rules_path(uri: str) -> str:
    """The canonical reading of a URI's path: decoded, with . and .. and // resolved, so /a/../admin,
    //admin and /%61dmin all read as /admin (path_readings holds this and every other reading)."""
    path = urllib.parse.urlsplit(uri).path if "://" in uri else uri.partition("?")[0].partition("#")[0]
    for _ in range(3):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    rooted = "/" + path.replace("\\", "/")
    return SLASHES_RE.sub("/", remove_dot_segments(SLASHES_RE.sub("/", rooted)))


class AccessRules:
    """The rules file, reloaded when it changes. `rules` is None while there is no file: everyone in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rules: Rules | None = None
        self._stamp: tuple | None = ()
        self.load()

    def load(self) -> None:
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        if stamp is None:
            if self.rules is not None:
                log.warning("event=rules_removed action=every_user_allowed_everywhere")
            self.rules = None
            return
        try:
            rules = parse_rules(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            # A broken edit keeps the rules that worked; with none to keep, fail closed.
            action = "keeping_previous_rules" if self.rules is not None else "denying_everyone"
            log.error("event=rules_rejected path=%s error=%s action=%s", self.path, logval(str(err)), action)
            self.rules = self.rules or Rules((), {})
            return
        self.rules = rules
        log.info("event=rules_loaded rules=%d", rules.count)


# -- API clients (HTTP Basic) ---------------------------------------------------------------


def parse_basic(header: str) -> tuple[str, str] | None:
    """(name, password) from an `Authorization: Basic` header, or None."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(value) > 1024:
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return (name, password) if sep and name and password else None


class BasicCache:
    """API credentials verified in the last TTL seconds, so a script's every call does not pay scrypt.
    Keyed by an HMAC under a random per-process key: the passwords themselves are never kept."""

    TTL = 60
    MAX = 1000

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: dict[bytes, tuple[str, str, float]] = {}

    def digest(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, f"{name}:{password}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def get(self, digest: bytes, factors: Callable[[str], str | None], now: float) -> str | None:
        """The user these credentials proved recently, if none of their factors has changed since."""
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


# -- Metrics --------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Counts for /ezauth/metrics. Plain ints bumped without a lock (verify must stay cheap), so they
    are per process (each gunicorn worker counts its own) and a rare race may lose one."""

    started: float
    logins_ok: int = 0
    logins_failed: int = 0
    logins_locked: int = 0
    verify_allowed: int = 0
    verify_denied: int = 0
    sessions_renewed: int = 0
    key_rotations: int = 0

    def render(self, visits: int | None) -> str:
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
                ("ezauth_sessions_renewed_total", self.sessions_renewed, "Sessions renewed past half their life."),
                ("ezauth_key_rotations_total", self.key_rotations, "New signing keys this process picked up.")):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
        if visits is not None:
            lines += ["# HELP ezauth_visits The login page visit counter.", "# TYPE ezauth_visits gauge",
                      f"ezauth_visits {visits}"]
        lines += ["# HELP process_start_time_seconds Start time of the process since the epoch.",
                  "# TYPE process_start_time_seconds gauge", f"process_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"


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
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "form-action 'self'{extra}; frame-ancestors 'none'; base-uri 'none'")
STATIC_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"
STATIC_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STATIC_TYPES = {
    ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".webp": "image/webp", ".ico": "image/x-icon", ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8", ".json": "application/json",
}


STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}  # an enum lookup per response costs 0.5 us


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


class Request:
    """A thin read-only view of the WSGI environ."""

    __slots__ = ("_trusted", "environ", "method", "path")

    def __init__(self, environ: dict, trusted: tuple) -> None:
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.path = environ.get("PATH_INFO", "") or "/"
        self._trusted = trusted

    def header(self, name: str) -> str:
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"), "")

    def query(self, name: str) -> str:
        """The first value of NAME in the query string; ValueError for one with too many fields."""
        values = urllib.parse.parse_qs(self.environ.get("QUERY_STRING", ""), max_num_fields=MAX_QUERY_FIELDS)
        return values.get(name, [""])[0]

    def cookies(self, name: str) -> list[str]:
        return cookie_values(self.environ.get("HTTP_COOKIE", ""), name)

    @property
    def host(self) -> str:
        host = self.header("Host") or self.environ.get("SERVER_NAME", "")
        if re.search(r"(^|[^:]):\d*$|\]:\d*$", host):
            host = host.rpartition(":")[0]
        return host.strip("[]").lower()

    @property
    def from_trusted_proxy(self) -> bool:
        """A trusted proxy, or a peer on a unix socket (gunicorn --bind unix:...), which only a local
        proxy can reach: gunicorn gives such a peer an empty REMOTE_ADDR (or the socket's path)."""
        peer = self.environ.get("REMOTE_ADDR")
        if peer == "" or (isinstance(peer, str) and peer.startswith("/")):
            return True
        return ip_in(peer or "", self._trusted)

    @property
    def is_https(self) -> bool:
        if self.environ.get("wsgi.url_scheme") == "https":
            return True
        proto = self.header("X-Forwarded-Proto").split(",")[0].strip().lower()
        return proto == "https" and self.from_trusted_proxy

    @property
    def client_ip(self) -> str:
        """The visitor's address: forwarding headers count only when the peer is a trusted proxy."""
        peer = self.environ.get("REMOTE_ADDR") or ""
        client = self._forwarded_client(peer) if self.from_trusted_proxy else peer
        if valid_ip(client):
            return str(ipaddress.ip_address(client))
        warn_once("client_ip_unknown", "event=client_ip_unknown peer=%s note=clients_share_one_lockout_and_"
                  "fail2ban_cannot_ban_them_make_the_proxy_send_X-Forwarded-For", logval(peer))
        return "unknown"

    def _forwarded_client(self, peer: str) -> str:
        """The rightmost X-Forwarded-For hop that is not a trusted proxy (or X-Real-IP without one)."""
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


_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object) -> None:
    """Log MESSAGE the first time KEY comes up in this process, never again."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def cookie_values(header: str, name: str) -> list[str]:
    """Every value of cookie NAME in a Cookie header, in the order sent."""
    if name not in header:
        return []
    values = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            values.append(value.strip().strip('"'))
    return values


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def valid_ip(text: str) -> bool:
    """An IPv4 or IPv6 address, without an IPv6 scope id (`fe80::1%x ip=6.6.6.6` is not an address)."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ip_in(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def host_under(host: str, domain: str) -> bool:
    """True when HOST is DOMAIN or one of its subdomains."""
    domain = domain.lstrip(".").lower()
    return bool(domain) and (host == domain or host.endswith("." + domain))


def safe_return_target(target: str, host: str = "", cookie_domain: str = "") -> str:
    """Where to send the visitor after login: a same-site path (or a URL under the cookie domain), else '/'."""
    if not target or len(target) > MAX_TARGET or not TARGET_CHARS_RE.fullmatch(target) or "\\" in target:
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
    path = _same_site_path((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    if hostname == host.lower():
        return path
    if cookie_domain and host_under(hostname, cookie_domain):
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"
    return "/"


def _same_site_path(path: str) -> str:
    # `/.//evil.example` is `//evil.example` once a browser or an app resolves its dot segments.
    if not path.startswith("/") or any(reading.startswith("//") for reading in path_readings(path)):
        return "/"
    if rules_path(path).startswith((f"{PREFIX}/login", f"{PREFIX}/logout")):
        return "/"
    return path


def login_url(original_uri: str, expired: bool) -> str:
    """The login page URL that returns the visitor to ORIGINAL_URI afterwards."""
    query = {"rd": original_uri} if original_uri and original_uri != "/" else {}
    if expired:
        query["expired"] = "1"
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")
    return f"{PREFIX}/login" + (f"?{encoded}" if encoded else "")


def make_cookie(name: str, value: str, *, secure: bool, domain: str = "", max_age: int | None = None,
                path: str = "/") -> str:
    """A Set-Cookie value: always HttpOnly and SameSite=Lax."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if domain:
        parts.append(f"Domain={domain.lstrip('.')}")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


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
        lang = "zh-CN" if tag.startswith("zh") else "en" if tag.startswith("en") or tag == "*" else None
        if lang and q > best_q:
            best, best_q = lang, q
    return best


def read_form(environ: dict) -> dict[str, str] | None:
    """The urlencoded form in the body (already size-checked), or None when it cannot be decoded."""
    if not environ.get("CONTENT_TYPE", "").lower().startswith("application/x-www-form-urlencoded"):
        return None
    length = int(environ.get("CONTENT_LENGTH") or 0)
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


def content_length(environ: dict) -> int | None:
    raw = environ.get("CONTENT_LENGTH") or "0"
    return int(raw) if re.fullmatch(r"[0-9]{1,18}", raw) else None


# -- Login page -----------------------------------------------------------------------------

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
        "msg_locked": "Too many attempts. Try again in {minutes} minutes.",
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
        "msg_locked": "尝试次数过多，请在 {minutes} 分钟后重试。",
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
    },
}
PAGE_FIELDS = ("lang", "title", "subtitle", "slogan", "static", "action", "csrf", "rd", "username",
               "remember", "error", "error_state", "footer", "password_step", "code_step", "pending")
# The page nginx shows (error_page 403) when access rules keep a logged-in user out.
FORBIDDEN_PAGE = string.Template("""<!doctype html>
<html lang="$lang">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>$title</title>
<script src="$static/theme.js"></script>
<link rel="stylesheet" href="$static/login.css">
</head>
<body>
<main class="card" data-state="error">
  <h1>$title</h1>
  <div class="oops" role="alert">
    <img class="cat" src="$static/cat.svg" alt="" width="96" height="96">
    <p class="bubble">$text</p>
  </div>
  <p class="links"><a href="/">$home</a> · <a href="$logout">$switch</a></p>
</main>
</body>
</html>
""")


def load_template(data_dir: Path) -> string.Template:
    """login.html from the data dir if there is one, else the shipped one; placeholders checked now."""
    path = data_dir / "login.html"
    if not path.is_file():
        path = HERE / "login.html"
    template = string.Template(path.read_text(encoding="utf-8"))
    known = set(PAGE_FIELDS) | {k for k in PAGE_TEXT["en"] if k.startswith("t_")}
    unknown = set(template.get_identifiers()) - known
    if unknown or not template.is_valid():
        raise SettingsError(f"{path}: unknown or broken placeholders: {', '.join(sorted(unknown)) or '$'}")
    return template


def render_page(template: string.Template, lang: str, values: Mapping[str, str]) -> bytes:
    """The login page, with every value HTML-escaped here and nowhere else."""
    text = {k: v for k, v in PAGE_TEXT[lang].items() if k.startswith("t_")}
    merged = {**text, **values, "lang": lang}
    return template.substitute({k: html.escape(str(v), quote=True) for k, v in merged.items()}).encode()


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


# -- Application ----------------------------------------------------------------------------

Handler = Callable[[Request], Response]


@dataclass
class EzauthApp:
    """The WSGI callable, with its collaborators visible for the CLI and the tests."""

    settings: Settings
    routes: dict[tuple[str, str], Handler]
    static: Handler
    users: Users
    keys: KeyRing
    sessions: Sessions
    counter: VisitCounter
    throttle: Throttle
    clock: Clock
    totp: TotpStore
    rules: AccessRules
    metrics: Metrics
    _next_refresh: float = 0.0
    _refresh_lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        request = Request(environ, self.settings.trusted_proxies)
        try:
            self.refresh()
            response = self.dispatch(request)
        except Exception:
            log.exception("event=error method=%s path=%s", request.method, logval(request.path))
            response = text_response(500, "internal error")
        headers = [*response.headers, ("Content-Length", str(len(response.body)))]
        start_response(response.status_line, headers)
        return [b"" if request.method == "HEAD" else response.body]

    def dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler:
            return handler(request)
        if request.path.startswith(f"{PREFIX}/static/"):
            return self.static(request) if method == "GET" else self.not_allowed(("GET", "HEAD"))
        allowed = sorted({m for m, p in self.routes if p == request.path})
        if allowed:
            return self.not_allowed((*allowed, "HEAD") if "GET" in allowed else allowed)
        return text_response(404, "not found")

    def answers_inline(self, environ: Mapping[str, object]) -> bool:
        """Cheap enough for the server's event loop: healthz, and verify unless it may hash a password."""
        path = environ.get("PATH_INFO")
        if path == f"{PREFIX}/healthz":
            return True
        return path == f"{PREFIX}/verify" and str(environ.get("HTTP_AUTHORIZATION", ""))[:6].lower() != "basic "

    def body_limit(self, environ: Mapping[str, object]) -> int:
        """The largest request body any route reads: the login form."""
        return MAX_FORM

    @staticmethod
    def not_allowed(methods: Iterable[str]) -> Response:
        return text_response(405, "method not allowed", ("Allow", ", ".join(methods)))

    def refresh(self) -> None:
        """At most once a second, pick up users and keys changed by the CLI or other workers."""
        now = self.clock()
        if now < self._next_refresh or not self._refresh_lock.acquire(blocking=False):
            return
        try:
            self._next_refresh = now + REFRESH_EVERY
            self.users.load()
            signer = self.keys.keys[-1].kid
            self.keys.refresh(now)
            self.metrics.key_rotations += self.keys.keys[-1].kid != signer
            self.totp.load()
            self.rules.load()
        finally:
            self._refresh_lock.release()


def make_app(settings: Settings, clock: Clock = time.time) -> EzauthApp:
    """Build the service: files in the data dir, and one small handler per route."""
    data = settings.data_dir
    prepare_data_dir(data)
    now = clock()
    legacy = {name: legacy_hash(name, password) for name, password in settings.legacy_users}
    users = Users(data / "users", legacy)
    keys = KeyRing(data / "keys.json", settings.rotate_every, settings.longest_ttl, now)
    sessions = Sessions(users, keys, settings.session_ttl, settings.remember_ttl)
    counter = VisitCounter(data / "counter.txt", clock)
    throttle = Throttle(data / "throttle.sqlite3", settings.max_attempts, settings.lockout_window,
                        settings.lockout_time, now)
    totp_store = TotpStore(data / "totp")
    access = AccessRules(data / "rules")
    basic_cache = BasicCache()
    metrics = Metrics(started=now)
    template = load_template(data)
    static_roots = (data / "static", HERE / "static")
    cookie = settings.cookie_name
    csrf_cookie = f"{cookie}_csrf"
    extra_form_action = f" https://*.{settings.cookie_domain.lstrip('.')}" if settings.cookie_domain else ""
    page_headers = [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
                    ("Content-Security-Policy", PAGE_CSP.format(extra=extra_form_action)),
                    ("Vary", "Accept-Language"), *SECURITY_HEADERS]

    def factors(name: str) -> str | None:
        """What proves NAME: their password hash and whether they have a second factor."""
        fingerprint = users.fingerprint(name)
        return None if fingerprint is None else f"{fingerprint}:{int(totp_store.enrolled(name))}"

    def secure(request: Request) -> bool:
        return settings.cookie_secure == "1" or (settings.cookie_secure == "auto" and request.is_https)

    def session_cookie(request: Request, token: str, session: Session) -> tuple[str, str]:
        max_age = session.expires - session.issued if session.remember else None
        return ("Set-Cookie", make_cookie(cookie, token, secure=secure(request),
                                          domain=settings.cookie_domain, max_age=max_age))

    def page(request: Request, status: int, *, error: str = "", username: str = "", rd: str = "/",
             remember: bool = False, visits: int | None = None, headers: Iterable = (),
             pending: str = "") -> Response:
        """The login page. Only a GET counts a visit (VISITS); other answers show the count as it is.
        With PENDING (a two-factor user's right password) it asks for the code instead."""
        visits = counter.current() if visits is None and request.method == "POST" else visits
        lang = choose_lang(request.header("Accept-Language"), settings.lang)
        text = PAGE_TEXT[lang]
        csrf = next((c for c in request.cookies(csrf_cookie) if re.fullmatch(r"[A-Za-z0-9_-]{32,64}", c)), "")
        extra = list(headers)
        if not csrf:
            csrf = secrets.token_urlsafe(32)
            extra.append(("Set-Cookie", make_cookie(csrf_cookie, csrf, secure=secure(request),
                                                    path=f"{PREFIX}/")))
        body = render_page(template, lang, {
            "title": settings.title or text["default_title"],
            "subtitle": settings.subtitle or text["default_subtitle"],
            "slogan": settings.slogan or text["default_slogan"],
            "static": f"{PREFIX}/static", "action": f"{PREFIX}/login", "csrf": csrf, "rd": rd,
            "username": username, "remember": "checked" if remember else "",
            "error": error, "error_state": "error" if error else "none",
            "footer": text["msg_visits"].format(count=f"{visits:,}") if visits is not None else "",
            # A disabled fieldset is neither validated nor sent, so the hidden step cannot block the form.
            "password_step": "disabled hidden" if pending else "",
            "code_step": "" if pending else "disabled hidden", "pending": pending,
        })
        return Response(status, body, [*page_headers, *extra])

    def message(request: Request, key: str, **fields: object) -> str:
        return PAGE_TEXT[choose_lang(request.header("Accept-Language"), settings.lang)][key].format(**fields)

    def target_of(request: Request, raw: str) -> str:
        return safe_return_target(raw, request.host, settings.cookie_domain)

    def login_page(request: Request) -> Response:
        try:
            expired, rd = request.query("expired") == "1", request.query("rd")
        except ValueError:
            log.warning("event=login_rejected reason=bad_query ip=%s", logval(request.client_ip))
            return page(request, 400, error=message(request, "msg_bad_form"))
        return page(request, 200, rd=target_of(request, rd),
                    error=message(request, "msg_expired") if expired else "",
                    visits=counter.increment())

    def login_submit(request: Request) -> Response:
        length = content_length(request.environ)
        if length is None or length > MAX_FORM:
            log.warning("event=login_rejected reason=body_too_large ip=%s", request.client_ip)
            return page(request, 413, error=message(request, "msg_too_large"))
        form = read_form(request.environ)
        if form is None:
            log.warning("event=login_rejected reason=bad_form ip=%s", request.client_ip)
            return page(request, 400, error=message(request, "msg_bad_form"))
        rd = target_of(request, form.get("rd", ""))
        name, password = form.get("username", "").strip(), form.get("password", "")
        if not any(hmac.compare_digest(c.encode(), form.get("csrf", "").encode())
                   for c in request.cookies(csrf_cookie)) or not form.get("csrf"):
            log.warning("event=login_rejected reason=csrf ip=%s user=%s", request.client_ip, logval(name))
            return page(request, 403, error=message(request, "msg_csrf"), username=name, rd=rd)
        if form.get("pending"):
            return check_code(request, form["pending"], form.get("code", "").replace(" ", ""), rd)
        if not name or not password:
            return page(request, 400, error=message(request, "msg_missing"), username=name, rd=rd)
        return check_login(request, name, password, rd, form.get("remember") in ("1", "on", "yes"))

    def reserve(request: Request, name: str, now: float, how: str = "") -> Attempt:
        """Reserve one password or code check for this client and user; a refusal is logged and counted."""
        attempt = throttle.begin([f"ip:{request.client_ip}", f"user:{name.lower()[:64]}"], now)
        if attempt.locked:
            metrics.logins_locked += 1
            log.warning("event=%s %suser=%s ip=%s retry_after=%d", "login_busy" if attempt.busy else "login_locked",
                        how, logval(name), request.client_ip, attempt.retry_after)
        return attempt

    def refuse(request: Request, attempt: Attempt, name: str, now: float, how: str = "") -> None:
        """A wrong password or code: it counts toward the lockout and gets the fail2ban log line."""
        throttle.failed(attempt, now)
        metrics.logins_failed += 1
        log.warning("event=login_failed %suser=%s ip=%s", how, logval(name), request.client_ip)

    def locked_page(request: Request, attempt: Attempt, **values: object) -> Response:
        minutes = math.ceil(attempt.retry_after / 60)
        return page(request, 429, error=message(request, "msg_locked", minutes=minutes),
                    headers=[("Retry-After", str(attempt.retry_after))], **values)

    def check_login(request: Request, name: str, password: str, rd: str, remember: bool) -> Response:
        now, ip = clock(), request.client_ip
        attempt = reserve(request, name, now)
        if attempt.locked:
            return locked_page(request, attempt, username=name, rd=rd, remember=remember)
        if not users.check(name, password):
            refuse(request, attempt, name, now)
            return page(request, 401, error=message(request, "msg_wrong"), username=name, rd=rd,
                        remember=remember)
        throttle.succeeded(attempt)
        if totp_store.enrolled(name):
            log.info("event=login_code_asked user=%s ip=%s", name, ip)
            pending = issue_pending(name, users.fingerprint(name) or "", remember, keys.signer(now), now)
            return page(request, 200, username=name, rd=rd, pending=pending)
        return logged_in(request, name, now, rd, remember)

    def check_code(request: Request, pending: str, code: str, rd: str) -> Response:
        """The second step: a valid pending login plus a fresh code from the user's app."""
        now, ip = clock(), request.client_ip
        try:
            name, fingerprint, remember = read_pending(pending, keys, now)
        except InvalidSession as err:
            log.warning("event=login_rejected reason=pending_%s ip=%s", logval(str(err)), ip)
            return page(request, 403, error=message(request, "msg_csrf"), rd=rd)
        if users.fingerprint(name) != fingerprint:
            log.warning("event=login_rejected reason=password_changed user=%s ip=%s", name, ip)
            return page(request, 403, error=message(request, "msg_csrf"), rd=rd)
        attempt = reserve(request, name, now, "step=code ")
        if attempt.locked:
            return locked_page(request, attempt, username=name, rd=rd, pending=pending)
        if not totp_store.accept(name, code, now):
            refuse(request, attempt, name, now, "step=code ")
            return page(request, 401, error=message(request, "msg_wrong_code"), username=name, rd=rd,
                        pending=pending)
        throttle.succeeded(attempt)
        return logged_in(request, name, now, rd, remember)

    def logged_in(request: Request, name: str, now: float, rd: str, remember: bool) -> Response:
        token, session = sessions.start(name, now, remember)
        metrics.logins_ok += 1
        log.info("event=login_ok user=%s ip=%s remember=%d", name, request.client_ip, remember)
        return Response(303, b"", [("Location", rd), session_cookie(request, token, session),
                                   ("Cache-Control", "no-store"), *SECURITY_HEADERS])

    def verify(request: Request) -> Response:
        now = clock()
        tokens = request.cookies(cookie)
        if len(tokens) > MAX_SESSION_COOKIES:
            log.warning("event=verify_refused reason=too_many_session_cookies count=%d ip=%s",
                        len(tokens), logval(request.client_ip))
            return deny(request, True)
        for token in tokens:
            session = sessions.check(token, now)
            if session is not None:
                headers = [("X-Auth-Request-User", session.user), ("Cache-Control", "no-cache")]
                renewed = sessions.renew(session, now)
                if renewed:
                    metrics.sessions_renewed += 1
                    headers.append(session_cookie(request, *renewed))
                return grant(request, session.user, headers)
        if settings.basic_auth and request.header("Authorization")[:6].lower() == "basic ":
            return verify_basic(request, now, bool(tokens))
        return deny(request, bool(tokens))

    def deny(request: Request, had_cookie: bool) -> Response:
        metrics.verify_denied += 1
        return Response(401, b"", [("X-Ezauth-Login", login_url(request.header("X-Original-URI"), had_cookie)),
                                   ("Cache-Control", "no-cache")])

    def grant(request: Request, user: str, headers: list[tuple[str, str]]) -> Response:
        """200 for a proven USER, unless access rules keep them off this host and path (403)."""
        if access.rules is not None and not access.rules.allows_every(
                user, (request.header("X-Original-Host") or request.host).lower(),
                request.header("X-Original-URI") or "/"):
            metrics.verify_denied += 1
            return Response(403, b"", [("Cache-Control", "no-cache")])
        if settings.basic_auth and request.header("Authorization")[:6].lower() == "basic ":
            headers.append(("X-Ezauth-Authorization", "strip"))  # nginx then keeps the password from the app
        metrics.verify_allowed += 1
        return Response(200, b"", headers)

    def verify_basic(request: Request, now: float, had_cookie: bool) -> Response:
        """HTTP Basic for API clients: checked once (scrypt, lockout), then cached for a minute."""
        credentials = parse_basic(request.header("Authorization"))
        if credentials is not None:
            digest = basic_cache.digest(*credentials)
            user = basic_cache.get(digest, factors, now) or check_basic(request, *credentials, digest, now)
            if user is not None:
                return grant(request, user, [("X-Auth-Request-User", user), ("Cache-Control", "no-cache")])
        metrics.verify_denied += 1
        # WWW-Authenticate only for a client that sent credentials: a browser must get the login page.
        return Response(401, b"", [("X-Ezauth-Login", login_url(request.header("X-Original-URI"), had_cookie)),
                                   ("WWW-Authenticate", 'Basic realm="ezauth"'), ("Cache-Control", "no-cache")])

    def check_basic(request: Request, name: str, password: str, digest: bytes, now: float) -> str | None:
        attempt = reserve(request, name, now, "via=basic ")
        if attempt.locked:
            return None
        if basic_cache.get(digest, factors, now):  # proved by a parallel request while this one waited
            throttle.succeeded(attempt)
            return name
        # Two-factor users cannot skip their code this way (checked after scrypt: same time either way).
        if not users.check(name, password) or totp_store.enrolled(name):
            refuse(request, attempt, name, now, "via=basic ")
            return None
        throttle.succeeded(attempt)
        metrics.logins_ok += 1
        log.info("event=login_ok via=basic user=%s ip=%s", name, request.client_ip)
        basic_cache.put(digest, name, factors(name) or "", now)
        return name

    def logout(request: Request) -> Response:
        clear = [("Set-Cookie", make_cookie(cookie, "", secure=secure(request), max_age=0))]
        if settings.cookie_domain:
            clear.append(("Set-Cookie", make_cookie(cookie, "", secure=secure(request),
                                                    domain=settings.cookie_domain, max_age=0)))
        log.info("event=logout ip=%s", request.client_ip)
        return Response(303, b"", [("Location", f"{PREFIX}/login"), *clear, ("Cache-Control", "no-store")])

    def healthz(request: Request) -> Response:
        return text_response(200, "ok")

    def forbidden(request: Request) -> Response:
        """The page nginx shows instead of the app when access rules keep a logged-in user out."""
        lang = choose_lang(request.header("Accept-Language"), settings.lang)
        text = PAGE_TEXT[lang]
        body = render_page(FORBIDDEN_PAGE, lang, {
            "title": text["forbidden_title"], "text": text["forbidden_text"], "home": text["forbidden_home"],
            "switch": text["forbidden_switch"], "logout": f"{PREFIX}/logout", "static": f"{PREFIX}/static"})
        return Response(403, body, page_headers)

    def metrics_page(request: Request) -> Response:
        # The visitor as resolved through trusted proxies: via nginx the peer is always loopback.
        client = request.client_ip
        if not settings.metrics or not (ip_in(client, LOOPBACK) or ip_in(client, settings.trusted_proxies)):
            return text_response(404, "not found")
        return Response(200, metrics.render(counter.current()).encode(),
                        [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), ("Cache-Control", "no-store")])

    def static(request: Request) -> Response:
        path = find_static(request.path[len(f"{PREFIX}/static/"):], static_roots)
        if path is None:
            return text_response(404, "not found")
        st = path.stat()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        headers = [("Content-Type", STATIC_TYPES[path.suffix.lower()]), ("ETag", etag),
                   ("Cache-Control", "public, max-age=3600"), ("Content-Security-Policy", STATIC_CSP),
                   ("X-Content-Type-Options", "nosniff")]
        if request.header("If-None-Match") == etag:
            return Response(304, b"", headers[1:])
        return Response(200, path.read_bytes(), headers)

    routes: dict[tuple[str, str], Handler] = {
        ("GET", f"{PREFIX}/login"): login_page,
        ("POST", f"{PREFIX}/login"): login_submit,
        # auth_request subrequests keep the method of the request they check.
        **{(method, f"{PREFIX}/verify"): verify for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")},
        ("GET", f"{PREFIX}/logout"): logout,
        ("POST", f"{PREFIX}/logout"): logout,
        ("GET", f"{PREFIX}/healthz"): healthz,
        ("GET", f"{PREFIX}/forbidden"): forbidden,
        ("GET", f"{PREFIX}/metrics"): metrics_page,
    }
    for name, _ in settings.legacy_users:
        log.warning("event=legacy_env_user user=%s note=password_from_.env_run_'python ezauth.py passwd %s'",
                    logval(name), logval(name))
    return EzauthApp(settings, routes, static, users, keys, sessions, counter, throttle, clock,
                     totp=totp_store, rules=access, metrics=metrics)


# -- HTTP server ----------------------------------------------------------------------------
# Our own because wsgiref serves one request per connection. The parsing and the answers'
# bytes are ours and strict; the connection machinery (buffers, partial writes, timers,
# the hand-off to threads, shutdown) is asyncio's.

FIRST_BYTE_TIMEOUT = 5.0  # a new connection that says nothing is dropped this soon
HEAD_TIMEOUT = 10.0  # a whole request head must arrive this fast after its first byte
BODY_TIMEOUT = 30.0
IDLE_TIMEOUT = 75.0  # between requests; longer than nginx's upstream keepalive_timeout (60 s)
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
MAX_BLANK_BYTES = 8  # CR/LF before a request line (RFC 9112 2.2 asks to skip "at least one" empty line)
MAX_CONNECTIONS = 1000
MAX_PER_ADDRESS = 64  # one address (not a trusted proxy) cannot take every connection
POOL_THREADS = 8
RECEIVE_SIZE = 64 * 1024
HEAD_END_RE = re.compile(rb"\n\r?\n")  # a literal first byte lets re skip ahead; parse_head strips the \r
TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
REQUEST_LINE_RE = re.compile(rf"({TCHARS}) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])\r?")
FIELD_NAMES_RE = re.compile(rf"{TCHARS}(:{TCHARS})*")
HEAD_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])  # what a request head may hold
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
    """The request line and header fields of HEAD (without its blank line), strictly per RFC 9112."""
    head = head.removesuffix(b"\r")  # the CR of the last line's CRLF
    # No NUL or other control bytes anywhere, and no CR that does not end a line.
    if head.translate(None, HEAD_BYTES) or head.count(b"\r") != head.count(b"\r\n"):
        raise HTTPError(400)
    request_line, _, fields = head.decode("latin-1").partition("\n")
    line = REQUEST_LINE_RE.fullmatch(request_line)
    if line is None:
        raise HTTPError(400)
    method, target, version = line.groups()
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(505)
    headers = []
    for field_line in fields.split("\n") if fields else ():
        name, colon, value = field_line.partition(":")
        if not colon:
            raise HTTPError(400)
        headers.append((name, value.strip(" \t\r")))
    if len(headers) > MAX_HEADERS:
        raise HTTPError(431)
    # Every name a token with its colon right after it: no "Name : value", no obs-fold, no empty name.
    if headers and not FIELD_NAMES_RE.fullmatch(":".join(name for name, _ in headers)):
        raise HTTPError(400)
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


def header_environ(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """HTTP_* keys (PEP 3333) from header fields; repeats joined once, in linear time."""
    environ: dict[str, str] = {}
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
            raise HTTPError(400)  # even `Content-Length:` then `Content-Length: 5`: a smuggling classic
        environ[key] = ("; " if key == "HTTP_COOKIE" else ", ").join(values)
    return environ


ENVIRON_KEYS: dict[str, str] = {}  # header name -> environ key, for the names nginx sends every time


def environ_key(name: str) -> str:
    """The environ key of header NAME; "" for a name with "_" (X_Forwarded_For and
    X-Forwarded-For would share one key: the ambiguity is refused by dropping it)."""
    key = "" if "_" in name else name.upper().replace("-", "_")
    key = key if key in ("", "CONTENT_LENGTH", "CONTENT_TYPE") else f"HTTP_{key}"
    if len(ENVIRON_KEYS) < 256:
        ENVIRON_KEYS[name] = key
    return key


def build_environ(base: Mapping[str, object], head: RequestHead, peer: tuple[str, int]) -> dict[str, object]:
    """A WSGI environ (PEP 3333) for one request; HTTPError for one that must not be answered."""
    path, query, authority = split_target(head.target)
    environ: dict[str, object] = dict(base)
    environ.update(header_environ(head.headers))
    if authority is not None:
        environ["HTTP_HOST"] = authority
    host = environ.get("HTTP_HOST")
    if (host is None and head.version == "HTTP/1.1") or (host is not None and not HOST_RE.fullmatch(str(host))):
        raise HTTPError(400)
    if "HTTP_TRANSFER_ENCODING" in environ:
        raise HTTPError(400 if "CONTENT_LENGTH" in environ else 411)
    if "CONTENT_LENGTH" in environ and not DIGITS_RE.fullmatch(str(environ["CONTENT_LENGTH"])):
        raise HTTPError(400)
    environ.update(REQUEST_METHOD=head.method, SERVER_PROTOCOL=head.version, QUERY_STRING=query,
                   PATH_INFO=urllib.parse.unquote_to_bytes(path).decode("latin-1") if "%" in path else path,
                   REMOTE_ADDR=peer[0], REMOTE_PORT=str(peer[1]))
    return environ


def run_wsgi(app: WSGIApp, environ: dict[str, object]) -> tuple[str, list[tuple[str, str]], bytes]:
    """Call a WSGI app and collect its whole response (ezauth's responses are small)."""
    started: list[object] = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Callable[[bytes], None]:
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
    return serialize_response(STATUS_LINES[status], [("Content-Type", "text/plain; charset=utf-8")],
                              f"{phrase.lower()}\n".encode(), keep_alive=False, head_only=False)


@dataclass(frozen=True)
class Routing:
    """What the app tells the server about a request before it is answered."""

    inline: Callable[[Mapping[str, object]], bool]  # cheap enough to answer on the event loop
    body_limit: Callable[[Mapping[str, object]], int]  # the largest body the route accepts


class Connection(asyncio.BufferedProtocol):
    """One client connection: its requests in order, each answered before the next is read."""

    transport: asyncio.Transport

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.peer: tuple[str, int] = ("", 0)
        self.buffer = bytearray()
        self.scanned = 0  # how much of the buffer holds no head end: dribbled heads are searched once
        self.waiting: tuple[dict[str, object], int] | None = None  # a head whose body is still arriving
        self.busy = self.paused = self.eof = self.closed = False
        self.request_started: float | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # asyncio's callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        if not self.server.admit(self):
            self.transport.write(error_bytes(503))
            self.transport.close()
            return
        self.set_deadline(FIRST_BYTE_TIMEOUT)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Received into one buffer shared by every connection (the loop runs one callback at a
        # time): asyncio's default recv() of 256 KiB costs an mmap per read, 8 us on every verify.
        return self.server.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.buffer += self.server.receive_buffer[:nbytes]
        self.process()
        if self.buffer:
            self.start_head_timer()

    def eof_received(self) -> bool:
        """A half-closed client still gets answers to every request it sent, then we close."""
        self.eof = True
        self.process()
        return self.busy

    def pause_writing(self) -> None:
        self.paused = True  # the client is not reading: stop answering until it catches up

    def resume_writing(self) -> None:
        self.paused = False
        self.process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.server.forget(self)

    # requests --------------------------------------------------------------------------------

    def fail(self, err: Exception) -> None:
        """Whatever goes wrong with one request ends its connection (400 or 500), never the server."""
        if isinstance(err, HTTPError):
            self.refuse(err.status)
            return
        log.error("event=connection_error ip=%s error=%s", logval(self.peer[0]), logval(repr(err)), exc_info=err)
        self.refuse(500)

    def process(self) -> None:
        """Answer every complete request in the buffer, in order."""
        try:
            while not (self.busy or self.paused or self.closed):
                if self.waiting is None:
                    self.waiting = self.read_head()
                    if self.waiting is None:
                        break
                environ, length = self.waiting
                if len(self.buffer) < length:
                    break
                self.waiting = None
                environ["wsgi.input"] = BytesIO(bytes(self.buffer[:length]))
                del self.buffer[:length]
                self.answer(environ)
        except Exception as err:
            self.fail(err)
        if self.eof and not self.busy and not self.closed:
            self.close()

    def read_head(self) -> tuple[dict[str, object], int] | None:
        """(environ, body length) of the next request head in the buffer, or None until it has arrived."""
        if not self.buffer:
            return None
        blank = len(self.buffer) - len(self.buffer.lstrip(b"\r\n")) if self.buffer[0] in b"\r\n" else 0
        if blank > MAX_BLANK_BYTES:
            raise HTTPError(400)
        end = HEAD_END_RE.search(self.buffer, max(self.scanned, blank))
        if end is None:
            if len(self.buffer) > MAX_HEAD:
                raise HTTPError(431)
            self.scanned = max(blank, len(self.buffer) - 2)
            return None
        if end.start() > MAX_HEAD:
            raise HTTPError(431)
        head = parse_head(bytes(self.buffer[blank:end.start()]))
        del self.buffer[:end.end()]
        self.scanned = 0
        environ = build_environ(self.server.base_environ, head, self.peer)
        length = int(cast(str, environ.get("CONTENT_LENGTH") or "0"))
        if length and length > self.server.body_limit(environ):
            raise HTTPError(413)  # refused before a byte of it is buffered
        if len(self.buffer) < length:
            self.set_deadline(BODY_TIMEOUT)
            if head.version == "HTTP/1.1" and str(environ.get("HTTP_EXPECT", "")).lower() == "100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return environ, length

    def answer(self, environ: dict[str, object]) -> None:
        keep_alive = environ["SERVER_PROTOCOL"] == "HTTP/1.1" and "close" not in str(
            environ.get("HTTP_CONNECTION", "")).lower()
        if self.server.inline(environ):
            self.send(self.server.respond(environ, keep_alive), keep_alive)
            return
        self.busy = True
        self.transport.pause_reading()
        done = self.server.loop.run_in_executor(self.server.pool, self.server.respond, environ, keep_alive)
        done.add_done_callback(lambda future: self.pool_done(future, keep_alive))

    def pool_done(self, future: asyncio.Future[bytes], keep_alive: bool) -> None:
        self.busy = False
        if self.closed:
            return
        try:
            data = future.result()
        except Exception as err:
            self.fail(err)
            return
        self.transport.resume_reading()
        self.send(data, keep_alive)
        self.process()

    def send(self, data: bytes, keep_alive: bool) -> None:
        self.transport.write(data)
        self.request_started = None
        if keep_alive and not self.eof:
            self.deadline = time.monotonic() + IDLE_TIMEOUT  # the loop's clock; later: the timer re-arms when it fires
            if self.buffer:
                self.start_head_timer()  # a pipelined request may already be part-way in
        else:
            self.close()

    def refuse(self, status: int) -> None:
        if not self.closed:
            self.transport.write(error_bytes(status))
            self.close()

    def close(self) -> None:
        self.closed = True
        self.transport.close()  # after what is buffered has been sent

    # timeouts: one timer per connection, moved forward by plain assignment on the fast path ------

    def start_head_timer(self) -> None:
        """A request has begun to arrive (blank lines count): from now on it has HEAD_TIMEOUT."""
        if self.buffer and self.request_started is None and self.waiting is None and not self.closed:
            self.request_started = self.server.loop.time()
            self.set_deadline(HEAD_TIMEOUT)

    def set_deadline(self, seconds: float) -> None:
        """Move the deadline. A later one costs an assignment (the timer re-arms when it fires);
        only an earlier one re-arms the timer now."""
        self.deadline = self.server.loop.time() + seconds
        if self.timer is not None and self.timer.when() > self.deadline:
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = self.server.loop.call_at(self.deadline, self.check_deadline)

    def check_deadline(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self.busy or self.server.loop.time() < self.deadline:
            self.timer = self.server.loop.call_at(max(self.deadline, self.server.loop.time() + 1),
                                                  self.check_deadline)
            return
        if (self.buffer or self.waiting) and not self.eof:
            self.refuse(408)
        else:
            self.close()

    @property
    def idle(self) -> bool:
        return not (self.buffer or self.waiting or self.busy or self.closed)


class HTTPServer:
    """HTTP/1.1 keep-alive server for one WSGI app. One event-loop thread holds every connection
    (idle or slow clients cost no thread) and answers the requests the app calls cheap itself;
    the rest (password hashing, file writes) go to a small thread pool."""

    def __init__(self, sock: socket.socket, app: WSGIApp, routing: Routing, *, access_log: bool = False,
                 exempt: Callable[[str], bool] = lambda address: False) -> None:
        self.loop = asyncio.new_event_loop()
        self.app, self.access_log, self.exempt = app, access_log, exempt
        self.inline, self.body_limit = routing.inline, routing.body_limit
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="ezauth-worker")
        self.receive_buffer = memoryview(bytearray(RECEIVE_SIZE))
        self.connections: set[Connection] = set()
        self.per_address: dict[str, int] = {}
        self.max_connections = max_connections()
        host, port = sock.getsockname()[:2]
        self.base_environ: dict[str, object] = {
            "SERVER_NAME": host, "SERVER_PORT": str(port), "SCRIPT_NAME": "",
            "GATEWAY_INTERFACE": "CGI/1.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        self.listener = self.loop.run_until_complete(
            self.loop.create_server(lambda: Connection(self), sock=sock, backlog=1024))

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.loop.stop)
        self.loop.run_forever()

    def close(self) -> None:
        self.listener.close()
        for conn in list(self.connections):
            conn.transport.abort()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def admit(self, conn: Connection) -> bool:
        """Room for one more connection? A full server first drops the connection idle the longest."""
        address = conn.peer[0]
        if self.per_address.get(address, 0) >= MAX_PER_ADDRESS and not self.exempt(address):
            log.warning("event=connection_refused reason=per_address_limit ip=%s", logval(address))
            return False
        if len(self.connections) >= self.max_connections:
            idle = [c for c in self.connections if c.idle]
            if not idle:
                log.warning("event=connection_refused reason=server_full ip=%s", logval(address))
                return False
            min(idle, key=lambda c: c.deadline).close()
        self.connections.add(conn)
        self.per_address[address] = self.per_address.get(address, 0) + 1
        return True

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            left = self.per_address.pop(conn.peer[0], 1) - 1
            if left:
                self.per_address[conn.peer[0]] = left

    def respond(self, environ: dict[str, object], keep_alive: bool) -> bytes:
        """The whole answer to one request, as bytes (on the loop, or on a pool thread)."""
        started = time.monotonic() if self.access_log else 0.0
        status, headers, body = run_wsgi(self.app, environ)
        data = serialize_response(status, headers, body, keep_alive, environ["REQUEST_METHOD"] == "HEAD")
        if self.access_log:
            log.info("event=request method=%s path=%s status=%s ip=%s ms=%.1f", logval(str(environ["REQUEST_METHOD"])),
                     logval(str(environ["PATH_INFO"])), status[:3], logval(str(environ["REMOTE_ADDR"])),
                     (time.monotonic() - started) * 1000)
        return data


def max_connections() -> int:
    """MAX_CONNECTIONS, or fewer when the file-descriptor limit cannot be raised that far."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 64  # the data dir's files, the pool's SQLite handles, stdio
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard >= wanted):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return max(16, min(MAX_CONNECTIONS, soft - 64))


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening socket; `::` takes IPv4 too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# -- CLI ------------------------------------------------------------------------------------


class CliError(Exception):
    """A failed command; the message is its one-line reason."""


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the built-in server until SIGTERM or Ctrl-C."""
    service = make_app(settings)
    announce_first_admin(service.users)
    try:
        sock = listening_socket(settings.host, settings.port)
    except OSError as err:
        raise CliError(f"cannot listen on {settings.host}:{settings.port}: {err.strerror}") from None
    server = HTTPServer(sock, service, Routing(service.answers_inline, service.body_limit),
                        access_log=settings.access_log,
                        exempt=lambda address: ip_in(address, settings.trusted_proxies))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("event=start url=http://%s:%d/ezauth/login data_dir=%s version=%s",
             host, sock.getsockname()[1], settings.data_dir.resolve(), __version__)
    try:
        server.serve_forever()
    finally:
        server.close()
        log.info("event=stop")
    return 0


def announce_first_admin(users: Users) -> None:
    """On a first start with no users, create admin and print its password once."""
    try:
        password = users.create_first_admin()
    except OSError as err:
        log.error("event=first_admin_failed error=%s", logval(str(err)))
        return
    if password:
        print(f"\nezauth: no users yet, so I created one.\n  user:     admin\n  password: {password}\n"
              f"  (shown only this once; only its hash is stored)\n"
              f"Change it with:  python ezauth.py passwd admin\n", flush=True)


def read_new_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n")
        password = password.removesuffix("\r")
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
    prepare_data_dir(settings.data_dir)
    return Users(settings.data_dir / "users")


def cmd_passwd(args: argparse.Namespace, settings: Settings) -> int:
    """Create a user or change their password (their sessions end)."""
    if not NAME_RE.fullmatch(args.name):
        raise CliError(f"{args.name!r} is not a valid user name (letters, digits, . _ @ + -; up to 64)")
    password = read_new_password(args)
    users = open_users(settings)
    existed = users.fingerprint(args.name) is not None
    users.set_password(args.name, password)
    print(f"{'changed the password of' if existed else 'created user'} {args.name}"
          f"{'; their sessions have ended' if existed else ''}")
    return 0


def cmd_deluser(args: argparse.Namespace, settings: Settings) -> int:
    """Delete a user; their sessions end within a second."""
    if not open_users(settings).delete(args.name):
        raise CliError(f"no user {args.name!r}")
    print(f"deleted user {args.name}; their sessions have ended")
    return 0


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    for name in open_users(settings).names():
        print(name)
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings) -> int:
    """Make a new signing key now; running servers start using it within a few seconds."""
    prepare_data_dir(settings.data_dir)
    now = time.time()
    key = KeyRing(settings.data_dir / "keys.json", settings.rotate_every, settings.longest_ttl, now).rotate(now)
    if key is None:
        raise CliError("could not write the key ring (see the log line above)")
    print(f"new signing key {key.kid}, used from {PUBLISH_DELAY:.0f} s from now; existing sessions stay valid")
    return 0


def cmd_totp(args: argparse.Namespace, settings: Settings) -> int:
    """Enroll a user in two-factor login (a new secret each time), or --remove it."""
    prepare_data_dir(settings.data_dir)
    store = TotpStore(settings.data_dir / "totp")
    if args.remove:
        if not store.remove(args.name):
            raise CliError(f"{args.name!r} has no second factor")
        print(f"removed the second factor of {args.name}; they log in with the password alone")
        return 0
    if open_users(settings).fingerprint(args.name) is None:
        raise CliError(f"no user {args.name!r}; create it first with: python ezauth.py passwd {args.name}")
    uri = totp_uri(args.name, store.enroll(args.name))
    print(f"{args.name} now needs a 6-digit code after the password. Add this to an authenticator app:\n{uri}")
    try:
        import segno
    except ImportError:
        print("(pip install segno to get a QR code here)")
    else:
        segno.make(uri, error="m").terminal(compact=True)
    return 0


def render_nginx_config(template: str, app: str, listen: int, server_name: str | None,
                        ezauth_address: str) -> str:
    """nginx.conf.example with the app, listen port, server name and ezauth address filled in."""
    parts = urllib.parse.urlsplit(app if "://" in app else f"http://{app}")
    try:
        if not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            raise ValueError
    except ValueError:
        raise CliError(f"--app {app!r}: give the app's address as http://HOST:PORT") from None
    text = template.replace("127.0.0.1:7860", parts.netloc).replace("127.0.0.1:2424", ezauth_address)
    text = re.sub(r"\blisten(\s+)(\[::\]:)?80\b", lambda m: f"listen{m.group(1)}{m.group(2) or ''}{listen}", text)
    if server_name:
        text = text.replace("server_name _;", f"server_name {server_name};")
    return text


def cmd_nginx_config(args: argparse.Namespace, settings: Settings) -> int:
    """Print the shipped nginx config with this setup's values filled in."""
    if not 1 <= args.listen <= 65535:
        raise CliError(f"--listen {args.listen}: not a port number")
    if args.server_name and not re.fullmatch(r"[A-Za-z0-9.*_-]+( [A-Za-z0-9.*_-]+)*", args.server_name):
        raise CliError(f"--server-name {args.server_name!r}: not a server name")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    template = (HERE / "nginx.conf.example").read_text(encoding="utf-8")
    sys.stdout.write(render_nginx_config(template, args.app, args.listen, args.server_name,
                                         f"{host}:{settings.port}"))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "serve": serve, "passwd": cmd_passwd, "deluser": cmd_deluser, "users": cmd_users,
    "rotate": cmd_rotate, "nginx-config": cmd_nginx_config, "totp": cmd_totp,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ezauth.py", description="Login page and session check for nginx auth_request.",
        epilog="Settings also come from EZAUTH_* environment variables and a .env file; see README.md.")
    parser.add_argument("--version", action="version", version=f"ezauth {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="where users, keys and the counter live "
                        "(EZAUTH_DATA_DIR, default ./ezauth-data)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_p = sub.add_parser("serve", parents=[common], help="run the server (the default command)")
    serve_p.add_argument("--host", help="address to listen on (EZAUTH_HOST, default 127.0.0.1; :: for IPv6)")
    serve_p.add_argument("--port", type=int, help="port (EZAUTH_PORT, default 2424)")
    serve_p.add_argument("--access-log", action="store_true", default=None,
                         help="log every request, verify calls included (EZAUTH_ACCESS_LOG)")
    passwd_p = sub.add_parser("passwd", parents=[common], help="create a user or change a password")
    passwd_p.add_argument("name")
    passwd_p.add_argument("--password-stdin", action="store_true",
                          help="read the password from one line of standard input")
    sub.add_parser("deluser", parents=[common], help="delete a user").add_argument("name")
    sub.add_parser("users", parents=[common], help="list users")
    sub.add_parser("rotate", parents=[common], help="make a new signing key now (sessions stay valid)")
    totp_p = sub.add_parser("totp", parents=[common], help="ask NAME for an authenticator code after the password")
    totp_p.add_argument("name")
    totp_p.add_argument("--remove", action="store_true", help="log in with the password alone again")
    nginx_p = sub.add_parser("nginx-config", parents=[common], help="print nginx.conf.example filled in")
    nginx_p.add_argument("--app", required=True, help="the protected app, e.g. http://127.0.0.1:7860")
    nginx_p.add_argument("--listen", type=int, required=True, help="port nginx listens on, e.g. 80")
    nginx_p.add_argument("--server-name", help="nginx server_name, e.g. sd.example.com")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes: 0 ok, 1 failure, 2 usage error."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s ezauth %(levelname)s %(message)s")
    flags = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
             "data_dir": args.data_dir, "access_log": getattr(args, "access_log", None)}
    try:
        settings = Settings.from_env(flags=flags)
        return COMMANDS[args.command](args, settings)
    except SettingsError as err:
        print(f"ezauth: {err}", file=sys.stderr)
        return 2
    except CliError as err:
        print(f"ezauth: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"ezauth: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 1


_service: EzauthApp | None = None
_service_lock = threading.Lock()


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """WSGI entry point for `gunicorn 'ezauth:app'`: built from the environment on first use."""
    global _service
    if _service is None:
        with _service_lock:
            if _service is None:
                logging.basicConfig(level=logging.INFO, format="%(asctime)s ezauth %(levelname)s %(message)s")
                service = make_app(Settings.from_env())
                announce_first_admin(service.users)
                _service = service
    return _service(environ, start_response)


if __name__ == "__main__":
    sys.exit(main())
