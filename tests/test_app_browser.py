"""``realisid app`` in a real browser: headless Chromium (Debian's chromium + chromium-driver, which .ci/run
installs) drives the page served by the command on 127.0.0.1: upload the astronaut, set a small box, generate
with 2 steps, check the gallery image; then a photo without a face gets its message, not a traceback."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image
from skimage import data

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium / chromedriver (apt-get install chromium chromium-driver)")
SIZE = 128  # smaller than the page default (256): a faster first compile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path, face_models):
    port = _free_port()
    log = open(tmp_path / "app.log", "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "realisid_jax.cli", "app", "--port", str(port),
                                "--out", str(tmp_path / "out")], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300  # model build; ~30 s on an idle 2-core machine
        while True:
            assert process.poll() is None, (tmp_path / "app.log").read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "app did not start in 300 s"
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _set_number(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def test_generate_in_the_browser(app_url, browser, tmp_path):
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(condition, timeout=60):
        return WebDriverWait(browser, timeout).until(condition)

    astronaut, coffee = tmp_path / "astronaut.png", tmp_path / "coffee.png"
    Image.fromarray(data.astronaut()).save(astronaut)
    Image.fromarray(data.coffee()).save(coffee)
    browser.get(app_url)
    wait(ec.presence_of_element_located(("css selector", "#generate")))

    browser.find_element("css selector", "#reference-0 input[type=file]").send_keys(str(astronaut))
    wait(ec.presence_of_element_located(("css selector", "#face-0 img")))  # detected face + landmarks shown
    _set_number(browser, "#box-w-0 input[type=number]", 0.125)  # a small face: 1/8 of the edge
    _set_number(browser, "#steps input[type=number]", 2)
    _set_number(browser, "#height input", SIZE)
    _set_number(browser, "#width input", SIZE)
    browser.find_element("css selector", "#generate").click()
    wait(lambda d: "Done" in d.find_element("css selector", "#status").text, timeout=300)
    image = wait(ec.presence_of_element_located(("css selector", "#gallery img")))
    wait(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [SIZE, SIZE]
    assert "steps" in browser.find_element("css selector", "#status").text
    browser.save_screenshot(str(tmp_path / "app.png"))

    browser.find_element("css selector", "#person-accordion-1 button").click()
    upload = wait(ec.presence_of_element_located(("css selector", "#reference-1 input[type=file]")))
    upload.send_keys(str(coffee))
    wait(lambda d: "no face" in d.find_element("css selector", "#person-message-1").text)
    browser.find_element("css selector", "#generate").click()
    wait(lambda d: "person 2: no usable face" in d.find_element("css selector", "#status").text)
    browser.save_screenshot(str(tmp_path / "app_no_face.png"))
