"""Access rules, in-process: parsing, the first matching rule, the normalised path, reloading, the
forbidden page, and HTTP Basic users under the rules."""

from __future__ import annotations

import logging

import pytest

import ezauth
from tests.support.app import login, verify
from tests.support.basics import (
    PASSWORD,
    basic,
)

SD = "sd.example.com"  # the host the rules below are about


RULES = """\
# admins may go anywhere; friends only to the image generator
group admins: alice
group friends: bob carol
allow @admins * /
deny @friends * /admin
allow @friends sd.example.com /
allow dave *.example.com /public/
"""


@pytest.mark.parametrize("user, host, path, allowed", [
    ("alice", "anything.example", "/admin/x", True),
    ("bob", "sd.example.com", "/", True),
    ("bob", "sd.example.com", "/admin", False),
    ("bob", "notes.example.com", "/", False),
    ("carol", "sd.example.com", "/img", True),
    ("dave", "notes.example.com", "/public/a", True),
    ("dave", "notes.example.com", "/private", False),
    ("dave", "example.com", "/public/a", False),
    ("erin", "sd.example.com", "/", False),  # no rule matches: denied
])
def test_first_matching_rule_decides(user, host, path, allowed):
    assert ezauth.parse_rules(RULES).allows(user, ezauth.Target(host, "80", ""), path) is allowed


@pytest.mark.parametrize("text, line", [
    ("allow * * /\npermit bob * /\n", 2),
    ("allow @nobody * /\n", 1),
    ("allow bob * admin\n", 1),
    ("allow bob\n", 1),
    ("group x: b@d!\n", 1),
])
def test_malformed_rules_name_the_line(text, line):
    with pytest.raises(ValueError, match=f"line {line}:"):
        ezauth.parse_rules(text)


@pytest.mark.parametrize("uri, path", [
    ("/admin", "/admin"), ("/a/../admin?x=/", "/admin"), ("//admin", "/admin"), ("/%61dmin", "/admin"),
    ("/x/..%2Fadmin", "/admin"), ("/x/%252e%252e/admin", "/admin"), ("/./admin/", "/admin/"),
    ("/../../admin", "/admin"), ("http://h/admin?q", "/admin"), ("", "/"),
])
def test_rules_see_the_normalised_path(uri, path):
    assert ezauth.rules_path(uri) == path


def test_without_a_rules_file_every_logged_in_user_gets_everywhere(client):
    login(client, "bob")
    verify(client, 200, uri="/admin", host="notes.example.com")


def test_rules_answer_403_for_a_user_outside_them(settings, make_client):
    (settings.data_dir / "rules").write_text(RULES)
    _, client = make_client()
    login(client, "bob")
    verify(client, 200, uri="/app/?a=1", host=SD)
    verify(client, 403, uri="/admin/users", host=SD)
    verify(client, 403, uri="/x/../admin", host=SD)
    verify(client, 403, uri="/", host="notes.example.com")


def test_rules_are_reloaded_and_a_broken_edit_keeps_the_previous_ones(settings, make_client, clock, caplog):
    rules = settings.data_dir / "rules"
    rules.write_text(RULES)
    _, client = make_client()
    login(client, "bob")
    verify(client, 403, uri="/admin", host=SD)
    rules.write_text("allow bob * /\n")
    clock.now += 1.5
    verify(client, 200, uri="/admin", host=SD)
    rules.write_text("allow bob * /\nallow bob everywhere\n")
    clock.now += 1.5
    with caplog.at_level(logging.ERROR, "ezauth"):
        verify(client, 200, uri="/admin", host=SD)
    assert "event=rules_rejected" in caplog.text and "line 2" in caplog.text
    rules.unlink()
    clock.now += 1.5
    verify(client, 200, uri="/admin", host="other.example")


def test_a_broken_rules_file_at_start_denies_everyone(settings, make_client):
    (settings.data_dir / "rules").write_text("allow everyone\n")
    _, client = make_client()
    login(client)
    verify(client, 403, uri="/", host=SD)


def test_forbidden_page_is_friendly_and_escaped(client):
    page = client.get("/ezauth/forbidden", status=403, headers={"Accept-Language": "zh-CN"})
    assert ezauth.PAGE_TEXT["zh-CN"]["forbidden_text"] in page.text
    assert page.html.find("a", href="/ezauth/logout")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]


def test_basic_users_are_subject_to_the_rules(settings, make_client):
    (settings.data_dir / "rules").write_text("allow alice * /api/\n")
    _, api = make_client(basic_auth=True)
    verify(api, 200, uri="/api/v1/txt2img", host=SD, Authorization=basic("alice", PASSWORD))
    verify(api, 403, uri="/settings", host=SD, Authorization=basic("alice", PASSWORD))
