"""Real apps behind the shipped nginx config: Gradio (in Chromium and through gradio_client) and
JupyterLab, with nginx on a free loopback port other than 80.

A non-default port is what breaks apps when nginx forwards `Host: $host` (the port dropped): Gradio
builds the URLs of its output files from the Host header, and Jupyter checks the browser's Origin
against it. Every app runs as a subprocess on loopback with no way to the internet; the pinned
versions are in requirements-e2e.txt. Without them these tests skip, unless
EZAUTH_REQUIRE_REALAPPS=1 (CI) says they must run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.basics import LOGIN, PASSWORD, basic, wait_until
from tests.support.browser import expect, launch_chromium, open_page, submit
from tests.support.process import http_call
from tests.support.realapps import (
    REQUIRE,
    AppProcess,
    AppStack,
    build_app_stack,
    offline_env,
    readme_gradio_paths,
    readme_jupyter_flags,
    require_modules,
    start_app,
    token_for,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser as Chromium
    from playwright.sync_api import BrowserContext, Locator, Page

pytestmark = pytest.mark.slow

USER = "alice"
UPLOAD_SIZE = 20 * 1024 * 1024
JOB_SECONDS = 10
WORDS = "alpha beta gamma delta epsilon zeta"
# Gradio's own bundle warns this when a stream starts, with or without nginx in front.
GRADIO_NOISE = {"console warning: Method not implemented."}
# JupyterLab now and then starts a new notebook's session twice (POST /api/sessions twice, DELETE
# of the first, every answer 2xx) and closes the first kernel socket while it is still connecting.
JUPYTER_NOISE = re.compile(r"console warning: WebSocket connection to 'ws://127\.0\.0\.1:\d+/jupyter/api/kernels/"
                           r"[-0-9a-f]+/channels\?session_id=[-0-9a-f]+' failed: "
                           r"WebSocket is closed before the connection is established\.")

# The Gradio app under test: a streaming generator, an image in and out, a file upload and a slow
# job with progress. System fonts only (the default theme loads Google Fonts).
GRADIO_APP = '''
import hashlib
import sys
import time
from pathlib import Path

import gradio as gr
from PIL import ImageOps


def stream_words(text):
    shown = []
    for word in text.split():
        shown.append(word)
        time.sleep(0.4)
        yield " ".join(shown)


def mirror(image):
    return ImageOps.mirror(ImageOps.invert(image.convert("RGB")))


def describe(path):
    data = Path(path).read_bytes()
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}"


def long_job(seconds, progress=gr.Progress()):
    steps = int(seconds)
    for step in range(steps):
        progress(step / steps, desc=f"step {step + 1} of {steps}")
        time.sleep(1)
    return f"finished {steps} steps"


with gr.Blocks(title="ezauth real app") as demo:
    words = gr.Textbox(label="Words", elem_id="words")
    streamed = gr.Textbox(label="Streamed", elem_id="streamed")
    gr.Button("Stream", elem_id="stream").click(stream_words, words, streamed, api_name="stream")
    image_in = gr.Image(type="pil", label="Image in", elem_id="image-in", sources=["upload"])
    image_out = gr.Image(type="pil", label="Image out", elem_id="image-out")
    gr.Button("Mirror", elem_id="mirror").click(mirror, image_in, image_out, api_name="mirror")
    upload = gr.File(label="Upload", elem_id="upload", type="filepath")
    described = gr.Textbox(label="Described", elem_id="described")
    gr.Button("Describe", elem_id="describe").click(describe, upload, described, api_name="describe")
    seconds = gr.Number(value=10, label="Seconds", elem_id="seconds")
    job = gr.Textbox(label="Job", elem_id="job")
    gr.Button("Run job", elem_id="run-job").click(long_job, seconds, job, api_name="long_job")

theme = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), theme=theme,
                    ssr_mode=False, quiet=True, show_error=True)
'''

# What the test needs beyond the README's `jupyter lab` flags (which turn Jupyter's own token off:
# ezauth is the gate): a base URL, a folder of its own, no news or update checks. allow_origin is
# left at its default, so every REST call and websocket goes through Jupyter's Origin-against-Host check.
JUPYTER_CONFIG = '''
c.ServerApp.base_url = "/jupyter/"
c.ServerApp.allow_root = True
c.ServerApp.root_dir = {root!r}
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"
'''


# -- Helpers for the pages of the apps ---------------------------------------------------------------


def login_in_chromium(page: Page, stack: AppStack, target: str) -> None:
    """Open TARGET through nginx, land on ezauth's login page, log in, land on TARGET."""
    page.goto(stack.url + target)
    landed = urlsplit(page.url)
    assert (landed.path, parse_qs(landed.query).get("rd")) == (LOGIN, [target]), page.url
    response = submit(page, USER, PASSWORD)
    assert page.url == stack.url + target, (page.url, response.status if response else None)


