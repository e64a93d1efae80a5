"""The login page in a real browser (Debian's chromium through Playwright) against the real server.
The template and assets without a browser are checked in tests/app/test_page_templates.py."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

import ezauth
from tests.support.basics import CSRF, HERE, LOGIN, PASSWORD, TEXT, wait_until
from tests.support.browser import expect, finish_animations, login_url, open_page, require_axe, run_axe, submit
from tests.support.process import Server, cli_totp, real_login

if TYPE_CHECKING:
    from playwright.sync_api import Page

ARTIFACTS = HERE / "artifacts"
WEIGHT_LIMIT = 50 * 1024

# Records, in order, whether data-theme was set on <html> before <body> was inserted.
THEME_PROBE = """
window.__themeEvents = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === "attributes" && r.target.nodeName === "HTML") window.__themeEvents.push("theme");
    for (const n of r.addedNodes || []) if (n.nodeName === "BODY") window.__themeEvents.push("body");
  }
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ["data-theme"]});
"""

LUMINANCE = """(el) => {
  const [r, g, b] = getComputedStyle(el).backgroundColor.match(/[\\d.]+/g).map(Number);
  const lin = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
}"""


# -- Fixtures and helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def page_text() -> dict:
    """ezauth's PAGE_TEXT, the single source of every string the page shows."""
    import ezauth

    return ezauth.PAGE_TEXT


def theme(page: Page) -> str | None:
    return page.evaluate("document.documentElement.getAttribute('data-theme')")


def luminance(page: Page) -> float:
    return page.eval_on_selector("body", LUMINANCE)


def path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# -- Error state ------------------------------------------------------------------


def test_wrong_password_shows_the_cat_and_it_stays(chromium, lenient_server, page_text):
    with open_page(chromium, lenient_server) as (page, watch):
        page.goto(login_url(lenient_server, "/ezauth/healthz"))
        expect(page.locator(".oops")).to_be_hidden()
        response = submit(page, "alice", "not the password", remember=True)
        assert response.status == 401
        assert path_and_query(page.url) == LOGIN
        alert = page.get_by_role("alert")
        expect(alert).to_be_visible()
        assert alert.get_attribute("aria-live") == "assertive"
        bubble = alert.locator(".bubble")
        message = bubble.inner_text().strip()
        assert message in {v for k, v in page_text["en"].items() if k.startswith("msg_")}
        cat = alert.locator("img.cat")
        expect(cat).to_be_visible()
        assert cat.evaluate("(img) => img.complete && img.naturalWidth > 0"), "cat.svg did not load"
        assert page.input_value("#username") == "alice"
        assert page.is_checked("#remember")
        assert page.evaluate("document.activeElement.id") == "password"
        page.wait_for_timeout(1800)  # it must not auto-hide
        for part in (cat, bubble):
            expect(part).to_be_visible()
            assert part.evaluate("(el) => getComputedStyle(el).opacity") == "1"
            box = part.bounding_box()
            assert box and box["width"] > 40 and box["height"] > 20
        assert bubble.inner_text().strip() == message
        # The return target survives the failed attempt, and the page still logs in.
        assert page.input_value("input[name=rd]") == "/ezauth/healthz"
        submit(page, "alice", PASSWORD)
        assert path_and_query(page.url) == "/ezauth/healthz"
        watch.assert_clean()


RUNNING_ANIMATIONS = "document.getAnimations().map((a) => a.animationName || a.transitionProperty)"


def test_entrance_animation_is_off_under_reduced_motion(chromium, lenient_server):
    with open_page(chromium, lenient_server, reduced_motion="no-preference") as (page, watch):
        page.goto(login_url(lenient_server))
        submit(page, "alice", "nope")
        assert {"cat-peek", "bubble-pop"} <= set(page.evaluate(RUNNING_ANIMATIONS))
        watch.assert_clean()
    with open_page(chromium, lenient_server, reduced_motion="reduce") as (page, watch):
        page.goto(login_url(lenient_server))
        submit(page, "alice", "nope")
        assert page.evaluate(RUNNING_ANIMATIONS) == []
        bubble = page.locator(".oops .bubble")
        expect(bubble).to_be_visible()
        assert bubble.evaluate("(el) => getComputedStyle(el).opacity") == "1"
        watch.assert_clean()


# -- Themes ------------------------------------------------------------------------


