"""The account page in Chromium against the real server: ending another device's session, changing
the password, turning on two-factor, making and revoking a token, axe-core in every state, on a
390-px phone, and times in the browser's own zone."""

from __future__ import annotations

import base64
import re
import time
from datetime import datetime
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest

import ezauth
from tests.support.basics import ACCOUNT, IPHONE, LOGIN, NEW_PASSWORD, PASSWORD, TEXT, VERIFY, bearer, shown_time
from tests.support.browser import expect, login_url, open_page, require_axe, run_axe, submit
from tests.support.process import TOKEN_RE, http_call, real_login, run_cli

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3,
         "user_agent": IPHONE}
ZONE = "Asia/Kolkata"  # UTC+5:30: a zone that moves the minutes too, not just the hours
LONG_IP = "2001:db8:1234:5678:9abc:def0:1234:5678"  # as wide as an address gets in the sessions table

# Everything that would make the page wider than the phone, or hide a button behind a scroll: the
# document's own scroll, and every scrolling box (the tables' wrappers) whose content is wider than it.
# A text field scrolling its own text (the new token, longer than the phone is wide) hides no button.
OVERFLOW = """() => [document.documentElement, ...document.querySelectorAll(':not(input)')]
    .filter((el) => el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'hidden'
                    && (el === document.documentElement || getComputedStyle(el).overflowX !== 'visible'))
    .map((el) => `${el.tagName}#${el.id}.${el.className}: ${el.scrollWidth} > ${el.clientWidth}`)"""


def account_url(server) -> str:
    return server.url + ACCOUNT


def log_in(page, server, password: str = PASSWORD) -> None:
    """The login page opened straight lands on the account page."""
    page.goto(login_url(server))
    submit(page, "alice", password)
    assert urlsplit(page.url).path == ACCOUNT, page.url


def click_and_wait(page, selector_or_locator) -> None:
    with page.expect_navigation():
        (page.locator(selector_or_locator) if isinstance(selector_or_locator, str) else selector_or_locator).click()


def test_chromium_ends_another_device_whose_next_request_goes_to_the_login(chromium, live_server):
    with open_page(chromium, live_server) as (laptop, laptop_watch), \
            open_page(chromium, live_server, user_agent=IPHONE) as (phone, phone_watch):
        log_in(laptop, live_server)
        log_in(phone, live_server)
        laptop.goto(account_url(live_server))
        listed = laptop.locator("#sessions tbody tr")
        expect(listed).to_have_count(2)
        expect(laptop.locator("#sessions tbody tr.current")).to_contain_text(TEXT["t_this_device"])
        other = laptop.locator("#sessions tbody tr:not(.current)")
        expect(other).to_contain_text("Safari on iOS")
        click_and_wait(laptop, other.get_by_role("button", name=TEXT["t_end"]))
        expect(laptop.locator("#account-notice")).to_have_text(TEXT["msg_session_ended"])
        expect(listed).to_have_count(1)

        phone.reload()  # the phone's next request
        parts = urlsplit(phone.url)
        assert parts.path == LOGIN and parse_qs(parts.query)["rd"] == [ACCOUNT]
        expect(phone.locator("#username")).to_be_visible()
        laptop_watch.assert_clean()
        phone_watch.assert_clean()


def test_chromium_changes_the_password_and_turns_on_two_factor(chromium, live_server):
    with open_page(chromium, live_server) as (page, watch):
        log_in(page, live_server)
        page.fill("#current-password", PASSWORD)
        page.fill("#new-password", NEW_PASSWORD)
        page.fill("#new-password-again", NEW_PASSWORD)
        click_and_wait(page, "#password-form button[type=submit]")
        expect(page.locator("#account-notice")).to_have_text(TEXT["msg_password_changed"].format(count=0))
        real_login(live_server.port, "alice", NEW_PASSWORD)

        click_and_wait(page, "#totp-form button[type=submit]")  # showing a secret needs no password
        text = page.inner_text("#totp-secret").strip()
        secret = base64.b32decode(text + "=" * (-len(text) % 8))
        assert page.inner_text("#totp-uri").startswith("otpauth://totp/")
        page.fill("#totp-code", ezauth.totp(secret, time.time()))
        page.fill("#totp-password", NEW_PASSWORD)  # turning it on does, beside the code
        click_and_wait(page, "#totp-form button[type=submit]")
        expect(page.locator("#account-notice")).to_have_text(TEXT["msg_totp_on"])
        expect(page.locator("#totp-form")).to_contain_text(TEXT["t_totp_turn_off"])
        watch.assert_clean()

    with open_page(chromium, live_server) as (page, watch):
        page.goto(login_url(live_server))
        submit(page, "alice", NEW_PASSWORD)
        expect(page.locator("#code")).to_be_visible()
        page.fill("#code", ezauth.totp(secret, time.time() + 30))  # the step that turned it on is spent
        with page.expect_navigation():
            page.press("#code", "Enter")
        assert urlsplit(page.url).path == ACCOUNT
        watch.assert_clean()


