"""The sync protocol: AMP commands between two paired gateways (``docs/sync-protocol.md``).

One :class:`SyncProtocol` per connection, on both ends (AMP is symmetric: either side may
call any command). The side that dialled (the client) drives *rounds*
(:meth:`SyncProtocol.run_round`); the side that listens answers. A round, for every
collection both sides share with each other:

1. ``Roots``: the peer's Merkle roots; equal roots end the collection's round at once.
2. ``Children``/``Leaves``: descend only into subtrees whose hashes differ, level by level
   (many prefixes per call), down to the differing keys.
3. ``Fetch`` the peer's states of keys it has and we lack or hold differently, merge them
   (committed by the engine before we go on); ``Push`` ours (read again after the merge)
   of keys the peer lacks or holds differently — the peer answers only once its engine
   committed them.
4. ``Roots`` again; when they match, ``Ack`` (and the local ``acknowledged``) with the
   HLC bound of the round's start: each side holds every state the other had then.

Policy is enforced on both ends: a side only asks for, offers, answers about or accepts
collections that ``engine.collections_for(peer)`` allows for that very peer; anything
else is refused with ``NOT_SHARED`` and nothing is stored.

AMP values are limited to 64 KiB (:data:`amp.MAX_VALUE_LENGTH`): each command carries its
bulk as one JSON ``body``; a body over :data:`CHUNK` bytes travels instead as ``Part``
commands (transfer id, index, final flag) sent ahead of the command or answer that names
the transfer, and is reassembled on receipt within :data:`MAX_TRANSFER` bytes per
transfer and :data:`MAX_PENDING` per connection.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from aico.sync.interfaces import DEPTH, EMPTY, FANOUT, ISyncEngine, ItemState

__all__ = [
    "CHUNK",
    "MAJOR",
    "MAX_PENDING",
    "MAX_TRANSFER",
    "MINOR",
    "Ack",
    "BadRequest",
    "Children",
    "DeviceNotAllowed",
    "Fetch",
    "Hello",
    "Leaves",
    "NotReady",
    "NotShared",
    "Part",
    "Push",
    "Roots",
    "RoundReport",
    "SyncError",
    "SyncProtocol",
    "TooLarge",
    "UnsupportedVersion",
    "hlc_bound",
    "refusal",
]

log = Logger(namespace="aico.sync.protocol")

#: The protocol version this code speaks. A peer with another major is refused; minors
#: only add (optional arguments, commands the other side may not call).
MAJOR = 1
MINOR = 0
#: The largest body sent inline; bigger ones go as ``Part`` commands of this size.
CHUNK = 60 * 1024
#: The largest body one transfer may reassemble to, and all pending transfers of one
#: connection together.
MAX_TRANSFER = 32 * 1024 * 1024
MAX_PENDING = 64 * 1024 * 1024
#: How many transfers may be open at once on one connection.
MAX_TRANSFERS = 64
#: How many prefixes one ``Children``/``Leaves`` call asks about, keys one ``Fetch``
#: asks for, states one ``Push`` carries (the receiver refuses more).
PREFIXES_PER_CALL = 64
KEYS_PER_CALL = 512
_HEX = "0123456789abcdef"
assert len(_HEX) == FANOUT

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class SyncError(Exception):
    """A refusal with a code (the AMP error code); its text is for people."""

    code = b"SYNC_ERROR"


class UnsupportedVersion(SyncError):
    code = b"UNSUPPORTED_VERSION"


class NotShared(SyncError):
    code = b"NOT_SHARED"


class BadRequest(SyncError):
    code = b"BAD_REQUEST"


class TooLarge(SyncError):
    code = b"TOO_LARGE"


class NotReady(SyncError):
    code = b"NOT_READY"


class DeviceNotAllowed(SyncError):
    code = b"DEVICE_NOT_ALLOWED"


#: The engine's refusals (``aico.sync.engine.SyncRefused``, by its stable ``code``) as
#: the protocol's errors: a peer's state the engine will not merge is a bad request.
_REFUSALS: dict[str, type[SyncError]] = {
    "collection_not_shared": NotShared,
    "bad_state": BadRequest,
    "clock_drift": BadRequest,
}


def refusal(error: BaseException) -> SyncError | None:
    """The protocol error for an engine's refusal (``None``: not one). Duck-typed on
    the refusal's text ``code`` so that this module needs nothing of the engine."""
    code = getattr(error, "code", None)
    if isinstance(error, SyncError) or not isinstance(code, str) or code not in _REFUSALS:
        return None
    return _REFUSALS[code](f"{code}: {getattr(error, 'detail', '') or error}")


