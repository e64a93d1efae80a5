"""`python ezauth.py doctor URL`: the shipped config through a real nginx is all OK, each broken copy
is caught as FAIL by the check that can see it, and the `nginx -T` reader keeps its footing on
tricky configs.

The doctor always runs as a real subprocess (conftest's run_cli) against a real nginx running
nginx.conf.example (conftest's build_stack), with the stub app that echoes what it receives. The
reader and the single checks are also called directly, on dumps written here in nginx -T's format.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest

import ezauth
from conftest import (
    EZAUTH,
    HERE,
    PASSWORD,
    TARGET,
    Stack,
    build_stack,
    enable_https,
    free_port,
    make_certificate,
    nginx_command,
    require_tool,
    run_cli,
)

nginx = pytest.mark.nginx
LINE_RE = re.compile(r"^(OK|WARN|FAIL) {2,4}(\S.*)$")
SUMMARY_RE = re.compile(r"^doctor: (\d+) OK, (\d+) WARN, (\d+) FAIL for (\S+)$")


# -- helpers -----------------------------------------------------------------------------------

def doctor(url: str, *args: str, data_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `python ezauth.py doctor URL ARGS` and check the shape of what it printed: one finding a
    line, then the summary, whose counts match the lines and whose verdict matches the exit code."""
    done = run_cli("doctor", url, *args, data_dir=data_dir, stdin=stdin, timeout=120)
    if done.returncode == 2:
        return done
    *lines, summary = done.stdout.splitlines()
    assert all(LINE_RE.match(line) for line in lines), done.stdout
    counts = SUMMARY_RE.fullmatch(summary)
    assert counts is not None, done.stdout
    found = [LINE_RE.match(line)[1] for line in lines]
    assert [int(n) for n in counts.groups()[:3]] == [found.count(level) for level in ("OK", "WARN", "FAIL")]
    assert done.returncode == (1 if "FAIL" in found else 0), done.stdout
    return done


def lines(done: subprocess.CompletedProcess, level: str | None = None) -> list[str]:
    """The finding lines printed (of one LEVEL), without the summary."""
    found = done.stdout.splitlines()[:-1]
    return [line for line in found if level is None or line.startswith(f"{level} ")]


def site_url(stack: Stack, target: str = TARGET) -> str:
    return f"http://127.0.0.1:{stack.nginx.port}{target}"


def conf_line(stack: Stack, text: str) -> str:
    """FILE:LINE of the first line of the running site config that reads TEXT (spaces around ignored)."""
    path = stack.nginx.prefix / "ezauth.conf"
    numbers = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text]
    assert numbers, text
    return f"{path}:{numbers[0]}"


def nginx_dump(nginx_bin: str, stack: Stack, where: Path) -> Path:
    """The running stack's config as `nginx -T` prints it, saved to a file."""
    done = subprocess.run(nginx_command(nginx_bin, stack.nginx.prefix, "-T"), capture_output=True, text=True,
                          timeout=30, check=True)
    where.write_text(done.stdout)
    return where


def breaking(old: str, new: str = "") -> Callable[[str], str]:
    """An edit of the site config that must change it: the first OLD that starts a line becomes NEW
    (so a copy of the line in a comment is left alone)."""
    def edit(site: str) -> str:
        assert f"\n{old}" in site, old
        return site.replace(f"\n{old}", f"\n{new}", 1)
    return edit


@pytest.fixture(scope="module")
def shipped(nginx_bin, tmp_path_factory) -> Iterator[Stack]:
    """The shipped config, unchanged, with user alice."""
    with contextlib.ExitStack() as cleanup:
        yield build_stack(nginx_bin, tmp_path_factory.mktemp("doctor-stack"), cleanup)


# -- the shipped config through a real nginx: all OK -----------------------------------------------

@nginx
def test_the_shipped_config_is_all_ok_and_the_app_never_hears_from_the_doctor(shipped):
    url, seen = site_url(shipped), len(shipped.app.seen)
    done = doctor(url, data_dir=shipped.ezauth.data_dir)
    assert done.returncode == 0 and lines(done, "WARN") == lines(done, "FAIL") == [], done.stdout
    deep, to_login = site_url(shipped, "/app/ezauth-doctor/deep/path?x=1&y=2"), "is sent to the login page (302)"
    assert lines(done) == [
        "OK    plain http to 127.0.0.1: a local address (127.0.0.1)",
        f"OK    anonymous GET {url} as a browser is sent to the login page (302)",
        f"OK    anonymous GET {url} as a script is sent to the login page (401)",
        f"OK    anonymous GET {deep} as a browser is sent to the login page (302)",
        f"OK    anonymous GET {deep} as a script is sent to the login page (401)",
        f"OK    GET {url} with X-Auth-Request-User, X-Forwarded-User, Remote-User: admin {to_login}",
        f"OK    GET {url} with a forged session cookie (an HS256 JWT signed with a made-up key) {to_login}",
        f"OK    GET {url} with a forged session cookie (a JWT with alg none) {to_login}",
        f"OK    GET {url} with a forged session cookie (garbage) {to_login}",
        "OK    /ezauth/verify is not reachable from outside (404)",
        "OK    /_ezauth_verify is not reachable from outside (404)",
    ]
    assert done.stdout.splitlines()[-1] == f"doctor: 11 OK, 0 WARN, 0 FAIL for {url}"
    assert len(shipped.app.seen) == seen  # not one of the doctor's anonymous requests reached the app


