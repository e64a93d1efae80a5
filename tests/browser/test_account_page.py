"""The account page in Chromium against the real server: ending another device's session, changing
the password, turning on two-factor, making and revoking a token, and axe-core in every state."""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlsplit

import pytest

import ezauth
from tests.support.basics import ACCOUNT, IPHONE, LOGIN, NEW_PASSWORD, PASSWORD, TEXT, VERIFY, bearer
from tests.support.browser import expect, login_url, open_page, require_axe, run_axe, submit
from tests.support.process import TOKEN_RE, http_call, real_login


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


@pytest.mark.parametrize("locale", ["en-US", "zh-CN"])
def test_chromium_account_page_has_no_axe_violations_in_any_state(chromium, live_server, locale):
    require_axe()
    found: dict[str, list] = {}
    # bypass_csp only so that axe itself can be injected; the page is unchanged.
    with open_page(chromium, live_server, locale=locale, bypass_csp=True) as (page, watch):
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
