"""The page in a real browser (headless Chromium through Selenium): the whole toy flow, from photos to an export.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them where it can); elsewhere the test skips
with the reason, except on CI, where a missing browser fails it."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.toy.subjects import SUBJECTS
from dreambooth.ui.server import UIConfig, make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver") or (Path("/usr/bin/chromedriver") if Path("/usr/bin/chromedriver").exists()
                                          else None)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        message = "no headless Chromium here (apt-get install chromium chromium-driver; `make test` does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no network beyond localhost here: Chromium's own background connections (updates, sync, QUIC) stay off
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000",
                "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # each WebDriver command answers within this, or fails the test: Selenium's default is to wait forever
    # (socket.getdefaulttimeout(), read when the driver is made), which let a stuck browser hang the whole suite
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(120)
    try:
        driver = webdriver.Chrome(service=Service(str(DRIVER), log_output=str(tmp_path / "chromedriver.log")),
                                  options=options)
    finally:
        socket.setdefaulttimeout(previous)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def page(tmp_path):
    server = make_server(UIConfig(port=0, workspace=tmp_path / "workspace"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "workspace"
    server.shutdown()
    server.server_close()


def test_whole_toy_flow_in_a_browser(browser, page, tmp_path):
    """Upload the toy subject's photos, type the class noun, take the first suggested identifier, train a short
    LoRA run with prior preservation on the bundled model, watch progress reach the end and a validation grid
    appear, render a gallery, export a kohya LoRA."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, workspace = page
    wait = WebDriverWait(browser, 30)
    long_wait = WebDriverWait(browser, 400)  # class images + a short run + final save, on a loaded 2-core CPU
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    def field(name: str):
        return browser.find_element(By.ID, f"f-{name}")

    def set_value(name: str, value: str) -> None:
        box = field(name)
        box.clear()
        box.send_keys(value)

    # the bundled toy model is preselected, with its presets: 32 px, LoRA
    assert field("pretrained_model_name_or_path").get_attribute("value").endswith("model")
    assert field("resolution").get_attribute("value") == "32"
    assert field("use_lora").is_selected()

    # photos: previews as the trainer crops them
    subject = SUBJECTS["red_circle"] if "red_circle" in SUBJECTS else next(iter(SUBJECTS.values()))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, img in enumerate(subject.instance_images(4)):
        Image.fromarray(np.asarray(img)).save(photos / f"photo-{i}.png")
    browser.find_element(By.ID, "photos").send_keys("\n".join(str(p) for p in sorted(photos.iterdir())))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#photo-previews img")) == 4)
    uploaded = Path(field("instance_data_dir").get_attribute("value"))
    assert uploaded.parent == workspace / "uploads" and len(list(uploaded.iterdir())) == 4

    # the class noun, then the first suggested identifier fills the prompts
    browser.find_element(By.ID, "class-noun").send_keys(subject.cls)
    browser.find_element(By.ID, "suggest").click()
    first = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#suggestions .suggestion")))
    token = first.text
    first.click()
    assert field("instance_prompt").get_attribute("value") == f"a {token} {subject.cls}"
    assert field("class_prompt").get_attribute("value") == f"a {subject.cls}"
    assert field("with_prior_preservation").is_selected()  # the class prompt comes with prior preservation

    # a bad value is refused beside its field, nothing starts
    set_value("max_train_steps", "0")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: d.find_element(By.ID, "e-max_train_steps").text != "")
    assert not list((workspace / "runs").iterdir())

    # a short LoRA run with prior preservation
    set_value("max_train_steps", "6")
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    for name, value in {"num_class_images": "8", "validation_steps": "3", "num_validation_images": "2",
                        "checkpointing_steps": "3", "logging_steps": "1"}.items():
        set_value(name, value)
    browser.find_element(By.ID, "start").click()
    long_wait.until(lambda d: d.find_element(By.ID, "run-status").text in ("finished", "failed", "interrupted"))
    assert browser.find_element(By.ID, "run-status").text == "finished", browser.find_element(
        By.ID, "run-message").text
    progress = browser.find_element(By.ID, "progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "6"
    assert "class images 8/8" in browser.find_element(By.ID, "class-progress").text
    assert len(browser.find_element(By.CSS_SELECTOR, "#loss-curve polyline").get_attribute("points").split()) == 6
    grids = browser.find_elements(By.CSS_SELECTOR, "#validations img.validation")
    assert len(grids) >= 2  # step 3, step 6 and the final one
    assert browser.execute_script("return arguments[0].naturalWidth", grids[0]) > 0
    run = browser.find_element(By.ID, "run-name").text
    assert (workspace / "runs" / run / "run_summary.json").is_file()
    assert run in browser.find_element(By.ID, "runs").text

    # the gallery, from the run's own prompts
    set_gallery = browser.find_element(By.ID, "gallery-n")
    set_gallery.clear()
    set_gallery.send_keys("1")
    browser.find_element(By.ID, "render").click()
    long_wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img.gallery-image")
                    or "failed" in d.find_element(By.ID, "gallery-status").text)
    assert browser.find_element(By.ID, "gallery-status").text == "generate done"
    shown = browser.find_elements(By.CSS_SELECTOR, "#gallery img.gallery-image")
    assert shown and browser.execute_script("return arguments[0].naturalWidth", shown[0]) == 32

    # export: the kohya LoRA file ComfyUI and A1111 load
    browser.find_element(By.CSS_SELECTOR, "button.export[data-format=kohya]").click()
    path = long_wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#exports code.export-path")
                           or ("failed" in d.find_element(By.ID, "exports").text and
                               d.find_element(By.ID, "exports")))
    assert isinstance(path, list), path.text
    exported = Path(path[0].text)
    assert exported.is_file() and exported.suffix == ".safetensors" and exported.parent == workspace / "exports"

    if os.environ.get("DREAMBOOTH_UI_SCREENSHOT"):  # the README's picture of the whole page: `make ui-screenshot`
        browser.execute_script("document.getElementById('advanced').open = false; window.scrollTo(0, 0)")
        browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 40)
        browser.save_screenshot(os.environ["DREAMBOOTH_UI_SCREENSHOT"])
