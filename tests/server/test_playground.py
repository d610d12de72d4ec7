"""The web page at "/", in a real headless Chromium: connect with a key, generate, see progress and the
image (checked in a screenshot), exact seeds that re-run to the same pixels, the tools on a result, a seed
image set and removed, a failed task's message, reconnects after a server restart, dark mode, a phone's
layout and generation from the keyboard alone.

Needs Debian's ``chromium`` and ``chromium-driver``; without them the test is skipped, unless
``IMAGEWIRE_REQUIRE_BROWSER`` is set (as in CI), where their absence fails it. The browser reaches no
address but the test server: every other request goes to a proxy on a closed loopback port.

Screenshots (desktop, phone, dark) are kept in ``IMAGEWIRE_SCREENSHOTS`` when it names a folder, else in
the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from tests.timing import seconds
from tests.wire import API_KEY

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
DESKTOP = (1280, 1000)
PHONE = (390, 844)
# Records every frame the page sends, so that a test can read the requests as the server got them.
RECORD_FRAMES = """
window.sentFrames = [];
const original = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) { window.sentFrames.push(data); return original.call(this, data); };
"""


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
                 f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
                 # Nothing leaves this machine: whatever is not loopback goes to a closed port.
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost"):
        options.add_argument(flag)
    # The console's messages, to check that the page logs no errors.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(seconds(60))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("IMAGEWIRE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def console_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def fetched(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=seconds(30)) as answer:
        return Image.open(io.BytesIO(answer.read())).convert("RGB")


class Page:
    """The playground in the browser, as a user drives it; every call blocks (run it in a thread)."""

    def __init__(self, driver: Any, port: int) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.port, self.by = driver, port, By

    def open(self) -> None:
        self.driver.get(f"http://127.0.0.1:{self.port}/")
        self.driver.execute_script(RECORD_FRAMES)
        self.driver.get_log("browser")   # what earlier pages logged is theirs

    def css(self, selector: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, selector)

    def field(self, element_id: str) -> Any:
        return self.driver.find_element(self.by.ID, element_id)

    def type(self, element_id: str, text: str) -> None:
        field = self.field(element_id)
        field.clear()
        if text:
            field.send_keys(text)

    def connect(self) -> None:
        self.type("api-key", API_KEY)
        self.field("connect").click()

    def connected(self) -> bool:
        return "up" in self.field("connection").get_attribute("class")

    def tasks(self, selector: str = "") -> list[dict[str, Any]]:
        """The requests of one task type the page sent, oldest first."""
        frames = self.driver.execute_script("return window.sentFrames")
        return [task for frame in frames for task in json.loads(frame) if selector in ("", task["taskType"])]

    def raw_frames(self) -> list[str]:
        return self.driver.execute_script("return window.sentFrames")

    def cards(self, selector: str = "") -> list[Any]:
        return self.css(f".task{selector}")

    def loaded_results(self, card: Any) -> list[Any]:
        return [img for img in card.find_elements(self.by.CSS_SELECTOR, "img.result")
                if self.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)]

    def colour(self, selector: str, prop: str) -> str:
        return self.driver.execute_script(
            "return getComputedStyle(document.querySelector(arguments[0]))[arguments[1]]", selector, prop)


async def test_the_page_generates_shows_progress_and_the_image(server, browser, tmp_path: Path, screenshots: Path):
    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    await until(lambda: page.field("status-ready").text == "yes")
    assert "imagewire:tiny@1" in page.field("status-models").text

    # Models: those on the server first, those missing listed off with the server's reason (how to get them),
    # and none the task cannot use (a refiner needs a seed image; an inpainting model a mask).
    def offered() -> dict[str, bool]:
        return {option.get_attribute("value"): option.is_enabled() for option in page.css("#model option")}

    await until(lambda: len(offered()) > 1)
    models = offered()
    assert models["imagewire:tiny@1"] and models["imagewire:tiny-flux@1"]
    assert models["imagewire:sd15@1"] is False
    assert not any("refiner" in air or "inpaint" in air for air in models)
    await asyncio.to_thread(lambda: page.css("#model-notes summary")[0].click())
    notes = page.field("model-notes").text
    assert "Stable Diffusion 1.5: " in notes and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in notes
    assert "why" in notes.lower() and "unavailable" in notes
    # This server downloads nothing (no --allow-downloads): no Download button.
    assert not page.css("#model-notes .model-download")
    await asyncio.to_thread(lambda: page.css("#model-notes summary")[0].click())

    def generate(steps: str, seed: str = "") -> None:
        page.type("steps", steps)
        page.type("seed", seed)
        page.field("generate").click()

    await asyncio.to_thread(generate, "20")
    # The card reports the steps while the task runs, then shows the image.
    await until(lambda: any("step " in card.find_element(page.by.CLASS_NAME, "state").text
                            for card in page.cards()))
    [first] = await until(lambda: page.cards(".done"))
    [result] = await until(lambda: page.loaded_results(first))
    picture = await asyncio.to_thread(screenshot_of, browser, result)
    picture.save(tmp_path / "result.png")
    # The tiny model's image is noise: far from the flat placeholder an empty slot shows.
    assert max(ImageStat.Stat(picture).stddev) > 20
    await asyncio.to_thread(browser.execute_script, "window.scrollTo(0, 0)")
    await asyncio.to_thread(browser.save_screenshot, str(screenshots / "desktop.png"))

    # The seed the page drew is below 2^53, sent as it is shown, and shown as the server answered it.
    [sent] = page.tasks("imageInference")
    seed = first.find_element(page.by.CSS_SELECTOR, ".params .seed").text
    assert seed == str(sent["seed"]) and 0 <= int(seed) < 2**53
    assert result.get_attribute("alt") == f"{sent['positivePrompt']}, seed {seed}"
    assert "imagewire:tiny@1" in first.find_element(page.by.CLASS_NAME, "params").text

    # Re-run sends the same seed and parameters under a new taskUUID: the same pixels again.
    await asyncio.to_thread(lambda: first.find_element(page.by.XPATH, ".//button[text()='Re-run']").click())
    await until(lambda: len(page.cards(".done")) == 2)
    again = page.cards(".done")[0]
    rerun = page.tasks("imageInference")[-1]
    assert {k: v for k, v in rerun.items() if k != "taskUUID"} == {k: v for k, v in sent.items() if k != "taskUUID"}
    assert again.find_element(page.by.CSS_SELECTOR, ".params .seed").text == seed
    urls = [card.find_element(page.by.CSS_SELECTOR, "img.result").get_attribute("src") for card in page.cards(".done")]
    assert urls[0] != urls[1]
    assert ImageChops.difference(*[await asyncio.to_thread(fetched, url) for url in urls]).getbbox() is None

    # A seed past 2^53 (here the largest the protocol allows) goes out and comes back digit for digit.
    largest = "9223372036854775807"
    await asyncio.to_thread(generate, "1", largest)
    await until(lambda: len(page.cards(".done")) == 3)
    assert f'"seed":{largest}' in [frame for frame in page.raw_frames() if "imageInference" in frame][-1]
    assert page.cards(".done")[0].find_element(page.by.CSS_SELECTOR, ".params .seed").text == largest
    # "Edit settings" puts a card's seed and parameters back into the form.
    await asyncio.to_thread(lambda: first.find_element(page.by.XPATH, ".//button[text()='Edit settings']").click())
    assert page.field("seed").get_attribute("value") == seed
    assert page.field("steps").get_attribute("value") == "20"

    # An empty prompt is said beside the field and nothing is sent.
    before = len(page.tasks("imageInference"))
    await asyncio.to_thread(page.type, "prompt", "")
    await asyncio.to_thread(lambda: page.field("generate").click())
    assert "Type a prompt" in page.field("prompt-error").text
    assert page.field("prompt").get_attribute("aria-invalid") == "true"
    assert len(page.tasks("imageInference")) == before and not any("__BLANK__" in f for f in page.raw_frames())
    await asyncio.to_thread(page.type, "prompt", "a red bicycle")

    # A task the server refuses: the card shows the server's message, not only the code.
    await asyncio.to_thread(generate, "0")
    [failed] = await until(lambda: page.cards(".failed"))
    assert failed.find_element(page.by.CLASS_NAME, "state").text
    message = failed.find_element(page.by.CLASS_NAME, "message").text
    assert "steps" in message.lower() and len(message) > 20

    # A result opens full size; its download link points at the image; Esc closes the view.
    await asyncio.to_thread(lambda: first.find_element(page.by.CSS_SELECTOR, "button.view").click())
    await until(lambda: page.field("viewer").get_attribute("open") is not None)
    assert page.field("viewer-image").get_attribute("src") == result.get_attribute("src")
    await until(lambda: browser.execute_script("return document.getElementById('viewer-image').naturalWidth") == 256)
    from selenium.webdriver.common.keys import Keys
    await asyncio.to_thread(lambda: page.field("viewer").send_keys(Keys.ESCAPE))
    await until(lambda: page.field("viewer").get_attribute("open") is None)
    download = first.find_element(page.by.CSS_SELECTOR, "a.download")
    assert download.get_attribute("href") == result.get_attribute("src")
    assert download.get_attribute("download") == f"imagewire-{seed}.png"

    # Tools on a result: upscale (twice the size), remove background, caption (text).
    def tool(name: str) -> None:
        first.find_element(page.by.XPATH, f".//figcaption//button[text()='{name}']").click()

    for name in ("Upscale ×2", "Remove background", "Caption"):
        await asyncio.to_thread(tool, name)
    await until(lambda: len(page.cards(".tool.done")) == 3)
    def tool_card(title: str) -> Any:
        return next(card for card in page.cards(".tool") if card.find_element(page.by.CLASS_NAME, "prompt")
                    .get_attribute("title").startswith(title))

    upscaled = tool_card("Upscale")
    [big] = await until(lambda: page.loaded_results(upscaled))
    assert browser.execute_script("return arguments[0].naturalWidth", big) == 512
    assert [t["inputImage"] for t in page.tasks() if t["taskType"] in
            ("imageUpscale", "imageBackgroundRemoval", "imageCaption")] == [sent_image_uuid(result)] * 3
    caption = tool_card("Caption")
    assert caption.find_element(page.by.CLASS_NAME, "caption-text").text

    # "Use as seed" makes a result the seed image; removing it sends the next task without one.
    await asyncio.to_thread(tool, "Use as seed")
    await until(lambda: page.css("#drop img"))
    await asyncio.to_thread(generate, "2")
    await until(lambda: page.tasks("imageInference")[-1].get("seedImage") == sent_image_uuid(result))
    # With a seed image, a refiner is offered too.
    assert offered()["imagewire:tiny-sdxl-refiner@1"] is True
    await asyncio.to_thread(lambda: page.field("seed-image-remove").click())
    assert not page.css("#drop img")
    assert "imagewire:tiny-sdxl-refiner@1" not in offered()
    await asyncio.to_thread(generate, "2")
    assert "seedImage" not in page.tasks("imageInference")[-1]

    # A seed image chosen in the file picker is uploaded and used for image-to-image.
    seed_file = tmp_path / "seed.png"
    Image.new("RGB", (256, 256), (20, 120, 200)).save(seed_file)
    await asyncio.to_thread(lambda: page.field("seed-file").send_keys(str(seed_file)))
    await until(lambda: page.css("#drop img"))
    await asyncio.to_thread(generate, "4")
    await until(lambda: not page.cards(".running"))
    assert "seedImage" in page.tasks("imageInference")[-1]
    # The gallery lists this key's images, newest first, as buttons with the prompt and seed as their text.
    await until(lambda: len(page.css("#gallery button img")) >= 6)
    alts = [img.get_attribute("alt") for img in page.css("#gallery img")]
    assert f"a lighthouse on a cliff at dawn, soft light, seed {seed}" in alts
    # From the gallery too, an image this page made gives back its settings (after a reload as well).
    await asyncio.to_thread(page.open)
    await until(page.connected)
    await until(lambda: len(page.css("#gallery img")) >= 6)
    # The first image and its re-run: the same seed.
    first_in_gallery, _ = [img for img in page.css("#gallery img") if img.get_attribute("alt").endswith(f"seed {seed}")]
    await asyncio.to_thread(first_in_gallery.click)
    await until(lambda: page.field("viewer").get_attribute("open") is not None)
    assert page.css("#viewer-actions a.download")[0].get_attribute("download") == f"imagewire-{seed}.png"
    await asyncio.to_thread(lambda: page.field("viewer-actions").find_element(
        page.by.XPATH, ".//button[text()='Edit settings']").click())
    assert page.field("seed").get_attribute("value") == seed
    assert page.field("prompt").get_attribute("value") == "a lighthouse on a cliff at dawn, soft light"
    assert console_errors(browser) == []


def sent_image_uuid(img: Any) -> str:
    return img.get_attribute("src").rsplit("/", 1)[1].split(".")[0]


async def test_a_restarted_server_is_found_again_without_a_click(start_server, browser):
    server = await start_server()
    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    await until(lambda: page.field("status-ready").text == "yes")

    # A dropped socket: the page reconnects into its session, and a task that ran meanwhile still finishes.
    await asyncio.to_thread(page.type, "steps", "40")
    await asyncio.to_thread(lambda: page.field("generate").click())
    await until(lambda: "step " in page.cards()[0].find_element(page.by.CLASS_NAME, "state").text)
    await asyncio.to_thread(browser.execute_script, "socket.close()")
    await until(lambda: page.cards(".done"))
    assert not page.cards(".failed")
    auths = page.tasks("authentication")
    assert len(auths) == 2 and auths[1]["connectionSessionUUID"]

    # A task running when the server stops is marked failed with a message, not left spinning.
    await asyncio.to_thread(page.type, "steps", "100")
    await asyncio.to_thread(lambda: page.field("generate").click())
    await until(lambda: "step " in page.cards()[0].find_element(page.by.CLASS_NAME, "state").text)
    await server.stop(grace=seconds(0.2))
    # Down: the header says so, Generate is off, and the server panel no longer claims the server is ready.
    await until(lambda: "reconnecting" in page.field("connection-text").text)
    assert not page.field("generate").is_enabled()
    assert page.field("status-ready").text == "unreachable"

    restarted = await start_server(port=server.port)
    loop = asyncio.get_running_loop()
    listening = loop.time()
    [lost] = await until(lambda: page.cards(".failed"))
    assert lost.find_element(page.by.CLASS_NAME, "message").text
    await until(page.connected, timeout=10)
    assert loop.time() - listening < seconds(10)
    assert page.field("generate").is_enabled()
    await until(lambda: page.field("status-ready").text == "yes")
    # The page works as before: a task goes out on the new socket and its image comes back.
    await asyncio.to_thread(page.type, "steps", "2")
    await asyncio.to_thread(lambda: page.field("generate").click())
    await until(lambda: len(page.cards(".done")) == 2 and not page.cards(".running"))
    # The only errors in the console are the browser's own notes of refused connections while the server was
    # away, a few of them (the page backs off), and none of the status panel's.
    errors = console_errors(browser)
    assert all("WebSocket connection" in error for error in errors), errors
    assert len(errors) <= 8, errors
    assert restarted.port == server.port


UNLABELLED = """
return [...document.querySelectorAll("input, select, textarea, button")]
  .filter((el) => el.type !== "hidden" && !el.hidden && el.offsetParent !== null)
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
                  && !el.getAttribute("aria-labelledby") && !el.textContent.trim())
  .map((el) => el.outerHTML);