def test_chromium_makes_a_token_on_the_page_that_works_until_revoked(chromium, live_server):
    with open_page(chromium, live_server, permissions=["clipboard-read", "clipboard-write"]) as (page, watch):
        log_in(page, live_server)
        page.fill("#token-label", "sd script")
        page.fill("#token-paths", "/sdapi/")
        page.fill("#token-password", PASSWORD)  # a token outlives the session: it takes the password
        click_and_wait(page, "#token-form button[type=submit]")
        secret = page.input_value("#new-token")
        assert TOKEN_RE.fullmatch(secret)
        copy = page.locator("button[data-copy]")
        expect(copy).to_be_visible()
        copy.click()
        assert page.evaluate("navigator.clipboard.readText()") == secret

        def ask(uri: str) -> int:
            return http_call(live_server.port, "GET", VERIFY,
                             headers={"Authorization": bearer(secret), "X-Original-URI": uri}).status

        assert ask("/sdapi/v1/sd-models") == 200
        assert ask("/admin") == 403

        page.goto(account_url(live_server))  # shown once
        expect(page.locator("#new-token")).to_have_count(0)
        assert secret not in page.content()
        row = page.locator("#tokens tbody tr", has_text="sd script")
        expect(row).to_contain_text("/sdapi/")
        click_and_wait(page, row.get_by_role("button", name=TEXT["t_revoke"]))
        expect(page.locator("#account-notice")).to_have_text(TEXT["msg_token_revoked"])
        assert ask("/sdapi/v1/sd-models") == 401
        watch.assert_clean()


@pytest.mark.parametrize("screen", ["desktop", "phone"])
@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_chromium_account_page_has_no_axe_violations_in_any_state(chromium, live_server, locale, screen):
    require_axe()
    found: dict[str, list] = {}
    # bypass_csp only so that axe itself can be injected; the page is unchanged.
    size = PHONE if screen == "phone" else {}
    with open_page(chromium, live_server, locale=locale, bypass_csp=True, **size) as (page, watch):
        log_in(page, live_server)
        found["sessions"] = run_axe(page)
        click_and_wait(page, "#totp-form button[type=submit]")
        found["two-factor set-up"] = run_axe(page)
        page.goto(account_url(live_server))
        page.fill("#token-label", "axe")
        page.fill("#token-password", PASSWORD)
        click_and_wait(page, "#token-form button[type=submit]")
        found["new token"] = run_axe(page)
        page.goto(account_url(live_server))
        page.fill("#current-password", "not my password")
        page.fill("#new-password", NEW_PASSWORD)
        page.fill("#new-password-again", NEW_PASSWORD)
        click_and_wait(page, "#password-form button[type=submit]")
        expect(page.locator("#account-error")).to_be_visible()
        found["error"] = run_axe(page)
        wrong_password = {f"HTTP 401: POST {account_url(live_server)}",
                          "console error: Failed to load resource: the server responded with a status of 401 "
                          "(Unauthorized)"}
        watch.problems = [p for p in watch.problems if p not in wrong_password]
        watch.assert_clean()
    assert {state: [(v["id"], [n["target"] for n in v["nodes"]]) for v in violations]
            for state, violations in found.items()} == {state: [] for state in found}


# -- On a phone, and in the browser's own time zone -------------------------------------------------

