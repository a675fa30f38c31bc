"""The web page in a real headless Chromium (Debian's), driven by Playwright: write, watch it stream, stop."""

from __future__ import annotations

import shutil

import httpx
import pytest
from test_serve import SlowWriter, writer_from

from conftest import serving
from penwright.config import ServeConfig
from penwright.serve import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
PROMPT = "The ship"


@pytest.fixture(scope="module")
def page_url(tiny_run):
    slow = writer_from(tiny_run, SlowWriter)
    with serving(create_app(ServeConfig(max_tokens_cap=160), {"tiny": slow})) as url:
        yield url, slow


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is not installed: run `make test`, which installs it (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_type_generate_watch_it_stream_then_stop(page, page_url):
    url, slow = page_url
    greedy = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 160, "temperature": 0},
                        timeout=60).json()
    assert greedy["choices"][0]["finish_reason"] == "length"  # left alone, it would write all 160 tokens

    page.goto(url)
    page.get_by_text("1 model ready").wait_for()
    assert page.locator("#label option").count() == 7  # "any" and the six genres
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "160")
    page.fill("#prompt", PROMPT)
    page.click("#generate")

    continuation = page.locator("#output .continuation")
    page.wait_for_function("document.querySelector('#output .continuation').textContent.length > 10")
    assert page.locator("#output .prompt").text_content() == PROMPT
    assert page.is_enabled("#stop") and page.is_disabled("#generate")
    first = continuation.text_content()
    page.wait_for_function(f"document.querySelector('#output .continuation').textContent.length > {len(first)}")

    page.click("#stop")
    page.get_by_text("stopped").wait_for()
    assert page.is_disabled("#stop") and page.is_enabled("#generate")
    assert slow.closed.wait(5) and not slow.finished  # the server stopped writing too
    written = continuation.text_content()
    assert len(written) > len(first) and greedy["choices"][0]["text"].startswith(written)
    assert page.locator("#history li").count() == 1
    assert page.locator("#history li .prompt").text_content() == PROMPT
