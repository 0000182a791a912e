"""The demo page in a real browser, on the shipped model: what it shows is what the API answers.

Set ERDE_UI_SCREENSHOT=docs/ui.png to keep the screenshot the README shows (otherwise it goes to a
temporary folder)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import httpx
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from service.api.ui import STATIC
from tests.browser.conftest import SHIPPED
from tests.service.conftest import Server

SAMPLES = STATIC / "samples"
UPLOAD = SAMPLES / "06-shirt.png"  # a Fashion-MNIST test image that runs to the last exit at budget 1.0
BOOT = "09-ankle-boot.png"  # one that answers at the middle exit at budget 0.5


def wait_for(browser: Chrome, check: Callable[[Chrome], object], timeout: float = 30) -> None:
    WebDriverWait(browser, timeout, poll_frequency=0.05).until(check)


def console_errors(browser: Chrome) -> list[str]:
    """Console errors since the last call: uncaught exceptions, CSP refusals, failed loads."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def api_classify(server: Server, image: Path, budget: str, **fields: str) -> httpx.Response:
    return httpx.post(f"{server.url}/classify", files={"image": (image.name, image.read_bytes(), "image/png")},
                      data={"budget": budget, "model": SHIPPED, "top_k": "5", **fields}, timeout=30)


def open_page(browser: Chrome, server: Server) -> dict:
    """Load the page, pick the shipped model, and return its /models/{name}."""
    browser.get(f"{server.url}/")
    wait_for(browser, lambda b: b.find_elements(By.ID, "curve-line")
             and b.find_elements(By.CSS_SELECTOR, "#samples button"))
    Select(browser.find_element(By.ID, "model")).select_by_value(SHIPPED)
    return httpx.get(f"{server.url}/models/{SHIPPED}").json()


def shown(browser: Chrome, image: str, budget: float) -> dict[str, str]:
    """Wait for the answer for `image` at `budget`, then read it as the page shows it."""
    wait_for(browser, lambda b: (r := b.find_element(By.ID, "result")).get_attribute("data-image") == image
             and float(r.get_attribute("data-budget")) == budget and "stale" not in r.get_attribute("class"))
    result = browser.find_element(By.ID, "result")
    text = {name: browser.find_element(By.ID, name).text for name in
            ("answer-label", "answer-summary", "macs-text", "expected-accuracy", "threshold")}
    stages = browser.find_elements(By.CSS_SELECTOR, "#stages .stage")
    return {**text, "exit": result.get_attribute("data-exit"), "macs": result.get_attribute("data-macs"),
            "lit": sum("lit" in s.get_attribute("class") for s in stages), "stages": len(stages),
            "answered": [i for i, s in enumerate(stages) if "answered" in s.get_attribute("class")],
            "topk": [row.text.split("\n")[0] for row in browser.find_elements(By.CSS_SELECTOR, "#topk li")]}


def assert_shows(page: dict, reply: dict) -> None:
    assert page["answer-label"] == reply["label"]
    assert page["answer-summary"] == f"answered at exit {reply['exit'] + 1} of {reply['exits']}"
    assert (page["exit"], page["macs"]) == (str(reply["exit"]), str(reply["macs"]))
    assert page["lit"] == reply["exit"] + 1 and page["answered"] == [reply["exit"]] and page["stages"] == reply["exits"]
    assert page["macs-text"].startswith(f"{reply['macs'] / 1e6:.2f} M of ")
    assert page["expected-accuracy"] == f"{100 * reply['expected_accuracy']:.1f}%"
    assert page["threshold"] == f"{reply['threshold']:.3f}"
    assert page["topk"] == [c["label"] for c in reply["top_k"]]


def marker(browser: Chrome) -> tuple[float, float]:
    """The operating point marked on the calibration chart: its (MACs fraction, accuracy) and its x on screen."""
    ring = browser.find_element(By.ID, "curve-marker")
    return float(ring.get_attribute("data-x")), float(ring.get_attribute("cx"))


def curve_point(info: dict, threshold: float) -> dict:
    return next(p for p in info["calibration"] if p["threshold"] == threshold)


def slide(browser: Chrome, keys: str) -> None:
    """Move the budget slider with the keyboard."""
    browser.find_element(By.ID, "budget").send_keys(keys)


def pick_sample(browser: Chrome, file: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'#samples button[data-file="{file}"]').click()


