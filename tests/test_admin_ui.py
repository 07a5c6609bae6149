"""The admin web UI (docs/admin.md § Web UI): pages on the in-memory gateway, then a real
headless Chromium, driven by Selenium, against a real gateway."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.devices.ca import DeviceCA, create_csr, generate_key
from aico.gateway.devices.registry import Device
from aico.gateway.testing.harness import start_gateway
from aico.gateway.testing.memory import MemoryGateway, MemoryResponse
from tests.test_admin import FORM, cookie_of, csrf_of, form_login

log = Logger(namespace="tests.test_admin_ui")

PAGES = ("/admin/", "/admin/config", "/admin/logs", "/admin/devices", "/admin/users",
         "/admin/audit")
CODE = re.compile(r"[A-Z0-9]{4}-[A-Z0-9]{4}")


def add_device(registry: Any, name: str) -> Deferred[Device]:
    ca = DeviceCA.create()
    cert = ca.issue_client_cert(create_csr(generate_key(), name), name)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return Deferred.fromCoroutine(registry.add(pem, name))


class PageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(test=self)
        self.cookie = cookie_of(form_login(self.gw))
        self.csrf = csrf_of(self.gw, self.cookie)

    def get(self, path: str, cookie: str | None = None) -> MemoryResponse:
        return self.gw.admin_request("GET", path, headers={
            "Cookie": self.cookie if cookie is None else cookie})

    def post(self, path: str, fields: dict[str, str], csrf: bool = True) -> MemoryResponse:
        if csrf:
            fields = {"csrf_token": self.csrf, **fields}
        return self.gw.admin_request("POST", path, data=urlencode(fields).encode(),
                                     headers={**FORM, "Cookie": self.cookie}, advance=1)

    def device(self, name: str) -> Device:
        device: Device = self.successResultOf(add_device(self.gw.parts.devices, name))
        self.gw.parts.device_gate.remember(device)
        return device

    def test_every_page_redirects_to_the_login_form_without_a_session(self) -> None:
        for path in PAGES:
            r = self.get(path, cookie="")
            self.assertEqual(r.code, 303, path)
            self.assertEqual(r.header("location"), "/admin/login", path)
        r = self.gw.admin_request("POST", "/admin/devices/pairing", data=b"minutes=5",
                                  headers={**FORM, "Cookie": ""})
        self.assertEqual((r.code, r.header("location")), (303, "/admin/login"))

    def test_every_page_has_the_nav_bar_the_stylesheet_and_the_csrf_meta(self) -> None:
        for path in PAGES:
            r = self.get(path)
            self.assertEqual(r.code, 200, (path, r.body[-400:]))
            html = r.body.decode()
            for link in PAGES:
                self.assertIn(f'href="{link}"', html, path)
            self.assertIn(f'<meta name="csrf-token" content="{self.csrf}"', html)
            self.assertIn('href="/admin/ui.css"', html)
            self.assertIn('aria-current="page"', html)
        css = self.gw.admin_request("GET", "/admin/ui.css")
        self.assertEqual(css.code, 200)
        self.assertIn(b"focus-visible", css.body)
        js = self.gw.admin_request("GET", "/admin/ui.js")
        self.assertEqual(js.code, 200)
        self.assertIn(b"EventSource", js.body)

    def test_each_page_shows_its_data(self) -> None:
        self.device("kitchen-tablet")
        dashboard = self.get("/admin/").body.decode()
        for name in self.gw.parts.directory.modules:
            self.assertIn(name, dashboard)
        self.assertIn(self.gw.parts.version, dashboard)
        self.assertIn("Connections", dashboard)
        self.assertIn("kitchen-tablet", self.get("/admin/devices").body.decode())
        self.assertIn("<strong>admin</strong>", self.get("/admin/users").body.decode())
        audit = self.get("/admin/audit").body.decode()
        self.assertIn("Verified", audit)
        self.assertIn("login", audit)
        self.assertIn('"ratelimit"', self.get("/admin/config").body.decode())
        logs = self.get("/admin/logs?level=info").body.decode()
        self.assertIn("aico.access", logs)
        self.assertIn('data-src="/admin/api/logs/tail?level=info"', logs)

    def test_a_form_without_the_csrf_token_is_refused_and_changes_nothing(self) -> None:
        phone = self.device("phone")
        r = self.post(f"/admin/devices/{phone.device_id}/revoke", {}, csrf=False)
        self.assertEqual(r.code, 403)
        self.assertFalse(self.gw.parts.device_gate.lookup(phone.device_id) is None)
        r = self.post("/admin/users", {"username": "mallory", "password": "mallory-pass-1",
                                       "roles": "admin"}, csrf=False)
        self.assertEqual(r.code, 403)
        self.assertNotIn("mallory", self.get("/admin/users").body.decode())

    def test_the_revoke_button_revokes_the_device(self) -> None:
        phone = self.device("phone")
        devices = self.get("/admin/devices").body.decode()
        self.assertIn(f'action="/admin/devices/{phone.device_id}/revoke"', devices)
        r = self.post(f"/admin/devices/{phone.device_id}/revoke", {})
        self.assertEqual(r.code, 200, r.body[-400:])
        self.assertIn("revoked", r.body.decode())
        self.assertIsNone(self.gw.parts.device_gate.lookup(phone.device_id))

    def test_opening_a_pairing_window_shows_the_code_and_an_svg_qr_code(self) -> None:
        r = self.post("/admin/devices/pairing", {"minutes": "5", "device_name": "tab"})
        self.assertEqual(r.code, 200, r.body[-400:])
        html = r.body.decode()
        code = CODE.search(html.split('id="pairing-code"', 1)[1])
        assert code is not None
        self.assertRegex(html, r'<div class="qr" id="pairing-qr"><svg [^>]*>')
        self.assertIn(f"code={code.group(0)}", html)

    def test_the_user_forms_create_and_disable_a_user(self) -> None:
        r = self.post("/admin/users", {"username": "carol", "password": "carol-password-1",
                                       "roles": "user"})
        self.assertEqual(r.code, 200, r.body[-400:])
        self.assertIn("User carol created.", r.body.decode())
        r = self.post("/admin/users/carol/disable", {})
        self.assertIn("User carol disabled.", r.body.decode())
        self.assertIn('action="/admin/users/carol/enable"', r.body.decode())

    def test_a_refused_action_is_shown_not_hidden(self) -> None:
        # The memory gateway has no config file: the API's 409 shows on the page.
        r = self.post("/admin/config", {"patch": '{"logging": {"access": true}}'})
        self.assertEqual(r.code, 200)
        self.assertIn("Refused (409)", r.body.decode())
        r = self.post("/admin/config", {"patch": "not json"})
        self.assertIn("Not JSON", r.body.decode())


# -- the real browser ------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")


def _drive(base: str, password: str, shots: Path, device_name: str) -> dict[str, Any]:
    """Everything the browser does (blocking: run in a thread). Returns what it saw."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="aico-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    seen: dict[str, Any] = {}
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 10)

        def shot(name: str) -> None:
            path = shots / f"{name}.png"
            driver.save_screenshot(str(path))
            seen.setdefault("screenshots", []).append(str(path))

        driver.get(base + "/admin/")
        wait.until(ec.presence_of_element_located((By.NAME, "username")))
        seen["login_url"] = driver.current_url
        driver.find_element(By.NAME, "username").send_keys("admin")
        driver.find_element(By.NAME, "password").send_keys(password + Keys.ENTER)
        wait.until(ec.title_contains("Dashboard"))
        seen["dashboard"] = driver.find_element(By.ID, "main").text
        # Keyboard: the first Tab stop is a real link of the nav bar.
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        seen["first_tab"] = driver.switch_to.active_element.get_attribute("href")
        shot("dashboard")

        driver.find_element(By.LINK_TEXT, "Config").click()
        wait.until(ec.title_contains("Config"))
        seen["config"] = driver.find_element(By.ID, "config").text
        shot("config")

        driver.find_element(By.LINK_TEXT, "Logs").click()
        wait.until(ec.title_contains("Logs"))
        seen["logs"] = driver.find_element(By.ID, "main").text
        wait.until(ec.text_to_be_present_in_element((By.ID, "tail-state"), "live"))
        # A new request: its access-log line must reach the open page through the tail.
        try:
            urllib.request.urlopen(base + "/admin/from-the-test", timeout=5).read()
        except urllib.error.HTTPError as e:  # 404: its access-log line is what counts
            seen["probe_status"] = e.code
        wait.until(ec.text_to_be_present_in_element((By.ID, "tail"), "from-the-test"))
        seen["tail"] = driver.find_element(By.ID, "tail").text
        shot("logs")

        driver.find_element(By.LINK_TEXT, "Devices").click()
        wait.until(ec.title_contains("Devices"))
        seen["devices"] = driver.find_element(By.ID, "main").text
        minutes = driver.find_element(By.ID, "minutes")
        minutes.clear()
        minutes.send_keys("2")
        driver.find_element(By.XPATH, "//button[text()='Open pairing window']").click()
        wait.until(ec.presence_of_element_located((By.ID, "pairing-code")))
        seen["code"] = driver.find_element(By.ID, "pairing-code").text
        seen["qr_svgs"] = len(driver.find_elements(By.CSS_SELECTOR, "#pairing-qr svg"))
        shot("devices")
        driver.find_element(By.CSS_SELECTOR, f"button[aria-label='Revoke {device_name}']").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "main"), "revoked."))

        driver.find_element(By.LINK_TEXT, "Users").click()
        wait.until(ec.title_contains("Users"))
        driver.find_element(By.ID, "new-username").send_keys("carol")
        driver.find_element(By.ID, "new-password").send_keys("carol-password-1")
        driver.find_element(By.XPATH, "//button[text()='Create']").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "main"), "User carol created."))
        seen["users"] = driver.find_element(By.ID, "main").text
        shot("users")

        driver.find_element(By.LINK_TEXT, "Audit").click()
        wait.until(ec.title_contains("Audit"))
        seen["audit"] = driver.find_element(By.ID, "main").text
        shot("audit")

        driver.find_element(By.LINK_TEXT, "Dashboard").click()
        wait.until(ec.title_contains("Dashboard"))
        docs = os.environ.get("AICO_UI_DOCS_SCREENSHOT")
        if docs:  # scripts/maintainers only: the screenshot in docs/
            driver.save_screenshot(docs)
            seen["docs_screenshot"] = docs
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return seen