"""


def luminance(css_colour: str) -> float:
    red, green, blue = (float(part) for part in css_colour.split("(")[1].rstrip(")").split(",")[:3])
    return 0.2126 * red + 0.7152 * green + 0.0722 * blue


async def test_keyboard_only_generation_dark_mode_and_a_phone(server, browser, screenshots: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    assert await asyncio.to_thread(browser.execute_script, UNLABELLED) == []

    def press(*keys: str) -> None:
        ActionChains(browser).send_keys(*keys).perform()

    def chord(modifier: str, key: str) -> None:
        ActionChains(browser).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def focused() -> Any:
        return browser.switch_to.active_element

    def tab_to(matches: Callable[[Any], bool], most: int = 60) -> Any:
        for _ in range(most):
            press(Keys.TAB)
            if matches(focused()):
                return focused()
        raise AssertionError("Tab never reached it")

    # The key field is the first stop; Enter there connects.
    key_field = await asyncio.to_thread(tab_to, lambda el: el.get_attribute("id") == "api-key")
    # Focus is visible: a solid outline on the field Tab reached.
    assert browser.execute_script("return getComputedStyle(arguments[0]).outlineStyle", key_field) == "solid"
    await asyncio.to_thread(press, API_KEY, Keys.ENTER)
    await until(page.connected)

    await asyncio.to_thread(tab_to, lambda el: el.get_attribute("id") == "prompt")
    await asyncio.to_thread(chord, Keys.CONTROL, "a")
    await asyncio.to_thread(press, "a quiet harbour at night")
    await asyncio.to_thread(tab_to, lambda el: el.get_attribute("id") == "steps")
    await asyncio.to_thread(press, "3")
    # Ctrl+Enter generates from wherever the focus is.
    await asyncio.to_thread(chord, Keys.CONTROL, Keys.ENTER)
    [card] = await until(lambda: page.cards(".done"))
    assert page.tasks("imageInference")[-1]["positivePrompt"] == "a quiet harbour at night"
    # The live region said so, for a screen reader.
    assert page.field("announce").text or browser.execute_script(
        "return document.getElementById('announce').textContent") == "Done: 1 image."
    # The result is reachable by Tab; Enter opens it full size; Esc closes it.
    view = await asyncio.to_thread(tab_to, lambda el: "view" in (el.get_attribute("class") or "").split())
    assert view.find_element(page.by.TAG_NAME, "img").get_attribute("alt") == \
        f"a quiet harbour at night, seed {page.tasks('imageInference')[-1]['seed']}"
    await asyncio.to_thread(press, Keys.ENTER)
    await until(lambda: page.field("viewer").get_attribute("open") is not None)
    await asyncio.to_thread(press, Keys.ESCAPE)
    await until(lambda: page.field("viewer").get_attribute("open") is None)
    # Gallery images are buttons with the prompt as their text, so they are reachable and named too.
    gallery = await asyncio.to_thread(tab_to, lambda el: el.get_attribute("title") == "view"
                                      and el.find_element(page.by.XPATH, "..").get_attribute("id") == "gallery")
    assert "a quiet harbour at night" in gallery.find_element(page.by.TAG_NAME, "img").get_attribute("alt")

    # Esc cancels the running task.
    await asyncio.to_thread(tab_to, lambda el: el.get_attribute("id") == "steps")
    await asyncio.to_thread(chord, Keys.CONTROL, "a")
    await asyncio.to_thread(press, "100")
    await asyncio.to_thread(chord, Keys.CONTROL, Keys.ENTER)
    await until(lambda: "step " in page.cards()[0].find_element(page.by.CLASS_NAME, "state").text)
    await asyncio.to_thread(press, Keys.ESCAPE)
    [cancelled] = await until(lambda: page.cards(".failed"))
    assert cancelled.find_element(page.by.CLASS_NAME, "state").text == "taskCancelled"
    assert "cancelled" in cancelled.find_element(page.by.CLASS_NAME, "message").text
    assert not cancelled.find_elements(page.by.CSS_SELECTOR, "img")
    assert page.tasks("cancelTask")[-1]["taskUUID"] == page.tasks("imageInference")[-1]["taskUUID"]
    assert console_errors(browser) == []

    # Dark mode follows the system's preference: a dark page with light text, not the light page's colours.
    light = (page.colour("body", "backgroundColor"), page.colour("body", "color"), page.colour(".task", "borderColor"))
    await asyncio.to_thread(browser.execute_cdp_cmd, "Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        dark = (page.colour("body", "backgroundColor"), page.colour("body", "color"),
                page.colour(".task", "borderColor"))
        assert all(a != b for a, b in zip(light, dark, strict=True)), (light, dark)
        assert luminance(dark[0]) < 40 < 200 < luminance(dark[1])
        assert luminance(page.colour("#prompt", "backgroundColor")) < 60
        await asyncio.to_thread(browser.save_screenshot, str(screenshots / "dark.png"))
    finally:
        await asyncio.to_thread(browser.execute_cdp_cmd, "Emulation.setEmulatedMedia", {"features": []})

    # On a phone the running task's card is on screen once Generate is pressed, above the server panel.
    await asyncio.to_thread(browser.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride",
                            {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True})
    try:
        await asyncio.to_thread(page.type, "steps", "20")
        await asyncio.to_thread(lambda: page.field("generate").click())
        await until(lambda: len(page.cards()) == 3)
        running = page.cards()[0]
        box = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                     "return [r.top, r.bottom, innerHeight, innerWidth]", running)
        assert 0 <= box[0] and box[0] + 100 < box[2] and box[3] == PHONE[0], box
        assert running.rect["y"] < page.field("status").rect["y"]
        await asyncio.to_thread(browser.save_screenshot, str(screenshots / "phone.png"))
        await until(lambda: len(page.cards(".done")) == 2)
    finally:
        await asyncio.to_thread(browser.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})


# A paste of a small PNG drawn in the page, as a paste from the clipboard delivers it.
PASTE_PICTURE = """
const canvas = document.createElement("canvas");
canvas.width = canvas.height = 64;
canvas.getContext("2d").fillRect(8, 8, 48, 48);
canvas.toBlob((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "pasted.png", {type: "image/png"}));
  document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true}));
}, "image/png");
"""


def data_uri_image(uri: str) -> Image.Image:
    import base64

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


async def test_a_painted_mask_is_sent_and_only_its_inside_changes(server, browser, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains

    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    # A seed image with structure: a gradient with a disc, so that "unchanged" means something.
    seed_file = tmp_path / "seed.png"
    from PIL import ImageDraw
    seed_image = Image.linear_gradient("L").resize((256, 256)).convert("RGB")
    ImageDraw.Draw(seed_image).ellipse((40, 40, 216, 216), fill=(30, 140, 90))
    seed_image.save(seed_file)
    await asyncio.to_thread(lambda: page.field("seed-file").send_keys(str(seed_file)))
    await until(lambda: page.css("#drop img"))
    canvas = await until(lambda: page.field("mask-canvas") if page.field("mask-canvas").get_attribute("width") == "256"
                         else None)
    assert not page.field("mask-editor").get_attribute("hidden")
    assert "imagewire:tiny-inpaint@1" not in {o.get_attribute("value") for o in page.css("#model option")}

    def paint() -> None:
        # A horizontal stroke across the middle of the picture (offsets from the canvas's centre).
        width = canvas.rect["width"]
        ActionChains(browser).move_to_element_with_offset(canvas, int(-width * 0.3), 0).click_and_hold() \
            .move_by_offset(int(width * 0.2), 0).move_by_offset(int(width * 0.2), 0) \
            .move_by_offset(int(width * 0.2), 0).release().perform()

    await asyncio.to_thread(paint)
    # Once painted, inpainting models are offered too.
    await until(lambda: "imagewire:tiny-inpaint@1" in {o.get_attribute("value") for o in page.css("#model option")})
    await asyncio.to_thread(page.type, "steps", "4")
    await asyncio.to_thread(page.type, "seed", "1234")
    await asyncio.to_thread(lambda: page.field("generate").click())
    [card] = await until(lambda: page.cards(".done"))
    sent = page.tasks("imageInference")[-1]
    assert sent["seed"] == 1234 and sent["seedImage"]
    mask = data_uri_image(sent["maskImage"]).convert("L")
    assert mask.size == (256, 256)
    painted = mask.point(lambda value: 255 if value > 127 else 0)
    box = painted.getbbox()
    # The stroke: across the middle from 20% to 80% of the width, widened by the brush's radius, a brush's
    # width high (32 screen pixels on a canvas shown larger than its 256); the rest black.
    assert box is not None and 30 < box[0] < 60 and 195 < box[2] < 230 and 100 < box[1] < box[3] < 160, box
    assert 15 < box[3] - box[1] < 40, box
    assert [count for count in mask.histogram() if count] == [mask.histogram()[0], mask.histogram()[255]]
    [result_img] = await until(lambda: page.loaded_results(card))
    result = await asyncio.to_thread(fetched, result_img.get_attribute("src"))
    assert result.size == (256, 256)
    difference = ImageChops.difference(result, seed_image).convert("L").point(lambda value: 255 if value else 0)
    # Outside the painted stroke the result is the seed image, pixel for pixel; inside, it was repainted.
    outside = ImageChops.multiply(difference, ImageChops.invert(painted))
    assert outside.getbbox() is None
    inside = ImageStat.Stat(difference, mask=painted).mean[0] / 255
    assert inside > 0.5, inside
    assert "inpainting" in card.find_element(page.by.CLASS_NAME, "params").text

    # The eraser takes paint away; Clear takes it all, and the next task goes without a mask.
    await asyncio.to_thread(lambda: page.field("mask-eraser").click())
    await asyncio.to_thread(paint)
    await asyncio.to_thread(lambda: page.field("mask-brush").click())
    assert browser.execute_script("return maskAsDataURI()") is None
    await asyncio.to_thread(paint)
    assert browser.execute_script("return maskAsDataURI()") is not None
    await asyncio.to_thread(lambda: page.field("mask-clear").click())
    await asyncio.to_thread(page.type, "seed", "1234")
    await asyncio.to_thread(lambda: page.field("generate").click())
    await until(lambda: len(page.cards(".done")) == 2)
    assert "maskImage" not in page.tasks("imageInference")[-1] and page.tasks("imageInference")[-1]["seedImage"]

    # Re-run of the inpainting card sends the same mask again; Edit settings paints it back.
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Re-run']").click())
    await until(lambda: len(page.cards(".done")) == 3)
    assert page.tasks("imageInference")[-1]["maskImage"] == sent["maskImage"]
    rerun = await until(lambda: page.loaded_results(page.cards(".done")[0]))
    again = await asyncio.to_thread(fetched, rerun[0].get_attribute("src"))
    assert ImageChops.difference(again, result).getbbox() is None
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Edit settings']").click())
    await until(lambda: browser.execute_script("return maskAsDataURI()") is not None)
    restored = data_uri_image(browser.execute_script("return maskAsDataURI()")).convert("L")
    assert ImageChops.difference(restored, mask).getbbox() is None
    assert console_errors(browser) == []


async def test_sampler_lora_controlnet_and_prompt_enhance(server, browser, tmp_path: Path):
    from selenium.webdriver.support.ui import Select

    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    await until(lambda: len(page.css("#model option")) > 1 and len(page.css("#controlnet-model option")) >= 1)

    # Prompt enhance: three versions to choose from; the chosen one becomes the prompt.
    await asyncio.to_thread(page.type, "prompt", "a cat")
    await asyncio.to_thread(lambda: page.field("enhance").click())
    versions = await until(lambda: page.css("#enhanced button") if page.field("enhanced").is_displayed() else None)
    assert len(versions) == 3
    [enhance] = page.tasks("promptEnhance")
    assert enhance["prompt"] == "a cat" and enhance["promptVersions"] == 3
    chosen = versions[1].text
    assert chosen.startswith("a cat") and len(chosen) > len("a cat")
    await asyncio.to_thread(versions[1].click)
    assert page.field("prompt").get_attribute("value") == chosen

    # Sampler, a LoRA with its weight, and a ControlNet on a guide image pre-processed to canny edges.
    await asyncio.to_thread(lambda: page.css("#advanced summary")[0].click())
    await asyncio.to_thread(lambda: Select(page.field("scheduler")).select_by_visible_text("DPM++ 2M Karras"))
    await asyncio.to_thread(lambda: page.field("lora-add").click())
    await asyncio.to_thread(lambda: Select(page.css(".lora-model")[0]).select_by_value("imagewire:tiny-lora@1"))
    weight = page.css(".lora-weight")[0]
    await asyncio.to_thread(lambda: (weight.clear(), weight.send_keys("0.7")))
    guide_file = tmp_path / "guide.png"
    from PIL import ImageDraw
    guide = Image.new("RGB", (256, 256), "black")
    ImageDraw.Draw(guide).rectangle((64, 64, 192, 192), outline="white", width=6)
    guide.save(guide_file)
    await asyncio.to_thread(lambda: page.field("guide-file").send_keys(str(guide_file)))
    await until(lambda: page.field("guide-settings").is_displayed())
    # Every control shown now, the advanced ones included, has a name.
    assert await asyncio.to_thread(browser.execute_script, UNLABELLED) == []
    await asyncio.to_thread(lambda: Select(page.field("preprocessor")).select_by_value("canny"))
    # The pre-processed guide can be seen first: the square's edges, white on black.
    await asyncio.to_thread(lambda: page.field("guide-preprocess").click())
    await until(lambda: browser.execute_script(
        "const i = document.getElementById('guide-processed'); return !i.hidden && i.complete && i.naturalWidth"))
    [preprocess] = page.tasks("imageControlNetPreProcess")
    assert preprocess["preProcessorType"] == "canny"
    edges = await asyncio.to_thread(fetched, page.field("guide-processed").get_attribute("src"))
    assert edges.convert("L").getbbox() is not None and edges.convert("L").getpixel((128, 128)) == 0
    await asyncio.to_thread(page.type, "steps", "3")
    await asyncio.to_thread(lambda: page.field("generate").click())
    [card] = await until(lambda: page.cards(".done"))
    sent = page.tasks("imageInference")[-1]
    assert sent["scheduler"] == "DPM++ 2M Karras"
    assert sent["lora"] == [{"model": "imagewire:tiny-lora@1", "weight": 0.7}]
    [unit] = sent["controlNet"]
    assert unit["model"] == "imagewire:tiny-controlnet@1" and unit["preprocessor"] == "canny" and unit["weight"] == 1
    upload = page.tasks("imageUpload")[-1]
    assert upload["image"].startswith("data:image/png;base64,")
    assert unit["guideImage"] in page.field("guide-preview").get_attribute("src")
    params = card.find_element(page.by.CLASS_NAME, "params").text
    assert "DPM++ 2M Karras" in params and "imagewire:tiny-lora@1 × 0.7" in params and "canny" in params

    # Edit settings after a change puts them all back.
    await asyncio.to_thread(lambda: page.field("guide-remove").click())
    await asyncio.to_thread(lambda: page.css(".lora-row button")[0].click())
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Edit settings']").click())
    assert Select(page.field("scheduler")).first_selected_option.text == "DPM++ 2M Karras"
    assert page.css(".lora-weight")[0].get_attribute("value") == "0.7"
    assert page.field("guide-settings").is_displayed()
    assert Select(page.field("preprocessor")).first_selected_option.get_attribute("value") == "canny"

    # A flow-matching model offers its own samplers, and no LoRA of another architecture.
    await asyncio.to_thread(lambda: Select(page.field("model")).select_by_value("imagewire:tiny-flux@1"))
    samplers = [option.text for option in page.css("#scheduler option")]
    assert "FlowMatch Euler" in samplers and "DPM++ 2M Karras" not in samplers
    assert not page.field("lora-add").is_enabled() and page.field("lora-none").is_displayed()
    assert console_errors(browser) == []


async def test_embeddings_vae_clip_skip_weighting_and_refiner_reach_the_request(server, browser):
    from selenium.webdriver.support.ui import Select

    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    await until(lambda: page.field("embedding-add").is_enabled() and len(page.css("#vae option")) > 1)
    await asyncio.to_thread(lambda: page.css("#advanced summary")[0].click())

    async def generate() -> tuple[dict[str, Any], Image.Image]:
        done = len(page.cards(".done"))
        await asyncio.to_thread(lambda: page.field("generate").click())
        await until(lambda: len(page.cards(".done")) > done)
        card = page.cards(".done")[0]
        [img] = await until(lambda: page.loaded_results(card))
        return page.tasks("imageInference")[-1], await asyncio.to_thread(fetched, img.get_attribute("src"))

    await asyncio.to_thread(page.type, "prompt", "a red fox in the snow")
    await asyncio.to_thread(page.type, "steps", "3")
    await asyncio.to_thread(page.type, "seed", "4242")
    plain_request, plain = await generate()
    assert not {"embeddings", "vae", "clipSkip", "promptWeighting", "refiner"} & plain_request.keys()

    # CLIP skip alone, at the same seed, makes another image.
    await asyncio.to_thread(lambda: Select(page.field("clip-skip")).select_by_value("1"))
    sent, skipped = await generate()
    assert sent["clipSkip"] == 1
    assert ImageChops.difference(plain, skipped).getbbox() is not None

    # An embedding with its weight and its token written into the prompt, a VAE and a prompt syntax.
    await asyncio.to_thread(lambda: Select(page.field("clip-skip")).select_by_value(""))
    await asyncio.to_thread(lambda: page.field("embedding-add").click())
    await asyncio.to_thread(
        lambda: Select(page.css(".embedding-model")[0]).select_by_value("imagewire:tiny-embedding@1"))
    weight = page.css(".embedding-weight")[0]
    await asyncio.to_thread(lambda: (weight.clear(), weight.send_keys("0.5")))
    assert "<tiny-embedding>" in page.css(".embedding-row .token")[0].text
    await asyncio.to_thread(lambda: page.css(".embedding-row .token button")[0].click())
    assert page.field("prompt").get_attribute("value") == "a red fox in the snow <tiny-embedding>"
    await asyncio.to_thread(lambda: Select(page.field("vae")).select_by_value("imagewire:tiny-vae@1"))
    await asyncio.to_thread(lambda: Select(page.field("prompt-weighting")).select_by_value("sdEmbeds"))
    assert "(cat:1.5)" in page.field("prompt-weighting-hint").text
    # The new controls have names (the results' image buttons are named by their pictures' text).
    unlabelled_advanced = UNLABELLED.replace("document.querySelectorAll",
                                             "document.getElementById('advanced').querySelectorAll")
    assert await asyncio.to_thread(browser.execute_script, unlabelled_advanced) == []
    sent, _ = await generate()
    assert sent["embeddings"] == [{"model": "imagewire:tiny-embedding@1", "weight": 0.5}]
    assert sent["vae"] == "imagewire:tiny-vae@1" and sent["promptWeighting"] == "sdEmbeds"
    assert "clipSkip" not in sent and sent["positivePrompt"].endswith("<tiny-embedding>")
    card = page.cards(".done")[0]
    params = card.find_element(page.by.CLASS_NAME, "params").text
    assert "embedding imagewire:tiny-embedding@1 × 0.5" in params and "VAE imagewire:tiny-vae@1" in params

    # Edit settings puts them back after a change; Re-run sends them again.
    await asyncio.to_thread(lambda: page.css(".embedding-row button")[0].click())
    await asyncio.to_thread(lambda: Select(page.field("vae")).select_by_value(""))
    await asyncio.to_thread(lambda: Select(page.field("prompt-weighting")).select_by_value(""))
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Edit settings']").click())
    assert Select(page.css(".embedding-model")[0]).first_selected_option.get_attribute("value") == \
        "imagewire:tiny-embedding@1"
    assert page.css(".embedding-weight")[0].get_attribute("value") == "0.5"
    assert Select(page.field("vae")).first_selected_option.get_attribute("value") == "imagewire:tiny-vae@1"
    assert Select(page.field("prompt-weighting")).first_selected_option.get_attribute("value") == "sdEmbeds"
    count = len(page.tasks("imageInference"))
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Re-run']").click())
    await until(lambda: len(page.tasks("imageInference")) > count)
    rerun = page.tasks("imageInference")[-1]
    assert {key: rerun[key] for key in ("embeddings", "vae", "promptWeighting", "seed")} == \
        {key: sent[key] for key in ("embeddings", "vae", "promptWeighting", "seed")}
    await until(lambda: not page.cards(".running"))

    # A refiner is offered for the model it refines, from a step or a percentage of the steps.
    assert not page.field("refiner-settings").is_displayed()
    await asyncio.to_thread(lambda: Select(page.field("model")).select_by_value("imagewire:tiny-sdxl@1"))
    await until(lambda: page.field("refiner-settings").is_displayed())
    await asyncio.to_thread(lambda: Select(page.field("refiner")).select_by_value("imagewire:tiny-sdxl-refiner@1"))
    await asyncio.to_thread(lambda: Select(page.field("refiner-start-unit")).select_by_value("step"))
    await asyncio.to_thread(page.type, "refiner-start", "2")
    await asyncio.to_thread(lambda: page.css(".embedding-row button")[0].click())
    await asyncio.to_thread(lambda: Select(page.field("vae")).select_by_value(""))
    await asyncio.to_thread(lambda: Select(page.field("clip-skip")).select_by_value("2"))
    sent, _ = await generate()
    assert sent["model"] == "imagewire:tiny-sdxl@1" and sent["clipSkip"] == 2
    assert sent["refiner"] == {"model": "imagewire:tiny-sdxl-refiner@1", "startStep": 2}
    card = page.cards(".done")[0]
    assert "refiner imagewire:tiny-sdxl-refiner@1 from step 2" in card.find_element(page.by.CLASS_NAME, "params").text
    await asyncio.to_thread(lambda: Select(page.field("refiner")).select_by_value(""))
    await asyncio.to_thread(lambda: card.find_element(page.by.XPATH, ".//button[text()='Edit settings']").click())
    assert Select(page.field("refiner")).first_selected_option.get_attribute("value") == "imagewire:tiny-sdxl-refiner@1"
    assert Select(page.field("refiner-start-unit")).first_selected_option.get_attribute("value") == "step"
    assert page.field("refiner-start").get_attribute("value") == "2"
    assert Select(page.field("clip-skip")).first_selected_option.get_attribute("value") == "2"

    # FLUX reads prompts with T5 too: none of these is offered, and none is sent.
    await asyncio.to_thread(lambda: Select(page.field("model")).select_by_value("imagewire:tiny-flux@1"))
    assert not page.field("text-add-ons").is_displayed() and not page.field("refiner-settings").is_displayed()
    assert console_errors(browser) == []


async def test_a_missing_model_downloads_with_a_progress_bar_and_joins_the_list(start_server, hub, hub_catalog,
                                                                                 browser, screenshots: Path):
    from tests.fake_hub import HUB_MODEL

    server = await start_server(allow_downloads=True, catalog_files=(hub_catalog,))
    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    option = f'#model option[value="{HUB_MODEL}"]'
    assert await until(lambda: browser.execute_script(
        "const option = document.querySelector(arguments[0]); return option && option.disabled", option))
    await asyncio.to_thread(lambda: page.css("#model-notes summary")[0].click())
    control = f'#model-notes .model-download[data-air="{HUB_MODEL}"]'
    # The list is drawn again whenever the models' answer comes: the page is read in one script each time, so
    # that no element read is one already replaced.
    read_control = """
        const control = document.querySelector(arguments[0]);
        if (!control) return null;
        return {label: control.querySelector("button").getAttribute("aria-label"),
                percent: Number(control.querySelector(".bar").getAttribute("aria-valuenow")),
                state: control.querySelector(".download-state").textContent};
    """
    # Every hub model missing from the cache has its own button on this server; this one's hub is the test's.
    first = await until(lambda: browser.execute_script(read_control, control))
    assert first == {"label": "Download tiny, from the hub", "percent": 0, "state": ""}

    def click_download() -> bool:
        from selenium.common.exceptions import StaleElementReferenceException

        try:
            page.css(f"{control} button")[0].click()
        except StaleElementReferenceException:  # drawn again between finding and clicking: find it again
            return False
        return True

    await until(click_download)
    seen: list[int] = []

    def finished() -> bool:
        now = browser.execute_script(read_control, control)
        seen.append(now["percent"])
        return now["percent"] == 100 and now["state"].startswith("ready")

    await until(finished)
    assert seen == sorted(seen)
    [sent] = page.tasks("modelDownload")
    assert sent["model"] == HUB_MODEL
    # The model is on the server now: the list offers it, and the notes say so beside its full bar.
    await until(lambda: browser.execute_script(
        "const option = document.querySelector(arguments[0]); return option && !option.disabled", option))
    assert "downloaded, now in the list above" in page.field("model-notes").text
    await asyncio.to_thread(browser.save_screenshot, str(screenshots / "model-download.png"))
    assert console_errors(browser) == []


async def test_the_gallery_shows_older_images_on_request(server, browser):
    import base64

    from tests.wire import Wire

    # 60 images of this key, uploaded by another client of the same key: more than one page of the gallery.
    wire = await Wire.open(server.url)
    uploaded = []
    for shade in range(60):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (shade * 4, 90, 160)).save(buffer, "PNG")
        [item] = await wire.run({"taskType": "imageUpload",
                                 "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
        uploaded.append(item["imageUUID"])
    await wire.close()
    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(lambda: len(page.css("#gallery img")) == 48)
    newest = [sent_image_uuid(img) for img in page.css("#gallery img")]
    assert newest == uploaded[::-1][:48]
    await asyncio.to_thread(lambda: page.field("gallery-more").click())
    await until(lambda: len(page.css("#gallery img")) == 60)
    assert [sent_image_uuid(img) for img in page.css("#gallery img")] == uploaded[::-1]
    assert not page.field("gallery-more").is_displayed()


async def test_outpainting_by_dragging_an_edge_keeps_the_seed_image(server, browser, tmp_path: Path,
                                                                    screenshots: Path):
    from PIL import ImageDraw
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page = Page(browser, server.port)
    await asyncio.to_thread(page.open)
    await asyncio.to_thread(page.connect)
    await until(page.connected)
    seed_file = tmp_path / "seed.png"
    seed_image = Image.linear_gradient("L").resize((256, 256)).convert("RGB")
    ImageDraw.Draw(seed_image).ellipse((40, 40, 216, 216), fill=(200, 60, 40))
    seed_image.save(seed_file)
    await asyncio.to_thread(lambda: page.field("seed-file").send_keys(str(seed_file)))
    await until(lambda: page.field("mask-canvas").get_attribute("width") == "256")

    def edge(side: str) -> Any:
        return page.css(f".edge[data-side={side}]")[0]

    def drag_right() -> None:
        # Half the canvas's shown width outwards: 128 pixels of a 256-pixel picture.
        width = page.field("outpaint-frame").rect["width"]
        ActionChains(browser).click_and_hold(edge("right")).move_by_offset(int(width / 4), 0) \
            .move_by_offset(int(width / 4), 0).release().perform()

    await asyncio.to_thread(drag_right)
    assert edge("right").get_attribute("aria-valuenow") == "128"
    # From the keyboard: the top edge, one step of 64 outwards.
    await asyncio.to_thread(lambda: edge("top").send_keys(Keys.ARROW_UP))
    assert edge("top").get_attribute("aria-valuenow") == "64"
    assert "384×320" in page.field("outpaint-text").text
    # The frame shows the new shape: the seed image now takes 2/3 of its width.
    frame, stage = page.field("outpaint-frame").rect, page.field("mask-stage").rect
    assert abs(stage["width"] / frame["width"] - 256 / 384) < 0.02
    assert abs(frame["width"] / frame["height"] - 1.2) < 0.02

    await asyncio.to_thread(page.type, "steps", "3")
    await asyncio.to_thread(page.type, "seed", "77")
    await asyncio.to_thread(lambda: page.field("generate").click())
    [card] = await until(lambda: page.cards(".done"))
    sent = page.tasks("imageInference")[-1]
    assert sent["outpaint"] == {"top": 64, "right": 128, "bottom": 0, "left": 0, "blur": 0}
    assert "width" not in sent and "height" not in sent and "maskImage" not in sent
    [img] = await until(lambda: page.loaded_results(card))
    result = await asyncio.to_thread(fetched, img.get_attribute("src"))
    assert result.size == (384, 320)
    # The seed image is kept pixel for pixel where it was; the added area is generated.
    assert ImageChops.difference(result.crop((0, 64, 256, 320)), seed_image).getbbox() is None
    assert max(ImageStat.Stat(result.crop((256, 0, 384, 320))).stddev) > 10
    assert "outpainting top 64, right 128" in card.find_element(page.by.CLASS_NAME, "params").text
    await asyncio.to_thread(browser.save_screenshot, str(screenshots / "outpainting.png"))
    # Removing the seed image puts the edges back.
    await asyncio.to_thread(lambda: page.field("seed-image-remove").click())
    assert edge("right").get_attribute("aria-valuenow") == "0"
    # A pasted picture becomes the seed image.
    await asyncio.to_thread(browser.execute_script, PASTE_PICTURE)
    await until(lambda: page.css("#drop img"))
    assert page.tasks("imageUpload")[-1]["image"].startswith("data:image/png;base64,")
    assert console_errors(browser) == []


def test_the_pages_sampler_lists_are_the_servers():
    """The page lists samplers by the kind of model; each name it offers must be one the server takes for it."""
    import re

    from imagewire.air_registry import ARCHITECTURES
    from imagewire.air_registry.samplers import DIFFUSION, FLOW, resolve_sampler
    from imagewire.server.http import PLAYGROUND
    from imagewire.tasks.image_add_ons import ADD_ON_FAMILIES, PROMPT_SYNTAXES

    page = PLAYGROUND.read_text()

    def listed(name: str) -> list[str]:
        body = re.search(rf"const {name} = \[(.*?)\];", page, re.S)
        assert body, name
        return re.findall(r'"([^"]+)"', body.group(1))

    for sampler in listed("SAMPLERS"):
        resolve_sampler(sampler, DIFFUSION)
    for sampler in listed("FLOW_SAMPLERS"):
        resolve_sampler(sampler, FLOW)
    # The page tells flow-matching models by their architecture's name.
    pattern = re.search(r"const flow = /(.+?)/\.test", page)
    assert pattern
    for architecture, spec in ARCHITECTURES.items():
        assert bool(re.search(pattern.group(1), architecture)) == (spec.sampling == FLOW), architecture
        # The page offers embeddings, a VAE, CLIP skip and prompt weighting where it sees no flow-matching
        # model: those are the families the server takes them for.
        if spec.task == "imageInference":
            assert (spec.sampling != FLOW) == (spec.family in ADD_ON_FAMILIES), architecture
        # It offers as refiners of a model those of its architecture's name with "-refiner".
        if spec.refines:
            assert spec.refines == (architecture.removesuffix("-refiner"),), architecture
    for syntax in PROMPT_SYNTAXES.values():
        assert f'<option value="{syntax}">' in page, syntax
