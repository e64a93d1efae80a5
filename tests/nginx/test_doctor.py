"""`python ezauth.py doctor URL` through a real nginx: the shipped config is all OK, https with a
self-signed certificate made here, and each deliberately broken copy caught as FAIL by the check that
can see it. The doctor runs as a real subprocess; the single checks and the `nginx -T` reader are
called directly in tests/app/test_doctor_checks.py, the command's own errors and the README's
systemd units are in tests/process/test_doctor_cli.py."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.basics import PASSWORD, free_port, require_tool
from tests.support.nginx import TARGET, Stack, build_stack, enable_https, make_certificate, nginx_command
from tests.support.process import findings, run_doctor


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

def test_the_shipped_config_is_all_ok_and_the_app_never_hears_from_the_doctor(shipped):
    url, seen = site_url(shipped), len(shipped.app.seen)
    done = run_doctor(url)
    assert done.returncode == 0 and findings(done, "WARN") == findings(done, "FAIL") == [], done.stdout
    deep, to_login = site_url(shipped, "/app/ezauth-doctor/deep/path?x=1&y=2"), "is sent to the login page (302)"
    assert findings(done) == [
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


def test_with_a_user_it_logs_in_lands_on_the_exact_url_and_logs_out(shipped):
    url, log_before = site_url(shipped), shipped.ezauth.log()
    done = run_doctor(url, "--user", "alice", stdin=f"{PASSWORD}\n")
    assert done.returncode == 0, done.stdout
    assert findings(done)[-4:] == [
        f"OK    logged in as alice: the login page sent the browser back to exactly {url}",
        f"OK    logged in, GET {url} reaches the app (200)",
        "OK    logged in, the app's answer does not show a spoofed X-Auth-Request-User or X-Forwarded-User or "
        "Remote-User (an app that echoes headers would)",
        "OK    logged out (303); the old session cookie no longer gets in",
    ]
    assert PASSWORD not in done.stdout + done.stderr and "eyJ" not in done.stdout + done.stderr  # nor a JWT
    new_log = shipped.ezauth.log()[len(log_before):]
    assert "event=login_ok user=alice" in new_log and "event=logout user=alice" in new_log
    assert shipped.app.seen[-2:] == [TARGET, TARGET]  # the two logged-in requests, and only those


def test_with_the_auth_cache_on_it_is_all_ok_and_logout_is_waited_for(make_stack):
    """The cache says yes to a just-ended session for up to 6 s (documented): the doctor waits that out."""
    stack = make_stack(cache=True)
    done = run_doctor(site_url(stack), "--user", "alice", stdin=f"{PASSWORD}\n")
    assert done.returncode == 0 and findings(done, "WARN") == [], done.stdout
    assert re.fullmatch(r"OK    logged out \(303\); the old session cookie no longer gets in "
                        r"\(after [1-7] s: the auth cache\)", findings(done)[-1]), done.stdout


def test_an_auth_cache_that_outlives_a_logout_is_a_fail(make_stack):
    longer = breaking("        proxy_cache_valid 200 5s;", "        proxy_cache_valid 200 1m;")
    stack = make_stack(cache=True, edit=longer)
    done = run_doctor(site_url(stack), "--user", "alice", stdin=f"{PASSWORD}\n")
    assert findings(done, "FAIL") == ["FAIL  logged out, but the old session cookie still gets in (200): logout does "
                                   "not end the session"]


def test_a_wrong_password_is_a_fail_that_says_so(shipped):
    done = run_doctor(site_url(shipped), "--user", "alice", stdin="wrong password\n")
    assert findings(done, "FAIL") == ["FAIL  --user: the login page refused the password of alice (401)"]
    assert "wrong password" not in done.stdout + done.stderr


def test_the_password_goes_to_no_other_host_than_the_urls_unless_named(make_stack):
    """A login page on another host (here `localhost` for 127.0.0.1) is fine for strangers, but the
    doctor posts the password there only when --login-host names it."""
    stack = make_stack(edit=breaking("        return 302 $ezauth_login;\n",
                                     "        return 302 http://localhost:$server_port$ezauth_login;\n"))
    url = site_url(stack)
    refused = run_doctor(url, "--user", "alice", stdin=f"{PASSWORD}\n")
    assert f"OK    anonymous GET {url} as a browser is sent to the login page on localhost (302)" in findings(refused)
    assert findings(refused, "FAIL") == ["FAIL  --user: the login form posts to localhost, and the doctor sends the "
                                      "password nowhere but 127.0.0.1 (--login-host localhost if it is your "
                                      "login host)"]
    assert "event=login" not in stack.ezauth.log()
    named = run_doctor(url, "--user", "alice", "--login-host", "LocalHost", stdin=f"{PASSWORD}\n")
    assert "event=login_ok user=alice" in stack.ezauth.log()
    assert f"FAIL  logged in as alice, but the login page sent the browser to http://localhost:{stack.nginx.port}" \
           f"{TARGET} instead of {url}: the return target was lost" in findings(named)


def test_the_nginx_dump_of_the_shipped_stack_is_all_ok_and_names_each_location(nginx_bin, shipped, tmp_path):
    dump = nginx_dump(nginx_bin, shipped, tmp_path / "nginx-T.txt")
    done = run_doctor(site_url(shipped), "--nginx-dump", str(dump))
    assert done.returncode == 0 and findings(done, "WARN") == [], done.stdout
    root, verify = conf_line(shipped, "location / {"), conf_line(shipped, "location = /_ezauth_verify {")
    server = conf_line(shipped, "server {")
    assert [line for line in findings(done) if "nginx:" in line] == [
        "OK    nginx: read 2 files of nginx -T, 1 server block",
        f"OK    nginx: server _ ({server}): /ezauth/verify from outside goes to location = /ezauth/verify "
        f"({conf_line(shipped, 'location = /ezauth/verify {')}), not to ezauth",
        f"OK    nginx: location = /_ezauth_verify ({verify}), which auth_request asks, is internal and passes to "
        "ezauth",
        f"OK    nginx: location / ({root}) asks ezauth first (auth_request /_ezauth_verify)",
        f"OK    nginx: location / ({root}) sets X-Auth-Request-User and X-Forwarded-User and Remote-User itself",
        f"OK    nginx: location / ({root}) keeps the ezauth session cookie from the app "
        f"({conf_line(shipped, 'proxy_set_header Cookie $ezauth_app_cookie;')})",
    ]


def test_with_nginx_it_runs_nginx_T_itself_and_a_failing_nginx_is_a_fail(nginx_bin, shipped, tmp_path):
    wrapper = tmp_path / "nginx"  # what `nginx -T` is on the box: the stack's nginx with its own prefix
    prefix = shipped.nginx.prefix
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(nginx_command(nginx_bin, prefix))} "$@"\n')
    wrapper.chmod(0o755)
    done = run_doctor(site_url(shipped), "--nginx", "--nginx-bin", str(wrapper))
    assert done.returncode == 0 and "OK    nginx: read 2 files of nginx -T, 1 server block" in findings(done)
    failing = run_doctor(site_url(shipped), "--nginx", "--nginx-bin", "/bin/false")
    assert findings(failing, "FAIL") == ["FAIL  nginx: `/bin/false -T` failed (no message); run the doctor as root, "
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


def test_over_https_the_cookies_are_secure_and_http_redirects(make_stack, certificate):
    stack, tls_port = https_stack(make_stack, certificate)
    url, cert = f"https://127.0.0.1:{tls_port}{TARGET}", str(certificate[0])
    done = run_doctor(url, "--ca", cert, "--http-port", str(stack.nginx.port), "--user", "alice", stdin=f"{PASSWORD}\n")
    assert done.returncode == 0 and findings(done, "WARN") == [], done.stdout
    assert "OK    over https the login page's cookie __Host-ezauth_csrf is Secure" in findings(done)
    assert "OK    over https the session cookie __Host-ezauth is Secure" in findings(done)
    plain = f"http://127.0.0.1:{stack.nginx.port}{TARGET}"
    assert f"OK    {plain} redirects to https (301 to https://127.0.0.1{TARGET})" in findings(done)
    assert not any(line.startswith("OK    plain http") for line in findings(done))
    wrong = run_doctor(plain)  # the http:// address of an https site
    assert findings(wrong, "FAIL") and all("is redirected to https (301 to https://127.0.0.1" in line
                                        for line in findings(wrong, "FAIL")) and "public" not in wrong.stdout


def test_over_https_an_untrusted_certificate_is_a_fail_and_insecure_a_warn(make_stack, certificate):
    stack, tls_port = https_stack(make_stack, certificate)
    url, http_port = f"https://127.0.0.1:{tls_port}/", str(stack.nginx.port)
    untrusted = run_doctor(url, "--http-port", http_port)
    assert findings(untrusted) == [
        f"FAIL  cannot check {url}: its certificate is not trusted (self-signed certificate). "
        "Fix the certificate, or name your own CA with --ca FILE"]
    insecure = run_doctor(url, "--insecure", "--http-port", http_port)
    assert insecure.returncode == 0 and findings(insecure, "WARN") == [
        "WARN  --insecure: the certificate was not checked; --ca FILE checks it against your own CA"]
    nothing = run_doctor(url, "--ca", str(certificate[0]), "--http-port", str(free_port()))
    assert nothing.returncode == 0 and len(findings(nothing, "WARN")) == 1
    assert findings(nothing, "WARN")[0].startswith("WARN  nothing answers http://127.0.0.1:")


@pytest.mark.parametrize(("edit", "failure"), [
    (breaking("    if ($scheme = http) { return 301 https://$host$request_uri; }\n"),
     "instead of redirecting to https: whatever is typed there crosses the network in clear text"),
    (breaking("        proxy_set_header X-Forwarded-Proto $scheme;\n        # The login form",
              "        # The login form"),
     "over https the login page's cookie ezauth_csrf is not Secure: ezauth does not know the request came over https"),
], ids=["no-http-redirect", "no-forwarded-proto-for-ezauth"])
def test_a_broken_https_copy_is_a_fail(make_stack, certificate, edit, failure):
    stack, tls_port = https_stack(make_stack, certificate, edit)
    done = run_doctor(f"https://127.0.0.1:{tls_port}/", "--ca", str(certificate[0]), "--http-port",
                      str(stack.nginx.port))
    assert len(findings(done, "FAIL")) == 1 and failure in findings(done, "FAIL")[0], done.stdout


# -- deliberately broken copies, each caught by the check that can see it -----------------------------

def test_no_auth_request_in_location_root_is_public_from_outside_and_in_the_config(nginx_bin, make_stack, tmp_path):
    stack = make_stack(edit=breaking("        auth_request /_ezauth_verify;\n"))
    url, deep, root = site_url(stack), site_url(stack, "/app/ezauth-doctor/deep/path?x=1&y=2"), conf_line(
        stack, "location / {")
    dump = nginx_dump(nginx_bin, stack, tmp_path / "nginx-T.txt")
    done = run_doctor(url, "--nginx-dump", str(dump), "--user", "alice",
                  stdin=f"{PASSWORD}\n")
    public = ("was answered by the app (200): your app is public. Check that the location serving it has "
              "auth_request (run the doctor with --nginx on the box)")
    assert findings(done, "FAIL") == [
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
    done = run_doctor(site_url(stack), "--nginx-dump", str(dump))
    expected = re.sub(r"\{([^{}]+ \{)\}", lambda m: conf_line(stack, m[1]), config)
    failures = findings(done, "FAIL")
    assert len(failures) == 2 and failures[0].startswith(outside) and failures[1] == expected, done.stdout


def test_a_user_header_not_cleared_is_a_fail_logged_in_and_in_the_config(nginx_bin, make_stack, tmp_path):
    stack = make_stack(edit=breaking("        proxy_set_header X-Forwarded-User $ezauth_user;\n"))
    dump = nginx_dump(nginx_bin, stack, tmp_path / "nginx-T.txt")
    done = run_doctor(site_url(stack), "--nginx-dump", str(dump), "--user", "alice",
                  stdin=f"{PASSWORD}\n")
    assert findings(done, "FAIL") == [
        "FAIL  logged in, the app got the X-Forwarded-User the client sent (its answer shows it): anyone logged in "
        "can pose as another user. Set it in nginx: `proxy_set_header X-Forwarded-User $ezauth_user;`",
        f"FAIL  nginx: location / ({conf_line(stack, 'location / {')}) passes a client's own X-Forwarded-User on to "
        "the app: add `proxy_set_header X-Forwarded-User $ezauth_user;`",
    ]
    # Anonymous, the same spoofed header still gets nowhere: only the logged-in check can see this.
    assert any(line.startswith(f"OK    GET {site_url(stack)} with X-Auth-Request-User") for line in findings(done))


def test_ezauth_down_is_a_fail_of_its_own_not_a_public_app(make_stack):
    stack = make_stack()
    stack.ezauth.stop()
    done = run_doctor(site_url(stack))
    failures = findings(done, "FAIL")
    assert len(failures) == 4 and all("got 503: nginx cannot reach ezauth" in line for line in failures)
    assert "public" not in done.stdout and stack.app.seen == []