def logout_in_other_tab(context: BrowserContext, stack: AppStack) -> None:
    """Log out in a second tab, so the app's own tab stays open with its scripts running."""
    other = context.new_page()
    other.goto(stack.url + "/ezauth/logout")
    with other.expect_navigation():
        other.click("#logout")  # logging out is the page's button: a POST with its CSRF token
    assert urlsplit(other.url).path == LOGIN, other.url
    assert not [c for c in context.cookies(stack.url) if c["name"] == "ezauth"]
    other.close()


def login_in_other_tab(context: BrowserContext, stack: AppStack, target: str) -> None:
    """Log in again in a second tab, as the README says to when an app's page has lost its session."""
    other = context.new_page()
    login_in_chromium(other, stack, target)
    other.close()


FETCH = """async (url) => {
    const r = await fetch(url, {headers: {Accept: "application/json"}});
    return {status: r.status, type: r.headers.get("content-type") || "", body: await r.text()};
}"""


def assert_json_401(answer: dict, what: str) -> None:
    """An in-page request after logout: 401 with a JSON body naming the login page, not HTML."""
    assert answer["status"] == 401, (what, answer)
    assert answer["type"].startswith("application/json"), (what, answer)
    body = json.loads(answer["body"])
    assert body["error"] == "login_required", (what, body)
    assert body["login"].startswith(LOGIN), (what, body)


def assert_lands_on_login(page: Page, stack: AppStack, target: str) -> None:
    page.goto(stack.url + target)
    landed = urlsplit(page.url)
    assert (landed.path, parse_qs(landed.query).get("rd")) == (LOGIN, [target]), page.url
    assert page.locator("#password").count() == 1


# Records every distinct value a field shows, every 20 ms, so a test can tell streamed output from
# output that arrived in one piece (nginx buffering the event stream).
RECORD = """([name, selector, pattern]) => {
    const seen = [];
    (window.ezauthSeen ||= {})[name] = seen;
    setInterval(() => {
        const node = document.querySelector(selector);
        let value = node ? (node.value ?? node.innerText) : "";
        if (pattern) value = (value.match(new RegExp(pattern)) || [""])[0];
        if (value && seen[seen.length - 1] !== value) seen.push(value);
    }, 20);
}"""


def loaded_size(page: Page, image: Locator, timeout: float = 15_000) -> list[int] | None:
    """[naturalWidth, naturalHeight] once the <img> has loaded, or None if it never does."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        done = page.wait_for_function(
            "(img) => img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : false",
            arg=image.element_handle(), timeout=timeout, polling=50)
    except PlaywrightTimeout:
        return None
    return done.json_value()


def recorded(page: Page, name: str) -> list[str]:
    return page.evaluate("(name) => window.ezauthSeen[name]", name)


# -- Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_realapps() -> Iterator[Chromium]:
    """Chromium, checked for under this suite's own CI flag."""
    with launch_chromium(REQUIRE) as launched:
        yield launched


@pytest.fixture(scope="module")
def gradio_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppStack]:
    """The Gradio app behind nginx; ezauth with HTTP Basic on (for gradio_client)."""
    require_modules("gradio", "gradio_client", "PIL")
    root = tmp_path_factory.mktemp("gradio")
    (root / "gradio_app.py").write_text(GRADIO_APP)
    env = offline_env(root, GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(root / "gradio-tmp"),
                      GRADIO_SSR_MODE="False")

    def launch(port: int) -> AppProcess:
        return start_app([sys.executable, str(root / "gradio_app.py"), str(port)], port, "/config",
                         root / "gradio.log", env, root)

    with contextlib.ExitStack() as cleanup:
        yield build_app_stack(root, cleanup, launch, EZAUTH_BASIC_AUTH="1")


