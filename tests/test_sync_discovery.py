"""mDNS discovery of sync peers (``_aico-sync._tcp``).

In memory: the browser's bookkeeping with zeroconf's thread replaced by the test (events
handed to the reactor with ``callFromThread``, own record ignored, updates, removals, a
slow resolution never undoing a later removal, nothing after stop) and what a record
must carry. On loopback only (PITFALLS.md): two gateways' advertisers and browsers find
each other with identity, host and port, see a port change, and see one leave.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zeroconf import ServiceInfo, ServiceStateChange

from aico.gateway.testing.waiting import eventually
from aico.sync.discovery import (
    SERVICE_TYPE,
    FoundPeer,
    SyncAdvertiser,
    SyncBrowser,
    peer_of,
)

LOOPBACK = ["127.0.0.1"]


class FakeReactor:
    """Only what the browser uses: ``callFromThread`` queues the call for the test."""

    def __init__(self) -> None:
        self.queued: list[tuple[Callable[..., Any], tuple[Any, ...], int]] = []

    def callFromThread(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queued.append((fn, args, threading.get_ident()))

    def run_queued(self) -> None:
        queued, self.queued = self.queued, []
        for fn, args, _ in queued:
            fn(*args)


def info(name: str, identity: str | None, port: int = 8774, addresses: tuple[str, ...] = ("192.0.2.5",),
         version: str = "1") -> ServiceInfo:
    props: dict[str, str] = {"v": version}
    if identity is not None:
        props["id"] = identity
    return ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port, properties=props,
                       server="x.local.", parsed_addresses=list(addresses))


class BrowserBookkeepingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.found: list[tuple[str, str, int]] = []
        self.lost: list[str] = []
        self.browser = SyncBrowser(self.reactor, "OWN", lambda *a: self.found.append(a),
                                   self.lost.append)
        #: What a resolution returns, per instance name (a Deferred to hold it back).
        self.records: dict[str, Any] = {}
        self.browser.in_thread = self.in_thread
        self.browser.startService()

    def in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if fn == self.browser._resolve_blocking:
            record = self.records.get(args[0])
            return record if isinstance(record, Deferred) else succeed(record)
        return succeed(None)  # start and close: no zeroconf in memory

    def event(self, name: str, change: ServiceStateChange) -> None:
        """zeroconf's handler, called from a thread of its own, then the reactor's turn."""
        t = threading.Thread(target=self.browser._changed, args=(None, SERVICE_TYPE, name, change))
        t.start()
        t.join()
        self.reactor.run_queued()

    def test_zeroconfs_thread_only_hands_the_event_to_the_reactor(self) -> None:
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 8774)
        t = threading.Thread(target=self.browser._changed,
                             args=(None, SERVICE_TYPE, "peer", ServiceStateChange.Added))
        t.start()
        t.join()
        self.assertEqual(self.found, [])
        [(fn, args, thread)] = self.reactor.queued
        self.assertEqual((fn, args), (self.browser.seen, ("peer",)))
        self.assertNotEqual(thread, threading.get_ident())
        self.reactor.run_queued()
        self.assertEqual(self.found, [("PEER", "192.0.2.5", 8774)])

    def test_its_own_record_is_never_reported(self) -> None:
        self.records["me"] = FoundPeer("OWN", "192.0.2.1", 8774)
        self.event("me", ServiceStateChange.Added)
        self.event("me", ServiceStateChange.Removed)
        self.assertEqual((self.found, self.lost), ([], []))

    def test_a_peer_is_reported_once_then_again_only_when_its_address_changes(self) -> None:
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.event("peer", ServiceStateChange.Added)
        self.event("peer", ServiceStateChange.Updated)
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 9000)
        self.event("peer", ServiceStateChange.Updated)
        self.assertEqual(self.found, [("PEER", "192.0.2.5", 8774), ("PEER", "192.0.2.5", 9000)])
        self.assertEqual(self.browser.peers, {"PEER": FoundPeer("PEER", "192.0.2.5", 9000)})

    def test_a_withdrawn_peer_is_reported_lost_and_unknown_names_are_ignored(self) -> None:
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.event("peer", ServiceStateChange.Added)
        self.event("stranger", ServiceStateChange.Removed)
        self.assertEqual(self.lost, [])
        self.event("peer", ServiceStateChange.Removed)
        self.assertEqual(self.lost, ["PEER"])
        self.assertEqual(self.browser.peers, {})

    def test_a_peer_under_two_names_is_lost_only_when_both_are_gone(self) -> None:
        self.records["one"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.records["two"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.event("one", ServiceStateChange.Added)
        self.event("two", ServiceStateChange.Added)
        self.event("one", ServiceStateChange.Removed)
        self.assertEqual(self.lost, [])
        self.event("two", ServiceStateChange.Removed)
        self.assertEqual(self.lost, ["PEER"])

    def test_unresolvable_or_invalid_records_are_skipped(self) -> None:
        self.records["gone"] = None
        self.event("gone", ServiceStateChange.Added)
        self.assertEqual(self.found, [])

    def test_a_slow_resolution_never_undoes_a_later_removal(self) -> None:
        slow: Deferred[FoundPeer] = Deferred()
        self.records["peer"] = slow
        self.event("peer", ServiceStateChange.Added)
        self.event("peer", ServiceStateChange.Removed)
        slow.callback(FoundPeer("PEER", "192.0.2.5", 8774))
        self.assertEqual((self.found, self.lost), ([], []))

    def test_nothing_is_reported_after_stop(self) -> None:
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.event("peer", ServiceStateChange.Added)
        self.browser._changed(None, SERVICE_TYPE, "peer", ServiceStateChange.Removed)
        self.browser._changed(None, SERVICE_TYPE, "other", ServiceStateChange.Added)
        self.browser.stopService()
        self.reactor.run_queued()
        self.assertEqual((len(self.found), self.lost), (1, []))

    def test_a_failing_callback_is_logged_and_browsing_goes_on(self) -> None:
        def boom(*args: Any) -> None:
            raise RuntimeError("callback bug")

        self.browser.on_found = boom
        self.records["peer"] = FoundPeer("PEER", "192.0.2.5", 8774)
        self.browser.seen("peer")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(list(self.browser.peers), ["PEER"])


class RecordTests(SynchronousTestCase):
    def test_a_valid_record_gives_identity_ipv4_host_and_port(self) -> None:
        self.assertEqual(peer_of(info("a", "PEER-ID", 9000, ("fe80::1", "192.0.2.9"))),
                         FoundPeer("PEER-ID", "192.0.2.9", 9000))
        self.assertEqual(peer_of(info("a", "PEER-ID", 9000, ("2001:db8::1",))),
                         FoundPeer("PEER-ID", "2001:db8::1", 9000))

    def test_records_without_identity_version_address_or_port_are_not_peers(self) -> None:
        self.assertIsNone(peer_of(info("a", None)))
        self.assertIsNone(peer_of(info("a", "")))
        self.assertIsNone(peer_of(info("a", "X" * 129)))
        self.assertIsNone(peer_of(info("a", "bad\nid")))
        self.assertIsNone(peer_of(info("a", "PEER", version="2")))
        self.assertIsNone(peer_of(info("a", "PEER", port=0)))
        self.assertIsNone(peer_of(info("a", "PEER", addresses=())))

    def test_an_advertiser_needs_an_identity(self) -> None:
        self.assertRaises(ValueError, SyncAdvertiser, reactor, "", 8774)
        self.assertRaises(ValueError, SyncAdvertiser, reactor, "X" * 129, 8774)


class Gateway:
    """One gateway's discovery: its advertiser and its browser, on loopback."""

    def __init__(self, test: TestCase, port: int) -> None:
        self.identity = f"TEST-{uuid.uuid4().hex}"
        self.found: list[tuple[str, str, int]] = []
        self.lost: list[str] = []
        self.threads: set[int] = set()
        self.advertiser = SyncAdvertiser(reactor, self.identity, port, LOOPBACK, instance="test")
        self.browser = SyncBrowser(reactor, self.identity, self._found, self._lost, LOOPBACK)
        self.test = test

    def _found(self, identity: str, host: str, port: int) -> None:
        self.threads.add(threading.get_ident())
        self.found.append((identity, host, port))

    def _lost(self, identity: str) -> None:
        self.threads.add(threading.get_ident())
        self.lost.append(identity)

    async def start(self) -> None:
        for service in (self.browser, self.advertiser):
            await service.startService()
            self.test.addCleanup(lambda s=service: s.stopService() if s.running else None)

    def saw(self, other: Gateway, port: int) -> bool:
        return (other.identity, "127.0.0.1", port) in self.found


