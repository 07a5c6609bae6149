"""Password hashing: Argon2id through argon2-cffi, off the reactor thread.

Parameters (:data:`PARAMETERS`) are RFC 9106's second recommended option, the
"low-memory" profile that argon2-cffi also uses by default: Argon2id, t=3 passes,
m=64 MiB, p=4 lanes, a 16-byte random salt and a 32-byte tag. One hash or verify takes
about a quarter of a second of CPU on these machines, so the gateway runs them in a thread
pool (:class:`PasswordService`); the synchronous :func:`hash_password` and
:func:`verify_password` are for bootstrap and the CLI, which run before the reactor.

The parameters travel inside every encoded hash (``$argon2id$v=19$m=65536,t=3,p=4$…``),
so changing them later still verifies old hashes; :func:`needs_rehash` says when a
stored hash should be replaced after a successful login.

The service runs at most ``concurrency`` Argon2 operations at once (every kind: hash,
verify, the dummy verify for unknown users) and lets at most ``queue`` more wait; past
that it refuses at once with :class:`PasswordServiceBusy` (the gateway answers 503 with
``Retry-After``), so a flood of logins costs a bounded amount of CPU and memory
(64 MiB per operation) and never an unbounded queue.

Passwords are NFC-normalised before hashing and verifying (as RFC 8265's OpaqueString
profile asks), so the same password typed on two keyboards verifies alike.
"""

from __future__ import annotations

import secrets
import threading
import unicodedata
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = [
    "PARAMETERS",
    "PasswordService",
    "PasswordServiceBusy",
    "ThreadRunner",
    "hash_password",
    "make_hasher",
    "needs_rehash",
    "synchronous_runner",
    "thread_pool_runner",
    "verify_password",
]

T = TypeVar("T")

#: The Argon2id parameters of new hashes (RFC 9106 §4, second recommended option).
PARAMETERS: argon2.Parameters = argon2.profiles.RFC_9106_LOW_MEMORY

#: Longest password accepted; longer input is refused rather than hashed (cheap DoS guard).
MAX_PASSWORD_LENGTH = 1024


def make_hasher(parameters: argon2.Parameters = PARAMETERS) -> argon2.PasswordHasher:
    """A :class:`argon2.PasswordHasher` for *parameters* (tests may pass cheaper ones)."""
    return argon2.PasswordHasher.from_parameters(parameters)


_DEFAULT = make_hasher()


def _normalise(password: str) -> str:
    if len(password) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"passwords are limited to {MAX_PASSWORD_LENGTH} characters")
    return unicodedata.normalize("NFC", password)


def hash_password(password: str, hasher: argon2.PasswordHasher | None = None) -> str:
    """The encoded Argon2id hash of *password* (blocking, ~0.25 s of CPU)."""
    return (hasher or _DEFAULT).hash(_normalise(password))


def verify_password(
    encoded: str, password: str, hasher: argon2.PasswordHasher | None = None
) -> bool:
    """Whether *password* matches the encoded hash; False for a malformed hash (blocking)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        return (hasher or _DEFAULT).verify(encoded, _normalise(password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(encoded: str, hasher: argon2.PasswordHasher | None = None) -> bool:
    """Whether *encoded* was made with other parameters than the current ones."""
    try:
        return (hasher or _DEFAULT).check_needs_rehash(encoded)
    except (InvalidHashError, ValueError):
        return True


# --------------------------------------------------------------------------- off the reactor


class ThreadRunner(Protocol):
    """Runs ``f(*args)`` somewhere (normally a thread pool) and returns a Deferred."""

    def __call__(self, f: Callable[..., T], /, *args: Any) -> Deferred[T]: ...


def thread_pool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> ThreadRunner:
    """A runner that uses ``deferToThreadPool(reactor, pool, …)``."""

    def run(f: Callable[..., T], /, *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f, *args)

    return run


def synchronous_runner(f: Callable[..., T], /, *args: Any) -> Deferred[T]:
    """A runner that calls at once on the current thread (for synchronous tests)."""
    return maybeDeferred(f, *args)


class PasswordServiceBusy(Exception):
    """Every Argon2 slot is busy and the queue is full: the caller should retry later."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("too many password operations in progress")
        #: Whole seconds after which a retry is likely to find room.
        self.retry_after = retry_after


#: Argon2 operations run at once, and how many more may wait, unless configured
#: (``auth.password_concurrency``, ``auth.password_queue``).
DEFAULT_CONCURRENCY = 2
DEFAULT_QUEUE = 8


