"""Argon2id password hashing, synchronous and through a thread pool."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import argon2
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.security.passwords import (
    PARAMETERS,
    PasswordService,
    PasswordServiceBusy,
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


class HandFired:
    """A runner whose work runs only when the test fires it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], /, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def fire(self, i: int) -> None:
        f, args, d = self.calls[i]
        d.callback(f(*args))


class ConcurrencyCapTests(SynchronousTestCase):
    """At most ``concurrency`` operations run and ``queue`` wait; the next is refused."""

    def setUp(self) -> None:
        self.runner = HandFired()
        self.service = PasswordService(self.runner, FAST, concurrency=2, queue=2)
        self.encoded = hash_password("pw", FAST)

    def outcome(self, d: Deferred[Any]) -> list[Any]:
        out: list[Any] = []
        d.addBoth(out.append)
        return out

    def test_past_the_cap_and_the_queue_every_kind_of_work_is_refused_at_once(self) -> None:
        started = [self.outcome(self.service.verify(self.encoded, "pw")),
                   self.outcome(self.service.dummy_verify("x")),
                   self.outcome(self.service.hash("new")),
                   self.outcome(self.service.verify(None, "y"))]
        self.assertEqual(len(self.runner.calls), 2)
        self.assertEqual((self.service.running, self.service.waiting), (2, 2))
        for call in (lambda: self.service.verify(self.encoded, "pw"),
                     lambda: self.service.verify(None, "pw"),
                     lambda: self.service.hash("pw"),
                     lambda: self.service.dummy_verify("pw")):
            refused = self.failureResultOf(call(), PasswordServiceBusy)
            self.assertEqual(refused.value.retry_after, 1)
        self.assertEqual(len(self.runner.calls), 2)  # none of them reached the runner
        self.assertEqual(self.service.refused, 4)
        self.assertEqual([o for o in started if o], [])

    def test_when_one_finishes_the_first_waiting_one_starts(self) -> None:
        first = self.outcome(self.service.verify(self.encoded, "pw"))
        self.outcome(self.service.verify(self.encoded, "no"))
        third = self.outcome(self.service.verify(self.encoded, "pw"))
        fourth = self.outcome(self.service.hash("x"))
        self.runner.fire(0)
        self.assertEqual(first, [True])
        self.assertEqual(len(self.runner.calls), 3)
        self.assertEqual(self.runner.calls[2][1][1], "pw")  # in order: the third call
        self.runner.fire(2)
        self.assertEqual(third, [True])
        self.assertEqual(len(self.runner.calls), 4)
        self.runner.fire(3)
        self.assertTrue(fourth[0].startswith("$argon2id$"))
        self.assertEqual((self.service.running, self.service.waiting), (1, 0))

    def test_a_failing_operation_frees_its_slot(self) -> None:
        self.service.verify(self.encoded, "a")
        failed = self.outcome(self.service.verify(self.encoded, "b"))
        self.service.verify(self.encoded, "c")
        self.runner.calls[1][2].errback(RuntimeError("pool stopped"))
        self.assertIsInstance(failed[0].value, RuntimeError)
        self.assertEqual((self.service.running, self.service.waiting, len(self.runner.calls)),
                         (2, 0, 3))
        failed[0].trap(RuntimeError)

    def test_a_cancelled_waiting_call_leaves_the_queue_a_cancelled_running_one_keeps_its_slot(
            self) -> None:
        running = self.service.verify(self.encoded, "a")
        self.service.verify(self.encoded, "b")
        waiting = self.service.verify(self.encoded, "c")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.service.waiting, 0)
        running.cancel()
        self.failureResultOf(running, CancelledError)
        # The thread cannot be stopped: the slot is taken until the work ends.
        self.assertEqual(self.service.running, 2)
        self.runner.fire(0)
        self.assertEqual(self.service.running, 1)

    def test_raising_the_cap_starts_waiting_work_and_checks_its_values(self) -> None:
        for _ in range(4):
            self.service.verify(self.encoded, "pw")
        self.service.limit(4, 2)
        self.assertEqual((len(self.runner.calls), self.service.waiting), (4, 0))
        self.assertRaises(ValueError, self.service.limit, 0, 2)
        self.assertRaises(ValueError, self.service.limit, 1, -1)

    def test_a_zero_queue_refuses_as_soon_as_every_slot_is_busy(self) -> None:
        service = PasswordService(self.runner, FAST, concurrency=1, queue=0)
        service.verify(self.encoded, "pw")
        self.failureResultOf(service.verify(self.encoded, "pw"), PasswordServiceBusy)


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