async def _engine(d: Deferred[T]) -> T:
    """Await an engine call; its refusal becomes the protocol's error (an AMP error
    with a code to the peer, a :class:`SyncError` that ends the round locally)."""
    try:
        return await d
    except Exception as e:
        mapped = refusal(e)
        if mapped is None:
            raise
        raise mapped from None


_ERRORS: dict[type[Exception], bytes] = {
    cls: cls.code for cls in (UnsupportedVersion, NotShared, BadRequest, TooLarge, NotReady,
                              DeviceNotAllowed)
}


# --------------------------------------------------------------------------- commands


def _bulk(*extra: tuple[bytes, amp.Argument]) -> list[tuple[bytes, amp.Argument]]:
    return [*extra, (b"body", amp.String()), (b"transfer", amp.Unicode(optional=True))]


class Hello(amp.Command):
    """Version negotiation and what each side offers (see the module docstring)."""

    arguments = [(b"major", amp.Integer()), (b"minor", amp.Integer()),
                 (b"node_id", amp.Unicode()), (b"collections", amp.ListOf(amp.Unicode()))]
    response = [(b"major", amp.Integer()), (b"minor", amp.Integer()),
                (b"node_id", amp.Unicode()), (b"collections", amp.ListOf(amp.Unicode()))]
    errors = _ERRORS


class Roots(amp.Command):
    """body: JSON list of collections → body: JSON ``{collection: hex root}``."""

    arguments = _bulk()
    response = _bulk()
    errors = _ERRORS


class Children(amp.Command):
    """body: JSON list of node prefixes (< DEPTH) → body: JSON ``[[child, hex], …]``."""

    arguments = _bulk((b"collection", amp.Unicode()))
    response = _bulk()
    errors = _ERRORS


class Leaves(amp.Command):
    """body: JSON list of bucket prefixes (= DEPTH) → ``{bucket: {key: hex digest}}``."""

    arguments = _bulk((b"collection", amp.Unicode()))
    response = _bulk()
    errors = _ERRORS


class Fetch(amp.Command):
    """body: JSON list of keys → body: JSON list of item states (unknown keys left out)."""

    arguments = _bulk((b"collection", amp.Unicode()))
    response = _bulk()
    errors = _ERRORS


class Push(amp.Command):
    """body: JSON list of item states → body: ``{"applied": n}``, sent only once committed."""

    arguments = _bulk((b"collection", amp.Unicode()))
    response = _bulk()
    errors = _ERRORS


