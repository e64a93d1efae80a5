"""A script the app serves (a JupyterLab notebook's output, an extension, an XSS in the app) tries
to become the user, in real Chromium through the shipped nginx config: fetch, XMLHttpRequest, an
iframe and window.open on the account page hand it no CSRF token, and even with one (a script that
got it some other way) it cannot create a token, change the password or touch two-factor login
without the password."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import ezauth
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
        assert notebook.evaluate(POST_CHANGE, ["x" * 43, fields])["status"] == 403
    nothing_changed(stack)


def test_even_with_a_csrf_token_no_lasting_change_without_the_password(notebook, stack):
    """The limit the README admits: a script might still obtain the token (say it draws a look-alike
    and the user types into the real page). Without the password it still changes nothing lasting."""
    account = notebook.context.new_page()
    account.goto(f"http://127.0.0.1:{stack.nginx.port}{ACCOUNT}")
    token = account.input_value("input[name=csrf] >> nth=0")
    account.close()
    refused = notebook.evaluate(POST_CHANGE, [token, {"action": "token_create", "label": "stolen"}])
    assert refused["status"] == 403 and "Enter your current password" in refused["text"]
    changed = notebook.evaluate(POST_CHANGE, [token, {"action": "password", "new": NEW_PASSWORD,
                                                      "again": NEW_PASSWORD}])
    assert changed["status"] == 403
    # Two-factor with the attacker's secret: the set-up shows a secret, confirming it needs the password.
    begun = notebook.evaluate(POST_CHANGE, [token, {"action": "totp_begin"}])
    assert begun["status"] == 200
    secret = re.search(r'<code id="totp-secret">([A-Z2-7]+)</code>', begun["text"])[1]
    enrollment = re.search(r'name="enrollment" value="([^"]+)"', begun["text"])[1]
    code = ezauth.totp(base64.b32decode(secret + "=" * (-len(secret) % 8)), time.time())
    confirmed = notebook.evaluate(POST_CHANGE, [token, {"action": "totp_confirm", "enrollment": enrollment,
                                                        "code": code}])
    assert confirmed["status"] == 403 and "Enter your current password" in confirmed["text"]
    wrong = notebook.evaluate(POST_CHANGE, [token, {"action": "totp_confirm", "enrollment": enrollment,
                                                    "code": code, "current": "a guess"}])
    assert wrong["status"] == 401
    nothing_changed(stack)
