"""Chromium through Playwright, which is imported only inside these functions: every other layer
collects and runs without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from tests.support.basics import HERE, LOGIN, missing, require_tool
from tests.support.process import Server

if TYPE_CHECKING:
    from playwright.sync_api import Browser as Chromium
    from playwright.sync_api import Page, Response

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


@contextlib.contextmanager
def launch_chromium(flag: str) -> Iterator[Chromium]:
    """Headless Debian chromium through Playwright, never a downloaded browser. Without chromium or
    Playwright the test skips, saying how to install them, or fails when FLAG=1 says it must run."""
    path = require_tool("chromium", flag, "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed; install it with: .venv/bin/pip install -r requirements-test.txt",
                flag)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
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


def require_axe() -> None:
    """Skip the test when axe-core (a test-only npm package) is not installed, saying how to install
    it; fail instead under EZAUTH_REQUIRE_BROWSER=1."""
    if not AXE.exists():
        missing(f"axe-core is not installed ({AXE} is missing); install it with: cd {HERE} && npm ci",
                "EZAUTH_REQUIRE_BROWSER")


def run_axe(page: Page) -> list[dict]:
    """axe-core's WCAG 2.1 A/AA and best-practice violations once the page has settled (mid-animation
    colours are not what anyone reads). Every axe check goes through here, so none can trip over a
    missing axe-core."""
    require_axe()
    finish_animations(page)
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        "async () => await axe.run(document, {resultTypes: ['violations'],"
        " runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})"
    )
    return result["violations"]
