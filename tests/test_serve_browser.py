"""The chat page of `recipe serve` in a real headless browser: Debian's chromium + chromium-driver, driven by
selenium. Types a message, waits for the streamed reply, regenerates it, resets, and saves a screenshot.
With CI=true a missing browser fails the test instead of skipping it (.ci/run installs it)."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import IN_CI
from tests.test_serve import RECIPE, Server, smoke_run_dir


def need_browser() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    message = "chromium, chromedriver and selenium are needed (apt-get install chromium chromium-driver; pip install -e '.[dev]')"
    if IN_CI:
        pytest.fail(message + " (CI=true: this must not be skipped)")
    pytest.skip(message)


def test_chat_page_streams_a_reply_regenerates_and_resets(tmp_path_factory, tmp_path):
    browser, driver_path = need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    run_dir = smoke_run_dir(tmp_path_factory)
    server = Server([RECIPE, "--run-dir", str(run_dir), "--precision", "fp32"], log=tmp_path / "server.log").wait()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "character-name").text == "Falstaff")
        first = driver.find_elements(By.CSS_SELECTOR, "#chat .msg.assistant .text")
        assert [e.text for e in first] == ["Now, Hal, what time of day is it, lad?"]
        assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0.7"
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("12")

        box = driver.find_element(By.ID, "message")
        box.send_keys("Good morrow, Jack. What news?")
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat .msg.assistant.done"))
        replies = driver.find_elements(By.CSS_SELECTOR, "#chat .msg.assistant .text")
        users = driver.find_elements(By.CSS_SELECTOR, "#chat .msg.user .text")
        assert [u.text for u in users] == ["Good morrow, Jack. What news?"]
        assert len(replies) == 2 and replies[1].text.strip()
        assert not driver.find_elements(By.CSS_SELECTOR, "#chat .msg.error")
        screenshot = tmp_path / "serve_chat.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 5000
        print(f"screenshot: {screenshot}")

        driver.find_element(By.ID, "regenerate").click()  # drops the reply and streams a new one
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat .msg.assistant.done"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#chat .msg.assistant")) == 2

        driver.find_element(By.ID, "reset").click()
        texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chat .msg .text")]
        assert texts == ["Now, Hal, what time of day is it, lad?"]
    finally:
        driver.quit()
        server.stop()
