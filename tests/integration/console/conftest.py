"""What the console's browser tests share: one headless Chromium for the session, driven
through Debian's chromedriver with selenium (`make chromium` installs both), and
:class:`ConsolePage`, the console as a user sees it (sign in, open a page, wait for
text, take a screenshot).

Screenshots go to the session's log folder; with ``LLAMAGATE_CONSOLE_SHOTS=docs/console``
they are also written there (how docs/console.md's pictures are made).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from ..conftest import ROOT

WAIT = 15.0  # seconds a page may take to show what a test waits for


@pytest.fixture(scope="session")
def browser(logs: Path) -> Iterator[WebDriver]:
    """Headless Debian Chromium under its chromedriver (never a downloaded browser)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are not on PATH: `make chromium` installs Debian's packages")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=1280,900", f"--user-data-dir={logs / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver, log_output=str(logs / "chromedriver.log"))
    drv = webdriver.Chrome(options=options, service=service)
    yield drv
    drv.quit()


class ConsolePage:
    """The console of the gateway at ``url`` in ``driver``."""

    def __init__(self, driver: WebDriver, url: str, shots: Path) -> None:
        self.driver = driver
        self.url = url
        self.shots = shots

    def wait(self, predicate: Callable[[], Any], timeout: float = WAIT, message: str = "the page") -> Any:
        """Poll ``predicate`` until it is truthy (element lookups that fail count as not yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (NoSuchElementException, StaleElementReferenceException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {message}; page text:\n{self.text('body')[:3000]}")
            time.sleep(0.1)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        try:
            return self.find(css).text
        except NoSuchElementException:
            return ""

    def sign_out(self) -> None:
        self.driver.get(self.url + "/admin/")
        self.driver.execute_script("sessionStorage.clear()")

    def sign_in(self, key: str, page: str = "overview") -> None:
        """Open the console, type ``key`` into its sign-in form, open ``page``."""
        self.sign_out()
        self.driver.get(self.url + "/admin/#/" + page)
        self.wait(lambda: self.find("#login").is_displayed(), message="the sign-in form")
        self.find("#key").send_keys(key)
        self.find("#login button").click()

    def open(self, page: str) -> WebElement:
        """Go to ``page`` (signed in): its root element once rendered."""
        self.driver.get(f"{self.url}/admin/#/{page}")
        return self.wait(lambda: self.find(f"#page-{page}"), message=f"the {page} page")

    def wait_text(self, css: str, fragment: str, timeout: float = WAIT) -> str:
        return self.wait(lambda: fragment in (t := self.text(css)) and t, timeout, f"{fragment!r} in {css}")

    def shot(self, name: str) -> Path:
        """A PNG of the whole page (``name``.png), also under LLAMAGATE_CONSOLE_SHOTS when set."""
        height = self.driver.execute_script("return Math.max(document.documentElement.scrollHeight, 700)")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 1280, "height": min(int(height), 2400), "deviceScaleFactor": 1, "mobile": False})
        path = self.shots / f"{name}.png"
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        wanted = os.environ.get("LLAMAGATE_CONSOLE_SHOTS")
        if wanted:
            target = Path(wanted) if Path(wanted).is_absolute() else ROOT / wanted
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
        return path

    def script_errors(self) -> list[str]:
        """The browser console's errors since the last call (a CSP refusal shows here)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def console_page(browser: WebDriver, logs: Path) -> Iterator[Callable[[str], ConsolePage]]:
    """``console_page(url)``: the console of the gateway at ``url`` in the session's browser.
    The module's gateways stop with it: the browser leaves their pages (which poll) and
    forgets what they logged, or the next module would read their failed calls as its own."""
    shots = logs / "console-shots"
    shots.mkdir(exist_ok=True)
    yield lambda url: ConsolePage(browser, url, shots)
    browser.get("about:blank")
    browser.get_log("browser")