@pytest.fixture(scope="module")
def jupyter_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppStack]:
    """JupyterLab under /jupyter/ as the app behind `location /`."""
    require_modules("jupyterlab", "jupyter_server", "ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    dirs = {name: root / name for name in ("config", "data", "runtime", "ipython", "settings", "workspaces", "notes")}
    for path in dirs.values():
        path.mkdir()
    env = offline_env(root, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
                      JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), IPYTHONDIR=str(dirs["ipython"]),
                      JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
                      JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), JUPYTER_PLATFORM_DIRS="1")

    def launch(port: int) -> AppProcess:
        config = dirs["config"] / "jupyter_server_config.py"
        config.write_text(JUPYTER_CONFIG.format(root=str(dirs["notes"])))
        return start_app([sys.executable, "-m", "jupyterlab", *readme_jupyter_flags(port)], port,
                         "/jupyter/api/status", root / "jupyter.log", env, root)

    with contextlib.ExitStack() as cleanup:
        yield build_app_stack(root, cleanup, launch)


@pytest.fixture(scope="module")
def api_token(gradio_stack: AppStack) -> str:
    """An API token for alice, made with the real CLI while the server runs."""
    return token_for(gradio_stack, USER)


# -- Gradio in Chromium -------------------------------------------------------------------------------


def test_gradio_in_chromium_every_component_then_logout(chromium_realapps: Chromium, gradio_stack: AppStack,
                                                         tmp_path: Path) -> None:
    from PIL import Image

    stack = gradio_stack
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(picture)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(UPLOAD_SIZE))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()

    with open_page(chromium_realapps, stack, viewport={"width": 1280, "height": 1600}) as (page, watch):
        login_in_chromium(page, stack, "/?from=realapps")
        page.wait_for_selector("#run-job")

        # The 10 s job runs (on its own queue) while the other components are used.
        page.evaluate(RECORD, ["job", "#job", r"step \d+ of \d+"])
        page.fill("#seconds input", str(JOB_SECONDS))
        page.click("#run-job")

        page.evaluate(RECORD, ["stream", "#streamed textarea", ""])
        page.fill("#words textarea", WORDS)
        page.click("#stream")
        expect(page.locator("#streamed textarea")).to_have_value(WORDS, timeout=20_000)
        streamed = recorded(page, "stream")
        assert len(streamed) >= 3 and all(WORDS.startswith(v) for v in streamed), streamed

        page.set_input_files("#image-in input[type=file]", str(picture))
        page.click("#mirror")
        output = page.locator("#image-out img")
        expect(output).to_have_count(1, timeout=20_000)
        src = output.get_attribute("src") or ""
        output.scroll_into_view_if_needed()  # the <img> is loading="lazy"
        assert urlsplit(src).netloc == urlsplit(stack.url).netloc, f"output image URL lost the port: {src}"
        assert loaded_size(page, output) == [64, 48], f"output image did not load: {src}"

        page.set_input_files("#upload input[type=file]", str(big))
        expect(page.locator("#upload")).to_contain_text("big.bin", timeout=60_000)
        page.click("#describe")
        expect(page.locator("#described textarea")).to_have_value(
            f"{UPLOAD_SIZE} bytes, sha256 {digest}", timeout=60_000)

        expect(page.locator("#job textarea")).to_have_value(f"finished {JOB_SECONDS} steps", timeout=30_000)
        steps = recorded(page, "job")
        assert len(steps) >= 3 and steps[-1] != steps[0], steps
        assert [p for p in watch.problems if p not in GRADIO_NOISE] == []

        logout_in_other_tab(page.context, stack)
        # The app's page is still open; its in-page requests now get a JSON 401, not a login page.
        with page.expect_response(lambda r: "/gradio_api/" in r.url and r.request.method == "POST") as refused:
            page.click("#stream")
        reply = refused.value
        assert_json_401({"status": reply.status, "type": reply.headers.get("content-type", ""),
                         "body": reply.text()}, reply.url)
        for url in ("/gradio_api/info", "/config", src):
            assert_json_401(page.evaluate(FETCH, url), url)
        # What the README says the page shows, and that logging in in another tab brings it back.
        expect(page.locator("#streamed")).to_contain_text("Error")
        expect(page.get_by_text("login_required").first).to_be_visible()
        login_in_other_tab(page.context, stack, "/?from=realapps")
        page.fill("#words textarea", "back again")
        page.click("#stream")
        expect(page.locator("#streamed textarea")).to_have_value("back again", timeout=20_000)
        logout_in_other_tab(page.context, stack)
        assert_lands_on_login(page, stack, "/?from=realapps")


# -- gradio_client with HTTP Basic and API tokens ----------------------------------------------------


def gradio_client(stack: AppStack, tmp_path: Path, headers: dict | None = None, auth: tuple | None = None):
    """gradio_client's Client as the README writes it: credentials in HEADERS, or as HTTP Basic
    through httpx (AUTH)."""
    from gradio_client import Client

    return Client(stack.url, headers=headers, verbose=False, download_files=str(tmp_path / "downloads"),
                  analytics_enabled=False, httpx_kwargs={"timeout": 60, **({"auth": auth} if auth else {})})


