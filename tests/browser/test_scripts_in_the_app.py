"""A script the app serves (a JupyterLab notebook's output, an extension, an XSS in the app) tries
to become the user, in real Chromium through the shipped nginx config: fetch, XMLHttpRequest, an
iframe and window.open on the account page hand it no CSRF token, and even with one (a script that
got it some other way) it cannot create a token, change the password or touch two-factor login
without the password."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import ezauth
from tests.support.app import enrollment_on
from tests.support.basics import ACCOUNT, NEW_PASSWORD, PASSWORD, require_tool
from tests.support.nginx import Stack, build_stack
from tests.support.process import real_login, run_cli

if TYPE_CHECKING:
    from playwright.sync_api import Browser as Chromium
    from playwright.sync_api import Page

# What a hostile script in the app does with the session it runs in. It reports what it got in
# #out, and keeps whatever CSRF token it could read in window.stolen.
HOSTILE_PAGE = """<!doctype html>
<html><head><title>a notebook</title></head><body>
<button id="go">run the cell</button><pre id="out"></pre>
<script>
const csrfIn = (html) => ((html || "").match(/name="csrf" value="([^"]+)"/) || [])[1] || null;
async function viaFetch() {
  const reply = await fetch("/ezauth/account", {credentials: "include"});
  return {status: reply.status, csrf: csrfIn(await reply.text())};
}
function viaXhr() {
  return new Promise((done) => {
    const xhr = new XMLHttpRequest();
    xhr.open("GET", "/ezauth/account");
    xhr.onload = () => done({status: xhr.status, csrf: csrfIn(xhr.responseText)});
    xhr.onerror = () => done({status: 0, csrf: null});
    xhr.send();
  });
}
function viaIframe() {
  return new Promise((done) => {
    const frame = document.createElement("iframe");
    frame.src = "/ezauth/account";
    frame.onload = () => {
      let csrf = null;
      try { csrf = csrfIn(frame.contentDocument.documentElement.outerHTML); } catch (e) { csrf = null; }
      done({csrf});
    };
    document.body.appendChild(frame);
    setTimeout(() => done({csrf: null, timeout: true}), 8000);
  });
}
function viaWindow() {
  return new Promise((done) => {
    const opened = window.open("/ezauth/account");
    let tries = 0;
    const poll = setInterval(() => {
      let csrf = null;
      try { csrf = csrfIn(opened.document.documentElement.outerHTML); } catch (e) { csrf = null; }
      if (csrf || ++tries > 40) { clearInterval(poll); done({csrf}); }
    }, 100);
  });
}
document.getElementById("go").addEventListener("click", async () => {
  const results = {fetch: await viaFetch(), xhr: await viaXhr(), iframe: await viaIframe(), window: await viaWindow()};
  window.stolen = Object.values(results).map((r) => r.csrf).find((c) => c) || null;
  document.getElementById("out").textContent = JSON.stringify(results);
});
</script></body></html>
"""

# The lasting changes the script tries with a CSRF token, posted as the account page's forms would.
POST_CHANGE = """async ([token, fields]) => {
  const reply = await fetch("/ezauth/account", {method: "POST", credentials: "include",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: new URLSearchParams({csrf: token, ...fields}).toString()});
  return {status: reply.status, text: await reply.text()};
}"""
# The same, as a form the script builds and submits: a top-level navigation, like the user's own.
FORM_CHANGE = """([token, fields]) => {
  const form = document.createElement("form");
  form.method = "post";
  form.action = "/ezauth/account";
  for (const [name, value] of Object.entries({csrf: token, ...fields})) {
    const input = document.createElement("input");
    input.type = "hidden";
    input.name = name;
    input.value = value;
    form.appendChild(input);
  }
  document.body.appendChild(form);
  form.submit();
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    nginx_bin = require_tool("nginx", "EZAUTH_REQUIRE_NGINX", "nginx-light")
    with contextlib.ExitStack() as cleanup:
        built = build_stack(nginx_bin, tmp_path_factory.mktemp("hostile"), cleanup)
        built.app.pages["/notebook"] = HOSTILE_PAGE
        yield built


@pytest.fixture
def notebook(chromium: Chromium, stack: Stack) -> Iterator[Page]:
    """Alice logged in through nginx, on the app's page that holds the hostile script."""
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.goto(f"http://127.0.0.1:{stack.nginx.port}/notebook")
        assert page.url.startswith(f"http://127.0.0.1:{stack.nginx.port}/ezauth/login"), page.url
        page.fill("#username", "alice")
        page.fill("#password", PASSWORD)
        with page.expect_navigation():
            page.press("#password", "Enter")
        assert page.url.endswith("/notebook"), page.url
        yield page
    finally:
        context.close()


def nothing_changed(stack: Stack) -> None:
    """No token for alice, her password the same, no second factor."""
    listed = run_cli("token", "list", "alice", data_dir=stack.ezauth.data_dir)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1:] == [], listed.stdout
    assert "alice:" not in ((stack.ezauth.data_dir / "totp").read_text() if (stack.ezauth.data_dir / "totp").exists()
                            else "")
    assert real_login(stack.ezauth.port).cookie()  # PASSWORD still logs in