@nginx
def test_with_a_user_it_logs_in_lands_on_the_exact_url_and_logs_out(shipped):
    url, log_before = site_url(shipped), shipped.ezauth.log()
    done = doctor(url, "--user", "alice", data_dir=shipped.ezauth.data_dir, stdin=f"{PASSWORD}\n")
    assert done.returncode == 0, done.stdout
    assert lines(done)[-4:] == [
        f"OK    logged in as alice: the login page sent the browser back to exactly {url}",
        f"OK    logged in, GET {url} reaches the app (200)",
        "OK    logged in, the app's answer does not show a spoofed X-Auth-Request-User or X-Forwarded-User (an app "
        "that echoes headers would)",
        "OK    logged out (303); the old session cookie no longer gets in",
    ]
    assert PASSWORD not in done.stdout + done.stderr and "eyJ" not in done.stdout + done.stderr  # nor a JWT
    new_log = shipped.ezauth.log()[len(log_before):]
    assert "event=login_ok user=alice" in new_log and "event=logout user=alice" in new_log
    assert shipped.app.seen[-2:] == [TARGET, TARGET]  # the two logged-in requests, and only those


@nginx
def test_with_the_auth_cache_on_it_is_all_ok_and_logout_is_waited_for(make_stack):
    """The cache says yes to a just-ended session for up to 6 s (documented): the doctor waits that out."""
    stack = make_stack(cache=True)
    done = doctor(site_url(stack), "--user", "alice", data_dir=stack.ezauth.data_dir, stdin=f"{PASSWORD}\n")
    assert done.returncode == 0 and lines(done, "WARN") == [], done.stdout
    assert re.fullmatch(r"OK    logged out \(303\); the old session cookie no longer gets in "
                        r"\(after [1-7] s: the auth cache\)", lines(done)[-1]), done.stdout


@nginx
def test_an_auth_cache_that_outlives_a_logout_is_a_fail(make_stack):
    longer = breaking("        proxy_cache_valid 200 5s;", "        proxy_cache_valid 200 1m;")
    stack = make_stack(cache=True, edit=longer)
    done = doctor(site_url(stack), "--user", "alice", data_dir=stack.ezauth.data_dir, stdin=f"{PASSWORD}\n")
    assert lines(done, "FAIL") == ["FAIL  logged out, but the old session cookie still gets in (200): logout does "
                                   "not end the session"]


@nginx
def test_a_wrong_password_is_a_fail_that_says_so(shipped):
    done = doctor(site_url(shipped), "--user", "alice", data_dir=shipped.ezauth.data_dir, stdin="wrong password\n")
    assert lines(done, "FAIL") == ["FAIL  --user: the login page refused the password of alice (401)"]
    assert "wrong password" not in done.stdout + done.stderr


@nginx
def test_the_password_goes_to_no_other_host_than_the_urls_unless_named(make_stack):
    """A login page on another host (here `localhost` for 127.0.0.1) is fine for strangers, but the
    doctor posts the password there only when --login-host names it."""
    stack = make_stack(edit=breaking("        return 302 $ezauth_login;\n",
                                     "        return 302 http://localhost:$server_port$ezauth_login;\n"))
    url, data_dir = site_url(stack), stack.ezauth.data_dir
    refused = doctor(url, "--user", "alice", data_dir=data_dir, stdin=f"{PASSWORD}\n")
    assert f"OK    anonymous GET {url} as a browser is sent to the login page on localhost (302)" in lines(refused)
    assert lines(refused, "FAIL") == ["FAIL  --user: the login form posts to localhost, and the doctor sends the "
                                      "password nowhere but 127.0.0.1 (--login-host localhost if it is your "
                                      "login host)"]
    assert "event=login" not in stack.ezauth.log()
    named = doctor(url, "--user", "alice", "--login-host", "LocalHost", data_dir=data_dir, stdin=f"{PASSWORD}\n")
    assert "event=login_ok user=alice" in stack.ezauth.log()
    assert f"FAIL  logged in as alice, but the login page sent the browser to http://localhost:{stack.nginx.port}" \
           f"{TARGET} instead of {url}: the return target was lost" in lines(named)


