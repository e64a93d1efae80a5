"""The page templates and static assets as files, without a browser: no inline code, nothing off the
origin, the theme script first, and every placeholder supplied in both languages."""

from __future__ import annotations

import re

import ezauth
from tests.support.basics import HERE

TEMPLATE = HERE / "login.html"
STATIC = HERE / "static"


def asset_texts() -> dict[str, str]:
    files = {"login.html": TEMPLATE.read_text()}
    files.update({f"static/{p.name}": p.read_text() for p in sorted(STATIC.iterdir()) if p.is_file()})
    return files


def test_template_has_no_inline_code_or_styles():
    page = TEMPLATE.read_text()
    assert re.search(r"<script(?![^>]*\ssrc=)[^>]*>", page) is None, "inline <script>"
    assert "<style" not in page
    assert re.search(r"\sstyle\s*=", page) is None, "inline style attribute"
    assert re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE) is None, "inline event handler"
    assert re.search(r"javascript:", page, re.IGNORECASE) is None


def test_nothing_points_off_the_origin():
    for name, text in asset_texts().items():
        without_xmlns = re.sub(r'xmlns="http://www\.w3\.org/2000/svg"', "", text)
        assert re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", without_xmlns, re.IGNORECASE) is None, name
        assert "@import" not in text and "@font-face" not in text, name


def test_theme_script_is_synchronous_and_first_in_head():
    head = TEMPLATE.read_text().split("</head>")[0]
    tag = re.search(r'<script src="\$static/theme\.js"\s*>', head)
    assert tag, "theme.js must be a plain (not async/defer) script in <head>"
    assert tag.start() < head.index('rel="stylesheet"'), "theme.js must come before the stylesheet"


# What the code supplies to each page besides the t_ texts, written out here so a change to either
# side (a new placeholder, a value no longer passed) is seen.
LOGIN_FIELDS = {"lang", "title", "subtitle", "slogan", "static", "action", "csrf", "rd", "username", "remember",
                "error", "error_state", "footer", "password_step", "code_step", "pending"}
ACCOUNT_FIELDS = {"lang", "title", "static", "prefix", "action", "csrf", "user", "signed_in", "error", "error_state",
                  "notice", "new_token", "session_rows", "totp", "token_rows"}


def test_every_placeholder_is_supplied_in_both_languages():
    page_text = ezauth.PAGE_TEXT

    def used(template: str) -> set[str]:
        return {m.group(1) or m.group(2) for m in re.finditer(r"\$(?:\{(\w+)\}|(\w+))", template)}

    fragments = "".join(v.template for v in vars(ezauth).values() if isinstance(v, ezauth.string.Template))
    login_page, account_page = used(TEMPLATE.read_text()), used((TEMPLATE.parent / "account.html").read_text())
    t_keys = {lang: {k for k in texts if k.startswith("t_")} for lang, texts in page_text.items()}
    assert set(page_text) == {"en", "zh-CN"}
    assert t_keys["en"] == t_keys["zh-CN"], "both languages need the same t_ keys"
    assert login_page - t_keys["en"] == set(ezauth.PAGE_FIELDS) == LOGIN_FIELDS, "the login page's own values"
    assert account_page - t_keys["en"] == set(ezauth.ACCOUNT_FIELDS) == ACCOUNT_FIELDS, "the account page's own"
    assert t_keys["en"] <= login_page | account_page | used(fragments), "every t_ key is used somewhere"
    assert all(page_text["zh-CN"][k] != page_text["en"][k] for k in t_keys["en"]), "untranslated t_ key"
