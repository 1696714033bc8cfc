"""Drives the operator console in headless Chromium (Selenium), against a
real server: signs in (and is refused with a user's key or a bad one), sees
a call made over the API appear live and in the figures, filters the audit
trail, suspends a user and sees the API refuse them, lifts it, sees an
anomaly with its evidence, and signs out leaving nothing behind.

Argument: one JSON object {url, admin, alice, mallory, screenshots}.
Exits non-zero, saying what failed, on the first check that fails.
"""

import json
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

CFG = json.loads(sys.argv[1])
BASE = CFG["url"]
SHOTS = CFG["screenshots"]


def step(what):
    print(f"-- {what}", flush=True)


def api(method, path, key, body=None):
    """(status, JSON body) of a request to the server's API."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def browser():
    options = Options()
    options.binary_location = CFG.get("chromium", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CFG.get("chromedriver", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=options)


def shot(driver, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        driver.save_screenshot(os.path.join(SHOTS, f"console-{name}.png"))


def until(driver, condition, what, seconds=20):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)
    except TimeoutException:
        shot(driver, "failure")
        raise AssertionError(f"waited {seconds} s for {what}; the page says:\n{text(driver, 'body')}")


def text(driver, selector):
    """The element's rendered text, read in one step (the console redraws its
    tables as it refreshes them, so a found element can go stale)."""
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", selector)
    if found is None:
        raise LookupError(f"no {selector}")
    return found


def click(driver, selector):
    """Clicks the element, finding it again if a refresh replaced it."""
    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{selector} kept going stale")


def contains(selector, *words):
    """A condition: the element's text holds every word."""
    def check(driver):
        try:
            found = text(driver, selector)
        except LookupError:  # not there yet
            return False
        return all(w in found for w in words)
    return check


def only_rows(selector, *words):
    """A condition: the element has rows, and every row holds every word."""
    def check(driver):
        try:
            rows = text(driver, selector).splitlines()
        except LookupError:  # not there yet
            return False
        return bool(rows) and all(all(w in r for w in words) for r in rows)
    return check


def sign_in(driver, key):
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()


def stored_key(driver):
    return driver.execute_script("return sessionStorage.getItem('imagentx.console.key')")


def main():
    driver = browser()
    try:
        run(driver)
        # Nothing the page did was refused by its own content security policy.
        refused = [e["message"] for e in driver.get_log("browser")
                   if "Content Security Policy" in e["message"] or e["level"] == "SEVERE"
                   and "/v1/" not in e["message"]]
        assert not refused, f"the browser logged errors: {refused}"
    finally:
        driver.quit()
    print("console: all checks passed", flush=True)