def test_theme_toggle_flips_and_the_choice_survives_reload(chromium, lenient_server, page_text):
    with open_page(chromium, lenient_server, color_scheme="light") as (page, watch):
        page.goto(login_url(lenient_server))
        toggle = page.locator("#theme-toggle")
        expect(toggle).to_be_visible()
        assert toggle.get_attribute("aria-label") == page_text["en"]["t_theme"]
        assert theme(page) == "light"
        assert toggle.get_attribute("aria-pressed") == "false"
        light = luminance(page)
        toggle.click()
        assert theme(page) == "dark"
        assert toggle.get_attribute("aria-pressed") == "true"
        assert luminance(page) < 0.05 < light
        page.reload()
        assert theme(page) == "dark"
        expect(page.locator("#theme-toggle")).to_have_attribute("aria-pressed", "true")
        assert luminance(page) < 0.05
        page.locator("#theme-toggle").click()
        page.reload()
        assert theme(page) == "light"
        assert luminance(page) > 0.6
        watch.assert_clean()


@pytest.mark.parametrize("scheme", ["dark", "light"])
def test_first_visit_follows_the_system_theme(chromium, lenient_server, scheme):
    with open_page(chromium, lenient_server, color_scheme=scheme) as (page, watch):
        page.goto(login_url(lenient_server))
        assert theme(page) == scheme
        assert page.evaluate("localStorage.getItem('ezauth-theme')") is None
        lum = luminance(page)
        assert lum < 0.05 if scheme == "dark" else lum > 0.6
        expected = "true" if scheme == "dark" else "false"
        assert page.locator("#theme-toggle").get_attribute("aria-pressed") == expected
        # Until the user chooses, the page follows the system when it changes; after that it does not.
        other = "light" if scheme == "dark" else "dark"
        page.emulate_media(color_scheme=other)
        expect(page.locator("html")).to_have_attribute("data-theme", other)
        page.locator("#theme-toggle").click()
        assert theme(page) == scheme
        page.emulate_media(color_scheme=other)
        page.emulate_media(color_scheme=scheme)
        page.emulate_media(color_scheme=other)
        assert theme(page) == scheme
        assert page.evaluate("localStorage.getItem('ezauth-theme')") == scheme
        watch.assert_clean()


def test_stored_theme_is_set_before_the_body_exists(chromium, lenient_server):
    """No flash: the saved choice wins over the system and is applied before anything can paint."""
    stored = {"cookies": [], "origins": [
        {"origin": lenient_server.url, "localStorage": [{"name": "ezauth-theme", "value": "dark"}]}]}
    with open_page(chromium, lenient_server, color_scheme="light", storage_state=stored) as (page, watch):
        page.context.add_init_script(THEME_PROBE)
        page.goto(login_url(lenient_server))
        events = page.evaluate("window.__themeEvents")
        assert "body" in events and "theme" in events[: events.index("body")], events
        assert theme(page) == "dark"
        assert luminance(page) < 0.05
        watch.assert_clean()


# -- Logging in ---------------------------------------------------------------------


@pytest.mark.parametrize("target,remember", [("/ezauth/healthz", False), ("/ezauth/healthz?a=1&b=2", True)])
def test_right_password_lands_on_the_return_target(chromium, lenient_server, target, remember):
    with open_page(chromium, lenient_server) as (page, watch):
        page.goto(login_url(lenient_server, target))
        assert page.input_value("input[name=rd]") == target
        response = submit(page, "alice", PASSWORD, remember=remember)
        assert path_and_query(page.url) == target
        assert response.status == 200 and page.locator("body").inner_text().strip() == "ok"
        assert response.request.redirected_from is not None
        assert response.request.redirected_from.method == "POST"
        cookie = next(c for c in page.context.cookies() if c["name"] == "ezauth")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == "/"
        if remember:
            assert cookie["expires"] > time.time() + 3600
        else:
            assert cookie["expires"] == -1  # a session cookie
        watch.assert_clean()


def test_the_fragment_of_the_first_url_survives_the_login(chromium, lenient_server):
    """nginx's redirect carries no #fragment, but the browser keeps it on the login page's URL:
    the page's script puts it into the return target, and the server lets it through."""
    with open_page(chromium, lenient_server) as (page, watch):
        page.goto(login_url(lenient_server, "/ezauth/healthz?tab=2") + "#results/7")
        assert page.input_value("input[name=rd]") == "/ezauth/healthz?tab=2#results/7"
        submit(page, "alice", PASSWORD)
        assert page.url.endswith("/ezauth/healthz?tab=2#results/7")
        watch.assert_clean()


