"""Feature-interaction matrix through a real nginx running the shipped config.

Auth cache on/off x HTTP Basic on/off x access rules on/off x cookie domain on/off: 16
configurations, each made from nginx.conf.example and default settings ONLY by the edits the README
and the config's comments document:

- cache:  every line marked `# ezauth-cache` uncommented (`render_example(cache_dir=...)` in tests/support/nginx.py);
- basic:  EZAUTH_BASIC_AUTH=1;
- rules:  a `rules` file in ezauth's data dir (RULES below);
- domain: EZAUTH_COOKIE_DOMAIN=.example.test, every request carrying `Host: sd.example.test:PORT`.

Plus EZAUTH_MAX_ATTEMPTS=1000 in all of them, so the wrong-password checks never lock the loopback
client out. In every configuration the same promises are checked: nobody anonymous or with a bad
credential reaches the app, denied users do not reach denied paths however they spell them, good
credentials do reach the app and the app never sees them, and ended sessions and revoked tokens stop
working within the documented time.

Each configuration's stack is built once (a module-scoped parametrized fixture: pytest runs all the
tests of one configuration, then tears it down). The two timed scenarios (logout replay, token
revoke) start in background threads as soon as the stack is up, so their waiting overlaps the other
checks; their tests, last in the file, collect the measurements. Each test collects every broken
promise of its configuration before failing, so one run shows all the evidence.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import ezauth
from tests.support.basics import LOGIN, PASSWORD, VERIFY, atomic_write, b64, basic, forge, jwt_parts, wait_until
from tests.support.nginx import CACHE_MARK, DOMAIN, Browser, Stack, build_stack, echo_header, login_through_nginx
from tests.support.process import Reply, cli_token, http_call, run_cli

pytestmark = pytest.mark.slow

RULES = """\
group admins: alice
allow @admins * /
deny bob * /admin
allow bob * /
"""
ENDS_WITHIN = 1.0  # logout and `token revoke` bite within a second (ezauth rereads its registry once a second)
CACHE_WINDOW = 5.0  # the documented lag of the auth cache (`proxy_cache_valid 200 5s`)
SLACK = 0.5  # scheduling and polling on a busy 2-core machine
OVERRUN = 2.0  # keep watching this long past a deadline, so a late refusal is measured rather than just missed
POLL = 0.05
FORBIDDEN_TEXT = ezauth.PAGE_TEXT["en"]["forbidden_text"]
EZAUTH_COOKIE_RE = re.compile(r"(?:^|;)\s*ezauth\s*=")


# -- Configurations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    cache: bool
    basic: bool
    rules: bool
    domain: bool

    @property
    def id(self) -> str:
        on = [name for name in ("cache", "basic", "rules", "domain") if getattr(self, name)]
        return "-".join(on) or "bare"

    def env(self) -> dict[str, str]:
        env = {"EZAUTH_MAX_ATTEMPTS": "1000"}
        if self.basic:
            env["EZAUTH_BASIC_AUTH"] = "1"
        if self.domain:
            env["EZAUTH_COOKIE_DOMAIN"] = f".{DOMAIN}"
        return env

    def replay_limit(self) -> float:
        """How long an ended session may still get in when its last use was just before the end."""
        return ENDS_WITHIN + (CACHE_WINDOW if self.cache else 0.0)


CONFIGS = [Config(*bits) for bits in itertools.product((True, False), repeat=4)]


# -- Helpers ---------------------------------------------------------------------------------------


@dataclass
class HostBrowser(Browser):
    """The support module's Browser as a real browser navigates: the configuration's Host and `Accept: text/html`
    on every request (ezauth answers a navigating browser with the login redirect, scripts with a 401)."""

    host: str = ""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        sent = {"Host": self.host, "Accept": "text/html", **(headers or {})}
        return super().request(method, path, body, sent)


SHOWN_HEADERS = ("cookie", "authorization", "x-auth-request-user", "x-forwarded-user")


def app_saw(echo: dict) -> str:
    """The headers of an echo that matter here."""
    return repr([(k, v) for k, v in echo["headers"] if k.lower() in SHOWN_HEADERS])


def show(reply: Reply) -> str:
    """One line of evidence: the status and what the app saw, or the start of the body."""
    echo = reply.app_echo()
    if echo is None:
        location = f" Location={reply.location!r}" if reply.location else ""
        return f"{reply.status}{location} body={reply.text[:160]!r}"
    return f"{reply.status} FROM THE APP path={echo['path']!r} app saw {app_saw(echo)}"


@dataclass
class Timing:
    """When polling after an ending event first saw a refusal, and every sample (seconds since the event)."""

    what: str
    limit: float
    first_refused: float | None = None
    samples: list[tuple[float, int, bool]] = field(default_factory=list)  # (elapsed, status, reached the app)

    def late_entries(self) -> list[tuple[float, int, bool]]:
        """Requests let in after the first refusal (a refusal must stick)."""
        if self.first_refused is None:
            return []
        return [s for s in self.samples if s[0] > self.first_refused and s[2]]

    def summary(self) -> str:
        let_in = [round(s[0], 2) for s in self.samples if s[2]]
        first = None if self.first_refused is None else round(self.first_refused, 2)
        more = "..." if len(let_in) > 8 else ""
        return (f"{self.what}: first refused at {first} s (limit {self.limit} s + {SLACK} s slack);"
                f" let in at {let_in[:8]}{more} s; {len(self.samples)} samples")


def watch_until_refused(what: str, send: Callable[[], tuple[Reply, bool]], start: float, limit: float,
                        stop: threading.Event) -> Timing:
    """Call SEND until it is refused three times running, at most until START + LIMIT + SLACK + OVERRUN."""
    timing = Timing(what, limit)
    refusals = 0

    def settled() -> bool:
        nonlocal refusals
        if stop.is_set():
            return True
        reply, reached = send()
        elapsed = time.monotonic() - start
        timing.samples.append((elapsed, reply.status, reached))
        if reached:
            refusals = 0
        else:
            refusals += 1
            if timing.first_refused is None:
                timing.first_refused = elapsed
        return refusals >= 3

    remaining = start + limit + SLACK + OVERRUN - time.monotonic()
    wait_until(settled, timeout=max(remaining, 0.0), interval=POLL)
    return timing


# -- One configuration's stack ------------------------------------------------------------------


@dataclass
class Matrix:
    """One configuration's running stack, its users' credentials, and how to ask it things."""

    config: Config
    stack: Stack
    host: str
    stop: threading.Event = field(default_factory=threading.Event)
    alice: str = ""  # session tokens
    bob: str = ""
    login_set_cookies: list[str] = field(default_factory=list)
    token: str = ""  # alice's API token, good everywhere
    api_token: str = ""  # alice's, made with --path /api/
    bob_token: str = ""
    rules_loaded: bool | None = None
    probes: dict[str, Future] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.stack.ezauth.data_dir

    @property
    def secrets(self) -> list[str]:
        """Everything the app must never see."""
        return [s for s in (self.alice, self.bob, self.token, self.api_token, self.bob_token) if s]

    def redact(self, text: str) -> str:
        """TEXT with each known secret replaced by its name, so evidence stays readable."""
        names = {"alice": "<alice's session>", "bob": "<bob's session>", "token": "<alice's token>",
                 "api_token": "<alice's /api/ token>", "bob_token": "<bob's token>"}
        for attribute, name in names.items():
            if getattr(self, attribute):
                text = text.replace(getattr(self, attribute), name)
        return text

    def browser(self) -> HostBrowser:
        return HostBrowser(self.stack.nginx.port, host=self.host)

    def mark(self, path: str) -> str:
        """PATH with a unique marker in its query, so whether the app saw this very request is known."""
        return f"{path}{'&' if '?' in path else '?'}mx={next(self.counter):07d}"

    def marker(self, path: str) -> str:
        return "mx=" + path.rsplit("mx=", 1)[1][:7]

    def hits(self, path: str) -> int:
        """How many requests carrying PATH's marker the app has seen."""
        marker = self.marker(path)
        return sum(marker in seen for seen in list(self.stack.app.seen))

    def call(self, path: str, cookie: str | None = None, *, navigate: bool = False, host: str | None = None,
             **headers: str) -> Reply:
        """One GET through nginx on a fresh connection (a client of its own), `_` in header names read as `-`."""
        sent = {"Host": host or self.host, **{k.replace("_", "-"): v for k, v in headers.items()}}
        if cookie is not None:
            sent["Cookie"] = cookie
        if navigate:
            sent["Accept"] = "text/html"
        return http_call(self.stack.nginx.port, "GET", path, headers=sent, timeout=15)

    def send(self, path: str, cookie: str | None = None, **how) -> tuple[Reply, bool]:
        """`call`, and whether the app saw this request."""
        before = self.hits(path)
        reply = self.call(path, cookie, **how)
        return reply, reply.app_echo() is not None or self.hits(path) > before

    def log_in(self, user: str) -> tuple[str, list[str]]:
        """Log USER in through nginx as a browser does: (session token, the Set-Cookie lines of the login)."""
        browser = self.browser()
        done = login_through_nginx(browser, user)
        return browser.cookie(), done.set_cookies