class PasswordService:
    """Asynchronous hashing and verification for the running gateway.

    Every call is handed to *runner* (a thread pool in production, see
    :func:`thread_pool_runner`; :func:`synchronous_runner` in tests), at most
    *concurrency* at once; up to *queue* more wait in order, and beyond that a call fails
    at once with :class:`PasswordServiceBusy` without reaching Argon2.

    ``verify(None, password)`` — or :meth:`dummy_verify` — verifies against a hash of a
    random password made with the same parameters, and answers False: a login for an
    unknown user costs the same time as one with a wrong password, so response times do
    not reveal which usernames exist.
    """

    def __init__(self, runner: ThreadRunner, hasher: argon2.PasswordHasher | None = None,
                 *, concurrency: int = DEFAULT_CONCURRENCY, queue: int = DEFAULT_QUEUE) -> None:
        #: Where the work runs (tests may swap it for one they fire by hand).
        self.runner = runner
        self._hasher = hasher or _DEFAULT
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()
        #: Operations handed to the runner and not finished yet.
        self.running = 0
        self._waiting: deque[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        #: Calls refused because every slot and the queue were taken.
        self.refused = 0
        self.concurrency = DEFAULT_CONCURRENCY
        self.queue = DEFAULT_QUEUE
        self.limit(concurrency, queue)

    def limit(self, concurrency: int, queue: int) -> None:
        """Set the cap (at least one at a time) and the queue length (zero: no waiting).
        Work already running or waiting is kept; a larger cap starts waiting work now."""
        if concurrency < 1 or queue < 0:
            raise ValueError("password concurrency must be at least 1 and the queue at least 0")
        self.concurrency, self.queue = concurrency, queue
        self._start_waiting()

    @property
    def waiting(self) -> int:
        """Operations queued behind the running ones."""
        return len(self._waiting)

    def _submit(self, f: Callable[..., T], /, *args: Any) -> Deferred[T]:
        if self.running < self.concurrency and not self._waiting:
            out: Deferred[T] = Deferred()
            self._start(f, args, out)
            return out
        if len(self._waiting) >= self.queue:
            self.refused += 1
            return fail(PasswordServiceBusy())

        def cancel(d: Deferred[Any]) -> None:
            self._waiting = deque(w for w in self._waiting if w[0] is not d)

        waiter: Deferred[T] = Deferred(cancel)
        self._waiting.append((waiter, f, args))
        return waiter

    def _start(self, f: Callable[..., T], args: tuple[Any, ...], out: Deferred[T]) -> None:
        # *out* is the caller's: cancelling it does not free the slot, which stays taken
        # until the work itself ends (a thread cannot be stopped half-way); a result that
        # comes for a cancelled *out* is dropped.
        self.running += 1
        try:
            d = self.runner(f, *args)
        except Exception as e:
            self.running -= 1
            out.errback(e)
            return
        d.addBoth(self._finished).addCallbacks(out.callback, out.errback)

    def _finished(self, result: T) -> T:
        self.running -= 1
        self._start_waiting()
        return result

    def _start_waiting(self) -> None:
        while self._waiting and self.running < self.concurrency:
            waiter, f, args = self._waiting.popleft()
            self._start(f, args, waiter)

    def hash(self, password: str) -> Deferred[str]:
        return self._submit(hash_password, password, self._hasher)

    def verify(self, encoded: str | None, password: str) -> Deferred[bool]:
        if encoded is None:
            return self.dummy_verify(password)
        return self._submit(verify_password, encoded, password, self._hasher)

    def needs_rehash(self, encoded: str) -> bool:
        """Cheap; runs on the calling thread."""
        return needs_rehash(encoded, self._hasher)

    def prepare(self) -> Deferred[None]:
        """Make the dummy hash now (call at start-up), so even the first unknown-user
        login costs one verification rather than a hash plus a verification."""
        d: Deferred[Any] = self._submit(self._dummy_hash)
        return d.addCallback(lambda _: None)

    def dummy_verify(self, password: str) -> Deferred[bool]:
        """Spend the time of a real verification, then answer False."""
        return self._submit(self._verify_dummy, password)

    def _dummy_hash(self) -> str:
        # Made lazily (in the runner's thread) and once; the random password is discarded.
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self._hasher.hash(secrets.token_urlsafe(32))
            return self._dummy

    def _verify_dummy(self, password: str) -> bool:
        verify_password(self._dummy_hash(), password[:MAX_PASSWORD_LENGTH], self._hasher)
        return False