class BrowserTests(TestCase):
    timeout = 60

    async def test_an_admin_uses_every_page_in_a_real_headless_chromium(self) -> None:
        gw = await start_gateway(self)
        for _ in range(100):  # the built-in modules register over the bus
            if gw.parts.directory.modules:
                break
            await deferLater(reactor, 0.05, lambda: None)
        modules = sorted(gw.parts.directory.modules)
        self.assertTrue(modules)
        await add_device(gw.parts.devices, "ui-test-phone")
        base = f"http://127.0.0.1:{gw.ports['admin']['port']}"
        shots = Path("screenshots").absolute()  # under the trial temp directory
        shots.mkdir(exist_ok=True)
        started = time.monotonic()
        seen = await deferToThread(_drive, base, gw.admin_password, shots, "ui-test-phone")
        log.info("admin UI screenshots: {paths} ({seconds:.1f} s)",
                 paths=", ".join(seen["screenshots"]), seconds=time.monotonic() - started)
        print("admin UI screenshots:", *seen["screenshots"], sep="\n  ")

        self.assertTrue(seen["login_url"].endswith("/admin/login"))
        for name in modules:
            self.assertIn(name, seen["dashboard"])
        self.assertIn(gw.parts.version, seen["dashboard"])
        self.assertEqual(seen["first_tab"], base + "/admin/")
        self.assertIn('"admin"', seen["config"])
        self.assertIn("aico.access", seen["logs"])
        self.assertIn("from-the-test", seen["tail"])
        self.assertIn("ui-test-phone", seen["devices"])
        self.assertRegex(seen["code"], CODE)
        self.assertEqual(seen["qr_svgs"], 1)
        self.assertIn("carol", seen["users"])
        self.assertIn("admin", seen["users"])
        self.assertIn("Verified", seen["audit"])
        for event in ("pairing_opened", "device_revoked", "admin_action"):
            self.assertIn(event, seen["audit"])
        self.assertIsNone(gw.parts.device_gate.lookup(
            next(d.device_id for d in await gw.parts.devices.list()
                 if d.name == "ui-test-phone")))
        for path in seen["screenshots"]:
            self.assertGreater(Path(path).stat().st_size, 1000, path)