class Findings:
    """Every broken promise of one test in one configuration, reported together at the end."""

    def __init__(self, matrix: Matrix) -> None:
        self.m = matrix
        self.problems: list[str] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.problems.append(message)
        return ok

    def refused(self, what: str, path: str, cookie: str | None = None, *, statuses: tuple[int, ...] = (302, 401),
                **how) -> Reply:
        """Ask, and note a problem unless nginx refused (one of STATUSES) without the app seeing the request."""
        reply, reached = self.m.send(path, cookie, **how)
        request = f"GET {path} Cookie={cookie!r} {how or ''}".rstrip()
        if reached:
            self.problems.append(f"REACHED THE APP: {what}: {request} -> {show(reply)}")
        elif reply.status not in statuses:
            self.problems.append(f"refused, but with {reply.status} not {statuses}: {what}: {request} -> {show(reply)}")
        elif reply.status == 302 and not reply.location.startswith(LOGIN):
            self.problems.append(f"302 not to the login page: {what}: {request} -> {show(reply)}")
        elif reply.status == 403 and FORBIDDEN_TEXT not in reply.text:
            self.problems.append(f"403 without ezauth's forbidden page: {what}: {request} -> {show(reply)}")
        return reply

    def forbidden(self, what: str, path: str, cookie: str | None = None, **how) -> Reply:
        """Refused with ezauth's 403 page."""
        return self.refused(what, path, cookie, statuses=(403,), **how)

    def reached(self, what: str, path: str, cookie: str | None = None, *, user: str = "alice",
                app_authorization: str | None = None, extra_secrets: tuple[str, ...] = (), **how) -> dict | None:
        """Ask, and note a problem unless the app got the request as USER, without any ezauth cookie or
        secret, and with exactly APP_AUTHORIZATION as its Authorization header (None: none at all)."""
        reply = self.m.call(path, cookie, **how)
        request = f"GET {path} Cookie={cookie!r} {how or ''}".rstrip()
        echo = reply.app_echo()
        if echo is None:
            self.problems.append(f"did not reach the app: {what}: {request} -> {show(reply)}")
            return None
        self.clean(what, request, echo, user, app_authorization, extra_secrets)
        return echo

    def clean(self, what: str, request: str, echo: dict, user: str, app_authorization: str | None,
              extra_secrets: tuple[str, ...] = ()) -> None:
        evidence = f"{what}: {request} -> app saw {app_saw(echo)}"
        self.check(echo_header(echo, "X-Auth-Request-User") == [user], f"user is not {user!r}: {evidence}")
        cookies = echo_header(echo, "Cookie")
        self.check(not any(EZAUTH_COOKIE_RE.search(c) for c in cookies), f"app saw an ezauth cookie: {evidence}")
        wanted = [] if app_authorization is None else [app_authorization]
        self.check(echo_header(echo, "Authorization") == wanted,
                   f"app's Authorization is {echo_header(echo, 'Authorization')} not {wanted}: {evidence}")
        everything = json.dumps(echo["headers"])
        for secret in (*self.m.secrets, *extra_secrets):
            if secret and secret != app_authorization:
                self.check(secret not in everything, f"app saw a secret ({self.m.redact(secret)}): {evidence}")

    def done(self) -> None:
        assert not self.problems, (f"[{self.m.config.id}] {len(self.problems)} broken promise(s):\n  "
                                   + "\n  ".join(map(self.m.redact, self.problems)))


