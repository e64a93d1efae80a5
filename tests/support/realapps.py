"""Real apps (Gradio, JupyterLab) as subprocesses behind the shipped nginx config, with ezauth in
front. The apps' packages are optional (requirements-e2e.txt): without them the suite skips, saying
how to install them, or fails under EZAUTH_REQUIRE_REALAPPS=1."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support.basics import clean_env, free_port, missing, readme_section, require_tool, wait_until
from tests.support.nginx import Nginx, render_example, start_nginx
from tests.support.process import Server, add_user, cli_token, http_call, start_server

REQUIRE = "EZAUTH_REQUIRE_REALAPPS"
INSTALL = ".venv/bin/pip install -r requirements-e2e.txt"


def require_modules(*names: str) -> None:
    """Skip (or fail under EZAUTH_REQUIRE_REALAPPS=1) unless every module NAME is importable."""
    absent = [name for name in names if importlib.util.find_spec(name) is None]
    if absent:
        missing(f"{', '.join(absent)} not installed; install it with: {INSTALL}", REQUIRE)


@dataclass
class AppProcess:
    """A real app as a subprocess in its own process group (Jupyter's kernels included)."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_app(command: list[str], port: int, ready_path: str, log_path: Path, env: dict[str, str],
              cwd: Path, timeout: float = 90) -> AppProcess:
    """Start an app and poll it directly (not through nginx) until READY_PATH answers 200."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    app = AppProcess(proc, port, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited with {proc.returncode}:\n{app.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    if not wait_until(ready, timeout=timeout, interval=0.2):
        app.stop()
        raise RuntimeError(f"{command[:3]} did not answer on {port} in {timeout}s:\n{app.log()[-3000:]}")
    return app


def offline_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment for an app that must never reach the internet nor read the caller's state."""
    env = {k: v for k, v in clean_env().items()
           if not k.startswith(("GRADIO_", "JUPYTER", "HF_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HOME=str(root / "home"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1", **extra)
    (root / "home").mkdir(parents=True, exist_ok=True)
    return env


@dataclass
class AppStack:
    """ezauth + a real app + nginx running the shipped example with `location /` at the app."""

    ezauth: Server
    app: AppProcess
    nginx: Nginx

    @property
    def url(self) -> str:
        """nginx's origin; named like Server.url, so open_page (support/browser.py) takes a stack as its server."""
        return f"http://127.0.0.1:{self.nginx.port}"


def build_app_stack(root: Path, cleanup: contextlib.ExitStack, launch: Callable[[int], AppProcess],
                    user: str = "alice", **ezauth_env: str) -> AppStack:
    """Start ezauth (with USER), the app (LAUNCH(port)) and nginx on a free port (ephemeral, so never 80)."""
    nginx_bin = require_tool("nginx", REQUIRE, "nginx-light")
    data_dir = root / "data"
    add_user(data_dir, user)
    server = start_server(data_dir, **ezauth_env)
    cleanup.callback(server.stop)
    app = launch(free_port())
    cleanup.callback(app.stop)
    port = free_port()
    nginx = start_nginx(nginx_bin, root / "nginx", render_example(server.port, app.port, port), port)
    cleanup.callback(nginx.stop)
    return AppStack(server, app, nginx)


# -- What the README tells a person to run ------------------------------------------------------------


def readme_jupyter_flags(port: int) -> list[str]:
    """The flags of the README's `jupyter lab` line as a shell passes them, on PORT instead of 8888."""
    line = re.search(r"^ *\.venv/bin/jupyter lab (.+)$", readme_section("Gradio and JupyterLab"), re.M)
    assert line, "the README lost its jupyter lab line"
    flags = shlex.split(line[1])
    assert "--port=8888" in flags, flags
    return [f"--port={port}" if flag == "--port=8888" else flag for flag in flags]


def readme_gradio_paths() -> list[str]:
    """The --path values of the README's token for a Gradio app."""
    line = re.search(r'^python ezauth\.py token add \w+ --label "gradio script"((?: --path \S+)+)$',
                     readme_section("API tokens (scripts without passwords)"), re.M)
    assert line, "the README lost its token line for Gradio"
    return line[1].split()[1::2]


def token_for(stack: AppStack, user: str, *paths: str) -> str:
    """An API token for USER (limited to PATHS, if any) made with the real CLI while the server runs,
    once ezauth knows it (a running ezauth takes in the CLI's changes within a second): no longer
    401, but 200 where it may go, or 403 where its paths keep it out."""
    token, _ = cli_token(stack.ezauth.data_dir, user, "test", *[flag for path in paths for flag in ("--path", path)])
    bearer = {"Authorization": f"Bearer {token}"}
    assert wait_until(lambda: http_call(stack.nginx.port, "GET", "/config", headers=bearer).status in (200, 403),
                      timeout=3, interval=0.1), "the new token was not known within 3 s"
    return token
