"""The page at /, end to end in Debian's headless chromium driven by Selenium (chromedriver given explicitly,
so selenium-manager never downloads a browser or a driver)."""

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from seglab.data.masks import load_image
from seglab.models.inference import confidence_image
from seglab.serve.app import create_app
from seglab.viz import overlay

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="needs Debian's chromium and chromedriver: as root, apt-get update && apt-get install -y chromium "
    "chromium-driver (.ci/run does this)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        # The machines are offline: without these chromium starts background connections that are refused.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def overlay_pixels(browser) -> np.ndarray:
    """The overlay <img> as the browser holds it, read back through a canvas."""
    data_url = browser.execute_script("""
        const img = document.getElementById('overlay');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        canvas.getContext('2d').drawImage(img, 0, 0);
        return canvas.toDataURL('image/png');""")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_page_segments_an_uploaded_image(browser, live_server, predictor, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = load_image(photo)
    mask = predictor.predict(image)
    with live_server(create_app(predictor)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#legend tbody tr")) == 3)
        assert browser.find_element(By.ID, "model-info").text.startswith(
            "deeplabv3_mobilenet_v3_large (pytorch fp32, served by PyTorch), 3 classes"
        )
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: b.find_element(By.ID, "overlay").get_attribute("data-ready") == "true")

        size = browser.execute_script(
            "const i = document.getElementById('overlay'); return [i.naturalWidth, i.naturalHeight];"
        )
        assert size == [96, 64] == [image.shape[1], image.shape[0]]
        rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
        assert [r.get_attribute("data-class-name") for r in rows] == ["background", "disc", "triangle"]
        # Pixel counts the page computed from the mask PNG are the server's mask's counts.
        counts = [int(r.find_elements(By.TAG_NAME, "td")[1].text.replace(",", "")) for r in rows]
        assert counts == np.bincount(mask.ravel(), minlength=3).tolist()
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")

        # Opacity 1 paints class colours exactly; background pixels keep the image's own.
        browser.execute_script("""const s = document.getElementById('opacity');
            s.value = '1'; s.dispatchEvent(new Event('input'));""")
        expected = overlay(image, mask, predictor.palette, 1.0)
        wait.until(lambda b: np.array_equal(overlay_pixels(b), expected))
        assert browser.find_element(By.ID, "opacity-value").text == "1.00"

        # The confidence view shows the server's confidence PNG (grey = round(255 x top probability)) ...
        browser.find_element(By.ID, "confidence").click()
        grey = confidence_image(predictor.predict_with_probabilities(image)[1])
        wait.until(lambda b: b.find_element(By.ID, "overlay").get_attribute("data-view") == "confidence")
        wait.until(lambda b: np.array_equal(overlay_pixels(b), np.repeat(grey[..., None], 3, axis=2)))
        # ... and switching back shows the overlay again, at the slider's opacity.
        browser.find_element(By.ID, "confidence").click()
        wait.until(lambda b: b.find_element(By.ID, "overlay").get_attribute("data-view") == "overlay")
        wait.until(lambda b: np.array_equal(overlay_pixels(b), expected))

        # The page asked for nothing outside this server.
        hosts = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).host);"
        )
        assert set(hosts) <= {url.removeprefix("http://")}


def test_page_asks_for_the_token_when_the_api_answers_401(browser, live_server, predictor, photo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token = "page-token-0123456789abcdef"
    with live_server(create_app(predictor, token=token)) as url:
        browser.get(url + "/")  # the page itself is open
        wait = WebDriverWait(browser, 60)
        form = browser.find_element(By.ID, "token-form")
        wait.until(lambda b: form.is_displayed())
        assert browser.find_element(By.ID, "status").text.startswith("401: This server requires a token")

        def submit(value):
            browser.find_element(By.ID, "token").send_keys(value)
            browser.find_element(By.CSS_SELECTOR, "#token-form button").click()

        submit("wrong-token-0123456789")
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("401: The token is wrong"))
        assert form.is_displayed()
        submit(token)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#legend tbody tr")) == 3)
        assert not form.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('seglab-token')") == token

        # Uploads carry it too.
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: b.find_element(By.ID, "overlay").get_attribute("data-ready") == "true")
        rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
        counts = [int(r.find_elements(By.TAG_NAME, "td")[1].text.replace(",", "")) for r in rows]
        assert counts == np.bincount(predictor.predict(load_image(photo)).ravel(), minlength=3).tolist()