# -- Background scenarios: the timed ones ---------------------------------------------------------


def replay_after_logout(m: Matrix) -> tuple[Timing, Timing]:
    """Log in, use the session (so the cache holds a yes for it), log out through nginx, and replay the
    old cookie: on the URL just used (the cache's worst case) and on fresh URLs (never cached)."""
    browser = m.browser()
    login_through_nginx(browser, "alice")
    cookie = f"ezauth={browser.cookie()}"
    used = m.mark("/replay/used")
    reply, reached = m.send(used, cookie)
    assert reached, f"the fresh session did not get in: {show(reply)}"
    out = browser.logout()
    start = time.monotonic()
    assert out.status == 303, show(out)
    fresh = watch_until_refused("replay on fresh URLs", lambda: m.send(m.mark("/replay/fresh"), cookie),
                                start, ENDS_WITHIN, m.stop)
    cached = watch_until_refused("replay on the URL used just before logout", lambda: m.send(used, cookie),
                                 start, m.config.replay_limit(), m.stop)
    return fresh, cached


def use_after_revoke(m: Matrix) -> Timing:
    """Use a token (so a cache that wrongly stores Authorization requests would hold a yes), revoke it with
    the CLI, and keep using it: requests with Authorization bypass the cache, so the limit is a second."""
    secret, token_id = cli_token(m.data_dir, "alice", "revoke probe")
    url = m.mark("/api/revoked")
    # A running ezauth takes in new tokens with its once-a-second reload.
    assert wait_until(lambda: m.send(url, Authorization=f"Bearer {secret}")[1], timeout=5), \
        f"the new token did not get in: {show(m.call(url, Authorization=f'Bearer {secret}'))}"
    done = run_cli("token", "revoke", token_id, data_dir=m.data_dir)
    start = time.monotonic()
    assert done.returncode == 0, (done.stdout, done.stderr)
    return watch_until_refused("token used after `token revoke`", lambda: m.send(url, Authorization=f"Bearer {secret}"),
                               start, ENDS_WITHIN, m.stop)