@nginx
def test_the_nginx_dump_of_the_shipped_stack_is_all_ok_and_names_each_location(nginx_bin, shipped, tmp_path):
    dump = nginx_dump(nginx_bin, shipped, tmp_path / "nginx-T.txt")
    done = doctor(site_url(shipped), "--nginx-dump", str(dump), data_dir=shipped.ezauth.data_dir)
    assert done.returncode == 0 and lines(done, "WARN") == [], done.stdout
    root, verify = conf_line(shipped, "location / {"), conf_line(shipped, "location = /_ezauth_verify {")
    server = conf_line(shipped, "server {")
    assert [line for line in lines(done) if "nginx:" in line] == [
        "OK    nginx: read 2 files of nginx -T, 1 server block",
        f"OK    nginx: server _ ({server}): /ezauth/verify from outside goes to location = /ezauth/verify "
        f"({conf_line(shipped, 'location = /ezauth/verify {')}), not to ezauth",
        f"OK    nginx: location = /_ezauth_verify ({verify}), which auth_request asks, is internal and passes to "
        "ezauth",
        f"OK    nginx: location / ({root}) asks ezauth first (auth_request /_ezauth_verify)",
        f"OK    nginx: location / ({root}) sets X-Auth-Request-User and X-Forwarded-User itself",
        f"OK    nginx: location / ({root}) keeps the ezauth session cookie from the app "
        f"({conf_line(shipped, 'proxy_set_header Cookie $ezauth_app_cookie;')})",
    ]


@nginx
def test_with_nginx_it_runs_nginx_T_itself_and_a_failing_nginx_is_a_fail(nginx_bin, shipped, tmp_path):
    wrapper = tmp_path / "nginx"  # what `nginx -T` is on the box: the stack's nginx with its own prefix
    prefix = shipped.nginx.prefix
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(nginx_command(nginx_bin, prefix))} "$@"\n')
    wrapper.chmod(0o755)
    done = doctor(site_url(shipped), "--nginx", "--nginx-bin", str(wrapper), data_dir=shipped.ezauth.data_dir)
    assert done.returncode == 0 and "OK    nginx: read 2 files of nginx -T, 1 server block" in lines(done)
    failing = doctor(site_url(shipped), "--nginx", "--nginx-bin", "/bin/false", data_dir=shipped.ezauth.data_dir)
    assert lines(failing, "FAIL") == ["FAIL  nginx: `/bin/false -T` failed (no message); run the doctor as root, "
                                      "or save `sudo nginx -T` to a file and pass it with --nginx-dump FILE"]


# -- https with a self-signed certificate made here ---------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = require_tool("openssl", "EZAUTH_REQUIRE_NGINX", "openssl")
    return make_certificate(openssl, tmp_path_factory.mktemp("certificate"))


def https_stack(make_stack, certificate: tuple[Path, Path], *edits: Callable[[str], str]) -> tuple[Stack, int]:
    """The example with its documented HTTPS lines turned on (then EDITS), and its https port."""
    tls_port = free_port()

    def edit(site: str) -> str:
        site = enable_https(site, *certificate, tls_port)
        for change in edits:
            site = change(site)
        return site
    return make_stack(edit=edit), tls_port


@nginx
def test_over_https_the_cookies_are_secure_and_http_redirects(make_stack, certificate):
    stack, tls_port = https_stack(make_stack, certificate)
    url, cert = f"https://127.0.0.1:{tls_port}{TARGET}", str(certificate[0])
    done = doctor(url, "--ca", cert, "--http-port", str(stack.nginx.port), "--user", "alice",
                  data_dir=stack.ezauth.data_dir, stdin=f"{PASSWORD}\n")
    assert done.returncode == 0 and lines(done, "WARN") == [], done.stdout
    assert "OK    over https the login page's cookie ezauth_csrf is Secure" in lines(done)
    assert "OK    over https the session cookie ezauth is Secure" in lines(done)
    plain = f"http://127.0.0.1:{stack.nginx.port}{TARGET}"
    assert f"OK    {plain} redirects to https (301 to https://127.0.0.1{TARGET})" in lines(done)
    assert not any(line.startswith("OK    plain http") for line in lines(done))
    wrong = doctor(plain, data_dir=stack.ezauth.data_dir)  # the http:// address of an https site
    assert lines(wrong, "FAIL") and all("is redirected to https (301 to https://127.0.0.1" in line
                                        for line in lines(wrong, "FAIL")) and "public" not in wrong.stdout


