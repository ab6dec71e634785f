"""The web page's metadata filter in a real headless Chromium against a live server (the
fixtures of ``test_web_page``: a gallery of five photos labelled with their names)."""

from __future__ import annotations

import pytest
from service_helpers import encode, photo
from test_web_page import browser, server  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_filter_box_restricts_the_neighbours(server, browser, tmp_path):  # noqa: F811
    upload = tmp_path / "chelsea.jpg"
    upload.write_bytes(encode(photo("chelsea", 160)))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.set_input_files("#file", str(upload))
    page.wait_for_function("document.querySelectorAll('#results figure').length >= 5")

    page.fill("#filter", "label=rocket")
    page.dispatch_event("#filter", "change")
    page.wait_for_function("document.querySelectorAll('#results figure').length === 1")
    assert "rocket" in page.locator("#results figcaption").first.inner_text()

    page.fill("#filter", '{"label": ["rocket"]}')  # the server refuses it: the page says why
    page.dispatch_event("#filter", "change")
    page.wait_for_function("document.body.textContent.includes('strings, numbers or booleans')")
    assert not errors, errors
