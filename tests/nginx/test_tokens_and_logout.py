"""Logout and API tokens through the shipped nginx config: a replayed cookie after logout, a bearer
token the app never sees, and the app's own Authorization header beside a session."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from tests.support.basics import LAG, LOGIN, basic, bearer, wait_until
from tests.support.nginx import TARGET, Browser, echo_header, login_target, login_through_nginx
from tests.support.process import cli_token, http_call


def test_logout_through_nginx_ends_the_session_for_a_replayed_cookie(stack):
    browser = stack.browser()
    login_through_nginx(browser)
    old = browser.cookie()
    assert browser.get(TARGET).echo()["path"] == TARGET
    out = browser.logout()
    assert (out.status, out.location) == (303, LOGIN)
    assert browser.cookie() is None

    replay = Browser(stack.nginx.port)
    refused = wait_until(lambda: (r := replay.get(TARGET, Cookie=f"ezauth={old}")).status == 302 and r,
                         timeout=LAG, interval=0.05)
    assert refused, "the old cookie still opens the app a second after logout"
    assert login_target(refused.location) == TARGET
    assert parse_qs(urlsplit(refused.location).query)["expired"] == ["1"]
    seen = len(stack.app.seen)
    for _ in range(5):
        assert replay.get(TARGET, Cookie=f"ezauth={old}").status == 302
    assert len(stack.app.seen) == seen


def test_bearer_token_reaches_the_app_which_never_sees_the_authorization_header(stack):
    secret, _ = cli_token(stack.ezauth.data_dir)
    browser = stack.browser()
    reply = wait_until(lambda: (r := browser.get(TARGET, Authorization=bearer(secret))).status == 200 and r,
                       timeout=LAG + 2)
    assert reply, "the new token was not accepted"
    for answer in (reply, browser.get(TARGET, Authorization=basic("alice", secret))):
        echo = answer.echo()
        assert echo["path"] == TARGET
        assert echo_header(echo, "Authorization") == []
        assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
        assert not [value for _, value in echo["headers"] if "ezt_" in value]
    wrong = browser.get(TARGET, Authorization=bearer("ezt_" + "A" * 43))
    assert wrong.status == 401 and b"wrong_credentials" in wrong.body


def test_the_apps_own_bearer_header_reaches_it_beside_a_session(stack):
    browser = stack.browser()
    login_through_nginx(browser)
    echo = browser.get(TARGET, Authorization="Bearer app-token").echo()
    assert echo_header(echo, "Authorization") == ["Bearer app-token"]
    assert echo_header(echo, "X-Auth-Request-User") == ["alice"]
    # The app's own header opens nothing by itself: a script gets 401, a browser the login page.
    seen = len(stack.app.seen)
    script = http_call(stack.nginx.port, "GET", TARGET, headers={"Authorization": "Bearer app-token"})
    assert script.status == 401 and b"login_required" in script.body
    page = stack.browser().get(TARGET, Authorization="Bearer app-token")
    assert page.status == 302 and login_target(page.location) == TARGET
    assert len(stack.app.seen) == seen
