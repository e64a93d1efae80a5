"""Fixtures for the suites that drive Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support.browser import launch_chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser as Chromium


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One headless Debian chromium per test file through Playwright (never a downloaded browser)."""
    with launch_chromium("EZAUTH_REQUIRE_BROWSER") as launched:
        yield launched