@nginx
def test_over_https_an_untrusted_certificate_is_a_fail_and_insecure_a_warn(make_stack, certificate):
    stack, tls_port = https_stack(make_stack, certificate)
    url, http_port = f"https://127.0.0.1:{tls_port}/", str(stack.nginx.port)
    untrusted = doctor(url, "--http-port", http_port, data_dir=stack.ezauth.data_dir)
    assert lines(untrusted) == [f"FAIL  cannot check {url}: its certificate is not trusted (self-signed certificate). "
                                "Fix the certificate, or name your own CA with --ca FILE"]
    insecure = doctor(url, "--insecure", "--http-port", http_port, data_dir=stack.ezauth.data_dir)
    assert insecure.returncode == 0 and lines(insecure, "WARN") == [
        "WARN  --insecure: the certificate was not checked; --ca FILE checks it against your own CA"]
    nothing = doctor(url, "--ca", str(certificate[0]), "--http-port", str(free_port()), data_dir=stack.ezauth.data_dir)
    assert nothing.returncode == 0 and len(lines(nothing, "WARN")) == 1
    assert lines(nothing, "WARN")[0].startswith("WARN  nothing answers http://127.0.0.1:")


@nginx
@pytest.mark.parametrize(("edit", "failure"), [
    (breaking("    if ($scheme = http) { return 301 https://$host$request_uri; }\n"),
     "instead of redirecting to https: whatever is typed there crosses the network in clear text"),
    (breaking("        proxy_set_header X-Forwarded-Proto $scheme;\n        # The login form",
              "        # The login form"),
     "over https the login page's cookie ezauth_csrf is not Secure: ezauth does not know the request came over https"),
], ids=["no-http-redirect", "no-forwarded-proto-for-ezauth"])
def test_a_broken_https_copy_is_a_fail(make_stack, certificate, edit, failure):
    stack, tls_port = https_stack(make_stack, certificate, edit)
    done = doctor(f"https://127.0.0.1:{tls_port}/", "--ca", str(certificate[0]), "--http-port", str(stack.nginx.port),
                  data_dir=stack.ezauth.data_dir)
    assert len(lines(done, "FAIL")) == 1 and failure in lines(done, "FAIL")[0], done.stdout


# -- deliberately broken copies, each caught by the check that can see it -----------------------------

@nginx
def test_no_auth_request_in_location_root_is_public_from_outside_and_in_the_config(nginx_bin, make_stack, tmp_path):
    stack = make_stack(edit=breaking("        auth_request /_ezauth_verify;\n"))
    url, deep, root = site_url(stack), site_url(stack, "/app/ezauth-doctor/deep/path?x=1&y=2"), conf_line(
        stack, "location / {")
    dump = nginx_dump(nginx_bin, stack, tmp_path / "nginx-T.txt")
    done = doctor(url, "--nginx-dump", str(dump), "--user", "alice", data_dir=stack.ezauth.data_dir,
                  stdin=f"{PASSWORD}\n")
    public = ("was answered by the app (200): your app is public. Check that the location serving it has "
              "auth_request (run the doctor with --nginx on the box)")
    assert lines(done, "FAIL") == [
        f"FAIL  anonymous GET {url} as a browser {public}",
        f"FAIL  anonymous GET {url} as a script {public}",
        f"FAIL  anonymous GET {deep} as a browser {public}",
        f"FAIL  anonymous GET {deep} as a script {public}",
        f"FAIL  --user: {url} does not send to the login page, so the doctor cannot log in",
        f"FAIL  nginx: location / ({root}) has no auth_request: everything it serves is public. Add "
        "`auth_request /_ezauth_verify;` and the lines around it from nginx.conf.example",
        "FAIL  nginx: no server block has auth_request: nothing is protected",
    ]
    assert TARGET in stack.app.seen  # the FAIL is true: the app did answer a stranger


@nginx
@pytest.mark.parametrize(("edit", "outside", "config"), [
    (breaking("        internal;\n"),
     "FAIL  /_ezauth_verify answers from outside as verify does (401)",
     "FAIL  nginx: location = /_ezauth_verify ({location = /_ezauth_verify {}), which auth_request asks, is not "
     "internal: clients can call it directly. Add `internal;`"),
    (breaking("    location = /ezauth/verify {\n        return 404;\n    }\n"),
     "FAIL  /ezauth/verify answers from outside as verify does (401)",
     "FAIL  nginx: server _ ({server {}): /ezauth/verify from outside reaches ezauth through location /ezauth/ "
     "({location /ezauth/ {}): add `location = /ezauth/verify { return 404; }`"),
], ids=["verify-not-internal", "verify-not-404"])
def test_verify_reachable_from_outside_is_a_fail_outside_and_in_the_config(nginx_bin, make_stack, tmp_path, edit,
                                                                           outside, config):
    stack = make_stack(edit=edit)
    dump = nginx_dump(nginx_bin, stack, tmp_path / "nginx-T.txt")
    done = doctor(site_url(stack), "--nginx-dump", str(dump), data_dir=stack.ezauth.data_dir)
    expected = re.sub(r"\{([^{}]+ \{)\}", lambda m: conf_line(stack, m[1]), config)
    failures = lines(done, "FAIL")
    assert len(failures) == 2 and failures[0].startswith(outside) and failures[1] == expected, done.stdout


