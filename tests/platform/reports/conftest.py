"""Fixtures of the report tests: one headless Chromium per test module, to load the HTML pages reports write."""

from __future__ import annotations

import pytest
from helpers.browser import Chromium, chromium_binary


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    assert binary, "Chromium is not installed: `apt-get install chromium` (.ci/run does)"
    chromium = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()
