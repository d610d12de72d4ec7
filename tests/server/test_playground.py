"""The web page at "/", in a real headless Chromium: connect with a key, generate, see progress and the
image (checked in a screenshot), use an uploaded seed image, and see the key's gallery and the server panel.

Needs Debian's ``chromium`` and ``chromium-driver``; without them the test is skipped, unless
``IMAGEWIRE_REQUIRE_BROWSER`` is set (as in CI), where their absence fails it. The browser reaches no
address but the test server: every other request goes to a proxy on a closed loopback port.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from tests.timing import seconds
from tests.wire import API_KEY

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM and DRIVER):
        message = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("IMAGEWIRE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
                 # Nothing leaves this machine: whatever is not loopback goes to a closed port.
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(seconds(60))
    try:
        yield driver
    finally:
        driver.quit()


async def until(check: Callable[[], Any], timeout: float = 120) -> Any:
    """Poll ``check`` (blocking browser calls: in a thread) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds(timeout)
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        assert loop.time() < deadline, "the page did not get there in time"
        await asyncio.sleep(seconds(0.1))


def screenshot_of(driver: Any, element: Any) -> Image.Image:
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    ratio = driver.execute_script("return window.devicePixelRatio") or 1
    box = element.rect
    return shot.crop((int(box["x"] * ratio), int(box["y"] * ratio),
                      int((box["x"] + box["width"]) * ratio), int((box["y"] + box["height"]) * ratio)))


async def test_the_page_generates_shows_progress_and_the_image(server, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By

    def css(selector: str) -> list[Any]:
        return browser.find_elements(By.CSS_SELECTOR, selector)

    await asyncio.to_thread(browser.get, f"http://127.0.0.1:{server.port}/")

    def connect() -> None:
        browser.find_element(By.ID, "api-key").clear()
        browser.find_element(By.ID, "api-key").send_keys(API_KEY)
        browser.find_element(By.ID, "connect").click()

    await asyncio.to_thread(connect)
    await until(lambda: "up" in browser.find_element(By.ID, "connection").get_attribute("class"))
    await until(lambda: browser.find_element(By.ID, "status-ready").text == "yes")
    assert "imagewire:tiny@1" in browser.find_element(By.ID, "status-models").text

    def generate(steps: str) -> None:
        field = browser.find_element(By.ID, "steps")
        field.clear()
        field.send_keys(steps)
        browser.find_element(By.ID, "generate").click()

    await asyncio.to_thread(generate, "30")
    # The card reports the steps while the task runs, then shows the image.
    await until(lambda: any(card.text and "step " in card.find_element(By.CLASS_NAME, "state").text
                            for card in css(".task")))
    await until(lambda: css(".task.done"))
    [result] = await until(lambda: [img for img in css(".task.done img.result")
                                    if browser.execute_script("return arguments[0].naturalWidth", img) > 0])
    picture = await asyncio.to_thread(screenshot_of, browser, result)
    picture.save(tmp_path / "result.png")
    # The tiny model's image is noise: far from the flat placeholder an empty slot shows.
    assert max(ImageStat.Stat(picture).stddev) > 20

    # A seed image chosen in the file picker is uploaded and used for image-to-image.
    seed = tmp_path / "seed.png"
    Image.new("RGB", (256, 256), (20, 120, 200)).save(seed)
    await asyncio.to_thread(lambda: browser.find_element(By.ID, "seed-file").send_keys(str(seed)))
    await until(lambda: browser.find_elements(By.CSS_SELECTOR, "#drop img"))
    await asyncio.to_thread(generate, "4")
    await until(lambda: len(css(".task.done")) == 2)
    # The gallery lists this key's images, newest first.
    await until(lambda: len(css("#gallery img")) >= 3)
    assert not browser.find_element(By.ID, "generate-error").text