class Ack(amp.Command):
    """The caller holds every state of *collection* the answerer had up to *hlc*."""

    arguments = [(b"collection", amp.Unicode()), (b"hlc", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []  # type: ignore[misc]
    errors = _ERRORS


class Part(amp.Command):
    """One piece of a body over :data:`CHUNK` bytes; the command or answer naming
    *transfer* follows the part marked *final*."""

    arguments = [(b"transfer", amp.Unicode()), (b"index", amp.Integer()),
                 (b"final", amp.Boolean()), (b"data", amp.String())]
    response: list[tuple[bytes, amp.Argument]] = []  # type: ignore[misc]
    errors = _ERRORS


# --------------------------------------------------------------------------- helpers


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _unjson(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest("the body is not JSON") from e


def _str_list(value: Any, what: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{what}: expected a list of strings")
    if len(value) > limit:
        raise TooLarge(f"{what}: at most {limit} per call")
    return value


def _prefix(value: str, *, bucket: bool) -> str:
    if any(c not in _HEX for c in value) or (len(value) == DEPTH) != bucket or len(value) > DEPTH:
        kind = f"a bucket prefix ({DEPTH} hex digits)" if bucket else \
            f"a node prefix (0-{DEPTH - 1} hex digits)"
        raise BadRequest(f"{value!r} is not {kind}")
    return value


def _states(value: Any, collection: str, keys: set[str] | None = None) -> list[ItemState]:
    if not isinstance(value, list):
        raise BadRequest("expected a list of item states")
    if len(value) > KEYS_PER_CALL:
        raise TooLarge(f"at most {KEYS_PER_CALL} states per call")
    out: list[ItemState] = []
    for raw in value:
        if not isinstance(raw, dict) or not isinstance(raw.get("state"), dict) \
                or not isinstance(raw.get("key"), str) or not isinstance(raw.get("hlc"), str):
            raise BadRequest("an item state is {collection, key, state, hlc, deleted}")
        if raw.get("collection") != collection:
            raise NotShared("a state of another collection than the command's")
        if keys is not None and raw["key"] not in keys:
            raise BadRequest("a state that was not asked for")
        out.append(ItemState.from_json(raw))
    return out


def hlc_bound(seconds: float) -> str:
    """An HLC text below every timestamp taken at or after *seconds* (any node)."""
    return f"{int(seconds * 1000):013d}:000000:"


@dataclass
class _Transfer:
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    done: bool = False


@dataclass
class RoundReport:
    """What one round did."""

    started: float
    finished: float = 0.0
    collections: list[str] = field(default_factory=list)
    #: Collections whose roots matched at the end (acknowledged both ways).
    converged: list[str] = field(default_factory=list)
    fetched: int = 0
    pushed: int = 0
    calls: int = 0


# --------------------------------------------------------------------------- the protocol


class SyncProtocol(amp.AMP):
    """One sync connection. *peer_id* is the other gateway's device ID in our registry
    (the name the policy and the engine know it by); on a listening side it is set when
    the peer's certificate is admitted (:meth:`admit`)."""

    def __init__(self, engine: ISyncEngine, peer_id: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.engine = engine
        self.peer_id = peer_id
        self.clock = clock
        #: Why this connection's peer is refused ("" when it is not).
        self.refusal = ""
        #: The peer's node ID and the collections it offered (after Hello).
        self.remote_node = ""
        self.remote_collections: list[str] = []
        #: The engine's epoch when this side last answered Roots, per collection.
        self._roots_epoch: dict[str, int] = {}
        self.remote_version: tuple[int, int] | None = None
        self._incoming: dict[str, _Transfer] = {}
        self._pending = 0
        self.calls = 0
        #: Called once the connection is lost (the service's bookkeeping).
        self.on_lost: list[Callable[[SyncProtocol], object]] = []

    # ------------------------------------------------------------------ connection

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._incoming.clear()
        self._pending = 0
        for callback in list(self.on_lost):
            try:
                callback(self)
            except Exception:
                log.failure("a sync connection-lost callback failed")
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _ready(self, collection: str | None = None) -> None:
        """Refuse a refused peer, a command before Hello, or a collection not shared."""
        if self.refusal:
            raise DeviceNotAllowed(self.refusal)
        if self.remote_version is None:
            raise NotReady("Hello first")
        if collection is not None and collection not in self.engine.collections_for(self.peer_id):
            raise NotShared(f"collection {collection!r} is not shared with this peer")

    def callRemote(self, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:  # type: ignore[override]
        self.calls += 1
        return super().callRemote(command, **kwargs)  # type: ignore[no-any-return,no-untyped-call]

    # ------------------------------------------------------------------ bodies and parts

    async def _outgoing(self, data: bytes) -> tuple[bytes, str | None]:
        """*data* inline, or sent ahead as parts: ``(body, transfer)`` for the command."""
        if len(data) <= CHUNK:
            return data, None
        tid = uuid.uuid4().hex
        pieces = list(_batches(data, CHUNK))
        calls = [self.callRemote(Part, transfer=tid, index=i, final=i == len(pieces) - 1,
                                 data=bytes(piece)) for i, piece in enumerate(pieces)]
        def first(failure: Failure) -> Failure:
            sub: Failure = getattr(failure.value, "subFailure", failure)
            return sub

        await gatherResults(calls, consumeErrors=True).addErrback(first)
        return b"", tid

    def _incoming_body(self, body: bytes, transfer: str | None) -> bytes:
        if not transfer:
            return body
        t = self._incoming.pop(transfer, None)
        if t is None or not t.done:
            if t is not None:
                self._pending -= t.size
            raise BadRequest("unknown or unfinished transfer")
        self._pending -= t.size
        return b"".join(t.parts)

    @Part.responder
    def part(self, transfer: str, index: int, final: bool, data: bytes) -> dict[str, Any]:
        if self.refusal:
            raise DeviceNotAllowed(self.refusal)
        if len(transfer) > 64:
            raise BadRequest("a transfer id is at most 64 characters")
        t = self._incoming.get(transfer)
        if t is None:
            if len(self._incoming) >= MAX_TRANSFERS:
                raise TooLarge(f"at most {MAX_TRANSFERS} transfers at once")
            t = self._incoming[transfer] = _Transfer()
        if t.done or index != len(t.parts):
            self._drop(transfer)
            raise BadRequest("parts out of order")
        if t.size + len(data) > MAX_TRANSFER or self._pending + len(data) > MAX_PENDING:
            self._drop(transfer)
            raise TooLarge(f"a transfer is at most {MAX_TRANSFER} bytes")
        t.parts.append(data)
        t.size += len(data)
        self._pending += len(data)
        t.done = final
        return {}

    def _drop(self, transfer: str) -> None:
        t = self._incoming.pop(transfer, None)
        if t is not None:
            self._pending -= t.size

    async def _answer(self, data: Any) -> dict[str, Any]:
        try:
            body, transfer = await self._outgoing(_json(data))
        except ConnectionClosed:
            # The peer went away (stopped, killed) while the parts travelled: there is
            # nobody to answer (AMP drops an answer to a closed connection). Not an
            # error of ours; raised, it would be logged as a critical "Unknown Error".
            log.debug("sync: connection lost while answering in parts")
            return {"body": b""}
        return {"body": body, "transfer": transfer} if transfer else {"body": body}

    async def _call(self, command: type[amp.Command], data: Any, **kwargs: Any) -> Any:
        """Call *command* with *data* as its body; the answer's body, decoded."""
        body, transfer = await self._outgoing(_json(data))
        if transfer:
            kwargs["transfer"] = transfer
        answer = await self.callRemote(command, body=body, **kwargs)
        return _unjson(self._incoming_body(answer["body"], answer.get("transfer")))

    # ------------------------------------------------------------------ responders

    @Hello.responder
    def hello(self, major: int, minor: int, node_id: str,
              collections: list[str]) -> dict[str, Any]:
        if self.refusal:
            raise DeviceNotAllowed(self.refusal)
        if major != MAJOR:
            raise UnsupportedVersion(f"this gateway speaks sync protocol {MAJOR}.x; "
                                     f"the peer sent {major}.{minor}")
        self.remote_version = (major, minor)
        self.remote_node = node_id
        self.remote_collections = list(collections)
        ours = self.engine.collections_for(self.peer_id)
        return {"major": MAJOR, "minor": MINOR, "node_id": self.engine.node_id,
                "collections": [c for c in ours if c in set(collections)]}

    @Roots.responder
    async def roots(self, body: bytes, transfer: str | None = None) -> dict[str, Any]:
        self._ready()
        wanted = _str_list(_unjson(self._incoming_body(body, transfer)), "collections", 10_000)
        shared = set(self.engine.collections_for(self.peer_id))
        refused = [c for c in wanted if c not in shared]
        if refused:
            raise NotShared(f"not shared with this peer: {', '.join(sorted(refused))}")
        # The epoch each root was read at: an Ack of this round counts only if no
        # tombstone arrived here since (SyncEngine.acknowledged).
        self._roots_epoch.update((c, self.engine.epoch(c)) for c in wanted)
        return await self._answer({c: self.engine.root(c).hex() for c in wanted})

    @Children.responder
    async def children(self, collection: str, body: bytes,
                       transfer: str | None = None) -> dict[str, Any]:
        self._ready(collection)
        prefixes = [_prefix(p, bucket=False) for p in _str_list(
            _unjson(self._incoming_body(body, transfer)), "prefixes", PREFIXES_PER_CALL)]
        out: list[list[str]] = []
        for p in prefixes:
            out.extend([child, h.hex()] for child, h in self.engine.children(collection, p))
        return await self._answer(out)

    @Leaves.responder
    async def leaves(self, collection: str, body: bytes,
                     transfer: str | None = None) -> dict[str, Any]:
        self._ready(collection)
        buckets = [_prefix(p, bucket=True) for p in _str_list(
            _unjson(self._incoming_body(body, transfer)), "buckets", PREFIXES_PER_CALL)]
        return await self._answer({b: {k: d.hex() for k, d in
                                       self.engine.leaves(collection, b).items()}
                                   for b in buckets})

    @Fetch.responder
    async def fetch(self, collection: str, body: bytes,
                    transfer: str | None = None) -> dict[str, Any]:
        self._ready(collection)
        keys = _str_list(_unjson(self._incoming_body(body, transfer)), "keys", KEYS_PER_CALL)
        return await self._answer([s.to_json() for s in self.engine.states(collection, keys)])

    @Push.responder
    async def push(self, collection: str, body: bytes,
                   transfer: str | None = None) -> dict[str, Any]:
        self._ready(collection)
        states = _states(_unjson(self._incoming_body(body, transfer)), collection)
        await _engine(self.engine.apply(collection, states, self.peer_id))
        return await self._answer({"applied": len(states)})

    @Ack.responder
    async def ack(self, collection: str, hlc: str) -> dict[str, Any]:
        self._ready(collection)
        await _engine(self.engine.acknowledged(self.peer_id, collection, hlc,
                                               self._roots_epoch.get(collection)))
        return {}

    # ------------------------------------------------------------------ the client's side

    async def hello_remote(self) -> list[str]:
        """Say Hello; the collections both sides share (refuses another major)."""
        offered = list(self.engine.collections_for(self.peer_id))
        answer = await self.callRemote(Hello, major=MAJOR, minor=MINOR,
                                       node_id=self.engine.node_id, collections=offered)
        if answer["major"] != MAJOR:
            raise UnsupportedVersion(f"the peer answered sync protocol "
                                     f"{answer['major']}.{answer['minor']}; "
                                     f"this gateway speaks {MAJOR}.x")
        self.remote_version = (answer["major"], answer["minor"])
        self.remote_node = answer["node_id"]
        self.remote_collections = [c for c in answer["collections"] if c in set(offered)]
        return self.remote_collections

    async def run_round(self) -> RoundReport:
        """One round over every collection both sides share (see the module docstring)."""
        report = RoundReport(started=self.clock())
        calls = self.calls
        if self.remote_version is None:
            await self.hello_remote()
        bound = hlc_bound(report.started)
        shared = [c for c in self.engine.collections_for(self.peer_id)
                  if c in set(self.remote_collections)]
        report.collections = shared
        if shared:
            epochs = {c: self.engine.epoch(c) for c in shared}
            roots = await self._call(Roots, shared)
            for collection in shared:
                if not isinstance(roots, dict) or collection not in roots:
                    raise BadRequest("the peer's roots lack a collection asked for")
                if roots[collection] != self.engine.root(collection).hex():
                    await self._sync_collection(collection, report)
                    epochs[collection] = self.engine.epoch(collection)
                    again = await self._call(Roots, [collection])
                    if again.get(collection) != self.engine.root(collection).hex():
                        continue  # changed meanwhile: the next round goes on
                await self.callRemote(Ack, collection=collection, hlc=bound)
                await _engine(self.engine.acknowledged(self.peer_id, collection, bound,
                                                       epochs[collection]))
                report.converged.append(collection)
        report.finished = self.clock()
        report.calls = self.calls - calls
        return report

    async def _sync_collection(self, collection: str, report: RoundReport) -> None:
        fetch, push = await self._differing_keys(collection)
        theirs: dict[str, bytes] = {}
        for batch in _batches(fetch, KEYS_PER_CALL):
            states = _states(await self._call(Fetch, list(batch), collection=collection),
                             collection, set(batch))
            if states:
                await _engine(self.engine.apply(collection, states, self.peer_id))
            theirs.update((s.key, s.digest) for s in states)
            report.fetched += len(states)
        for batch in _batches(push, KEYS_PER_CALL):
            # Read after the merge above; a merge that left the peer's state as it was
            # needs no push back.
            mine = [s for s in self.engine.states(collection, list(batch))
                    if theirs.get(s.key) != s.digest]
            if mine:
                await self._call(Push, [s.to_json() for s in mine], collection=collection)
            report.pushed += len(mine)

    def _local_keys(self, collection: str, prefix: str) -> list[str]:
        """Every key under node *prefix* of the local tree."""
        if len(prefix) == DEPTH:
            return list(self.engine.leaves(collection, prefix))
        return [k for child, _ in self.engine.children(collection, prefix)
                for k in self._local_keys(collection, child)]

    async def _differing_keys(self, collection: str) -> tuple[list[str], list[str]]:
        """Descend both trees where they differ: (keys to fetch, keys to push)."""
        fetch: list[str] = []
        push: list[str] = []
        frontier = [""]
        buckets: list[str] = []
        while frontier:
            deeper: list[str] = []
            for batch in _batches(frontier, PREFIXES_PER_CALL):
                remote = {c: bytes.fromhex(h) for c, h in
                          await self._call(Children, list(batch), collection=collection)}
                for parent in batch:
                    local = dict(self.engine.children(collection, parent))
                    for c in _HEX:
                        child = parent + c
                        mine, theirs = local.get(child, EMPTY), remote.get(child, EMPTY)
                        if mine == theirs:
                            continue
                        if theirs == EMPTY:  # only here: push all of it, no need to ask
                            push.extend(self._local_keys(collection, child))
                        elif len(child) == DEPTH:
                            buckets.append(child)
                        else:
                            deeper.append(child)
            frontier = deeper
        for batch in _batches(buckets, PREFIXES_PER_CALL):
            remote_leaves = await self._call(Leaves, list(batch), collection=collection)
            for bucket in batch:
                local_leaves = {k: d.hex() for k, d in self.engine.leaves(collection,
                                                                          bucket).items()}
                theirs = remote_leaves.get(bucket, {})
                for key in sorted(set(local_leaves) | set(theirs)):
                    if key not in local_leaves:
                        fetch.append(key)
                    elif key not in theirs:
                        push.append(key)
                    elif local_leaves[key] != theirs[key]:
                        fetch.append(key)
                        push.append(key)
        return fetch, push