class DiscoveryLoopbackTests(TestCase):
    timeout = 60

    async def test_two_gateways_find_each_other_see_a_port_change_and_see_one_leave(self) -> None:
        a, b = Gateway(self, 41001), Gateway(self, 41002)
        started = time.monotonic()
        await a.start()
        await b.start()
        await eventually(lambda: a.saw(b, 41002) and b.saw(a, 41001), timeout=15)
        found_after = time.monotonic() - started
        # Never its own record; every call on the reactor thread.
        for g in (a, b):
            self.assertNotIn(g.identity, [f[0] for f in g.found])
            self.assertEqual(g.threads, {threading.get_ident()})
        self.assertEqual(a.browser.peers[b.identity].port, 41002)
        # B's listener moves: A learns the new port.
        await b.advertiser.update_port(41003)
        await eventually(lambda: a.saw(b, 41003), timeout=15)
        # B stops advertising (goodbye packets): A reports it lost.
        started = time.monotonic()
        await b.advertiser.stopService()
        await eventually(lambda: b.identity in a.lost, timeout=15)
        lost_after = time.monotonic() - started
        self.assertNotIn(a.identity, b.lost)
        self.assertNotIn(b.identity, a.browser.peers)
        # Figures for docs/sync-relay.md (printed in the test log).
        print(f"\ndiscovery: found after {found_after:.2f} s, lost after {lost_after:.2f} s")
