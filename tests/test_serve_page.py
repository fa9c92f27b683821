"""The page at `/` in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium):
a prompt typed and submitted streams text in, and the text is what `gpt-fpga generate` gives for the
page's settings. The screenshot goes to the test's folder; with GPT_FPGA_SCREENSHOT=docs it replaces
docs/serve.png (the one docs/serve.md shows).

Chromium missing: skipped, or failed under CI=true (the suite's missing-tool rule, tests/conftest.py);
`make chromium` installs it.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from conftest import MISSING_TOOL_MARK, REPO, running_server
from test_serve import MODEL_ID, PROMPT, WrappedBackend, generated_text, image, reference  # noqa: F401 - fixtures
from gpt_fpga.host.backends import FixedBackend
from gpt_fpga.host.generate import Sampling
from gpt_fpga.host.serve import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
INSTALL = "apt-get install chromium chromium-driver / make chromium"
TOOLS = (("chromium", CHROMIUM), ("chromedriver (chromium-driver)", CHROMEDRIVER))
pytestmark = [getattr(pytest.mark, MISSING_TOOL_MARK)(what, INSTALL) for what, found in TOOLS if not found]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # headless as root, and no background connections (this machine reaches no other host)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_streams_the_generated_text(browser, image, reference, tmp_path):  # noqa: F811 - fixtures
    from selenium.webdriver.common.by import By

    new_tokens, seed = 40, 7
    backend = WrappedBackend(FixedBackend(image), delay_s=0.05)  # slow enough to see the text grow
    with running_server(create_app(backend, MODEL_ID)) as url:
        browser.get(url + "/")
        field = {name: browser.find_element(By.ID, name) for name in ("prompt", "max_tokens", "seed")}
        for name, value in (("prompt", PROMPT), ("max_tokens", str(new_tokens)), ("seed", str(seed))):
            field[name].clear()
            field[name].send_keys(value)
        browser.find_element(By.ID, "go").click()
        output = browser.find_element(By.ID, "output")
        seen, deadline = [], time.monotonic() + 60
        while not browser.find_element(By.ID, "status").text.startswith("done:"):  # the usage chunk came
            assert time.monotonic() < deadline, f"no end of generation: {browser.find_element(By.ID, 'status').text}"
            seen.append(output.text)
            time.sleep(0.05)
        want, ids = generated_text(reference, reference.codec.encode(PROMPT), new_tokens,
                                   Sampling(0.8, 40, 1.0, seed))  # the page's temperature and top_k
        assert output.text == PROMPT + want
        partial = {t for t in seen if PROMPT in t and len(PROMPT) < len(t) < len(PROMPT + want)}
        assert len(partial) >= 3, f"the text did not stream in: {len(partial)} partial states seen"
        assert browser.find_element(By.ID, "tokens").text == str(len(ids))
        assert float(browser.find_element(By.ID, "rate").text) > 0
        assert "done: 3 prompt + 40 generated tokens" in browser.find_element(By.ID, "status").text
        shot = tmp_path / "serve.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("GPT_FPGA_SCREENSHOT") == "docs":
            shutil.copy(shot, REPO / "docs" / "serve.png")


def test_page_shows_the_servers_error(browser, image):  # noqa: F811 - fixtures
    from selenium.webdriver.common.by import By

    with running_server(create_app(FixedBackend(image), MODEL_ID)) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("1000")
        browser.find_element(By.ID, "go").click()
        deadline = time.monotonic() + 30
        while "400" not in browser.find_element(By.ID, "status").text:
            assert time.monotonic() < deadline, browser.find_element(By.ID, "status").text
            time.sleep(0.05)
        assert "exceeds the model's context of 256 tokens" in browser.find_element(By.ID, "status").text