# -- The fixture -----------------------------------------------------------------------------------


def set_up(m: Matrix) -> None:
    """Start the timed scenarios, then sessions, tokens and (with rules) the rules file, side by side."""
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"matrix-{m.config.id}")
    m.stack.cleanup.callback(executor.shutdown, wait=True)
    m.stack.cleanup.callback(m.stop.set)  # runs first: the scenarios stop polling, then the executor drains
    m.probes["logout"] = executor.submit(replay_after_logout, m)
    m.probes["revoke"] = executor.submit(use_after_revoke, m)
    if m.config.rules:  # first, so ezauth's reload of it overlaps the rest
        atomic_write(m.data_dir / "rules", RULES)
    with ThreadPoolExecutor(max_workers=3) as pool:
        alice, bob = pool.submit(m.log_in, "alice"), pool.submit(m.log_in, "bob")
        tokens = pool.submit(lambda: [cli_token(m.data_dir, "alice", "t")[0],
                                      cli_token(m.data_dir, "alice", "api only", "--path", "/api/")[0],
                                      cli_token(m.data_dir, "bob", "bob's")[0]])
        (m.alice, m.login_set_cookies), (m.bob, _) = alice.result(), bob.result()
        m.token, m.api_token, m.bob_token = tokens.result()

    # ezauth rereads its files and the token registry once a second: ask it directly (never the app)
    # until the new tokens (taken in all at once) and the rules decide.
    def verify(**headers: str) -> int:
        sent = {"X-Original-Host": m.host.split(":")[0], "Host": m.host,  # as nginx sends them: one host
                **{k.replace("_", "-"): v for k, v in headers.items()}}
        return http_call(m.stack.ezauth.port, "GET", VERIFY, headers=sent).status

    assert wait_until(lambda: verify(Authorization=f"Bearer {m.bob_token}", X_Original_URI="/public/") == 200,
                      timeout=5), "ezauth never took in the tokens the CLI made"
    if m.config.rules:
        m.rules_loaded = bool(wait_until(lambda: verify(Cookie=f"ezauth={m.bob}", X_Original_URI="/admin") == 403,
                                         timeout=5))


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.id)
def matrix(request, nginx_bin, tmp_path_factory) -> Iterator[Matrix]:
    config: Config = request.param
    with contextlib.ExitStack() as cleanup:
        stack = build_stack(nginx_bin, tmp_path_factory.mktemp(config.id), cleanup, users=("alice", "bob"),
                            cache=config.cache, **config.env())
        host = f"sd.{DOMAIN}:{stack.nginx.port}" if config.domain else f"127.0.0.1:{stack.nginx.port}"
        m = Matrix(config, stack, host)
        set_up(m)
        yield m


# -- The configuration is what its id says ---------------------------------------------------------


def test_configuration_is_what_its_id_says(matrix):
    m, f = matrix, Findings(matrix)
    site = (m.stack.nginx.prefix / "ezauth.conf").read_text()
    cache_lines = [line for line in site.splitlines() if CACHE_MARK in line]
    f.check(bool(cache_lines) and all(line.lstrip().startswith("#") != m.config.cache for line in cache_lines),
            f"cache lines do not match cache={m.config.cache}: {cache_lines}")
    f.reached("a session", m.mark("/config/cache"), f"ezauth={m.alice}")
    cache_dir = m.stack.nginx.prefix.parent / "auth-cache"
    cached_files = [p for p in cache_dir.rglob("*") if p.is_file()] if cache_dir.exists() else []
    f.check(bool(cached_files) == m.config.cache, f"auth cache files {cached_files} with cache={m.config.cache}")

    good_basic = m.call(m.mark("/config/basic"), Authorization=basic("alice", PASSWORD))
    f.check((good_basic.app_echo() is not None) == m.config.basic,
            f"good Basic credentials with basic={m.config.basic}: {show(good_basic)}")

    if m.config.rules:
        f.check(m.rules_loaded is True, "ezauth did not apply the rules file within 5 s")
    bob_admin = m.call(m.mark("/admin"), f"ezauth={m.bob}", navigate=True)
    f.check((bob_admin.status == 403) == m.config.rules and (bob_admin.app_echo() is None) == m.config.rules,
            f"bob on /admin with rules={m.config.rules}: {show(bob_admin)}")

    session_cookie = next((c for c in m.login_set_cookies if c.startswith("ezauth=")), "")
    f.check((f"Domain={DOMAIN}" in session_cookie or f"Domain=.{DOMAIN}" in session_cookie) == m.config.domain,
            f"login cookie {session_cookie[-80:]!r} with domain={m.config.domain}")
    if m.config.domain:  # one login covers the other subdomains
        f.reached("the session on another subdomain", m.mark("/config/notes"), f"ezauth={m.alice}",
                  host=f"notes.{DOMAIN}:{m.stack.nginx.port}")
    f.done()


