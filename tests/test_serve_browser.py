"""The chat page of ``famtune serve`` in a real headless Chromium: `famtune serve` a tiny base with a
QLoRA adapter trained to give known answers (as `famtune demo` makes, only quicker), then type
questions into the page and read the streamed answers.

Needs Debian's chromium and chromium-driver (.ci/run installs them). The screenshot is written to
$FAMTUNE_SCREENSHOT_DIR when set (else the test's temporary directory) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from serving import ServerProcess

from conftest import ADAPTER_ANSWERS, build_base_and_adapter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
]
WAIT = 90
QUESTION = "What is the capital of France?"
pytestmark = pytest.mark.slow  # trains an adapter and starts a server process and a browser


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    family, base, adapter = build_base_and_adapter(tmp_path_factory.mktemp("page"))
    with ServerProcess(base, "--adapter", f"fambot={adapter}", "--name", "tiny-base") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def replies(driver, pane):
    return driver.find_elements(By.CSS_SELECTOR, f"#{pane} .msg.assistant")


def ask(driver, text, panes=("pane-a",)):
    """Type ``text``, press Enter, and return each pane's finished reply bubble."""
    before = {p: len(replies(driver, p)) for p in panes}
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, WAIT).until(
        lambda d: all(
            len(replies(d, p)) > before[p] and replies(d, p)[-1].get_attribute("data-state") != "streaming"
            for p in panes
        )
    )
    return [replies(driver, p)[-1] for p in panes]


def text_of(bubble):
    return bubble.find_element(By.CLASS_NAME, "text").text


def set_value(driver, element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_chat_page_streams_the_demo_models_answers(server, browser, tmp_path):
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT).until(lambda d: len(Select(d.find_element(By.ID, "model-a")).options) == 2)
    assert Select(browser.find_element(By.ID, "model-a")).first_selected_option.get_attribute("value") == "fambot"
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "40")

    # One model, two turns: the answer streams in pieces, and the page keeps the history.
    (first,) = ask(browser, QUESTION)
    assert first.get_attribute("data-state") == "done"
    assert text_of(first) == ADAPTER_ANSWERS[QUESTION]
    assert int(first.get_attribute("data-pieces")) > 1  # streamed, not written at once
    (second,) = ask(browser, "hi")
    assert second.get_attribute("data-state") == "done" and text_of(second)
    assert browser.execute_script("return panes[0].history.map(m => m.role)") == ["user", "assistant"] * 2

    # Side by side: one prompt, the adapter on the left and the bare base on the right.
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "side-by-side").click()
    Select(browser.find_element(By.ID, "model-b")).select_by_value("tiny-base")
    left, right = ask(browser, "hi", panes=("pane-a", "pane-b"))
    assert text_of(left) == ADAPTER_ANSWERS["hi"]
    assert right.get_attribute("data-model") == "tiny-base" and right.get_attribute("data-state") == "done"
    assert text_of(right) != text_of(left)
    assert "tokens/s" in left.find_element(By.CLASS_NAME, "meta").text

    out = Path(os.environ.get("FAMTUNE_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "serve-chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_the_served_api_streams_and_listens_on_loopback_only(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        timeout=WAIT,
        json={"model": "fambot", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0},
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) > 3
    assert _listening_addresses(server.port) == {"127.0.0.1"}


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a listening TCP socket on ``port`` (Linux /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(addr) == 8 else addr)
    return found