@nginx
def test_a_user_header_not_cleared_is_a_fail_logged_in_and_in_the_config(nginx_bin, make_stack, tmp_path):
    stack = make_stack(edit=breaking("        proxy_set_header X-Forwarded-User $ezauth_user;\n"))
    dump = nginx_dump(nginx_bin, stack, tmp_path / "nginx-T.txt")
    done = doctor(site_url(stack), "--nginx-dump", str(dump), "--user", "alice", data_dir=stack.ezauth.data_dir,
                  stdin=f"{PASSWORD}\n")
    assert lines(done, "FAIL") == [
        "FAIL  logged in, the app got the X-Forwarded-User the client sent (its answer shows it): anyone logged in "
        "can pose as another user. Set it in nginx: `proxy_set_header X-Forwarded-User $ezauth_user;`",
        f"FAIL  nginx: location / ({conf_line(stack, 'location / {')}) passes a client's own X-Forwarded-User on to "
        "the app: add `proxy_set_header X-Forwarded-User $ezauth_user;`",
    ]
    # Anonymous, the same spoofed header still gets nowhere: only the logged-in check can see this.
    assert any(line.startswith(f"OK    GET {site_url(stack)} with X-Auth-Request-User") for line in lines(done))


@nginx
def test_ezauth_down_is_a_fail_of_its_own_not_a_public_app(make_stack):
    stack = make_stack()
    stack.ezauth.stop()
    done = doctor(site_url(stack), data_dir=stack.ezauth.data_dir)
    failures = lines(done, "FAIL")
    assert len(failures) == 4 and all("got 503: nginx cannot reach ezauth" in line for line in failures)
    assert "public" not in done.stdout and stack.app.seen == []


# -- without nginx: usage errors, nothing listening, single checks -------------------------------------

@pytest.mark.parametrize("args", [
    ["ftp://example.com/"], ["http://"], ["https://user:pw@example.com/"], ["http://example.com:99999/"],
    ["http://127.0.0.1/ezauth/login"], ["http://example.com/ a"], [],
    ["http://example.com/", "--ca", "cert.pem", "--insecure"],
    ["http://example.com/", "--ca", "/nonexistent/cert.pem"],
    ["http://example.com/", "--http-port", "0"], ["http://example.com/", "--timeout", "0"],
    ["http://example.com/", "--nginx-dump", "-", "--user", "alice"],
    ["http://example.com/", "--user", "alice"],  # and no password on standard input
])
def test_usage_errors_exit_2_and_check_nothing(tmp_path, args):
    done = run_cli("doctor", *args, data_dir=tmp_path / "data", stdin="")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip(), done


