"""The doctor's single checks and its `nginx -T` reader, called directly on answers and dumps made
here (the doctor through a real nginx is in tests/nginx/test_doctor.py)."""

from __future__ import annotations

from email.message import Message

import pytest

import ezauth


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
        proxy_set_header Remote-User $ezauth_user;
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
               "        proxy_set_header Remote-User $ezauth_user;\n"
               "        proxy_set_header Cookie $ezauth_app_cookie;\n")
    moved = SHIPPED_SITE.replace(headers, "").replace("    listen 80;\n", "    listen 80;\n" + headers)
    assert {level for level, _ in judged(moved)} == {"OK"}  # nothing of its own: the server's lines count
    own = moved.replace("        proxy_pass http://127.0.0.1:7860;\n",
                        "        proxy_pass http://127.0.0.1:7860;\n        proxy_set_header Host $host;\n")
    failures = [text for level, text in judged(own) if level == "FAIL"]
    assert failures == [f"nginx: location / (/etc/nginx/conf.d/site.conf:14) passes a client's own {header} on to "
                        "the app (an outer level sets it, but a level with proxy_set_header lines of its own inherits "
                        f"none): add `proxy_set_header {header} $ezauth_user;`" for header in ezauth.USER_HEADERS]


def test_a_server_without_ezauth_is_named_and_a_redirect_only_server_is_not():
    site = SHIPPED_SITE + (
        "server { listen 8080; server_name other; root /var/www; location / { try_files $uri =404; } }\n"
        "server { listen 80; server_name old; return 301 https://$host$request_uri; }\n")
    warnings = [text for level, text in judged(site) if level == "WARN"]
    assert warnings == ["nginx: server other (/etc/nginx/conf.d/site.conf:19) does not use ezauth: whatever it "
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