def predict_both(client, tmp_path: Path) -> None:
    """A streamed call, and an image up through /gradio_api/upload and down from the file URL Gradio
    built from the Host header."""
    from gradio_client import handle_file
    from PIL import Image

    try:
        assert client.predict("one two three", api_name="/stream") == "one two three"
        picture = tmp_path / "in.png"
        Image.new("RGB", (40, 30), (10, 20, 30)).save(picture)
        result = client.predict(handle_file(str(picture)), api_name="/mirror")
        with Image.open(result) as image:
            assert image.size == (40, 30)
            pixel = image.convert("RGB").getpixel((20, 15))
        # Inverted; Gradio sends WebP, so allow its rounding.
        assert all(abs(got - want) <= 4 for got, want in zip(pixel, (245, 235, 225), strict=True)), pixel
    finally:
        client.close()


@pytest.mark.parametrize("how", ["password", "bearer_token", "token_as_basic_password", "token_as_httpx_auth"])
def test_gradio_client_predicts_through_nginx(gradio_stack: AppStack, request: pytest.FixtureRequest,
                                              tmp_path: Path, how: str) -> None:
    if how == "password":
        client = gradio_client(gradio_stack, tmp_path, headers={"Authorization": basic(USER, PASSWORD)})
    else:
        token = request.getfixturevalue("api_token")
        client = gradio_client(gradio_stack, tmp_path, **{
            "bearer_token": {"headers": {"Authorization": f"Bearer {token}"}},
            "token_as_basic_password": {"headers": {"Authorization": basic(USER, token)}},
            "token_as_httpx_auth": {"auth": (USER, token)}}[how])
    predict_both(client, tmp_path)


def test_a_token_kept_to_the_readmes_gradio_paths_works_and_one_narrower_does_not(gradio_stack: AppStack,
                                                                                  tmp_path: Path) -> None:
    """The README's `token add ... --path /config --path /gradio_api/`: gradio_client needs both."""
    paths = readme_gradio_paths()
    assert paths == ["/config", "/gradio_api/"]
    token = token_for(gradio_stack, USER, *paths)
    predict_both(gradio_client(gradio_stack, tmp_path, headers={"Authorization": f"Bearer {token}"}), tmp_path)
    assert http_call(gradio_stack.nginx.port, "GET", "/", headers={"Authorization": f"Bearer {token}"}).status == 403
    for left_out, fails_at in (("/config", "config"), ("/gradio_api/", "api info")):
        narrower = token_for(gradio_stack, USER, *(path for path in paths if path != left_out))
        with pytest.raises(ValueError, match=f"Could not fetch {fails_at}"):
            gradio_client(gradio_stack, tmp_path, headers={"Authorization": f"Bearer {narrower}"})


def test_gradio_api_without_credentials_is_a_json_401(gradio_stack: AppStack) -> None:
    """What gradio_client (httpx, no Sec-Fetch-Mode) gets without or with wrong credentials: the
    error verify names (in the JSON body nginx writes) and its challenge, which reaches the client
    through auth_request. This stack has EZAUTH_BASIC_AUTH=1, so a wrong Basic password is checked."""
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    unknown_token = "ezt_" + "A" * 43  # well-formed, never issued
    cases = [
        ({}, "login_required", 'Bearer realm="ezauth"'),
        ({"Authorization": basic(USER, "wrong password")}, "wrong_credentials", 'Basic realm="ezauth"'),
        ({"Authorization": f"Bearer {unknown_token}"}, "wrong_credentials", 'Bearer realm="ezauth"'),
        ({"Authorization": basic(USER, unknown_token)}, "wrong_credentials", 'Basic realm="ezauth"'),
    ]
    for headers, error, challenge in cases:
        reply = http_call(gradio_stack.nginx.port, "GET", "/config", headers={"Accept": "*/*", **headers})
        seen = (headers, reply.status, dict(reply.headers), reply.text[:300])
        assert reply.status == 401, seen
        assert reply.headers.get("Content-Type", "").startswith("application/json"), seen
        assert json.loads(reply.body) == {"error": error, "login": f"{LOGIN}?rd=%2Fconfig"}, seen
        assert reply.headers.get_all("WWW-Authenticate") == [challenge], seen
    with pytest.raises(AuthenticationError):
        Client(gradio_stack.url, verbose=False, analytics_enabled=False)