def test_nothing_listening_is_one_fail(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/"
    done = doctor(url, data_dir=tmp_path / "data")
    assert lines(done) == ["OK    plain http to 127.0.0.1: a local address (127.0.0.1)",
                           f"FAIL  cannot reach {url}: [Errno 111] Connection refused"]


@pytest.mark.parametrize(("host", "level"), [("127.0.0.1", "OK"), ("::1", "OK"), ("192.168.1.10", "OK"),
                                             ("10.1.2.3", "OK"), ("8.8.8.8", "WARN"),
                                             ("2606:4700:4700::1111", "WARN")])
def test_plain_http_is_a_warning_unless_the_address_is_local(host, level):
    found = ezauth.check_plain_http(host, 80)
    assert found[0] == level
    assert (found[0] == "WARN") == ("passwords cross the network in clear text" in found[1])


def answer(status: int, url: str = "https://sd.example.com/app/", body: bytes = b"", **headers: str) -> ezauth.Answer:
    message = Message()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    return ezauth.Answer(url, status, message, body)


@pytest.mark.parametrize(("reply", "expected"), [
    (answer(302, Location="/ezauth/login?rd=%2Fapp%2F"), ("OK", "is sent to the login page (302)")),
    (answer(302, Location="https://auth.example.com/ezauth/login?rd=x"),
     ("OK", "is sent to the login page on auth.example.com (302)")),
    (answer(401, body=b'{"error": "login_required"}'), ("OK", "is sent to the login page (401)")),
    (answer(200), ("FAIL", "was answered by the app (200): your app is public")),
    (answer(302, Location="/login"), ("FAIL", "was answered by the app (302 to https://sd.example.com/login)")),
    (answer(404), ("FAIL", "was answered by the app (404)")),
    (answer(401), ("WARN", "got 401 instead of the login page")),
    (answer(503), ("FAIL", "got 503: nginx cannot reach ezauth")),
    (answer(502), ("FAIL", "got 502: nginx or ezauth is failing")),
    (answer(301, "http://sd.example.com/app/", Location="https://sd.example.com/app/"),
     ("FAIL", "is redirected to https (301 to https://sd.example.com/app/), so nothing behind it was checked")),
])
def test_an_anonymous_answer_is_ok_only_when_it_sends_to_the_login_page(reply, expected):
    level, text = ezauth.refusal(reply)
    assert (level, text[:len(expected[1])]) == expected


@pytest.mark.parametrize(("action", "level"), [
    ("https://sd.example.com/ezauth/login", None), ("http://192.168.1.5/ezauth/login", None),
    ("http://8.8.8.8/ezauth/login", "WARN"), ("https://evil.example/ezauth/login", "FAIL"),
])
def test_the_password_is_posted_only_to_a_named_host_and_not_in_clear_text_off_the_network(action, level):
    login = ezauth.Login("doctor", "secret password", frozenset({"sd.example.com", "192.168.1.5", "8.8.8.8"}))
    assert "secret password" not in repr(login)
    if level is None:
        ezauth.check_destination(action, login)
        return
    with pytest.raises(ezauth.DoctorStop) as stopped:
        ezauth.check_destination(action, login)
    assert stopped.value.finding[0] == level


def test_a_value_from_the_network_is_printed_on_one_line():
    assert ezauth.shown("/a\r\nSet-Cookie: x\x7f\u00e9") == "/a??Set-Cookie: x?\\xe9"


# -- the nginx -T reader on tricky configs ---------------------------------------------------------

def dump(files: dict[str, str]) -> str:
    """Files (named under /etc/nginx/) in nginx -T's format; the first one is the main config."""
    return "".join(f"# configuration file /etc/nginx/{name}:\n{text}\n" for name, text in files.items())


SHIPPED_SITE = """
upstream ezauth { server 127.0.0.1:2424; }
server {
    listen 80;
    server_name sd.example.com;
    location /ezauth/ { proxy_pass http://ezauth; }
    location = /ezauth/verify { return 404; }
    location = /_ezauth_verify { internal; proxy_pass http://ezauth/ezauth/verify; }
    location @ezauth_login { return 302 /ezauth/login; }
    location / {
        auth_request /_ezauth_verify;
        proxy_pass http://127.0.0.1:7860;
        proxy_set_header X-Auth-Request-User $ezauth_user;
        proxy_set_header X-Forwarded-User $ezauth_user;
        proxy_set_header Cookie $ezauth_app_cookie;
    }
}
"""


def judged(site: str, main: str = "http {\n    include conf.d/*.conf;\n}\n") -> list[tuple[str, str]]:
    return ezauth.nginx_findings(ezauth.NginxConfig(dump({"nginx.conf": main, "conf.d/site.conf": site})))


def test_the_reader_keeps_quotes_comments_and_braces_in_their_place():
    text = ('map $http_x $y { "~^a;b{c}#d" \'it\\\'s\'; default "";}  # a comment { ;\n'
            'add_header X-A "two\nlines";log_format x#y ${host}z}w;#end\nreturn 200 a\\;b;')
    config = ezauth.NginxConfig(dump({"nginx.conf": text}))
    first, second, third, fourth = config.root.block
    assert (first.name, first.args, first.where) == ("map", ("$http_x", "$y"), "/etc/nginx/nginx.conf:1")
    assert [(d.name, d.args) for d in first.block] == [("~^a;b{c}#d", ("it's",)), ("default", ("",))]
    assert (second.args, second.where) == (("X-A", "two\nlines"), "/etc/nginx/nginx.conf:2")
    assert (third.name, third.args, third.where) == ("log_format", ("x#y", "${host}z}w"), "/etc/nginx/nginx.conf:3")
    assert (fourth.args, fourth.where) == (("200", "a\\;b"), "/etc/nginx/nginx.conf:4")  # nginx keeps that \\


def test_the_reader_puts_included_files_in_place_in_sorted_glob_order():
    main = "events {}\nhttp {\n    include conf.d/*.conf;\n    include /etc/nginx/extra.conf;\n}\n"
    config = ezauth.NginxConfig(dump({
        "nginx.conf": main, "conf.d/b.conf": "server { listen 2; }",
        "conf.d/a.conf": "server { listen 1;\n include snippets/x.conf; }", "snippets/x.conf": "location / { }",
        "extra.conf": "server { listen 3; }", "conf.d/a.conf.orig": "server { listen 9; }"}))
    servers = [s for _, _, s in ezauth.server_chains(config)]
    assert [s.block[0].args for s in servers] == [("1",), ("2",), ("3",)]
    assert servers[0].block[1].where == "/etc/nginx/snippets/x.conf:1"
    assert "/etc/nginx/conf.d/a.conf.orig" not in config.placed  # conf.d/*.conf does not match it


def test_a_dumped_file_the_reader_cannot_place_is_a_warning(tmp_path):
    config = ezauth.NginxConfig(dump({"nginx.conf": "http { include conf.d/[ab].conf; }",
                                      "conf.d/a.conf": "server {}"}))
    assert ("WARN", "nginx: /etc/nginx/conf.d/a.conf was dumped by nginx -T but the doctor could not place it (an "
            "include pattern it does not read): not checked") in ezauth.nginx_findings(config)


@pytest.mark.parametrize(("text", "message"), [
    ("http {\n  server {\n", "/etc/nginx/nginx.conf:2: not closed before the end of the file"),
    ("events {}\n}\n", "/etc/nginx/nginx.conf:2: unexpected '}'"),
    ("a b;\n;", "/etc/nginx/nginx.conf:2: unexpected ';'"),
    ('a "b;', "/etc/nginx/nginx.conf:1: cannot read '\"b;\\n' (an open quote?)"),
    ("a b", "/etc/nginx/nginx.conf:1: not closed before the end of the file"),
])
def test_a_config_the_reader_cannot_follow_is_an_error_naming_the_line(text, message):
    with pytest.raises(ezauth.NginxError) as caught:
        ezauth.NginxConfig(dump({"nginx.conf": text}))
    assert str(caught.value) == message


def test_text_that_is_not_nginx_T_output_is_an_error():
    with pytest.raises(ezauth.NginxError, match="not the output of nginx -T"):
        ezauth.NginxConfig("nginx: the configuration file /etc/nginx/nginx.conf syntax is ok\n")


def test_the_shipped_shape_is_all_ok():
    assert {level for level, _ in judged(SHIPPED_SITE)} == {"OK"}


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("        auth_request /_ezauth_verify;\n", "",
     ("FAIL", "nginx: location / (/etc/nginx/conf.d/site.conf:10) has no auth_request")),
    ("        auth_request /_ezauth_verify;\n", "        auth_request off;\n",
     ("FAIL", "nginx: location / (/etc/nginx/conf.d/site.conf:10) has `auth_request off` "
              "(/etc/nginx/conf.d/site.conf:11)")),
    ("internal; ", "", ("FAIL", "nginx: location = /_ezauth_verify (/etc/nginx/conf.d/site.conf:8), which "
                                "auth_request asks, is not internal")),
    ("internal; proxy_pass http://ezauth/ezauth/verify;", "internal; return 200;",
     ("FAIL", "nginx: location = /_ezauth_verify (/etc/nginx/conf.d/site.conf:8), which auth_request asks, "
              "does not pass to ezauth")),
    ("auth_request /_ezauth_verify;", "auth_request /_ezauth_check;",  # nginx would ask location / itself
     ("FAIL", "nginx: location / (/etc/nginx/conf.d/site.conf:10), which auth_request asks, does not pass to ezauth")),
    ("        proxy_set_header X-Forwarded-User $ezauth_user;\n",
     "        proxy_set_header X-Forwarded-User $http_x_forwarded_user;\n",
     ("FAIL", "nginx: location / (/etc/nginx/conf.d/site.conf:10) copies a client's own header into X-Forwarded-User")),
    ("        proxy_set_header Cookie $ezauth_app_cookie;\n", "",
     ("WARN", "nginx: location / (/etc/nginx/conf.d/site.conf:10) passes the ezauth session cookie to the app")),
    ("        auth_request /_ezauth_verify;\n", "        auth_request /_ezauth_verify;\n        satisfy any;\n",
     ("WARN", "nginx: location / (/etc/nginx/conf.d/site.conf:10) has `satisfy any`")),
    ("    location = /ezauth/verify { return 404; }\n", "",
     ("FAIL", "nginx: server sd.example.com (/etc/nginx/conf.d/site.conf:3): /ezauth/verify from outside reaches "
              "ezauth through location /ezauth/ (/etc/nginx/conf.d/site.conf:6)")),
    ("    location @ezauth_login", "    location /outputs/ { alias /srv/sd/outputs/; }\n    location @ezauth_login",
     ("FAIL", "nginx: location /outputs/ (/etc/nginx/conf.d/site.conf:9) has no auth_request")),
], ids=["no-auth-request", "auth-request-off", "verify-not-internal", "verify-not-ezauth", "verify-missing",
        "header-copied", "cookie-passed", "satisfy-any", "verify-path-open", "static-files-open"])