def test_the_budget_at_work(shipped_server: Server, browser: Chrome, tmp_path: Path) -> None:
    info = open_page(browser, shipped_server)
    slider = browser.find_element(By.ID, "budget")
    cheapest = math.ceil(min(p["expected_macs_fraction"] for p in info["calibration"]) * 100 - 1e-9) / 100
    assert (float(slider.get_attribute("min")), float(slider.get_attribute("max"))) == (cheapest, 1.0)
    assert slider.get_attribute("value") == "1"

    # A bundled sample, then a real image uploaded through the file picker.
    pick_sample(browser, BOOT)
    assert_shows(shown(browser, BOOT, 1.0), api_classify(shipped_server, SAMPLES / BOOT, "1").json())
    browser.find_element(By.ID, "file").send_keys(str(UPLOAD))
    full = api_classify(shipped_server, UPLOAD, "1").json()
    assert_shows(shown(browser, UPLOAD.name, 1.0), full)
    x_full, cx_full = marker(browser)
    assert x_full == curve_point(info, full["threshold"])["expected_macs_fraction"]

    # The slider, by keyboard, down to the cheapest point: the network stops earlier and spends less.
    slide(browser, Keys.HOME)
    low = api_classify(shipped_server, UPLOAD, str(cheapest)).json()
    assert_shows(shown(browser, UPLOAD.name, cheapest), low)
    assert low["exit"] < full["exit"] and low["macs"] < full["macs"]
    x_low, cx_low = marker(browser)
    assert x_low == curve_point(info, low["threshold"])["expected_macs_fraction"] < x_full and cx_low < cx_full

    # The calibration chart: one vertex per distinct operating point, and the marker on it.
    points = browser.find_element(By.ID, "curve-line").get_attribute("points").split()
    assert len(points) == len({p["threshold"] for p in info["calibration"]}) >= 2

    # One step up by keyboard, then a mid budget for the screenshot: each answer is the API's.
    slide(browser, Keys.ARROW_RIGHT)
    step = round(cheapest + 0.01, 2)
    assert_shows(shown(browser, UPLOAD.name, step), api_classify(shipped_server, UPLOAD, str(step)).json())
    pick_sample(browser, BOOT)
    slide(browser, Keys.END + Keys.ARROW_LEFT * 50)
    assert_shows(shown(browser, BOOT, 0.5), api_classify(shipped_server, SAMPLES / BOOT, "0.5").json())

    # Live state from /stats: this page's requests are counted, per exit too.
    def live_counts(b: Chrome) -> bool:
        text = b.find_element(By.ID, "live-requests").text
        bars = b.find_elements(By.CSS_SELECTOR, "#live-exits li")
        return text.isdigit() and int(text) >= 5 and len(bars) == full["exits"]

    wait_for(browser, live_counts)
    assert browser.find_element(By.ID, "live-rate").text != "–"
    assert console_errors(browser) == []

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 140)  # the whole page, for the README
    shot = Path(os.environ.get("ERDE_UI_SCREENSHOT", tmp_path / "ui.png"))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_an_unmeetable_floor_is_explained(shipped_server: Server, browser: Chrome) -> None:
    open_page(browser, shipped_server)
    browser.find_element(By.ID, "file").send_keys(str(UPLOAD))
    slide(browser, Keys.HOME)
    cheapest = float(browser.find_element(By.ID, "budget").get_attribute("value"))
    shown(browser, UPLOAD.name, cheapest)
    floor = browser.find_element(By.ID, "floor-value").get_attribute("value")
    refused = api_classify(shipped_server, UPLOAD, str(cheapest), min_accuracy=floor)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unsatisfiable"

    browser.find_element(By.ID, "floor-on").click()
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda b: error.is_displayed() and error.get_attribute("data-code") == "unsatisfiable")
    assert "No operating point meets this accuracy floor" in error.text
    assert refused.json()["error"]["message"] in error.text
    assert "stale" in browser.find_element(By.ID, "result").get_attribute("class")
    # The browser itself logs the refused request; nothing else may be there.
    errors = console_errors(browser)
    assert errors and all("/classify - Failed to load resource" in e and "422" in e for e in errors), errors

    slide(browser, Keys.END)  # a budget that meets the floor: answered again
    met = api_classify(shipped_server, UPLOAD, "1", min_accuracy=floor).json()
    assert_shows(shown(browser, UPLOAD.name, 1.0), met)
    assert not error.is_displayed()
    assert console_errors(browser) == []


def test_phone_width(shipped_server: Server, browser: Chrome) -> None:
    browser.set_window_size(390, 900)
    open_page(browser, shipped_server)
    pick_sample(browser, UPLOAD.name)
    shown(browser, UPLOAD.name, 1.0)
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
    for selector in ("#budget", "#stages .stage", "#curve-chart", "#topk li", "#samples button"):
        for element in browser.find_elements(By.CSS_SELECTOR, selector):
            assert element.rect["x"] >= 0 and element.rect["x"] + element.rect["width"] <= width, selector
    assert console_errors(browser) == []
