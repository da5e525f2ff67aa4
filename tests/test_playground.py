"""The playground page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
which .ci/run installs) driven by Selenium, against the front on the tiny weights.

Marked `browser`: `make test-browser` runs it (a step of its own in .ci/run). PLAYGROUND_SCREENSHOT=path
saves a screenshot of the finished page (how docs/playground.png is made)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

from tests.front_server import FrontServer

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def front(tiny_weights):
    with FrontServer(tiny_weights) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("the page never got there")


def field(browser, name: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, f"input-{name}")


def set_value(browser, name: str, value) -> None:
    element = field(browser, name)
    browser.execute_script("arguments[0].value = arguments[1]", element, str(value))


def test_a_prediction_runs_from_the_page_with_progress_and_its_seed(front, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(front.url + "/")
    wait_for(lambda: browser.find_elements(By.ID, "input-prompt"))
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".field label")]
    assert labels[0].startswith("prompt") and any(t.startswith("extra_lora") for t in labels)
    assert field(browser, "hf_api_token").get_attribute("type") == "password"
    assert field(browser, "disable_safety_checker").get_attribute("type") == "checkbox"
    field(browser, "prompt").send_keys("an ascii art lighthouse")
    Select(field(browser, "aspect_ratio")).select_by_value("custom")
    # Long enough (≈ 6 s on 2 cores) for several of coglet's progress webhooks, 0.5 s apart.
    set_value(browser, "width", 1024)
    set_value(browser, "height", 1024)
    set_value(browser, "num_inference_steps", 40)
    set_value(browser, "seed", 1234)
    browser.find_element(By.ID, "run").click()

    seen = set()

    def finished():
        bar = browser.execute_script("const p = document.getElementById('progress'); return [p.value, p.max]")
        seen.add(tuple(float(v) for v in bar))
        return browser.find_elements(By.CSS_SELECTOR, "#outputs img.output")

    (image,) = wait_for(finished, timeout=180)
    assert image.get_attribute("src").startswith("data:image/webp;base64,")
    steps = [value for value, most in seen if most == 40]
    assert any(0 < v < 40 for v in steps), f"the progress bar never showed a step between 0 and 40: {sorted(seen)}"
    seed = browser.find_element(By.CSS_SELECTOR, "#outputs .seed").get_attribute("data-seed")
    assert seed == "1234"
    assert browser.find_element(By.CSS_SELECTOR, "#outputs a[download]").get_attribute("href").startswith("data:")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#history li"))
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(os.environ["PLAYGROUND_SCREENSHOT"])


def test_bad_values_are_shown_where_they_belong(front, browser):
    from selenium.webdriver.common.by import By

    browser.get(front.url + "/")
    wait_for(lambda: browser.find_elements(By.ID, "input-prompt"))
    field(browser, "prompt").send_keys("a cat")
    before = len(requests.get(front.url + "/predictions", timeout=10).json()["results"])
    # a bound the form enforces itself: the browser's own message, nothing sent
    set_value(browser, "num_outputs", 9)
    browser.find_element(By.ID, "run").click()
    message = browser.execute_script("return arguments[0].validationMessage", field(browser, "num_outputs"))
    assert message
    set_value(browser, "num_outputs", 1)
    # one the server refuses: its one line next to the field
    set_value(browser, "image", "file:///etc/passwd")
    browser.find_element(By.ID, "run").click()
    error = wait_for(lambda: browser.find_element(By.ID, "input-image-error").text)
    assert "server paths" in error
    assert len(requests.get(front.url + "/predictions", timeout=10).json()["results"]) == before