def test_logging_in_without_a_return_target_lands_on_the_account_page(chromium, lenient_server):
    with open_page(chromium, lenient_server) as (page, watch):
        page.goto(lenient_server.url + "/ezauth/login")
        submit(page, "alice", PASSWORD)
        assert path_and_query(page.url) == "/ezauth/account"
        expect(page.locator("#signed-in")).to_have_text("You are logged in as alice.")
        with page.expect_navigation():
            page.click("form[action='/ezauth/logout'] button")
        assert path_and_query(page.url) == "/ezauth/login"
        watch.assert_clean()


def test_login_works_without_javascript(chromium, lenient_server):
    with open_page(chromium, lenient_server, java_script_enabled=False, color_scheme="dark") as (page, watch):
        page.goto(login_url(lenient_server, "/ezauth/healthz?from=nojs"))
        assert theme(page) is None  # no script ran
        expect(page.locator("#theme-toggle")).to_be_hidden()
        assert luminance(page) < 0.05  # the CSS alone follows the system's dark scheme
        response = submit(page, "alice", "wrong again")
        assert response.status == 401
        expect(page.locator(".oops .bubble")).to_be_visible()
        submit(page, "alice", PASSWORD)
        assert path_and_query(page.url) == "/ezauth/healthz?from=nojs"
        watch.assert_clean()


# -- Languages ----------------------------------------------------------------------


def visible_strings(page: Page) -> dict[str, str]:
    return {
        "label_username": page.locator("label[for=username]").inner_text().strip(),
        "label_password": page.locator("label[for=password]").inner_text().strip(),
        "label_remember": page.locator("label[for=remember]").inner_text().strip(),
        "submit": page.locator("button[type=submit]").inner_text().strip(),
        "toggle": page.locator("#theme-toggle").get_attribute("aria-label"),
    }


@pytest.mark.parametrize("locale", ["zh-CN", "en-US"])
def test_page_speaks_the_browser_language(chromium, lenient_server, page_text, locale):
    lang = "zh-CN" if locale == "zh-CN" else "en"
    texts = page_text[lang]
    with open_page(chromium, lenient_server, locale=locale) as (page, watch):
        page.goto(login_url(lenient_server))
        expect(page.locator("#username")).to_be_focused()
        expect(page.locator(".oops")).to_be_hidden()
        assert page.get_attribute("html", "lang") == lang
        assert visible_strings(page) == {
            "label_username": texts["t_username"],
            "label_password": texts["t_password"],
            "label_remember": texts["t_remember"],
            "submit": texts["t_submit"],
            "toggle": texts["t_theme"],
        }
        assert texts["t_submit"] in page.title()
        submit(page, "alice", "wrong")
        message = page.locator(".oops .bubble").inner_text().strip()
        assert message in {v for k, v in texts.items() if k.startswith("msg_")}
        body = page.locator("body").inner_text()
        if lang == "zh-CN":
            assert re.search(r"[\u4e00-\u9fff]", message)
            english = [v for k, v in page_text["en"].items() if k.startswith("t_") and v in body]
            assert english == []
        # A session that ran out: the same cat, on an ordinary 200 page.
        response = page.goto(login_url(lenient_server) + "?expired=1")
        assert response.status == 200
        expect(page.get_by_role("alert")).to_contain_text(texts["msg_expired"])
        watch.assert_clean()


# -- Accessibility ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_violations(chromium, lenient_server, scheme):
    require_axe()
    found = {}
    for locale in ("en-US", "zh-CN"):
        # bypass_csp only so that axe itself can be injected; the page is unchanged.
        with open_page(chromium, lenient_server, color_scheme=scheme, locale=locale, bypass_csp=True) as (page, watch):
            page.goto(login_url(lenient_server))
            assert theme(page) == scheme
            found[f"{locale} form"] = run_axe(page)
            submit(page, "alice", "wrong")
            finish_animations(page)
            expect(page.get_by_role("alert")).to_be_visible()
            found[f"{locale} error"] = run_axe(page)
            watch.assert_clean()
    summary = {state: [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in violations]
               for state, violations in found.items()}
    serious = {state: [v for v in found_here if v[1] in ("serious", "critical")]
               for state, found_here in summary.items()}
    nothing = {state: [] for state in found}
    assert serious == nothing, "serious or critical: contrast, labels, landmarks, lang..."
    assert summary == nothing, "minor and moderate findings are not expected either"


# -- Layout, screenshots and weight ---------------------------------------------------


