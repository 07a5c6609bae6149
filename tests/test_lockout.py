"""Lockout is not a weapon: failed logins count per (account, source); a lock earned from
one source never refuses the right password from another; all of loopback is one
source, an IPv6 source its /64; the lock's growth decays; the answer and the work stay
the same for unknown, locked, disabled and wrong-password logins."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.routing.messages import Request, request_id_from
from aico.gateway.security.passwords import synchronous_runner
from aico.gateway.testing.memory import MemoryGateway
from aico.net import is_loopback, source_identity

PASSWORD = "the-right-password-1"
AUTH = "/api/v1/users/authenticate"


def login_from(test: SynchronousTestCase, gw: MemoryGateway, host: str, username: str,
               password: str) -> tuple[int, dict[str, Any]]:
    """A login through the gateway's dispatcher as if from *host* (status, body)."""
    request = Request("POST", AUTH, request_id_from(None), "http", peer_host=host,
                      loopback=is_loopback(host), headers={"content-type": "application/json"},
                      body=json.dumps({"username": username, "password": password}).encode())
    d = gw.parts.dispatcher.handle(request)
    gw.settle()
    response = test.successResultOf(d)
    body: dict[str, Any] = json.loads(response.body)
    return response.status, body


class SourceIdentityTests(SynchronousTestCase):
    def test_all_of_loopback_is_one_identity(self) -> None:
        for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "localhost",
                     "::ffff:127.0.0.1"):
            self.assertEqual(source_identity(host), "loopback", host)

    def test_ipv6_collapses_to_its_64_and_ipv4_stays_exact(self) -> None:
        self.assertEqual(source_identity("2001:db8:1:2::a"), "2001:db8:1:2::/64")
        self.assertEqual(source_identity("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64")
        self.assertNotEqual(source_identity("2001:db8:1:3::a"), source_identity("2001:db8:1:2::a"))
        self.assertEqual(source_identity("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_identity("192.0.2.7"), "192.0.2.7")
        self.assertEqual(source_identity("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertNotEqual(source_identity("192.0.2.8"), source_identity("192.0.2.7"))
        self.assertEqual(source_identity(""), "")


class PerSourceLockTests(SynchronousTestCase):
    config = "[auth]\nlockout_threshold = 3\nlockout_base = 60.0\nlockout_max = 600.0\n"

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.config, test=self)
        self.gw.add_user("admin2", PASSWORD, ("admin",))

    def login(self, host: str, password: str, username: str = "admin2") -> int:
        return login_from(self, self.gw, host, username, password)[0]

    def failures(self) -> dict[str, tuple[int, float, int]]:
        d = Deferred.fromCoroutine(self.gw.parts.user_store.login_failures("admin2"))
        return self.successResultOf(d)

    def test_a_lock_from_one_source_never_refuses_the_right_password_from_another(self) -> None:
        for _ in range(3):
            self.assertEqual(self.login("192.0.2.66", "a-guess-of-mallory"), 401)
        self.assertEqual(self.login("192.0.2.66", PASSWORD), 401)  # locked for that source
        self.assertEqual(self.login("192.0.2.10", PASSWORD), 200)
        self.assertEqual(self.login("127.0.0.1", PASSWORD), 200)
        r = self.gw.post(AUTH, {"username": "admin2", "password": PASSWORD})  # over HTTP
        self.assertEqual(r.code, 200)
        self.assertEqual(self.login("192.0.2.66", PASSWORD), 401)  # still locked there

    def test_every_loopback_address_is_one_source(self) -> None:
        for host in ("127.0.0.1", "127.0.0.2", "::1"):
            self.assertEqual(self.login(host, "a-guess"), 401)
        self.assertEqual(self.login("127.9.9.9", PASSWORD), 401)
        self.assertEqual(list(self.failures()), ["loopback"])
        self.assertEqual(self.login("192.0.2.10", PASSWORD), 200)

    def test_an_ipv6_source_is_its_64(self) -> None:
        for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2::c"):
            self.assertEqual(self.login(host, "a-guess"), 401)
        self.assertEqual(self.login("2001:db8:1:2::ffff", PASSWORD), 401)
        self.assertEqual(self.login("2001:db8:1:3::1", PASSWORD), 200)

    def test_success_clears_only_its_own_sources_failures(self) -> None:
        for host in ("192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.2"):
            self.assertEqual(self.login(host, "a-guess"), 401)
        self.assertEqual(self.login("192.0.2.1", PASSWORD), 200)
        self.assertEqual({s: f for s, (f, _, _) in self.failures().items()}, {"192.0.2.2": 2})
        self.assertEqual(self.login("192.0.2.2", "a-guess"), 401)
        self.assertEqual(self.login("192.0.2.2", PASSWORD), 401)  # the third: locked

    def test_a_lock_is_audited_with_its_source(self) -> None:
        for _ in range(3):
            self.login("192.0.2.66", "a-guess")
        entries = self.successResultOf(self.gw.parts.audit.latest(10))
        locked = [e for e in entries if e.event == "account_locked"]
        self.assertEqual([(e.actor, e.detail["source"]) for e in locked], [("admin2", "192.0.2.66")])

    def test_a_new_password_clears_every_lock_of_the_account(self) -> None:
        for _ in range(3):
            self.login("192.0.2.66", "a-guess")
        r = self.gw.request("PATCH", "/api/v1/users/admin2", json_body={"password": "a-new-password-2"},
                            token=self.gw.token())
        self.assertEqual(r.code, 200)
        self.assertEqual(self.failures(), {})
        self.assertEqual(self.login("192.0.2.66", "a-new-password-2"), 200)


class DecayTests(SynchronousTestCase):
    """The level of a source's lock drops by one per ``lockout_max`` seconds without a
    failure from it (counted from the end of its lock)."""

    config = "[auth]\nlockout_threshold = 2\nlockout_base = 10.0\nlockout_max = 100.0\n"

    def setUp(self) -> None:
        self.gw = MemoryGateway(self.config, test=self)
        self.gw.add_user("kim", PASSWORD)

    def lock(self) -> float:
        """Fail twice from one source; the length of the lock that earns."""
        self.assertEqual(login_from(self, self.gw, "192.0.2.9", "kim", "a-guess")[0], 401)
        self.assertEqual(login_from(self, self.gw, "192.0.2.9", "kim", "a-guess")[0], 401)
        entry = self.successResultOf(self.gw.parts.audit.latest(1))[0]
        self.assertEqual((entry.event, entry.actor), ("account_locked", "kim"))
        seconds: float = entry.detail["seconds"]
        return seconds

    def test_the_locks_growth_decays_with_quiet_time(self) -> None:
        lengths = []
        for _ in range(4):
            lengths.append(self.lock())
            self.gw.advance(lengths[-1])  # the lock ends; the next failures come at once
        self.assertEqual(lengths, [10.0, 20.0, 40.0, 80.0])
        self.gw.advance(100.0)  # one quiet lockout_max after the lock ended: one level down
        self.assertEqual(self.lock(), 80.0)
        self.gw.advance(80.0 + 99.0)  # not quite a quiet lockout_max: no decay
        self.assertEqual(self.lock(), 100.0)  # 160 s, capped at lockout_max
        self.gw.advance(100.0 + 400.0)  # four quiet periods: four levels down (of five)
        self.assertEqual(self.lock(), 20.0)
        self.gw.advance(20.0 + 1000.0)  # more quiet than levels: back to the first lock
        self.assertEqual(self.lock(), 10.0)

    def test_failures_in_a_row_are_forgotten_after_quiet_time(self) -> None:
        self.assertEqual(login_from(self, self.gw, "192.0.2.9", "kim", "a-guess")[0], 401)
        self.gw.advance(100.0)
        self.assertEqual(login_from(self, self.gw, "192.0.2.9", "kim", "a-guess")[0], 401)
        self.assertEqual(login_from(self, self.gw, "192.0.2.9", "kim", PASSWORD)[0], 200)

    def test_fully_decayed_sources_are_forgotten(self) -> None:
        self.lock()
        self.gw.advance(10.0 + 100.0)
        login_from(self, self.gw, "192.0.2.10", "kim", "a-guess")  # any later failure prunes
        d = Deferred.fromCoroutine(self.gw.parts.user_store.login_failures("kim"))
        self.assertEqual(list(self.successResultOf(d)), ["192.0.2.10"])


class NoEnumerationTests(SynchronousTestCase):
    config = "[auth]\nlockout_threshold = 2\n"

    def test_unknown_locked_disabled_and_wrong_logins_get_one_answer_and_one_verification(
        self,
    ) -> None:
        gw = MemoryGateway(self.config, test=self)
        gw.add_user("lou", PASSWORD)
        gw.add_user("dis", PASSWORD)
        r = gw.request("PATCH", "/api/v1/users/dis", json_body={"disabled": True}, token=gw.token())
        self.assertEqual(r.code, 200)
        for _ in range(2):
            login_from(self, gw, "192.0.2.5", "lou", "a-guess")
        calls: list[str] = []

        def counting(f: Any, /, *args: Any) -> Any:
            calls.append(f.__name__)
            return synchronous_runner(f, *args)

        self.patch(gw.passwords, "runner", counting)
        answers = {}
        for case, (username, password) in {
            "unknown": ("nobody-at-all", PASSWORD),
            "locked": ("lou", PASSWORD),
            "disabled": ("dis", PASSWORD),
            "wrong": ("admin", "a-wrong-password"),
        }.items():
            calls.clear()
            status, body = login_from(self, gw, "192.0.2.5", username, password)
            body.pop("request_id", None)
            answers[case] = (status, body)
            self.assertEqual(len(calls), 1, (case, calls))  # one Argon2 verification each
        self.assertEqual(len({json.dumps(a, sort_keys=True) for a in answers.values()}), 1, answers)
        self.assertEqual(answers["unknown"][0], 401)
