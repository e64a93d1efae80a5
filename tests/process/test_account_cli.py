"""Sessions, API tokens and two-factor from the command line (`sessions`, `token`, `passwd`,
`deluser`, `totp`), each a real subprocess, with the running app seeing the change within a second."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

import ezauth
from tests.support.app import build, change, login, new_client, new_token_on, other_code, session_token, tick, verify
from tests.support.basics import (
    CLIENT_IP,
    FIREFOX,
    FORWARDED,
    HEALTHZ,
    IPHONE,
    NEW_PASSWORD,
    PASSWORD,
    FakeClock,
    bearer,
    shown_time,
    sid_of,
)
from tests.support.process import (
    add_user,
    cli_on_a_terminal,
    cli_token,
    cli_totp,
    run_cli,
    secret_printed,
    terminal_output_until,
)


def test_deleting_a_user_ends_their_sessions_in_every_worker(data_dir, clock):
    (app_a, worker_a), (app_b, worker_b) = build(data_dir, clock), build(data_dir, clock)
    first, second = session_token(new_client(app_a)), session_token(new_client(app_b))
    bob = session_token(new_client(app_a), "bob")

    deleted = run_cli("deluser", "alice", data_dir=data_dir)
    assert deleted.returncode == 0, deleted.stderr
    tick(clock, worker_a, worker_b)
    for worker in (worker_a, worker_b):
        verify(worker, 401, first)
        verify(worker, 401, second)
        verify(worker, 200, bob)
    for token in (first, second):
        assert app_a.stores.registry.get(sid_of(token), clock()).reason == "user_deleted"
    assert app_a.stores.registry.live(clock(), "alice") == []


def test_a_deleted_users_token_stays_dead_when_the_name_is_created_again(data_dir, clock):
    app, worker = build(data_dir, clock)
    _, secret = app.stores.tokens.add("alice", "old script", clock())
    deleted = run_cli("deluser", "alice", data_dir=data_dir)
    assert deleted.returncode == 0, deleted.stderr
    tick(clock, worker)
    verify(worker, 401, Authorization=bearer(secret))
    add_user(data_dir, "alice", "someone else's password")  # a new account that happens to get the name
    tick(clock, worker)
    verify(worker, 401, Authorization=bearer(secret))


def test_cli_token_add_list_and_revoke(data_dir):
    secret, token_id = cli_token(data_dir, "alice", "sd script", "--expires", "90", "--path", "/sdapi/",
                                 "--path", "/extra/")
    [stored] = stored_tokens(data_dir)
    assert (stored.id, stored.user, stored.label, stored.paths) == (token_id, "alice", "sd script",
                                                                   ("/sdapi/", "/extra/"))
    assert stored.expires - stored.created == 90 * 86400

    listing = run_cli("token", "list", data_dir=data_dir)
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    assert header.split() == ["ID", "USER", "LABEL", "CREATED", "LAST", "USED", "EXPIRES", "PATHS"]
    [line] = lines
    assert line.startswith(f"{token_id}  alice  sd script  ")
    for cell in (shown_time(stored.created), "never", shown_time(stored.expires), "/sdapi/ /extra/"):
        assert cell in line
    assert secret not in listing.stdout
    assert run_cli("token", "list", "bob", data_dir=data_dir).stdout.splitlines()[1:] == []

    clock = FakeClock()
    _, client = build(data_dir, clock)
    verify(client, 200, Authorization=bearer(secret), uri="/sdapi/v1/sd-models")
    verify(client, 403, Authorization=bearer(secret), uri="/admin")

    revoked = run_cli("token", "revoke", token_id, data_dir=data_dir)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked token {token_id}" in revoked.stdout
    tick(clock, client)
    verify(client, 401, Authorization=bearer(secret), uri="/sdapi/v1/sd-models")
    again = run_cli("token", "revoke", token_id, data_dir=data_dir)
    assert again.returncode == 1 and "no token" in again.stderr
    assert run_cli("token", "list", data_dir=data_dir).stdout.splitlines()[1:] == []


@pytest.mark.parametrize(("args", "code"), [
    pytest.param(("nobody", "--label", "x"), 1, id="no-such-user"),
    pytest.param(("alice", "--label", ""), 1, id="empty-label"),
    pytest.param(("alice", "--label", "x", "--path", "sdapi/"), 1, id="relative-path"),
    pytest.param(("alice", "--label", "x", "--expires", "0"), 1, id="zero-days"),
    pytest.param(("alice", "--label", "x", "--expires", "3651"), 1, id="too-many-days"),
    pytest.param(("alice",), 2, id="no-label"),
])
def test_cli_token_add_refuses_bad_input(data_dir, args, code):
    done_ = run_cli("token", "add", *args, data_dir=data_dir)
    assert done_.returncode == code, done_.stdout
    assert done_.stderr.strip() and "ezt_" not in done_.stdout
    assert stored_tokens(data_dir) == []


def test_token_store_keeps_only_a_digest_in_a_private_file(data_dir):
    from_cli, _ = cli_token(data_dir)
    _, client = build(data_dir)  # a running app keeps the registry open, its write-ahead log beside it
    login(client)
    from_page = new_token_on(change(client, "token_create", 200, label="page", current=PASSWORD).text)
    db = data_dir / "sessions.sqlite3"
    everything = b"".join(p.read_bytes() for p in data_dir.iterdir() if p.is_file())
    for secret in (from_cli, from_page):
        assert secret.encode() not in everything
        assert secret[4:].encode() not in everything
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in everything  # what is stored instead
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for companion in data_dir.glob("sessions.sqlite3*"):
        assert stat.S_IMODE(companion.stat().st_mode) & 0o077 == 0, companion
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_cli_sessions_lists_and_ends_sessions(data_dir):
    clock = FakeClock()
    app, nginx = build(data_dir, clock)
    laptop = session_token(new_client(app), headers={"User-Agent": FIREFOX, **FORWARDED})
    phone = session_token(new_client(app), headers={"User-Agent": IPHONE, "X-Forwarded-For": "198.51.100.23"})
    bob = session_token(new_client(app), "bob", headers={"User-Agent": "curl/8.5.0"})

    listing = run_cli("sessions", data_dir=data_dir)
    assert listing.returncode == 0, listing.stderr
    header, *lines = listing.stdout.splitlines()
    assert header.split() == ["ID", "USER", "CREATED", "LAST", "SEEN", "IP", "BROWSER"]
    assert len(lines) == 3
    when = shown_time(clock())
    for token, user, ip, browser in ((laptop, "alice", CLIENT_IP, "Firefox on Linux"),
                                     (phone, "alice", "198.51.100.23", "Safari on iOS"),
                                     (bob, "bob", "127.0.0.1", "curl")):
        [line] = [line for line in lines if line.startswith(sid_of(token)[:8])]
        assert line.split(maxsplit=1)[1].split("  ")[0] == user
        assert f"{when}  {when}" in line and ip in line and line.endswith(browser)
    assert sid_of(laptop) not in listing.stdout  # a prefix, not the whole id
    only_alice = run_cli("sessions", "alice", data_dir=data_dir).stdout.splitlines()[1:]
    assert len(only_alice) == 2 and all(" alice " in line for line in only_alice)

    # `--end=ID`: one id in 64 begins with "-" (see the test below for `--end ID` with such an id).
    ended = run_cli("sessions", f"--end={sid_of(laptop)[:6]}", data_dir=data_dir)
    assert ended.returncode == 0, ended.stderr
    assert sid_of(laptop)[:8] in ended.stdout and "alice" in ended.stdout
    tick(clock, nginx)
    verify(nginx, 401, laptop)
    verify(nginx, 200, phone)
    for wrong in (sid_of(phone)[:5], "zzzzzzzzzz"):
        refused = run_cli("sessions", f"--end={wrong}", data_dir=data_dir)
        assert refused.returncode == 1 and "at least 6 characters" in refused.stderr
    verify(nginx, 200, phone)

    everyone = run_cli("sessions", "--end-user", "alice", data_dir=data_dir)
    assert everyone.returncode == 0 and everyone.stdout.strip() == "ended 1 session of alice"
    tick(clock, nginx)
    verify(nginx, 401, phone)
    verify(nginx, 200, bob)
    remaining = run_cli("sessions", data_dir=data_dir).stdout.splitlines()[1:]
    assert len(remaining) == 1 and remaining[0].startswith(sid_of(bob)[:8])


def test_cli_sessions_end_takes_the_printed_prefix_as_the_readme_writes_it(data_dir):
    """`sessions --end PREFIX` must work for every id it prints: none may begin with "-" (which
    argparse would read as an option; base64url ids did, one in 64)."""
    clock = FakeClock()
    app, nginx = build(data_dir, clock)
    sids = [app.stores.sessions.start("bob", clock(), False)[1].sid for _ in range(300)]
    assert not [sid for sid in sids if sid.startswith("-")]
    token = session_token(new_client(app))
    shown = run_cli("sessions", "alice", data_dir=data_dir).stdout.splitlines()[1].split()[0]
    assert shown == sid_of(token)[:8]
    ended = run_cli("sessions", "--end", shown, data_dir=data_dir)
    assert ended.returncode == 0, ended.stderr
    tick(clock, nginx)
    verify(nginx, 401, token)


def test_cli_passwd_ends_the_users_sessions(data_dir):
    clock = FakeClock()
    app, nginx = build(data_dir, clock)
    token = session_token(new_client(app))
    bob = session_token(new_client(app), "bob")
    changed = run_cli("passwd", "alice", "--password-stdin", data_dir=data_dir, stdin=NEW_PASSWORD + "\n")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout == "changed the password of alice; 1 session(s) ended, 0 API token(s) revoked\n"
    tick(clock, nginx)
    verify(nginx, 401, token)
    verify(nginx, 200, bob)
    assert app.stores.registry.get(sid_of(token), clock()).reason == "password_changed"
    assert run_cli("sessions", "alice", data_dir=data_dir).stdout.splitlines()[1:] == []
    login(new_client(app), password=NEW_PASSWORD)


def test_a_token_made_by_the_cli_works_at_once_in_a_running_worker(data_dir, clock):
    """A script runs `token add` and calls the API straight away: no waiting for the next refresh."""
    _, client = build(data_dir, clock)
    client.get(HEALTHZ, status=200)  # the worker has looked at the registry already
    secret, _ = cli_token(data_dir)
    verify(client, 200, Authorization=bearer(secret))
    verify(client, 401, Authorization=bearer("ezt_" + "x" * 43))  # a miss stays a miss


def stored_tokens(data_dir: Path) -> list[ezauth.ApiToken]:
    return ezauth.open_registry(ezauth.Settings(data_dir=data_dir))[1].list(time.time())


def totp_line(data: Path, name: str) -> tuple[bytes, int] | None:
    return ezauth.parse_totp((data / "totp").read_bytes() if (data / "totp").exists() else b"").get(name)


@pytest.mark.parametrize("right", [True, False], ids=["right-code", "wrong-code"])
def test_totp_cli_on_a_terminal_shows_the_secret_and_turns_on_only_with_a_right_code(tmp_path, right):
    data = tmp_path / "data"
    add_user(data, "carol")
    with cli_on_a_terminal("totp", "carol", data_dir=data) as (proc, reader):
        shown = terminal_output_until(reader, "The 6-digit code the app shows now:")
        secret = secret_printed(shown)
        assert "otpauth://totp/ezauth%3Acarol?secret=" in shown  # the URI, to paste
        grouped = base64.b32encode(secret).decode()
        assert f"secret: {' '.join(grouped[i:i + 4] for i in range(0, 32, 4))}" in shown  # to type by hand
        assert "\u2588" in shown or "\u2580" in shown  # the QR code, drawn by segno in block characters
        code = ezauth.totp(secret, time.time())
        os.write(reader, f"{code if right else other_code(code)}\n".encode())
        said = terminal_output_until(reader, "two-factor login is on for carol" if right else "nothing changed")
        assert proc.wait(timeout=30) == (0 if right else 1), said
    if not right:
        assert totp_line(data, "carol") is None
        return
    stored, used = totp_line(data, "carol")
    assert stored == secret and abs(used - int(time.time() // ezauth.TOTP_STEP)) <= 1  # the typed code is spent
    assert stat.S_IMODE((data / "totp").stat().st_mode) == 0o600


def test_totp_cli_with_code_stdin_lets_a_script_read_the_secret_then_write_the_code(tmp_path):
    data = tmp_path / "data"
    add_user(data, "carol")
    secret, printed = cli_totp(data, "carol")  # reads up to the secret before it writes the code
    assert printed.endswith("two-factor login is on for carol: after the password, the login page asks for a code\n")
    assert secret_printed(printed) == secret and totp_line(data, "carol")[0] == secret


def test_totp_cli_refuses_without_a_terminal_and_a_wrong_code_keeps_the_old_secret(tmp_path):
    data = tmp_path / "data"
    add_user(data, "carol")
    piped = run_cli("totp", "carol", data_dir=data, stdin="123456\n")  # like passwd: no terminal, no flag
    assert (piped.returncode, piped.stdout) == (1, "")
    assert piped.stderr.splitlines()[-1] == ("ezauth: no terminal to ask for a code on; pipe it in with --code-stdin "
                                             "once the secret is printed")
    assert totp_line(data, "carol") is None
    old = ezauth.TotpStore(data / "totp").enroll("carol")
    again = run_cli("totp", "carol", "--code-stdin", data_dir=data, stdin=f"{ezauth.totp(old, time.time())}\n")
    assert again.returncode == 1 and "carol has a second factor already" in again.stdout
    assert again.stderr.splitlines()[-1].endswith("nothing changed")
    assert totp_line(data, "carol")[0] == old  # a code of the old secret does not confirm the new one
    assert run_cli("totp", "nobody", "--code-stdin", data_dir=data, stdin="123456\n").returncode == 1
    assert run_cli("totp", "carol", "--remove", data_dir=data).returncode == 0
    assert (data / "totp").read_text() == ""
    assert run_cli("totp", "carol", "--remove", data_dir=data).returncode == 1


# -- Tokens die with the password; deluser removes everything (issue 16) ---------------------


@pytest.mark.parametrize("keep", [False, True], ids=["revoked", "kept"])
def test_cli_passwd_revokes_the_users_tokens_unless_told_to_keep_them(data_dir, clock, keep):
    _, nginx = build(data_dir, clock)
    alices = [cli_token(data_dir, "alice", label)[0] for label in ("one", "two")]
    bobs = cli_token(data_dir, "bob")[0]
    changed = run_cli("passwd", "alice", "--password-stdin", *(["--keep-tokens"] if keep else []), data_dir=data_dir,
                      stdin=NEW_PASSWORD + "\n")
    assert changed.returncode == 0, changed.stderr
    told = "API tokens kept (--keep-tokens)" if keep else "2 API token(s) revoked"
    assert changed.stdout == f"changed the password of alice; 0 session(s) ended, {told}\n"
    tick(clock, nginx)
    for secret in alices:
        verify(nginx, 200 if keep else 401, Authorization=f"Bearer {secret}")
    verify(nginx, 200, Authorization=f"Bearer {bobs}")


def test_cli_sessions_end_user_with_revoke_tokens_ends_everything_of_the_user(data_dir, clock):
    app, nginx = build(data_dir, clock)
    sessions = [session_token(new_client(app)) for _ in range(2)]
    secret = cli_token(data_dir)[0]
    bob = session_token(new_client(app), "bob")
    ended = run_cli("sessions", "--end-user", "alice", "--revoke-tokens", data_dir=data_dir)
    assert (ended.returncode, ended.stdout) == (0, "ended 2 sessions of alice; 1 API token(s) revoked\n")
    tick(clock, nginx)
    for token in sessions:
        verify(nginx, 401, token)
    verify(nginx, 401, Authorization=f"Bearer {secret}")
    verify(nginx, 200, bob)
    alone = run_cli("sessions", "--revoke-tokens", data_dir=data_dir)
    assert alone.returncode == 1 and "--revoke-tokens goes with --end-user NAME" in alone.stderr


def test_cli_deluser_removes_everything_of_the_user_and_points_at_the_rules(data_dir, clock):
    app, nginx = build(data_dir, clock)
    (data_dir / "rules").write_text("group family: carol alice\nallow @family * /\nallow alice * /admin\n"
                                    "allow bob * /\n")
    token = session_token(new_client(app))
    secret = cli_token(data_dir)[0]
    app.stores.totp.enroll("alice")
    gone = run_cli("deluser", "alice", data_dir=data_dir)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout == "deleted user alice: 1 session(s) ended, 1 API token(s) revoked, second factor removed\n"
    assert gone.stderr == (f"ezauth: data dir {data_dir}\n"
                           f"ezauth: warning: {data_dir / 'rules'} still names alice (line 1, line 3): a new user "
                           "called alice would get those rules\n")
    assert "alice:" not in (data_dir / "totp").read_text()
    # A new alice starts clean: no second factor, no tokens, no sessions of the old one.
    add_user(data_dir, "alice")
    tick(clock, nginx)
    verify(nginx, 401, token)
    verify(nginx, 401, Authorization=f"Bearer {secret}")
    fresh = login(new_client(app))
    assert fresh.status_int == 303  # the password alone: no code step from the old second factor
    assert run_cli("token", "list", "alice", data_dir=data_dir).stdout.splitlines()[1:] == []
    assert run_cli("deluser", "bob", data_dir=data_dir).stderr.count("still names bob (line 4)") == 1