@pytest.mark.parametrize("width,height", [(1280, 800), (375, 740), (320, 568)])
def test_screenshots_and_the_form_fits(chromium, lenient_server, width, height):
    ARTIFACTS.mkdir(exist_ok=True)
    for scheme in ("light", "dark"):
        options = {"viewport": {"width": width, "height": height}, "color_scheme": scheme,
                   "reduced_motion": "reduce"}  # the final state at once
        with open_page(chromium, lenient_server, **options) as (page, watch):
            page.goto(login_url(lenient_server))
            page.screenshot(path=str(ARTIFACTS / f"login-{scheme}-{width}x{height}.png"))
            submit(page, "alice", "wrong")
            page.screenshot(path=str(ARTIFACTS / f"login-{scheme}-error-{width}x{height}.png"))
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"horizontal scrolling at {width}px"
            if height >= 700:
                for selector in ("form", ".oops"):
                    box = page.locator(selector).bounding_box()
                    assert box is not None
                    assert box["x"] >= 0 and box["y"] >= 0, selector
                    assert box["x"] + box["width"] <= width, selector
                    assert box["y"] + box["height"] <= height, f"{selector} below the fold"
            watch.assert_clean()


def test_page_and_assets_weigh_under_50_kb(chromium, lenient_server):
    with open_page(chromium, lenient_server) as (page, watch):
        sizes: dict[str, int] = {}

        def measure() -> None:
            """Read bodies now: Chromium forgets them once the page navigates away."""
            page.wait_for_load_state("networkidle")
            for response in watch.responses:
                key = f"{response.request.method} {urlsplit(response.url).path}"
                sizes[key] = max(sizes.get(key, 0), len(response.body()))
            watch.responses.clear()

        page.goto(login_url(lenient_server))
        measure()
        submit(page, "alice", "wrong")  # the error page, with the cat
        measure()
        for name in ("login.css", "theme.js", "login.js", "cat.svg", "favicon.svg"):
            assert f"GET /ezauth/static/{name}" in sizes, name
        page_size = max(sizes.pop(f"GET {LOGIN}"), sizes.pop(f"POST {LOGIN}"))
        total = page_size + sum(sizes.values())
        assert total < WEIGHT_LIMIT, (total, sizes)
        favicon = page.request.get(lenient_server.url + "/ezauth/static/favicon.svg")
        assert favicon.ok and favicon.headers["content-type"].startswith("image/svg+xml")
        watch.assert_clean()


# -- The code step of two-factor login --------------------------------------------------------------


def enroll_alice(server: Server) -> bytes:
    """Turn on two-factor for alice with the real `totp` command (confirmed with a code, as a script
    does it); her secret, once the server has reread its files (at most once a second): the
    password alone then gets the code page (200), no longer a session (303)."""
    secret, _ = cli_totp(server.data_dir)
    assert wait_until(lambda: real_login(server.port, csrf=CSRF, status="*").status == 200)
    return secret


def enter_a_wrong_code(page: Page, server: Server) -> None:
    """The password, then the code step (focused, the password hidden), then a wrong code."""
    page.goto(login_url(server, "/ezauth/healthz"))
    assert submit(page, "alice", PASSWORD).status == 200
    expect(page.locator("#code")).to_be_focused()
    expect(page.locator("#password")).to_be_hidden()
    page.fill("#code", "000000")
    with page.expect_navigation() as nav:
        page.press("#code", "Enter")
    assert nav.value.status == 401
    expect(page.get_by_role("alert")).to_contain_text(TEXT["msg_wrong_code"])


def test_code_step_in_a_real_browser_is_focused_and_logs_in(chromium, lenient_server):
    secret = enroll_alice(lenient_server)
    with open_page(chromium, lenient_server) as (page, watch):
        enter_a_wrong_code(page, lenient_server)
        page.fill("#code", ezauth.totp(secret, time.time() + 30))  # the step that turned it on is spent
        with page.expect_navigation():
            page.press("#code", "Enter")
        assert urlsplit(page.url).path == "/ezauth/healthz"
        watch.assert_clean()


def test_code_step_has_no_axe_violations(chromium, lenient_server):
    require_axe()
    enroll_alice(lenient_server)
    # bypass_csp only so that axe itself can be injected; the page is unchanged.
    with open_page(chromium, lenient_server, bypass_csp=True) as (page, watch):
        enter_a_wrong_code(page, lenient_server)
        assert [(v["id"], v["impact"]) for v in run_axe(page)] == []
        watch.assert_clean()