# -- Anonymous requests --------------------------------------------------------------------------


ANONYMOUS_COOKIES = [
    None, "", ";", "ezauth", "ezauth=", "ezauth=;", "ezauth=; ezauth=", "ezauth=;ezauth=", 'ezauth=""',
    "ezauth= ", "ezauth=junk", "ezauth=junk; ezauth=", "theme=dark", "theme=dark; ezauth=", "Ezauth=", "EZAUTH=x",
    "ezauth=ezt_" + "A" * 43,
]
ANONYMOUS_HEADERS = [
    {}, {"X-Auth-Request-User": "alice"}, {"X-Forwarded-User": "alice"}, {"Authorization": ""},
    {"Authorization": "Bearer "}, {"Authorization": "Bearer ezt_"}, {"Authorization": "Bearer app-token"},
    {"Authorization": "Basic "}, {"Authorization": "Basic !!!"}, {"X-Original-URI": "/ezauth/login"},
]


def test_anonymous_requests_never_reach_the_app(matrix):
    m, f = matrix, Findings(matrix)
    for cookie in ANONYMOUS_COOKIES:
        for navigate in (True, False):
            f.refused(f"anonymous cookie {cookie!r}", m.mark("/anon/"), cookie, navigate=navigate)
    for headers in ANONYMOUS_HEADERS:
        f.refused(f"anonymous with {headers}", m.mark("/anon/h"), **headers)
    for method in ("POST", "PUT", "HEAD"):
        path = m.mark("/anon/m")
        before = m.hits(path)
        reply = http_call(m.stack.nginx.port, method, path, b"x=1" if method != "HEAD" else None,
                          {"Host": m.host, "Content-Type": "application/x-www-form-urlencoded"})
        f.check(m.hits(path) == before and reply.status in (302, 401),
                f"anonymous {method} {path} -> {show(reply)}")
    f.done()


def test_a_valid_session_beside_an_empty_cookie_opens_no_door_for_the_next_anonymous_request(matrix):
    """`Cookie: ezauth=; ezauth=<valid>` gets in (it holds a session); right after it, requests on the same
    URL holding no session must not (the cache must not store its yes under a session-less key)."""
    m, f = matrix, Findings(matrix)
    a = m.alice
    pairs = [
        (f"ezauth=; ezauth={a}", ["ezauth=", "ezauth=; ezauth=", "ezauth=;ezauth=", None, "", "ezauth=; ezauth=x"]),
        (f"ezauth=junk; ezauth={a}", ["ezauth=junk", "ezauth=junk; ezauth=", "ezauth=junk; ezauth=junk"]),
        (f"theme=dark; ezauth=; ezauth={a}", ["theme=dark; ezauth=", "theme=dark", "theme=dark; ezauth=; ezauth="]),
        (f"ezauth={a}; ezauth=", ["ezauth=", "ezauth=x; ezauth=", None]),
        (f"ezauth={a}; theme=dark", ["theme=dark", "ezauth=; theme=dark", "ezauth=x; theme=dark"]),
    ]
    for _ in range(3):
        for valid, anonymous in pairs:
            url = m.mark("/poison/")
            f.reached(f"valid session beside another cookie {valid[:24]!r}...", url, valid)
            for cookie in anonymous:
                for navigate in (False, True):
                    f.refused(f"anonymous right after {valid[:24]!r}... on the same URL", url, cookie,
                              navigate=navigate)
    f.done()


def test_three_or_more_session_cookies_are_refused_and_the_app_never_sees_a_third(matrix):
    m, f = matrix, Findings(matrix)
    a = m.alice
    for cookie in [
        f"ezauth={a}; ezauth={a}; ezauth={a}",
        f"ezauth={a};ezauth={a};ezauth={a}",
        f"ezauth=; ezauth=; ezauth={a}",
        f"ezauth=x; ezauth={a}; ezauth={a}",
        f"ezauth={a}; ezauth={a}; ezauth=",
        f"a=1; ezauth={a}; b=2; ezauth={a}; c=3; ezauth={a}; d=4",
        f"ezauth={a}; ezauth={a}; ezauth={a}; ezauth={a}",
        f"ezauth={a}; ezauth={m.bob}; ezauth={a}",
    ]:
        f.refused(f"{cookie.count('ezauth=')} ezauth cookies", m.mark("/three/"), cookie)
    # Spellings ezauth's parser may not count as a third session cookie but an app's lenient parser
    # would: if such a request gets in, the app must still not see the token.
    for third in ("ezauth =", "ezauth= ", " ezauth=", "ezauth\t=", "ezauth=\""):
        path = m.mark("/three/spelled")
        reply = m.call(path, f"ezauth={a}; ezauth={a}; {third}{a}")
        echo = reply.app_echo()
        if echo is not None:
            f.clean(f"two sessions and a third spelled {third!r}", f"GET {path} Cookie=ezauth=A; ezauth=A; {third}A",
                    echo, "alice", None)
    f.done()


