"""The command line as a new user meets it, each command a real subprocess: --help, passwd (on a
terminal and from stdin), users, deluser, rotate, usage errors, bad settings at start-up, and the
first start with and without a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import ezauth
from ezauth import Users
from tests.support.basics import EZAUTH, clean_env, free_port
from tests.support.process import (
    add_user,
    cli_on_a_terminal,
    copy_ezauth,
    real_login,
    real_verify,
    run_cli,
    terminal_output_until,
    wait_healthy,
)

# -- Commands ---------------------------------------------------------------------------------


def test_help_lists_every_setting_with_its_default():
    shown = subprocess.run([sys.executable, str(EZAUTH), "--help"], capture_output=True, text=True, timeout=30,
                           env=clean_env()).stdout
    for item, spec in ezauth.setting_specs():
        default = re.escape(ezauth.shown_default(item, spec))
        assert re.search(rf"^  {ezauth.variable(item)} +{default} ", shown, re.M), item
    serve = subprocess.run([sys.executable, str(EZAUTH), "serve", "--help"], capture_output=True, text=True,
                           timeout=30, env=clean_env()).stdout
    assert all(f"--{item.name.replace('_', '-')}" in serve for item, _ in ezauth.setting_specs())


@pytest.mark.parametrize(("flag", "value", "variable"), [("--session-ttl", "soon", "EZAUTH_SESSION_TTL"),
                                                       ("--cookie-secure", "maybe", "EZAUTH_COOKIE_SECURE"),
                                                       ("--trusted-proxies", "nope", "EZAUTH_TRUSTED_PROXIES")])
def test_a_bad_flag_is_refused_naming_its_setting(tmp_path, flag, value, variable):
    done = run_cli("serve", flag, value, data_dir=tmp_path / "data")
    assert done.returncode == 2 and variable in done.stderr


def test_passwd_reads_one_line_and_the_newline_is_not_the_password(tmp_path):
    data = tmp_path / "data"
    done = run_cli("passwd", "carol", "--password-stdin", data_dir=data, stdin="s3cret pass\nignored\n")
    assert done.returncode == 0, done.stderr
    assert "carol" in done.stdout
    users = Users(data / "users")
    assert users.check("carol", "s3cret pass")
    assert not users.check("carol", "s3cret pass\n")
    again = run_cli("passwd", "carol", "--password-stdin", data_dir=data, stdin="another pass\n")
    assert again.returncode == 0 and "changed" in again.stdout
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


@pytest.mark.parametrize(("second", "code"), [("first pass", 0), ("other pass", 1)])
def test_passwd_prompts_twice_on_a_terminal_and_refuses_a_mismatch(tmp_path, second, code):
    data = tmp_path / "data"
    with cli_on_a_terminal("passwd", "carol", data_dir=data) as (proc, reader):
        terminal_output_until(reader, "New password for carol:")
        os.write(reader, b"first pass\n")
        terminal_output_until(reader, "Again:")
        os.write(reader, f"{second}\n".encode())
        terminal_output_until(reader, "created user carol" if code == 0 else "the two passwords differ")
        assert proc.wait(timeout=30) == code
        assert ("carol" in Users(data / "users").names()) is (code == 0)


def test_passwd_without_a_terminal_says_to_use_password_stdin(tmp_path):
    done = run_cli("passwd", "carol", data_dir=tmp_path / "data", stdin="first pass\nfirst pass\n")
    assert done.returncode == 1 and "--password-stdin" in done.stderr and "Warning" not in done.stderr


@pytest.mark.parametrize(("password", "code"), [("1234567", 1), ("12345678", 0), ("", 1)])
def test_passwd_refuses_passwords_under_8_characters(tmp_path, password, code):
    data = tmp_path / "data"
    done = run_cli("passwd", "carol", "--password-stdin", data_dir=data, stdin=password + "\n")
    assert done.returncode == code, done.stderr
    if code:  # the data dir it would have used, then the one-line reason
        assert done.stderr.splitlines() == [f"ezauth: data dir {data}",
                                            "ezauth: passwords need at least 8 characters; nothing changed"]
        assert "carol" not in Users(data / "users").names()
    else:
        assert Users(data / "users").check("carol", password)


def test_users_deluser_and_rotate(tmp_path):
    data = tmp_path / "data"
    add_user(data, "bob")
    add_user(data, "alice")
    listed = run_cli("users", data_dir=data)
    assert listed.returncode == 0 and listed.stdout.split() == ["alice", "bob"]
    deleted = run_cli("deluser", "bob", data_dir=data)
    assert deleted.returncode == 0, deleted.stderr
    assert run_cli("users", data_dir=data).stdout.split() == ["alice"]
    missing = run_cli("deluser", "bob", data_dir=data)
    assert (missing.returncode, missing.stderr) == (1, f"ezauth: data dir {data}\nezauth: no user 'bob'\n")
    rotated = run_cli("rotate", data_dir=data)
    assert rotated.returncode == 0, rotated.stderr
    rotated = run_cli("rotate", data_dir=data)
    assert len(json.loads((data / "keys.json").read_text())["keys"]) == 3


@pytest.mark.parametrize("args", [("frobnicate",), ("passwd",), ("serve", "--port", "abc"), ("users", "--nope")])
def test_usage_error_exits_2(tmp_path, args):
    done = run_cli(*args, data_dir=tmp_path / "data")
    assert done.returncode == 2
    assert done.stderr.strip()


@pytest.mark.parametrize(("name", "value"), [("EZAUTH_PORT", "abc"), ("EZAUTH_SESSION_TTL", "-5"),
                                             ("EZAUTH_COOKIE_SECURE", "sometimes")])
def test_bad_setting_stops_start_up_with_one_line_naming_it(tmp_path, name, value):
    done = run_cli("serve", data_dir=tmp_path / "data", env=clean_env(**{name: value}), timeout=15)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], done.stderr


def test_bad_setting_in_dotenv_stops_start_up(tmp_path):
    (tmp_path / ".env").write_text("EZAUTH_LOCKOUT_TIME=forever\n")
    done = run_cli("serve", data_dir=tmp_path / "data", cwd=tmp_path, timeout=15)
    assert done.returncode == 2 and "EZAUTH_LOCKOUT_TIME" in done.stderr


def test_broken_template_stops_start_up(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "login.html").write_text("<p>$nosuchfield</p>")
    done = run_cli("serve", "--port", str(free_port()), data_dir=data, timeout=15)
    assert done.returncode != 0
    assert "nosuchfield" in done.stderr


# -- The first start ----------------------------------------------------------------------------


def start_on_a_terminal(data: Path) -> tuple[subprocess.Popen, int, int]:
    """`python ezauth.py serve` with its output on a pseudo-terminal, as when run by hand:
    (process, port, the terminal's reading end)."""
    port, (reader, writer) = free_port(), pty.openpty()
    proc = subprocess.Popen([sys.executable, str(EZAUTH), "serve", "--port", str(port), "--data-dir", str(data)],
                            stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, env=clean_env(), cwd=data.parent)
    os.close(writer)
    return proc, port, reader


def test_first_start_on_a_terminal_prints_the_admin_password_once_and_it_works(tmp_path):
    data = tmp_path / "data"
    for round_ in range(2):
        proc, port, reader = start_on_a_terminal(data)
        try:
            shown = terminal_output_until(reader, "event=start")
            printed = re.findall(r"password:\s+(\S+)", shown)
            if round_ == 1:
                assert printed == [], "a second start shows no password"
                continue
            assert len(printed) == 1 and re.fullmatch(r"[A-Za-z0-9_-]{16,}", printed[0])
            assert "passwd admin" in shown and printed[0] not in (data / "users").read_text()
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            assert real_verify(port, real_login(port, "admin", printed[0]).cookie()) == 200
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            os.close(reader)


def test_first_start_without_a_terminal_creates_nobody_and_says_how(tmp_path, servers):
    """Under systemd the output goes to the journal: no password may land there."""
    data = tmp_path / "data"
    server = servers(data)
    assert "password:" not in server.log()
    line = next(line for line in server.log().splitlines() if "event=no_users" in line)
    command = re.search(r' command=(".*")$', line)
    assert command, line
    assert json.loads(command.group(1)) == f"{sys.executable} {EZAUTH} passwd admin", line  # whole, however deep
    assert not (data / "users").exists() or (data / "users").read_text() == ""
    assert run_cli("users", data_dir=data).stdout == ""


def test_legacy_dotenv_works_with_plain_python_ezauth_py(tmp_path):
    """The blog post's folder: ezauth.py with its .env beside it, run as `python ezauth.py` there."""
    port = free_port()
    script = copy_ezauth(tmp_path / "blog")
    (script.parent / ".env").write_text(f"EZAUTH_PORT={port}\nchat_username=bob\npassword=blog post password\n"
                                        "SECRET_KEY=abcdef\nLAST_UPDATED=2023-05-01\n")
    log_path = tmp_path / "out.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "ezauth.py"], cwd=script.parent, env=clean_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        token = real_login(port, "bob", "blog post password").cookie()
        assert real_verify(port, token) == 200
        assert (script.parent / "ezauth-data").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    output = log_path.read_text()
    assert "legacy_env_user" in output and "password:" not in output
