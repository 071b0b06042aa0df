"""The dead-letter console in a real browser: Selenium driving Debian's headless chromium
(chromedriver) against `dokstamp-sync console`, with a real worker and the sandbox."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import live
from test_worker import EXE, STREAM, start_worker, wait_settled, wredis, xadd
from testenv import TEST_WORKER_REDIS_URL

__all__ = ["start_worker", "wredis"]  # fixtures, used by name
DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OPERATOR = ("ops", "console-test-pw")
pytestmark = pytest.mark.skipif((CHROMIUM is None or DRIVER is None)
                                and not os.environ.get("CI"),
                                reason="Debian's chromium and chromium-driver (CI installs them)")


@pytest.fixture
def console(database_url, tmp_path):
    """`dokstamp-sync console` on a free loopback port, with an operator and a read-only
    login; stopped afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_WORKER_REDIS_URL,
        "DOKSTAMP_SYNC_STREAM": STREAM,
        "DOKSTAMP_SYNC_CONSOLE_AUTH": ":".join(OPERATOR),
        "DOKSTAMP_SYNC_CONSOLE_READONLY_AUTH": "viewer:viewer-pw"}
    log = open(tmp_path / "console.log", "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen([EXE, "console", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (tmp_path / "console.log").read_text()
        try:
            urllib.request.urlopen(f"{base}/login", timeout=2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the console did not start"
            time.sleep(0.2)
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER or "chromedriver"), options=options)
    driver.implicitly_wait(10)  # an element of a page still loading is waited for, not missed
    yield driver
    driver.quit()


def click_through(driver, by: str, value: str) -> None:
    """Click a link or a submit button and wait until the next page replaced this one: a click
    returns before the navigation it starts has finished (it failed under load)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(by, value).click()

    def replaced(_driver: object) -> bool:
        # The old page's root is gone: stale, or (Chromium, mid-navigation) "Node with given
        # id does not belong to the document", which selenium's staleness_of does not catch.
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 30).until(replaced)


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_an_operator_fixes_a_cause_and_replays_a_letter_in_the_browser(
        console, browser, start_worker, wredis, sandbox, sessions):
    """Log in (a wrong password is refused), filter the letters by entity, open one, fix the
    sandbox's cause (a 403 on POST /students) and replay it: the letter is resolved with who
    replayed it in its history, the event synced, and DokStamp holds the student. A POST
    without the CSRF token is refused. Screenshots go to docs/."""
    from selenium.webdriver.common.by import By

    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=403, times=1000)]))
    proc = start_worker(concurrency=1)
    student = samples.event("student", "S-REFUSED", {
        "name": "Ana Recusada", "email": "ana.recusada@example.edu",
        "date_of_birth": "2000-02-02"}, event_id="ev-refused")
    broken = samples.event("enrollment", "E-BROKEN", event_id="ev-broken")  # no data: invalid
    xadd(wredis, [broken, student])
    assert wait_settled(sessions, 1, proc=proc) == {"dead": 1}

    browser.get(f"{console}/letters")  # not logged in: sent to the login page
    assert browser.current_url.endswith("/login")
    browser.find_element(By.ID, "user").send_keys(OPERATOR[0])
    browser.find_element(By.ID, "password").send_keys("not-the-password")
    click_through(browser, By.ID, "login")
    assert text_of(browser, "#error") == "Wrong user or password."
    browser.find_element(By.ID, "user").send_keys(OPERATOR[0])
    browser.find_element(By.ID, "password").send_keys(OPERATOR[1])
    click_through(browser, By.ID, "login")
    assert text_of(browser, "#open-letters") == "2"

    browser.get(f"{console}/letters")
    browser.find_element(By.ID, "f-entity").send_keys("student")
    click_through(browser, By.ID, "apply")
    keys = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#letters td.key")]
    assert keys == ["S-REFUSED"]
    browser.save_screenshot(str(DOCS / "console-letters.png"))
    click_through(browser, By.CSS_SELECTOR, "#letters a.letter")
    assert "403" in text_of(browser, "#reason")
    assert text_of(browser, "#key") == "S-REFUSED"
    browser.save_screenshot(str(DOCS / "console-letter.png"))
    letter_url = browser.current_url

    sandbox.sandbox.faults.configure(Faults())  # the cause fixed (DokStamp accepts again)
    click_through(browser, By.ID, "replay")
    assert "Replay 1 dead letter?" in text_of(browser, "h1")
    click_through(browser, By.ID, "confirm")
    assert text_of(browser, "#done") == "1 letter replayed"
    deadline = time.monotonic() + 60
    while True:
        browser.get(letter_url)
        if text_of(browser, "#event-state") == "synced":
            break
        assert time.monotonic() < deadline, "the replayed event did not sync"
        time.sleep(0.5)
    assert text_of(browser, "#status") == "replayed"
    history = text_of(browser, "#history")
    assert "replayed ops" in history
    emails = [s["email"] for s in live(sandbox, "students")]
    assert emails == ["ana.recusada@example.edu"]

    cookie = browser.get_cookie("dokstamp_console")["value"]
    letter_id = letter_url.rsplit("/", 1)[1]
    request = urllib.request.Request(
        f"{console}/letters/action", method="POST",
        data=urllib.parse.urlencode({"action": "discard", "ids": letter_id,
                                     "confirmed": "yes"}).encode(),
        headers={"Cookie": f"dokstamp_console={cookie}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code == 403