# -- Wrong or stale credentials -------------------------------------------------------------------


def tampered_tokens(m: Matrix) -> dict[str, str]:
    """Bad versions of alice's session token: edited, re-signed with wrong keys, expired, not yet valid."""
    token = m.alice
    header, claims, signature = jwt_parts(token)
    head, body, _ = token.split(".")
    middle = len(signature) // 2
    flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1:]
    keys = ezauth.parse_keyring((m.data_dir / "keys.json").read_text())
    secret = next(k.secret for k in keys if k.kid == header.get("kid"))
    now = int(time.time())
    later = {**claims, "exp": claims["exp"] + 86400}
    return {
        "signature changed": f"{head}.{body}.{flipped}",
        "subject changed to bob, old signature": f"{head}.{b64(json.dumps({**claims, 'sub': 'bob'}))}.{signature}",
        "expiry extended, old signature": f"{head}.{b64(json.dumps(later))}.{signature}",
        "alg none": f"{b64(json.dumps({**header, 'alg': 'none'}))}.{body}.",
        "signed with a random key": forge(header, claims, secrets.token_bytes(32)),
        "unknown key id": forge({**header, "kid": "nosuchkey"}, claims, secret),
        "truncated": token[:-6],
        "extra segment": token + ".AAAA",
        "expired (real key)": forge(header, {**claims, "iat": now - 7200, "exp": now - 3600}, secret),
        "not yet valid (real key)": forge(header, {**claims, "iat": now + 3600, "exp": now + 7200}, secret),
    }


def test_tampered_and_expired_session_tokens_never_reach_the_app(matrix):
    m, f = matrix, Findings(matrix)
    for what, bad in tampered_tokens(m).items():
        for cookie in (f"ezauth={bad}", f"theme=dark; ezauth={bad}", f"ezauth=; ezauth={bad}"):
            f.refused(f"session token: {what}", m.mark("/tampered/"), cookie)
        f.refused(f"session token: {what}, navigating", m.mark("/tampered/"), f"ezauth={bad}", navigate=True)
    f.done()


def test_wrong_basic_credentials_and_unknown_tokens_never_reach_the_app(matrix):
    m, f = matrix, Findings(matrix)
    for what, header in {
        "wrong password": basic("alice", "wrong password"),
        "password plus a character": basic("alice", PASSWORD + "x"),
        "password in capitals": basic("alice", PASSWORD.upper()),
        "user that does not exist": basic("mallory", PASSWORD),
        "user name in another case": basic("Alice", PASSWORD),
        "empty password": basic("alice", ""),
        "no colon": "Basic " + base64.b64encode(b"alice").decode(),
        "unknown API token as the password": basic("alice", "ezt_" + secrets.token_urlsafe(32)),
        "bob's API token with alice's name": basic("alice", m.bob_token),
        "unknown bearer token": "Bearer ezt_" + secrets.token_urlsafe(32),
        "bearer token cut short": "Bearer " + m.token[:-1],
    }.items():
        reply = f.refused(f"Authorization: {what}", m.mark("/wrong/"), Authorization=header)
        if m.config.basic and header.startswith("Basic") and reply.status == 401:
            f.check(reply.headers.get("WWW-Authenticate") == 'Basic realm="ezauth"',
                    f"no Basic challenge for {what}: {show(reply)} {reply.headers.items()}")
    f.done()


# -- Access rules ---------------------------------------------------------------------------------


DENIED_SPELLINGS = [
    "/admin", "/admin/", "/admin/x", "/administrator", "/ADMIN", "/Admin/x", "//admin", "///admin/x", "/./admin",
    "/admin;x", "/admin;x/y", "/public/../admin", "/public/./../admin", "/public/..;/admin", "/%61dmin",
    "/%2561dmin", "/%2fadmin", "/admin%2f..%2fpublic/x", "/admin%2F..%2Fpublic/x", "/admin\\..\\public/x",
    "/admin%5c..%5cpublic/x", "/admin%252f..%252fpublic", "/admin%252f..%252fpublic/x", "/public/%2e%2e/admin",
    "/public/..%2fadmin", "/public%2f..%2fadmin", "/public#/../admin", "/admin?/public",
]


