"""The first hour on a new box, each command a real subprocess. Most run a copy of ezauth.py
installed elsewhere, so its default data dir is the copy's and never the checkout's: the data dir
beside ezauth.py from any directory, a stray ./ezauth-data refused, a missing data dir refused, the
.env files, gunicorn halting on what would stop `serve`, and the README's systemd unit."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

import ezauth
from tests.support.basics import PASSWORD, clean_env, free_port, wait_until
from tests.support.process import (
    TOKEN_RE,
    add_user,
    copy_ezauth,
    data_dir_line,
    readme_units,
    run_cli,
    verify_units,
)


def two_data_dirs(stray: Path, default: Path) -> str:
    return (f"ezauth: two data dirs: {stray} here and {default} beside ezauth.py, the default; say which with "
            "--data-dir DIR or EZAUTH_DATA_DIR=DIR\n")


# -- The data dir beside ezauth.py ------------------------------------------------------------------


def test_every_command_uses_the_data_dir_beside_ezauth_py_from_any_directory_and_names_it(tmp_path):
    """`passwd admin` from the home directory changes the admin `serve` uses; the data dir each
    command used is its first line on stderr, so what it prints on stdout stays clean for scripts."""
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    default, home, elsewhere = script.parent / "ezauth-data", tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    made = run_cli("passwd", "admin", "--password-stdin", stdin=f"{PASSWORD}\n", cwd=home, script=script)
    assert (made.returncode, made.stdout, data_dir_line(made)) == (0, "created user admin\n", str(default))
    assert not (home / "ezauth-data").exists()
    assert ezauth.Users(default / "users").check("admin", PASSWORD)

    listed = run_cli("users", cwd=elsewhere, script=script)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "admin\n", f"ezauth: data dir {default}\n")
    token = run_cli("token", "add", "admin", "--label", "script", cwd=elsewhere, script=script)
    assert token.returncode == 0 and data_dir_line(token) == str(default), token.stderr
    assert TOKEN_RE.fullmatch(token.stdout.splitlines()[0]), token.stdout
    for args in (("sessions",), ("token", "list"), ("rotate",)):
        done = run_cli(*args, cwd=elsewhere, script=script)
        assert (done.returncode, data_dir_line(done)) == (0, str(default)), (args, done.stderr)
        assert "data dir" not in done.stdout


def test_a_stray_ezauth_data_where_a_command_runs_stops_it_naming_both(tmp_path):
    """Before the default moved beside ezauth.py, ./ezauth-data was the data dir: a command run where
    one is says so and stops, rather than switch to (or create) another one silently."""
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    default, home = script.parent / "ezauth-data", tmp_path / "home"
    stray = home / "ezauth-data"
    home.mkdir()
    add_user(stray, "alice")
    users_before = (stray / "users").read_bytes()
    port = str(free_port())
    for args in (("users",), ("passwd", "bob", "--password-stdin"), ("serve", "--port", port), ("token", "list"),
                 ("rotate",), ("totp", "alice", "--code-stdin")):
        done = run_cli(*args, stdin="another password\n", cwd=home, script=script)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", two_data_dirs(stray, default)), args
    assert not default.exists() and (stray / "users").read_bytes() == users_before

    # Naming either one answers the question.
    named = run_cli("users", data_dir=stray, script=script)
    assert (named.returncode, named.stdout) == (0, "alice\n"), named.stderr
    from_env = run_cli("users", cwd=home, script=script, env=clean_env(EZAUTH_DATA_DIR=str(default)))
    assert from_env.returncode == 1 and "no data dir at" in from_env.stderr  # the default, not made by `users`
    # In the folder of ezauth.py itself, ./ezauth-data is the default: no question.
    beside = run_cli("passwd", "carol", "--password-stdin", stdin=f"{PASSWORD}\n", cwd=script.parent, script=script)
    assert (beside.returncode, data_dir_line(beside)) == (0, str(default)), beside.stderr


def test_nginx_config_and_doctor_need_no_data_dir_and_make_none(tmp_path):
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    home = tmp_path / "home"
    (home / "ezauth-data").mkdir(parents=True)  # not even a stray one stops them
    config = run_cli("nginx-config", "--app", "http://127.0.0.1:7860", cwd=home, script=script)
    assert config.returncode == 0 and "upstream ezauth" in config.stdout and config.stderr == "", config.stderr
    url = f"http://127.0.0.1:{free_port()}/"
    doctor = run_cli("doctor", url, cwd=home, script=script)
    assert doctor.returncode == 1 and doctor.stdout.endswith(f"1 FAIL for {url}\n") and doctor.stderr == ""
    assert sorted(p.name for p in script.parent.iterdir()) == sorted(
        ["ezauth.py", "login.html", "account.html", "nginx.conf.example", "static"])
    assert list((home / "ezauth-data").iterdir()) == []
    refused = run_cli("doctor", url, "--data-dir", str(home / "ezauth-data"), cwd=home, script=script)
    assert refused.returncode == 2 and "unrecognized arguments: --data-dir" in refused.stderr


@pytest.mark.parametrize("args", [
    ("users",), ("deluser", "bob"), ("sessions",), ("sessions", "--end-user", "bob"), ("token", "list"),
    ("token", "add", "bob", "--label", "x"), ("token", "revoke", "abcdef"), ("rotate",),
    ("totp", "bob", "--code-stdin"), ("totp", "bob", "--remove"),
])
def test_commands_that_only_read_or_change_a_data_dir_refuse_a_missing_one(tmp_path, args):
    """A mistyped --data-dir would otherwise become a new, empty data dir that holds the change."""
    typo = tmp_path / "ezauth-dtaa"
    done = run_cli(*args, data_dir=typo, stdin="123456\n")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"ezauth: no data dir at {typo}; name the one ezauth serves from with --data-dir DIR or "
                           "EZAUTH_DATA_DIR=DIR (`serve` and `passwd` make a new one)\n")
    assert not typo.exists()


# -- The .env files -------------------------------------------------------------------------------


def test_the_dotenv_beside_ezauth_py_counts_from_any_directory_and_the_working_directorys_wins(tmp_path):
    """A directory named .env stands in for an unreadable file (as root every file is readable by
    mode); reading either fails with the same error."""
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    ours, theirs, home = tmp_path / "ours", tmp_path / "theirs", tmp_path / "home"
    add_user(ours, "alice")
    add_user(theirs, "bob")
    home.mkdir()
    beside = script.parent / ".env"
    beside.write_text(f"EZAUTH_DATA_DIR={ours}\n")
    assert run_cli("users", cwd=home, script=script).stdout == "alice\n"
    (home / ".env").write_text(f"EZAUTH_DATA_DIR={theirs}\n")
    assert run_cli("users", cwd=home, script=script).stdout == "bob\n"

    (home / ".env").unlink()
    (home / ".env").mkdir()  # one here that cannot be read: a warning, and the one beside ezauth.py counts
    warned = run_cli("users", cwd=home, script=script)
    assert (warned.returncode, warned.stdout) == (0, "alice\n"), warned.stderr
    warning, named = warned.stderr.splitlines()
    assert re.search(rf"ezauth WARNING event=env_file_unreadable error=\".*{re.escape(str(home / '.env'))}: cannot "
                     r"read it .*\" action=ignored$", warning), warning
    assert named == f"ezauth: data dir {ours}"

    beside.unlink()
    beside.mkdir()  # the install's own: a stop, with one line naming it
    stopped = run_cli("users", cwd=home, script=script)
    assert (stopped.returncode, stopped.stdout) == (2, "")
    assert stopped.stderr.count("\n") == 1 and stopped.stderr.startswith(f"ezauth: {beside}: cannot read it ("), (
        stopped.stderr)


# -- gunicorn -------------------------------------------------------------------------------------------


def gunicorn_command(gunicorn_bin: str, script: Path, port: int) -> list[str]:
    return [gunicorn_bin, "-w", "2", "-b", f"127.0.0.1:{port}", "--pythonpath", str(script.parent), "ezauth:app"]


def assert_halted_on_app_load(done: subprocess.CompletedProcess, line: str) -> None:
    """gunicorn halted on its first workers, each of which printed LINE and exited with 4. (gunicorn
    itself exits with 4, or with 1 and a traceback of its own when the second worker's exit reaches
    it while it halts for the first: its race, so only its worker codes are judged.)"""
    assert done.returncode != 0 and "App failed to load" in done.stderr, done.stderr
    exits = re.findall(r"Worker \(pid:\d+\) exited with code (\d+)", done.stderr)
    booted = done.stderr.count("Booting worker")
    assert 1 <= booted <= 2 and set(exits) == {"4"}, done.stderr  # halted, never started again
    assert done.stderr.count(line) >= 1 and 'ezauth.py", line' not in done.stderr, done.stderr


@pytest.mark.parametrize("problem", ["bad setting", "broken template", "two data dirs"])
def test_gunicorn_halts_on_what_stops_serve_with_the_same_one_line_error(tmp_path, gunicorn_bin, problem):
    """Each worker stops as it loads the app, with exit code 4, on which gunicorn halts instead of
    starting workers again (that would be a loop of tracebacks, or workers answering 500)."""
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    data, cwd = tmp_path / "data", script.parent
    add_user(data, "alice")
    env = clean_env(EZAUTH_DATA_DIR=str(data))
    if problem == "bad setting":
        env["EZAUTH_SESSION_TTL"] = "-5"
        line = "ezauth: EZAUTH_SESSION_TTL: must be at least 1, got -5\n"
    elif problem == "broken template":
        (data / "login.html").write_text("<p>$nosuchfield</p>")
        line = f"ezauth: {data / 'login.html'}: unknown or broken placeholders: nosuchfield\n"
    else:
        del env["EZAUTH_DATA_DIR"]
        cwd = tmp_path / "home"
        (cwd / "ezauth-data").mkdir(parents=True)
        line = two_data_dirs(cwd / "ezauth-data", script.parent / "ezauth-data")
    serve = run_cli("serve", "--port", str(free_port()), cwd=cwd, script=script, env=env)
    assert (serve.returncode, serve.stderr) == (2, line)
    done = subprocess.run(gunicorn_command(gunicorn_bin, script, free_port()), capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)
    assert_halted_on_app_load(done, line)


def test_gunicorn_logs_the_start_line_as_each_worker_loads_the_app(tmp_path, gunicorn_bin):
    data = tmp_path / "data"
    add_user(data, "alice")
    script = copy_ezauth(tmp_path / "opt" / "ezauth")
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(gunicorn_command(gunicorn_bin, script, free_port()), stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path, env=clean_env(EZAUTH_DATA_DIR=str(data)))
    try:
        def started() -> list[str]:
            return re.findall(r"^.* ezauth INFO event=start server=gunicorn .*$", log_path.read_text(), re.M)

        lines = wait_until(lambda: len(started()) == 2 and started(), timeout=30, interval=0.1)
        assert lines, log_path.read_text()  # logged at boot: no request was made
        for line in lines:
            assert re.search(rf" pid=\d+ data_dir={re.escape(str(data))} version={ezauth.__version__}$", line), line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0, log_path.read_text()
    assert os.path.isdir(data) and not (script.parent / "ezauth-data").exists()


# -- The README's systemd unit --------------------------------------------------------------------------


def test_the_readmes_systemd_unit_is_hardened_stops_for_good_on_what_a_restart_cannot_fix_and_verifies(tmp_path):
    units = readme_units("Running it for good")
    assert sorted(units) == ["ezauth.service"]
    unit = units["ezauth.service"]
    keys = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    data_dir = keys["Environment"].removeprefix("EZAUTH_DATA_DIR=")
    assert data_dir == f"/var/lib/{keys['StateDirectory']}" == "/var/lib/ezauth"  # writable under strict
    assert {k: keys[k] for k in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "Restart")} == {
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes", "Restart": "on-failure"}
    # What a restart cannot fix: a bad setting or two data dirs (2), a data dir it cannot use (3).
    assert sorted(keys["RestartPreventExitStatus"].split()) == sorted(
        {str(ezauth.UsageError.code), str(ezauth.DataDirUnusable.code)})
    command = shlex.split(keys["ExecStart"])
    assert command[:2] == ["/opt/ezauth/.venv/bin/python", "/opt/ezauth/ezauth.py"]
    assert ezauth.build_parser().parse_args(command[2:]).command == "serve"
    done = verify_units(units, tmp_path)
    assert done.returncode == 0 and "ezauth.service" not in done.stderr, done.stderr
