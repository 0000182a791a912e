"""A real headless Chromium (Debian's `chromium` + `chromium-driver`, no browser download) driving the
demo page of a real server that serves the shipped model from the repository's model_store (read only)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.service.conftest import ROOT, Server, start_server

SHIPPED = "fashion-mnist"


def debian_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: `make system-deps` installs chromium and chromium-driver")
    return path


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(ROOT / "model_store", tmp_path_factory.mktemp("logs"), default_model=SHIPPED)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = debian_binary("chromium")
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--window-size=1280,1000"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to start as root with its sandbox
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, read by the tests
    driver = webdriver.Chrome(options=options, service=Service(debian_binary("chromedriver")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
