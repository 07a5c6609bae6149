"""Argon2id password hashing, synchronous and through a thread pool."""

from __future__ import annotations

from typing import Any

import argon2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.security.passwords import (
    PARAMETERS,
    PasswordService,
    hash_password,
    make_hasher,
    needs_rehash,
    synchronous_runner,
    thread_pool_runner,
    verify_password,
)

#: Cheap parameters so the service tests run fast; the algorithm stays Argon2id.
FAST = make_hasher(
    argon2.Parameters(
        type=argon2.Type.ID,
        version=19,
        salt_len=16,
        hash_len=32,
        time_cost=1,
        memory_cost=8,
        parallelism=1,
    )
)


def _result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert len(results) == 1, "Deferred did not fire synchronously"
    return results[0]


class HashTests(SynchronousTestCase):
    def test_hash_is_argon2id_with_documented_parameters(self) -> None:
        encoded = hash_password("correct horse")
        self.assertTrue(encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), encoded)
        self.assertEqual(argon2.extract_parameters(encoded), PARAMETERS)

    def test_verify_accepts_right_and_refuses_wrong_password(self) -> None:
        encoded = hash_password("correct horse")
        self.assertTrue(verify_password(encoded, "correct horse"))
        self.assertFalse(verify_password(encoded, "correct horse!"))

    def test_salts_differ(self) -> None:
        self.assertNotEqual(hash_password("x", FAST), hash_password("x", FAST))

    def test_malformed_hash_verifies_false(self) -> None:
        self.assertFalse(verify_password("not-a-hash", "x"))
        self.assertFalse(verify_password("", "x"))

    def test_nfc_and_nfd_forms_verify_alike(self) -> None:
        encoded = hash_password("caf\u00e9", FAST)
        self.assertTrue(verify_password(encoded, "cafe\u0301", FAST))

    def test_overlong_password_is_refused(self) -> None:
        self.assertRaises(ValueError, hash_password, "x" * 5000, FAST)
        self.assertFalse(verify_password(hash_password("x", FAST), "x" * 5000, FAST))

    def test_needs_rehash_for_other_parameters(self) -> None:
        self.assertTrue(needs_rehash(hash_password("x", FAST)))
        self.assertFalse(needs_rehash(hash_password("x")))
        self.assertTrue(needs_rehash("garbage"))


class SynchronousServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = PasswordService(synchronous_runner, FAST)

    def test_hash_then_verify(self) -> None:
        encoded = _result(self.service.hash("pw"))
        self.assertTrue(_result(self.service.verify(encoded, "pw")))
        self.assertFalse(_result(self.service.verify(encoded, "other")))

    def test_unknown_user_verify_is_false_and_does_real_work(self) -> None:
        calls: list[str] = []
        hasher = FAST

        class Counting(argon2.PasswordHasher):
            def verify(self, hash: str | bytes, password: str | bytes) -> bool:
                calls.append("verify")
                return super().verify(hash, password)

        counting = Counting.from_parameters(argon2.extract_parameters(hasher.hash("x")))
        service = PasswordService(synchronous_runner, counting)
        _result(service.prepare())
        self.assertFalse(_result(service.verify(None, "anything")))
        self.assertFalse(_result(service.dummy_verify("anything")))
        self.assertEqual(calls, ["verify", "verify"])

    def test_runner_receives_the_work(self) -> None:
        ran: list[str] = []

        def runner(f: Any, /, *args: Any) -> Deferred[Any]:
            ran.append(getattr(f, "__name__", repr(f)))
            return synchronous_runner(f, *args)

        service = PasswordService(runner, FAST)
        _result(service.hash("pw"))
        self.assertEqual(ran, ["hash_password"])


class ThreadPoolServiceTests(TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(1, 1, name="test-passwords")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    @inlineCallbacks
    def test_hash_and_verify_in_pool(self) -> Any:
        import threading

        main = threading.get_ident()
        seen: list[int] = []

        def runner(f: Any, /, *args: Any) -> Deferred[Any]:
            def wrapped(*a: Any) -> Any:
                seen.append(threading.get_ident())
                return f(*a)

            return thread_pool_runner(reactor, self.pool)(wrapped, *args)  # type: ignore[arg-type]

        service = PasswordService(runner, FAST)
        encoded = yield service.hash("pw")
        ok = yield service.verify(encoded, "pw")
        self.assertTrue(ok)
        self.assertTrue(seen)
        self.assertNotIn(main, seen)
