"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against ``pgdurable dashboard`` and a running
supervisor with real instances. It logs in, finds a failed instance, opens its timeline,
retries it and sees it finish; answers a pending input; and is refused without a login and
with a forged action from another page.

Skipped, with the reason, where no Chromium is installed (``.ci/run`` installs it). The
screenshots go to the test's temporary folder, or to docs/img/ with
PGDURABLE_DOCS_SCREENSHOTS=1 (how the documentation's pictures are made).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the dashboard extra is not installed")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

from selenium.webdriver.common.by import By  # noqa: E402

from .dashboard_machines import Charge  # noqa: E402
from .input_machines import Expense  # noqa: E402
from .supervised import ROOT, start, wait_until  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no Chromium: install Debian's chromium and chromium-driver (apt-get install chromium-driver)",
)

DASHBOARD = """
[dashboard]
listen = "127.0.0.1:0"

[dashboard.users.ada]
password = "${DASH_ADA_PASSWORD}"
role = "admin"
"""
PASSWORD = "correct horse battery"


@pytest.fixture
def shots(tmp_path) -> Path:
    if os.environ.get("PGDURABLE_DOCS_SCREENSHOTS"):
        return ROOT / "docs" / "img"
    return tmp_path


@pytest.fixture
def running(sups, tmp_path, dsn, schema, monkeypatch):
    """A supervisor running the test machines, and the dashboard on its config."""
    monkeypatch.setenv("DASH_ADA_PASSWORD", PASSWORD)
    sup = start(
        sups,
        tmp_path,
        dsn,
        schema,
        modules='["tests.dashboard_machines", "tests.input_machines"]',
        processes=1,
        extra=DASHBOARD,
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgdurable", "dashboard", "--config", str(sup.config)],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "dashboard.log").open("w"),
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (tmp_path / "dashboard.log").read_text()
        yield line.split()[3]  # "pgdurable dashboard on http://127.0.0.1:PORT/ (Ctrl-C to stop)"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver, url: str) -> None:
    driver.get(url)
    assert "/login" in driver.current_url  # no session: the login form
    driver.find_element(By.ID, "username").send_keys("ada")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    assert shown(driver, "#who").text == "ada (admin)"


def shown(driver, css: str):
    """The element, once the page that has it is loaded (a click does not wait for the next
    page)."""
    return wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, css), what=f"the page with {css}")[0]


def status_of(client, iid: int, want: str) -> bool:
    return client.get(iid).status == want


def test_log_in_retry_a_failed_instance_and_see_it_finish(running, browser, client, tmp_path, shots):
    url = running
    iid = client.insert(Charge, {"order": 41, "unlock": "unlock"})  # the supervisor's cwd
    wait_until(lambda: status_of(client, iid, "failed"), what="the instance to fail")
    log_in(browser, url)
    browser.save_screenshot(str(shots / "dashboard-overview.png"))
    assert browser.find_element(By.CSS_SELECTOR, 'tr[data-queue="rt"]')

    browser.get(url + "instances?status=failed")
    browser.save_screenshot(str(shots / "dashboard-instances.png"))
    browser.find_element(By.LINK_TEXT, str(iid)).click()
    timeline = shown(browser, "#timeline").text
    assert "prepare" in timeline and "charge" in timeline and "stop" in timeline
    assert "charging order 41" in timeline  # the step's captured log line
    assert "card declined <b>for order</b>" in browser.find_element(By.ID, "last-error").text  # as text
    graph = browser.find_element(By.ID, "graph").text
    assert "prepare" in graph and "Next" in graph  # drawn from the machine's code

    (tmp_path / "unlock").touch()
    browser.find_element(By.CSS_SELECTOR, "#actions button.primary").click()
    assert "retried from step charge" in shown(browser, "#flash").text

    def finished() -> bool:
        browser.refresh()
        return "done" in browser.find_element(By.CSS_SELECTOR, "h1 .status").text

    wait_until(finished, what="the retried instance to finish")
    assert '"charged": 41' in browser.find_element(By.ID, "result").text
    browser.set_window_size(1400, 1500)  # the whole page: timeline, logs and graph
    browser.save_screenshot(str(shots / "dashboard-instance.png"))


def test_answer_a_pending_input(running, browser, client, shots):
    url = running
    iid = client.insert(Expense, {"amount": 250}, correlation_key="expense:250")
    wait_until(lambda: client.inputs(), what="the pending input")
    log_in(browser, url + "inputs")
    section = browser.find_element(By.CSS_SELECTOR, f'section[data-instance="{iid}"]')
    assert "Approve 250 EUR?" in section.text
    section.find_element(By.NAME, "value").send_keys('{"approved": true, "amount": 250, "note": "ok"}')
    browser.save_screenshot(str(shots / "dashboard-inputs.png"))
    section.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert "answered approval" in shown(browser, "#flash").text
    wait_until(lambda: status_of(client, iid, "done"), what="the answered instance to finish")
    assert client.get(iid).result == {"type": "Approval", "approved": True, "amount": 250}


def test_refuses_a_request_without_a_login_and_a_forged_action(running, browser, client, tmp_path):
    url = running
    iid = client.insert(Charge, {"order": 9, "unlock": "never"})
    wait_until(lambda: status_of(client, iid, "failed"), what="the instance to fail")

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + f"instances/{iid}", timeout=30)
    assert e.value.code == 401
    browser.get(url + f"instances/{iid}")
    assert "/login" in browser.current_url  # the browser is sent to the login form
    assert browser.find_element(By.ID, "username") and not browser.find_elements(By.ID, "timeline")

    # Logged in, the browser visits another page (here a file) whose form posts an action to
    # the dashboard: its session cookie is not sent (SameSite=Strict), and the form has no
    # valid token: refused, and the instance is not touched.
    log_in(browser, url)
    forged = tmp_path / "forged.html"
    forged.write_text(
        f'<form method="post" action="{url}instances/{iid}/retry">'
        '<input type="hidden" name="csrf" value="guessed"><button id="go">win a prize</button></form>'
    )
    browser.get(forged.as_uri())
    browser.find_element(By.ID, "go").click()
    body = wait_until(
        lambda: browser.current_url.startswith(url) and browser.find_element(By.TAG_NAME, "body").text,
        what="the answer to the forged post",
    )
    assert "refused" in body or "authentication required" in body, body
    assert client.get(iid).status == "failed"