def test_fetch_xhr_iframe_and_window_open_hand_the_script_no_csrf_token(notebook, stack):
    notebook.click("#go")
    notebook.wait_for_function("document.getElementById('out').textContent !== ''", timeout=30_000)
    results = json.loads(notebook.text_content("#out"))
    assert results["fetch"] == {"status": 403, "csrf": None}, results
    assert results["xhr"] == {"status": 403, "csrf": None}, results
    assert results["iframe"]["csrf"] is None and results["window"]["csrf"] is None, results
    assert notebook.evaluate("window.stolen") is None
    # With no token the script's changes are refused for that alone.
    for fields in ({"action": "token_create", "label": "stolen"}, {"action": "end_all"}):
        refused = notebook.evaluate(POST_CHANGE, ["x" * 43, fields])
        assert refused["status"] == 403 and "csrf" not in refused["text"], refused  # a bare 403
    nothing_changed(stack)


def submit_as_form(page: Page, token: str, fields: dict[str, str]) -> tuple[int, str]:
    """Status and page of a change the script posts as a form from the app's page, then back there."""
    back = page.url
    with page.expect_navigation() as navigation:
        page.evaluate(FORM_CHANGE, [token, fields])
    answer = navigation.value
    status, text = (answer.status if answer else 0), page.content()
    page.goto(back)
    return status, text


def test_even_with_a_csrf_token_no_lasting_change_without_the_password(notebook, stack):
    """The limit the README admits: a script might still obtain the token (say it draws a look-alike
    and the user types into the real page). Without the password it still changes nothing lasting."""
    account = notebook.context.new_page()
    account.goto(f"http://127.0.0.1:{stack.nginx.port}{ACCOUNT}")
    token = account.input_value("input[name=csrf] >> nth=0")
    account.close()
    # fetch() gets a bare 403 whatever it posts, so it cannot read a refusal's page either.
    fetched = notebook.evaluate(POST_CHANGE, [token, {"action": "token_create", "label": "stolen"}])
    assert fetched["status"] == 403 and "csrf" not in fetched["text"], fetched
    # A form the script submits is a navigation: it reaches the account page, and the password stops it.
    status, text = submit_as_form(notebook, token, {"action": "token_create", "label": "stolen"})
    assert status == 403 and "Enter your current password" in text
    status, _ = submit_as_form(notebook, token, {"action": "password", "new": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert status == 403
    # Two-factor with the attacker's secret: the set-up shows a secret, confirming it needs the password.
    status, text = submit_as_form(notebook, token, {"action": "totp_begin"})
    assert status == 200
    secret, _, enrollment = enrollment_on(text)
    code = ezauth.totp(secret, time.time())
    status, text = submit_as_form(notebook, token, {"action": "totp_confirm", "enrollment": enrollment, "code": code})
    assert status == 403 and "Enter your current password" in text
    status, _ = submit_as_form(notebook, token, {"action": "totp_confirm", "enrollment": enrollment, "code": code,
                                                 "current": "a guess"})
    assert status == 401
    nothing_changed(stack)