def busy_account(server) -> None:
    """alice with another device's session from a long IPv6 address and a token with a long label
    and paths: the widest rows the page shows."""
    real_login(server.port, ip=LONG_IP)
    made = run_cli("token", "add", "alice", "--label", "the nightly image batch on the other machine",
                   "--path", "/sdapi/v1/txt2img", "--path", "/sdapi/v1/img2img", data_dir=server.data_dir)
    assert made.returncode == 0, made.stderr


def assert_fits_the_phone(page, state: str) -> None:
    """No horizontal scroll anywhere, and every button on the page inside the 390 px and clickable."""
    assert page.evaluate(OVERFLOW) == [], state
    buttons = page.locator("button:visible, a.button:visible")
    assert buttons.count() >= 3, state
    for i in range(buttons.count()):
        button = buttons.nth(i)
        button.click(trial=True, timeout=5_000)  # visible, enabled, not covered: what a tap needs
        box = button.bounding_box()
        name = button.inner_text().strip()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (state, name, box)


def test_account_page_fits_a_390_px_phone_with_every_button_visible_in_every_state(chromium, live_server):
    busy_account(live_server)
    options = {**PHONE, "permissions": ["clipboard-read", "clipboard-write"]}
    with open_page(chromium, live_server, **options) as (page, watch):
        log_in(page, live_server)
        expect(page.locator("#sessions tbody tr")).to_have_count(2)
        expect(page.locator("#sessions")).to_contain_text(LONG_IP)
        end = page.locator("#sessions tbody tr:not(.current)").get_by_role("button", name=TEXT["t_end"])
        expect(end).to_be_visible()
        assert_fits_the_phone(page, "sessions and tokens")

        page.fill("#token-label", "phone")
        page.fill("#token-password", PASSWORD)
        click_and_wait(page, "#token-form button[type=submit]")
        expect(page.locator("button[data-copy]")).to_be_visible()
        assert_fits_the_phone(page, "a new token with its copy button")

        page.goto(account_url(live_server))
        click_and_wait(page, "#totp-form button[type=submit]")
        expect(page.locator("#totp-uri")).to_be_visible()
        assert_fits_the_phone(page, "two-factor set-up")

        click_and_wait(page, end)  # the button that used to be cut off works
        expect(page.locator("#account-notice")).to_have_text(TEXT["msg_session_ended"])
        assert_fits_the_phone(page, "after ending the other session")
        watch.assert_clean()


def test_account_page_times_are_in_the_browsers_zone_and_stay_utc_without_javascript(chromium, live_server):
    """The server cannot know the visitor's zone: its HTML says UTC in every <time>, and login.js
    shows each in the zone the browser runs in (Playwright's timezone_id), keeping the UTC as the
    tooltip. Without JavaScript the page shows the server's UTC."""
    busy_account(live_server)
    cookie = real_login(live_server.port).cookie()
    served = http_call(live_server.port, "GET", ACCOUNT, headers={"Cookie": f"ezauth={cookie}"}).text
    stamps = re.findall(r'<time datetime="([0-9T:-]+Z)">([^<]+)</time>', served)
    assert len(stamps) == 5, served  # last seen and created of both sessions, created of the token
    assert all(shown == utc_text(iso) for iso, shown in stamps), stamps

    with open_page(chromium, live_server, timezone_id=ZONE) as (page, watch):
        log_in(page, live_server)
        times = page.locator("time[datetime]")
        expect(times.first).not_to_contain_text("UTC")  # login.js has run
        seen = [(t.get_attribute("datetime"), t.inner_text(), t.get_attribute("title")) for t in times.all()]
        assert len(seen) >= 5, seen
        for iso, text, title in seen:
            local = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(ZoneInfo(ZONE))
            assert text == local.strftime("%Y-%m-%d %H:%M GMT+5:30") and title == utc_text(iso), (iso, text, title)
        watch.assert_clean()

    with open_page(chromium, live_server, timezone_id=ZONE, java_script_enabled=False) as (page, watch):
        log_in(page, live_server)
        seen = [(t.get_attribute("datetime"), t.inner_text()) for t in page.locator("time[datetime]").all()]
        assert len(seen) >= 5 and all(text == utc_text(iso) for iso, text in seen), seen
        watch.assert_clean()


def utc_text(iso: str) -> str:
    """A <time>'s datetime as the server writes it for people: "2026-12-01 09:30 UTC"."""
    return shown_time(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
