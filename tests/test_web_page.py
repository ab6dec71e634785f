"""The web page in a real headless Chromium (Debian's package) driven by Playwright, against a live
server: upload an image, see the attention maps and the neighbours, use the gallery and the
threshold slider, add the image to the index, and save screenshots as test artefacts."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from live_server import ROOT, Server
from service_helpers import encode, photo

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTEFACTS = ROOT / "test-artifacts"
GALLERY = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = "Chromium not installed: apt-get install chromium (CI's .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tiny_vit_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    live = Server(tiny_vit_dir, tmp / "data", tmp / "server.log")
    try:
        live.wait_ready()
        files = [("images", (f"{n}.jpg", encode(photo(n, 160)))) for n in GALLERY]
        metadata = "[" + ",".join(f'{{"label": "{n}"}}' for n in GALLERY) + "]"
        added = httpx.post(
            f"{live.url}/items",
            files=files,
            data={"ids": list(GALLERY), "metadata": metadata},
            timeout=60,
        )
        assert added.status_code == 201, added.text
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.mark.slow
def test_upload_shows_attention_maps_and_neighbours(server, browser, tmp_path):
    ARTEFACTS.mkdir(exist_ok=True)
    upload = tmp_path / "chelsea.jpg"
    upload.write_bytes(encode(photo("chelsea", 160)))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model-info').textContent.includes('tiny-vit')")

    page.set_input_files("#file", str(upload))
    # tiny-vit has 3 heads: their mean plus one map per head.
    page.wait_for_function("document.querySelectorAll('#maps canvas').length === 4")
    page.wait_for_function("document.querySelectorAll('#results figure').length === 5")
    captions = page.locator("#results figcaption").all_inner_texts()
    assert "chelsea" in captions[0], captions  # the same photo is its own best match
    assert float(captions[0].split()[0]) > 0.99

    page.locator("#threshold").fill("0.3")
    assert page.locator("#threshold-value").inner_text() == "0.30"
    page.screenshot(path=str(ARTEFACTS / "web-page-desktop.png"), full_page=True)

    page.click("#add")
    page.wait_for_function("document.querySelector('#add-status').textContent.startsWith('added')")
    assert httpx.get(f"{server.url}/index").json()["count"] == len(GALLERY) + 1

    page.click("#gallery-box summary")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length >= 5")
    page.locator("#gallery figure", has_text="rocket").click()
    page.wait_for_function(
        "(() => { const c = document.querySelector('#results figcaption');"
        " return c && !c.textContent.includes(' rocket'); })()"
    )
    assert "rocket" not in page.locator("#results figcaption").first.inner_text()  # itself left out
    assert not errors, errors


@pytest.mark.slow
def test_page_fits_a_phone_screen(server, browser, tmp_path):
    upload = tmp_path / "coffee.jpg"
    upload.write_bytes(encode(photo("coffee", 160)))
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(upload))
    page.wait_for_function("document.querySelectorAll('#results figure').length > 0")
    page.wait_for_function("document.querySelectorAll('#maps canvas').length === 4")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the phone screen"
    page.screenshot(path=str(ARTEFACTS / "web-page-phone.png"), full_page=True)


def test_page_and_assets_are_served(tiny_vit_dir, tmp_path):
    """Without a browser: the page, its script and style come from the API itself."""
    live = Server(tiny_vit_dir, tmp_path / "data", tmp_path / "server.log")
    try:
        live.wait_ready()
        page = httpx.get(live.url + "/")
        assert page.status_code == 200 and "DINO feature service" in page.text
        for asset in ("static/app.js", "static/style.css"):
            assert httpx.get(f"{live.url}/{asset}").status_code == 200
    finally:
        live.stop()


@pytest.mark.slow
def test_duplicate_groups_are_shown(server, browser):
    copy = [("images", ("coffee-copy.jpg", encode(photo("coffee", 160))))]
    added = httpx.post(f"{server.url}/items", files=copy, data={"ids": ["coffee-copy"]})
    assert added.status_code == 201, added.text
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/")
    page.locator("#dup-threshold").fill("0.9999")
    page.click("#dup-find")
    page.wait_for_function("document.querySelector('#dup-status').textContent.includes('groups')")
    groups = [
        {caption.split()[1] for caption in group.locator("figcaption").all_inner_texts()}
        for group in page.locator(".dup-group").all()
    ]
    assert any({"coffee", "coffee-copy"} <= ids for ids in groups), groups
    page.locator("#dup-threshold").fill("2")
    page.click("#dup-find")
    page.wait_for_function("document.querySelector('#dup-status').textContent.startsWith('422')")
    assert not errors, errors
