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


@pytest.fixture(scope="module")
def chat_page_url(tiny_run, tiny_chat_run):
    writers = {"chatty": writer_from(tiny_chat_run), "tiny": writer_from(tiny_run)}
    with serving(create_app(ServeConfig(), writers)) as url:
        yield url


def test_chat_mode_for_a_model_with_a_template_keeps_the_conversation(page, chat_page_url):
    url = chat_page_url
    question = "Which genre is 'Letters to the Lamp Room'?"
    greedy = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "chatty", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "system", "content": "You name genres."}, {"role": "user", "content": question}]})
    answer = greedy.json()["choices"][0]["message"]["content"]
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)

    page.goto(url)
    page.get_by_text("2 models ready").wait_for()
    page.select_option("#model", "tiny")
    assert page.locator("#modes").is_hidden()  # no template, no chat
    page.select_option("#model", "chatty")
    page.click("#mode-chat")
    assert page.is_visible("#chat-box") and page.is_hidden("#output") and page.text_content("#generate") == "Send"
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    page.fill("#system", "You name genres.")
    page.fill("#prompt", question)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent === 'done'")
    turns = page.locator("#transcript li")
    assert turns.count() == 2 and turns.nth(0).text_content() == question
    assert turns.nth(1).text_content() == answer and "assistant" in turns.nth(1).get_attribute("class")

    page.fill("#prompt", "Once more?")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#transcript li').length === 4 && "
                           "document.querySelector('#status').textContent === 'done'")
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][2]["content"] == answer and sent[1]["stream"] is True
    page.click("#new-chat")
    assert turns.count() == 0


def test_the_pages_sliders_start_at_the_clis_defaults():
    """The same model and prompt write alike on the page and with `penwright generate`."""
    from html.parser import HTMLParser

    from penwright.config import SampleConfig
    from penwright.serve.app import STATIC

    class Sliders(HTMLParser):
        values: dict = {}

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "input" and attrs.get("type") == "range":
                self.values[attrs["id"]] = float(attrs["value"])

    page = Sliders()
    page.feed((STATIC / "index.html").read_text())
    cli = SampleConfig()
    assert page.values == {"temperature": cli.temperature, "top_p": cli.top_p, "top_k": cli.top_k,
                           "max_tokens": cli.max_new_tokens}