def test_denied_user_never_reaches_the_denied_path_in_any_spelling(matrix):
    m, f = matrix, Findings(matrix)
    if not m.config.rules:
        # No rules file: every logged-in user may go everywhere (so the refusals below come from the rules).
        f.reached("bob on /admin without rules", m.mark("/admin"), f"ezauth={m.bob}", user="bob")
        f.done()
        return
    for path in DENIED_SPELLINGS:
        f.forbidden(f"bob's session on {path!r}", m.mark(path), f"ezauth={m.bob}", navigate=True)
        f.forbidden(f"bob's API token on {path!r}", m.mark(path), Authorization=f"Bearer {m.bob_token}")
        if m.config.basic:
            f.forbidden(f"bob's Basic credentials on {path!r}", m.mark(path), Authorization=basic("bob", PASSWORD))
    f.forbidden("bob's session beside alice's junk cookie", m.mark("/admin"), f"ezauth=junk; ezauth={m.bob}")
    f.reached("bob on /public/x", m.mark("/public/x"), f"ezauth={m.bob}", user="bob")
    f.reached("bob on /adm", m.mark("/adm"), f"ezauth={m.bob}", user="bob")
    f.reached("alice (an admin) on /admin", m.mark("/admin"), f"ezauth={m.alice}")
    f.reached("alice's token on /admin/x", m.mark("/admin/x"), Authorization=f"Bearer {m.token}")
    f.done()


# -- Good credentials reach the app, and the app never sees them ----------------------------------


def test_a_good_session_reaches_the_app_without_its_cookie(matrix):
    m, f = matrix, Findings(matrix)
    a = m.alice
    for cookie, others in [
        (f"ezauth={a}", []),
        (f"theme=dark; ezauth={a}", ["theme=dark"]),
        (f"ezauth={a}; theme=dark", ["theme=dark"]),
        (f"ezauth={a};theme=dark", ["theme=dark"]),
        (f"a=1; ezauth={a}; b=2", ["a=1", "b=2"]),
        (f"ezauth=; ezauth={a}", []),
        (f"ezauth=junk; ezauth={a}; x=1", ["x=1"]),
        (f"ezauth={a}; ezauth={a}", []),
    ]:
        echo = f.reached(f"session with cookie header {cookie[:30]!r}...", m.mark("/good/"), cookie,
                         X_Auth_Request_User="bob", X_Forwarded_User="bob")
        if echo is not None:
            sent_on = "; ".join(echo_header(echo, "Cookie"))
            f.check(all(o in sent_on for o in others), f"app lost the other cookies {others}: got {sent_on!r}")
            f.check(echo_header(echo, "X-Forwarded-User") == ["alice"],
                    f"X-Forwarded-User {echo_header(echo, 'X-Forwarded-User')} for {cookie[:30]!r}")
    f.reached("a navigating browser", m.mark("/good/nav"), f"ezauth={a}", navigate=True)
    # Two users' sessions in one request: one was tossed in (by a sibling host, say) to swap the visitor.
    f.refused("alice's session beside bob's", m.mark("/good/two"), f"ezauth={a}; ezauth={m.bob}")
    f.done()


def test_good_basic_credentials_reach_the_app_without_the_password_only_when_basic_is_on(matrix):
    m, f = matrix, Findings(matrix)
    header = basic("alice", PASSWORD)
    if not m.config.basic:
        f.refused("good Basic credentials with EZAUTH_BASIC_AUTH off", m.mark("/basic/"), Authorization=header)
        f.done()
        return
    for _ in range(3):  # the first is checked with scrypt, the rest come from ezauth's own minute-long cache
        f.reached("good Basic credentials", m.mark("/basic/"), Authorization=header,
                  extra_secrets=(header.split()[1], PASSWORD))
    f.reached("good Basic credentials with other cookies", m.mark("/basic/c"), "theme=dark",
              Authorization=header, extra_secrets=(header.split()[1], PASSWORD))
    f.reached("bob's good Basic credentials", m.mark("/basic/bob"), Authorization=basic("bob", PASSWORD),
              user="bob", extra_secrets=(basic("bob", PASSWORD).split()[1],))
    f.done()


def test_api_tokens_reach_the_app_in_every_configuration_without_the_header(matrix):
    m, f = matrix, Findings(matrix)
    f.reached("Bearer token", m.mark("/tok/"), Authorization=f"Bearer {m.token}")
    f.reached("Bearer token, scheme in lower case", m.mark("/tok/"), Authorization=f"bearer {m.token}")
    f.reached("Bearer token with other cookies", m.mark("/tok/c"), "theme=dark", Authorization=f"Bearer {m.token}")
    f.reached("bob's Bearer token", m.mark("/tok/bob"), Authorization=f"Bearer {m.bob_token}", user="bob")
    f.done()