def run(driver):
    step("no key: the sign-in page, and nothing of the server's data")
    driver.get(BASE + "/console")
    until(driver, EC.visibility_of_element_located((By.ID, "sign-in-form")), "the sign-in form")
    assert not driver.find_element(By.ID, "nav").is_displayed()
    page = driver.page_source
    for secret in ("alice", "mallory", "probe", CFG["admin"], CFG["alice"]):
        assert secret not in page, f"the signed-out page shows {secret!r}"
    shot(driver, "sign-in")

    step("a user's key: refused with 403, and not kept")
    sign_in(driver, CFG["alice"])
    until(driver, contains("#sign-in-error", "403", "admin"), "the 403 for a user's key")
    assert not driver.find_element(By.ID, "nav").is_displayed()
    assert stored_key(driver) is None

    step("a bad key: refused with 401")
    sign_in(driver, "ixs_" + "0" * 64)
    until(driver, contains("#sign-in-error", "401"), "the 401 for a bad key")
    assert stored_key(driver) is None

    step("the admin key: the overview")
    sign_in(driver, CFG["admin"])
    until(driver, contains("#live-cards", "Calls in flight"), "the live figures")
    assert driver.find_element(By.ID, "nav").is_displayed()
    assert not driver.find_element(By.ID, "sign-in").is_displayed()

    step("a call made over the API appears while it runs, then in the figures")
    # Some traffic first: calls that succeed, and some stopped by their time limit.
    for user, n in (("alice", 6), ("mallory", 3)):
        for _ in range(n):
            status, report = api("POST", "/v1/tools/probe/invoke", CFG[user], {"input": {"op": "echo"}})
            assert status == 200 and report["status"] == "ok", (status, report)
    for _ in range(2):
        status, report = api("POST", "/v1/tools/probe/invoke", CFG["alice"],
                             {"input": {"op": "sleep", "ms": 5000}, "timeout_ms": 50})
        assert status == 200 and report["status"] == "timeout", (status, report)
    answers = {}

    def slow_call():
        answers["slow"] = api("POST", "/v1/tools/probe/invoke", CFG["alice"],
                              {"input": {"op": "sleep", "ms": 8000}, "timeout_ms": 20000})

    caller = threading.Thread(target=slow_call)
    caller.start()
    until(driver, contains("#live-calls tbody", "alice", "probe"), "alice's call in flight", seconds=7)
    until(driver, contains("#live-cards", "1 / "), "one call in flight", seconds=7)
    shot(driver, "overview-live")
    caller.join()
    status, report = answers["slow"]
    assert status == 200 and report["status"] == "ok", (status, report)
    until(driver, contains("#live-calls tbody", "No call is running"), "the call to end")
    # Switching the window asks for the figures at once (not at the next 10 s refresh).
    Select(driver.find_element(By.ID, "window")).select_by_value("1h")
    until(driver, contains("#top-users tbody", "alice"), "alice among the top users", seconds=4)
    until(driver, contains("#top-tools tbody", "probe"), "probe among the top tools", seconds=4)
    # alice: 6 + 2 + 1 calls, the 2 stopped by their timeout the errors.
    until(driver, contains("#top-users tbody tr:first-child", "alice\t9\t2\t2"), "alice's figures", seconds=4)
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart svg rect"), "the chart")
    shot(driver, "overview")

    step("the audit trail, filtered")
    driver.get(BASE + "/console#audit")
    until(driver, EC.visibility_of_element_located((By.ID, "audit-filters")), "the audit filters")
    form = driver.find_element(By.ID, "audit-filters")
    form.find_element(By.NAME, "user").send_keys("alice")
    Select(form.find_element(By.NAME, "kind")).select_by_value("execution")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    # The unfiltered trail may be on the page already (the section loads it
    # when opened): wait for the filtered answer, every row alice's execution.
    until(driver, only_rows("#audit-table tbody", "execution", "alice"), "only alice's execution records")
    shown = text(driver, "#audit-table tbody").splitlines()
    assert len(shown) == 9 and all("execution" in r and "alice" in r and "probe" in r for r in shown), shown
    shot(driver, "audit")
    click(driver, "#audit-table tbody tr td:first-child")
    until(driver, contains("#record-body", '"kind": "execution"', '"user": "alice"'), "the record's detail")
    driver.find_element(By.ID, "record-close").click()
    assert not driver.execute_script("return document.getElementById('record-dialog').open")

    step("suspend a user: the API refuses them")
    driver.get(BASE + "/console#users")
    until(driver, contains("#user-table tbody", "alice", "mallory", "root"), "the users")
    click(driver, "tr[data-user=alice] button.suspend")
    until(driver, EC.visibility_of_element_located((By.ID, "suspend-dialog")), "the suspend dialog")
    dialog = driver.find_element(By.ID, "suspend-form")
    Select(dialog.find_element(By.NAME, "for_s")).select_by_value("86400")
    # Enter in the reason submits the dialog, as in any form.
    dialog.find_element(By.NAME, "reason").send_keys("checked by the console test", Keys.ENTER)
    until(driver, contains("tr[data-user=alice] td.restricted", "suspended until"), "alice suspended")
    status, answer = api("GET", "/v1/me", CFG["alice"])
    assert status == 403 and answer["error"]["code"] == "suspended", (status, answer)
    assert "checked by the console test" in answer["error"]["message"], answer
    status, users = api("GET", "/v1/users", CFG["admin"])
    until_s = next(u["suspended_until"] for u in users["users"] if u["id"] == "alice")
    left = driver.execute_script("return (Date.parse(arguments[0]) - Date.now()) / 1000", until_s)
    assert 86_000 < left <= 86_400, f"a day was chosen, the suspension runs {left} s"
    shot(driver, "users")

    step("the last admin cannot be suspended: the dialog says why")
    click(driver, "tr[data-user=root] button.suspend")
    until(driver, EC.visibility_of_element_located((By.ID, "suspend-dialog")), "the suspend dialog")
    driver.find_element(By.ID, "suspend-confirm").click()
    until(driver, contains("#suspend-error", "409"), "the 409 for the last admin")
    driver.find_element(By.ID, "suspend-cancel").click()
    assert not driver.execute_script("return document.getElementById('suspend-dialog').open")
    status, _ = api("GET", "/v1/me", CFG["admin"])
    assert status == 200, status

    step("unsuspend: the API serves them again")
    click(driver, "tr[data-user=alice] button.unsuspend")
    until(driver, lambda d: "suspended" not in text(d, "tr[data-user=alice] td.restricted"), "alice unsuspended")
    status, _ = api("GET", "/v1/me", CFG["alice"])
    assert status == 200, status

    step("an anomaly, with its evidence and the response it took")
    for _ in range(5):
        status, answer = api("GET", "/v1/files/%2Fetc%2Fpasswd", CFG["mallory"])
        assert status == 400, (status, answer)
    driver.get(BASE + "/console#anomalies")
    until(driver, contains("#anomaly-list", "escape_attempts", "mallory", "suspend"), "mallory's anomaly")
    card = text(driver, "#anomaly-list .anomaly")
    assert "/etc/passwd" in card, card
    shot(driver, "anomalies")

    step("the user's page: restriction, figures and records")
    click(driver, "#anomaly-list .anomaly a[href='#user/mallory']")
    until(driver, contains("#user-title", "mallory"), "mallory's page")
    until(driver, contains("#user-info", "suspended until"), "mallory's suspension")
    until(driver, contains("#user-audit tbody", "anomaly", "user_suspended"), "mallory's records")
    # Mallory's own figures (?user=): 3 calls, and the 5 refused escapes and the anomaly.
    until(driver, contains("#user-totals", "escape 5", "anomaly 1"), "mallory's security events")
    calls = driver.execute_script("return document.querySelector('#user-totals .card .value').textContent")
    assert calls == "3", calls
    until(driver, contains("#user-tools tbody", "probe\t3"), "mallory's tools")
    shot(driver, "user")
    status, answer = api("GET", "/v1/me", CFG["mallory"])
    assert status == 403 and answer["error"]["code"] == "suspended", (status, answer)

    step("sign out: nothing stays")
    driver.find_element(By.ID, "sign-out").click()
    until(driver, EC.visibility_of_element_located((By.ID, "sign-in-form")), "the sign-in form")
    assert stored_key(driver) is None
    # Hidden elements included: nothing of what was shown stays in the document.
    page = driver.execute_script("return document.body.textContent")
    for secret in ("alice", "mallory", "escape_attempts", "probe"):
        assert secret not in page, f"the signed-out page still holds {secret!r}"


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        traceback.print_exc()
        print(f"console: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