# -- JupyterLab in Chromium ----------------------------------------------------------------------------


def test_jupyterlab_in_chromium_runs_a_cell_then_logout(chromium_realapps: Chromium, jupyter_stack: AppStack) -> None:
    stack = jupyter_stack
    # The README's flags: Jupyter answers the host name nginx passes on, not only localhost.
    named = http_call(stack.app.port, "GET", "/jupyter/api/status", headers={"Host": "notebook.example.test"})
    assert named.status == 200, (named.status, named.text[:300])
    with open_page(chromium_realapps, stack) as (page, watch):
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        login_in_chromium(page, stack, "/jupyter/lab")

        # A new notebook: REST calls (POST, so Jupyter checks Origin against Host), then a kernel.
        launcher = page.locator(".jp-LauncherCard[data-category='Notebook']").first
        expect(launcher).to_be_visible(timeout=60_000)
        with page.expect_response(lambda r: r.request.method == "POST" and "/jupyter/api/contents" in r.url) as made:
            launcher.click()
        assert made.value.status == 201, (made.value.url, made.value.status, made.value.text()[:300])
        notebook = page.locator(".jp-NotebookPanel")
        # What a person waits for: the status bar naming the kernel as idle (the notebook's own
        # indicator says idle while the kernel is still "Initializing", and a cell run then is lost).
        kernel_idle = page.locator(".jp-StatusBar-Widget").get_by_text("Python 3 (ipykernel) | Idle", exact=True)
        expect(kernel_idle).to_be_visible(timeout=60_000)
        notebook.locator(".jp-Cell .cm-content").first.click()
        page.keyboard.type("print('kernel says', 6 * 7)")
        page.keyboard.press("Shift+Enter")
        expect(notebook.locator(".jp-OutputArea-output").first).to_have_text("kernel says 42", timeout=60_000)
        channels = [u for u in sockets if "/jupyter/api/kernels/" in u and "/channels" in u]
        assert channels and all(u.startswith(f"ws://127.0.0.1:{stack.nginx.port}/") for u in channels), sockets
        kernel_socket = channels[-1]
        assert [p for p in watch.problems if not JUPYTER_NOISE.match(p)] == []

        # The Origin check is real: the browser's session and XSRF token, sent again with only the
        # Origin changed, are refused by Jupyter (404, its answer to a cross-origin API call).
        cookies = {c["name"]: c["value"] for c in page.context.cookies(stack.url + "/jupyter/")}
        for origin, status in ((stack.url, 201), ("http://127.0.0.1:1", 404)):
            made_again = http_call(stack.nginx.port, "POST", "/jupyter/api/contents", b'{"type": "file"}', {
                "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()), "X-XSRFToken": cookies["_xsrf"],
                "Origin": origin, "Content-Type": "application/json"})
            assert made_again.status == status, (origin, made_again.status, made_again.text[:300])

        logout_in_other_tab(page.context, stack)
        assert_json_401(page.evaluate(FETCH, "/jupyter/api/contents"), "/jupyter/api/contents")
        opened = page.evaluate("""(url) => new Promise((done) => {
            const ws = new WebSocket(url);
            ws.onopen = () => { ws.close(); done("open"); };
            ws.onerror = () => done("refused");
            setTimeout(() => done("no answer in 10 s"), 10000);
        })""", kernel_socket)
        assert opened == "refused", kernel_socket

        # What the README says the page shows on saving, and that logging in in another tab lets the
        # same page save what it had.
        notebook.locator(".jp-Cell .cm-content").last.click()
        page.keyboard.type("saved_after_a_new_login = True")
        page.keyboard.press("Control+s")
        page.locator(".jp-Dialog").get_by_role("button", name="Rename and Save").click()  # an untitled notebook
        refused = page.locator(".jp-Dialog")
        expect(refused).to_contain_text("File Save Error for Untitled.ipynb")
        expect(refused).to_contain_text("Invalid response: 401 Unauthorized")
        refused.get_by_role("button", name="Close").click()
        login_in_other_tab(page.context, stack, "/jupyter/lab")
        page.keyboard.press("Control+s")

        def saved() -> bool:
            answer = page.evaluate(FETCH, "/jupyter/api/contents/Untitled.ipynb")
            return answer["status"] == 200 and "saved_after_a_new_login" in answer["body"]

        assert wait_until(saved, timeout=15, interval=0.5), "the page did not save after the new login"
        logout_in_other_tab(page.context, stack)
        assert_lands_on_login(page, stack, "/jupyter/lab")