def test_each_broken_line_is_found_where_it_is(old, new, expected):
    assert old in SHIPPED_SITE
    found = judged(SHIPPED_SITE.replace(old, new, 1))
    assert [f for f in found if f[0] == expected[0] and f[1].startswith(expected[1])], found


def test_auth_request_at_server_level_is_inherited_and_a_nested_location_keeps_it():
    site = SHIPPED_SITE.replace("        auth_request /_ezauth_verify;\n", "").replace(
        "    listen 80;\n", "    listen 80;\n    auth_request /_ezauth_verify;\n").replace(
        "    location / {\n", "    location / {\n        location /api/ { proxy_pass http://127.0.0.1:7861; }\n")
    found = judged(site)
    assert ("OK", "nginx: location / (/etc/nginx/conf.d/site.conf:11) asks ezauth first (auth_request "
                  "/_ezauth_verify)") in found
    assert ("OK", "nginx: location /api/ (/etc/nginx/conf.d/site.conf:12) asks ezauth first (auth_request "
                  "/_ezauth_verify)") in found


def test_a_location_with_proxy_set_header_lines_of_its_own_inherits_none_of_the_servers():
    headers = ("        proxy_set_header X-Auth-Request-User $ezauth_user;\n"
               "        proxy_set_header X-Forwarded-User $ezauth_user;\n"
               "        proxy_set_header Cookie $ezauth_app_cookie;\n")
    moved = SHIPPED_SITE.replace(headers, "").replace("    listen 80;\n", "    listen 80;\n" + headers)
    assert {level for level, _ in judged(moved)} == {"OK"}  # nothing of its own: the server's lines count
    own = moved.replace("        proxy_pass http://127.0.0.1:7860;\n",
                        "        proxy_pass http://127.0.0.1:7860;\n        proxy_set_header Host $host;\n")
    failures = [text for level, text in judged(own) if level == "FAIL"]
    assert failures == [f"nginx: location / (/etc/nginx/conf.d/site.conf:13) passes a client's own {header} on to "
                        "the app (an outer level sets it, but a level with proxy_set_header lines of its own inherits "
                        f"none): add `proxy_set_header {header} $ezauth_user;`" for header in ezauth.USER_HEADERS]