def test_the_apps_own_authorization_header_reaches_it_beside_a_session(matrix):
    m, f = matrix, Findings(matrix)
    for own in ("Bearer something-else", "Bearer app.jwt.token", "Token abc123"):
        f.reached(f"session + the app's own {own!r}", m.mark("/own/"), f"ezauth={m.alice}",
                  Authorization=own, app_authorization=own)
    f.done()


# -- The auth cache and Authorization --------------------------------------------------------------


def test_one_basic_or_token_request_never_lets_the_next_anonymous_one_in(matrix):
    """The review's critical hole: with the cache on, an Authorization request must not store a yes that
    the next request on the same URL and Cookie header, without credentials, gets. Looped within 5 s."""
    m, f = matrix, Findings(matrix)
    credentials = {"Bearer token": f"Bearer {m.token}"}
    if m.config.basic:
        credentials["Basic"] = basic("alice", PASSWORD)
    for rounds in range(1, 6):
        for what, header in credentials.items():
            for shared_cookie in (None, "theme=dark", "ezauth="):
                url = m.mark("/hole/")
                first, got_in = m.send(url, shared_cookie, Authorization=header)
                f.check(got_in, f"{what} did not get in (round {rounds}): {show(first)}")
                for navigate in (False, True, False):
                    f.refused(f"anonymous right after one {what} request (round {rounds})", url, shared_cookie,
                              navigate=navigate)
    f.done()


def test_requests_with_credentials_are_never_answered_from_the_cache(matrix):
    """A session request stores a yes (cache on); the same URL and Cookie with ezauth credentials in
    Authorization must still be asked of ezauth, which tells nginx to keep them from the app."""
    m, f = matrix, Findings(matrix)
    cookie = f"ezauth={m.alice}"
    credentials = {"Bearer token": f"Bearer {m.token}"}
    if m.config.basic:
        credentials["Basic"] = basic("alice", PASSWORD)
    for what, header in credentials.items():
        url = m.mark("/warm/")
        f.reached("session, storing a yes", url, cookie)
        f.reached(f"same session and URL plus {what}", url, cookie, Authorization=header,
                  extra_secrets=(header.split()[1],))
        # And the other way round: an Authorization request stores nothing a session-less one could get.
        url = m.mark("/warm/auth-first")
        f.reached(f"{what} with a cookie that is no session", url, "theme=dark", Authorization=header,
                  extra_secrets=(header.split()[1],))
        f.refused(f"the app's own token after {what}, same URL and cookie", url, "theme=dark",
                  Authorization="Bearer app-token")
    f.done()


def test_a_path_limited_token_stays_under_its_path(matrix):
    m, f = matrix, Findings(matrix)
    bearer = f"Bearer {m.api_token}"
    for path in ("/api/", "/api/x", "/api/v1/models?a=1"):
        f.reached(f"--path /api/ token on {path!r}", m.mark(path), Authorization=bearer)
    for path in ("/", "/admin", "/apix", "/api", "/public/api/", "/api/../admin", "/api/./../admin",
                 "/api/%2e%2e/admin", "/api/%2E%2E/admin", "/api%2f..%2fadmin", "/api/..%2fadmin", "/api/..%5cadmin",
                 "/api/..\\admin", "/api/%252e%252e/admin", "/api/..%252fadmin", "/api/..;/admin",
                 "/x/../api/../admin", "/api#/../../admin"):
        f.refused(f"--path /api/ token on {path!r}", m.mark(path), statuses=(401, 403), Authorization=bearer)
    f.done()


# -- Timed: ended sessions and revoked tokens (measured in the background since set-up) ------------


def test_a_logged_out_session_is_refused_within_the_documented_lag(matrix):
    m, f = matrix, Findings(matrix)
    fresh, cached = m.probes["logout"].result(timeout=ENDS_WITHIN + CACHE_WINDOW + SLACK + 2 * OVERRUN + 30)
    for timing in (fresh, cached):
        print(f"[{m.config.id}] {timing.summary()}")  # the measurement, shown with -rP
        f.check(timing.first_refused is not None and timing.first_refused <= timing.limit + SLACK,
                "old cookie replayed after /ezauth/logout not refused in time: " + timing.summary())
        f.check(not timing.late_entries(), f"let in again after a refusal: {timing.late_entries()}")
    f.done()


def test_a_revoked_token_is_refused_within_a_second_cache_or_not(matrix):
    m, f = matrix, Findings(matrix)
    timing = m.probes["revoke"].result(timeout=ENDS_WITHIN + SLACK + OVERRUN + 30)
    print(f"[{m.config.id}] {timing.summary()}")  # the measurement, shown with -rP
    f.check(timing.first_refused is not None and timing.first_refused <= timing.limit + SLACK,
            "revoked token not refused in time" + (" (the auth cache answered a request carrying Authorization?)"
                                                   if m.config.cache else "") + ": " + timing.summary())
    f.check(not timing.late_entries(), f"let in again after a refusal: {timing.late_entries()}")
    f.done()