def test_a_server_without_ezauth_is_named_and_a_redirect_only_server_is_not():
    site = SHIPPED_SITE + (
        "server { listen 8080; server_name other; root /var/www; location / { try_files $uri =404; } }\n"
        "server { listen 80; server_name old; return 301 https://$host$request_uri; }\n")
    warnings = [text for level, text in judged(site) if level == "WARN"]
    assert warnings == ["nginx: server other (/etc/nginx/conf.d/site.conf:18) does not use ezauth: whatever it "
                        "serves is public (fine if that is meant)"]


def test_no_auth_request_anywhere_is_a_fail():
    found = judged("server { listen 80; location / { proxy_pass http://127.0.0.1:7860; } }\n")
    assert ("FAIL", "nginx: no server block has auth_request: nothing is protected") in found


@pytest.mark.parametrize(("uri", "picked"), [
    ("/_ezauth_verify", "= /_ezauth_verify"), ("/static/x.png", "^~ /static/"), ("/a.php", "~ \\.php$"),
    ("/api/v1", "/api/"), ("/api/v1/inner", "/api/v1/inner"), ("/other", "/"),
])
def test_find_location_picks_as_nginx_does(uri, picked):
    site = ("server { location / {} location /api/ { location /api/v1/inner {} } location ^~ /static/ {}\n"
            "location ~ \\.php$ {} location ~* ^/static/.*\\.png$ {} location = /_ezauth_verify {} }")
    config = ezauth.NginxConfig(dump({"nginx.conf": f"http {{ {site} }}"}))
    found = ezauth.find_location(ezauth.server_chains(config)[0], uri)
    assert found is not None and " ".join(found[-1].args) == picked


# -- the README's daily check ------------------------------------------------------------------------

def readme_doctor_units() -> dict[str, str]:
    """The doctor's systemd units as the README writes them: file name -> text."""
    section = (HERE / "README.md").read_text().split("## Check your setup: doctor", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^`/etc/systemd/system/(ezauth-doctor\.\w+)`:\n\n```ini\n(.*?)```", section, re.M | re.S))


def test_the_readme_runs_the_doctor_daily_with_units_systemd_accepts(tmp_path):
    units = readme_doctor_units()
    assert sorted(units) == ["ezauth-doctor.service", "ezauth-doctor.timer"]
    service = units["ezauth-doctor.service"]
    dump = re.search(r"^ExecStartPre=\+/bin/sh -c 'exec /usr/sbin/nginx -T > (\S+)'$", service, re.M)
    command = shlex.split(re.search(r"^ExecStart=(.*)$", service, re.M)[1])
    assert dump and command[:3] == ["/opt/ezauth/.venv/bin/python", "/opt/ezauth/ezauth.py", "doctor"]
    args = ezauth.build_parser().parse_args(command[2:])  # the command line as the README writes it
    assert (args.command, args.nginx_dump) == ("doctor", dump[1])
    analyze = require_tool("systemd-analyze", "EZAUTH_REQUIRE_NGINX", "systemd")
    for name, text in units.items():  # paths filled in for this checkout, as an install would have them
        text = text.replace("/opt/ezauth/.venv/bin/python", sys.executable)
        text = text.replace("/opt/ezauth/ezauth.py", str(EZAUTH)).replace("/opt/ezauth", str(HERE))
        (tmp_path / name).write_text(text)
    done = subprocess.run([analyze, "verify", *(str(tmp_path / name) for name in units)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "ezauth-doctor" not in done.stderr, done.stderr
