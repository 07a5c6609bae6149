"""Sync discovery and connection, wired into the running gateway (issue 13, points 5
and 6): two real gateways (state directories, SQLite files, the ``sync`` listener on
127.0.0.1 port 0) joined with ``sync join``, then

* recorded addresses that lead nowhere, a transit relay both reach (run in process):
  they meet through the relay, each side's writes reach the other, the relay forwards
  only ciphertext; a direct address found later takes over from the relay;
* a static ``[sync.peers.NAME]`` address wins over the recorded one (direct);
* mDNS on loopback finds the right address when the recorded one is wrong;
* ``[sync]`` configuration errors.
"""

from __future__ import annotations

import itertools
import socket
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway import config as configuration
from aico.gateway.testing.harness import RunningGateway, start_gateway
from aico.gateway.testing.waiting import eventually
from aico.sync import relay
from aico.sync.peers import SyncPeer
from aico.sync.protocol import SyncProtocol
from aico.sync.service import PeerLink, SyncService, mdns_interfaces
from aico.sync.testing import MemoryEngine, recording_transit, start_recording_relay
from tests.test_sync_join import SYNC, engine, join_into

#: A value whose bytes must never cross the relay in the clear.
MARKER = "plaintext-marker-7f3a9c"


#: The relay's own connection class, keeping every byte it forwarded.
RecordingTransit: Any = recording_transit()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def service(gw: RunningGateway) -> SyncService:
    s = gw.parts.sync_service
    assert isinstance(s, SyncService)
    return s


def only(gw: RunningGateway) -> dict[str, Any]:
    """The gateway's one peer in ``GET /admin/api/sync``'s terms."""
    (entry,) = service(gw).status()
    return entry


async def misdirect(gw: RunningGateway, port: int) -> None:
    """Make the address ``sync join`` recorded for *gw*'s peer lead to a closed port."""
    await gw.parts.db.run_operation("UPDATE sync_peers SET host = '127.0.0.1', port = ?",
                                    (port,))
    await service(gw).refresh()


async def converge(a: RunningGateway, b: RunningGateway, tag: str) -> None:
    """A write on each side reaches the other."""
    await maybeDeferred(engine(a).put, "notes", f"{tag}-a", {"v": MARKER})
    await maybeDeferred(engine(b).put, "notes", f"{tag}-b", {"v": MARKER})
    keys = [f"{tag}-a", f"{tag}-b"]
    await eventually(lambda: len(engine(a).states("notes", keys)) == 2
                     and len(engine(b).states("notes", keys)) == 2
                     and engine(a).root("notes") == engine(b).root("notes"), timeout=10)


class RelayTests(TestCase):
    timeout = 40

    def start_relay(self) -> int:
        return start_recording_relay(self, reactor, RecordingTransit)

    async def test_unreachable_peers_meet_through_the_relay_then_switch_back_to_direct(
            self) -> None:
        port = self.start_relay()
        extra = SYNC.replace("port = 0\n[sync.collections.notes]",
                             f'port = 0\nrelay = "127.0.0.1:{port}"\n[sync.collections.notes]')
        a = await start_gateway(self, extra)
        b = await start_gateway(self, extra)
        await join_into(a, b)
        await misdirect(a, closed_port())
        await misdirect(b, closed_port())
        sa, sb = service(a), service(b)
        # Each fails its direct attempts, then both dial the relay and meet there.
        await eventually(lambda: only(a)["via"] == "relay" and only(b)["via"] == "relay"
                         and only(a)["rounds"] > 0 and only(b)["rounds"] > 0, timeout=20)
        self.assertEqual(only(a)["state"], "connected")
        self.assertGreaterEqual(sa.links[only(a)["peer_id"]].direct_failures, 2)
        # One relayed connection serves both: the TLS server side counts it as incoming.
        server = a if relay.is_tls_server(sa.identity, sb.identity) else b
        client = b if server is a else a
        self.assertEqual(only(server)["incoming"], 1)
        self.assertEqual(only(client)["incoming"], 0)
        await converge(a, b, "relayed")
        # What crossed the relay: TLS records only, never the value written.
        forwarded = b"".join(b"".join(t.forwarded) for t in RecordingTransit.instances)
        self.assertGreater(len(forwarded), 1000)
        self.assertNotIn(MARKER.encode(), forwarded)
        # A direct address turns up (as mDNS reports it): both leave the relay.
        sa.found(sb.identity, "127.0.0.1", b.ports["sync"]["port"])
        sb.found(sa.identity, "127.0.0.1", a.ports["sync"]["port"])
        await eventually(lambda: only(a)["via"] == "direct" and only(b)["via"] == "direct",
                         timeout=10)
        self.assertEqual(only(a)["address"]["source"], "mdns")
        await converge(a, b, "direct")

    async def test_a_static_peer_address_is_dialled_directly(self) -> None:
        b = await start_gateway(self, SYNC)
        name = f"aico-gateway {socket.gethostname()}"[:64]  # b's name in a's sync_peers
        b_port = b.ports["sync"]["port"]
        static = SYNC + f'[sync.peers."{name}"]\nhost = "127.0.0.1"\nport = {b_port}\n'
        a = await start_gateway(self, static)
        await join_into(a, b)
        await misdirect(a, closed_port())  # what join recorded: wrong; the static entry: right
        await eventually(lambda: only(a)["via"] == "direct" and only(a)["rounds"] > 0,
                         timeout=10)
        self.assertEqual(only(a)["address"],
                         {"host": "127.0.0.1", "port": b_port, "source": "static"})
        self.assertEqual(service(a).links[only(a)["peer_id"]].direct_failures, 0)
        await converge(a, b, "static")


class DiscoveryTests(TestCase):
    timeout = 40

    async def test_mdns_finds_the_right_address_when_the_recorded_one_is_wrong(self) -> None:
        loopback = SYNC.replace("port = 0\n[sync.collections.notes]",
                                'port = 0\ninterfaces = ["127.0.0.1"]\n'
                                "[sync.collections.notes]")
        a = await start_gateway(self, loopback)
        b = await start_gateway(self, loopback)
        sa = service(a)
        self.assertIsNotNone(sa.advertiser)
        self.assertIsNotNone(sa.browser)
        await join_into(a, b)
        await misdirect(a, closed_port())
        await misdirect(b, closed_port())
        await eventually(lambda: only(a)["via"] == "direct" and only(b)["via"] == "direct"
                         and only(a)["rounds"] > 0 and only(b)["rounds"] > 0, timeout=15)
        self.assertEqual(only(a)["address"], {"host": "127.0.0.1",
                                              "port": b.ports["sync"]["port"],
                                              "source": "mdns"})
        self.assertEqual(only(b)["address"]["port"], a.ports["sync"]["port"])
        await converge(a, b, "mdns")


class ConfigTests(SynchronousTestCase):
    def error(self, text: str) -> configuration.ConfigError:
        with self.assertRaises(configuration.ConfigError) as caught:
            configuration.from_string(text)
        return caught.exception

    def test_the_new_keys_default_to_no_relay_two_attempts_and_mdns(self) -> None:
        s = configuration.from_string("[sync]\nenabled = true\n").sync
        self.assertEqual((s.relay, s.direct_attempts, s.mdns, s.interfaces, s.peers),
                         ("", 2, True, (), {}))

    def test_a_full_sync_section_loads(self) -> None:
        s = configuration.from_string(
            '[sync]\nenabled = true\nrelay = "[2001:db8::1]:4001"\ndirect_attempts = 5\n'
            'mdns = false\ninterfaces = ["192.0.2.10"]\n'
            '[sync.peers.office]\nhost = "office.example.org"\n').sync
        self.assertEqual(configuration.split_host_port(s.relay), ("2001:db8::1", 4001))
        self.assertEqual(s.peers["office"], configuration.SyncPeerAddress("office.example.org",
                                                                          8774))

    def test_bad_values_name_the_key(self) -> None:
        cases = {
            '[sync]\nrelay = "relay.example.org"': ("sync.relay", "expected HOST:PORT"),
            '[sync]\nrelay = "r:0"': ("sync.relay", "1-65535"),
            '[sync]\nrelay = "::1:4001"': ("sync.relay", "expected HOST:PORT"),
            '[sync]\nrelay = 4001': ("sync.relay", "expected a string"),
            "[sync]\ndirect_attempts = 0": ("sync.direct_attempts", "at least 1"),
            '[sync]\nmdns = "yes"': ("sync.mdns", "true or false"),
            '[sync]\ninterfaces = ["eth0"]': ("sync.interfaces[0]", "IP address"),
            "[sync.peers.office]\nport = 8774": ("sync.peers.office.host", "host name"),
            '[sync.peers.office]\nhost = "h"\nport = 70000': ("sync.peers.office.port",
                                                             "1-65535"),
            '[sync.peers.office]\nhots = "h"': ("sync.peers.office.hots", "unknown key"),
        }
        for text, (key, problem) in cases.items():
            e = self.error(text)
            self.assertEqual(e.key, key, text)
            self.assertIn(problem, e.problem, text)

    def test_mdns_runs_on_the_listener_host_every_interface_or_not_at_all(self) -> None:
        def interfaces(text: str) -> tuple[str, ...] | None:
            return mdns_interfaces(configuration.from_string(
                "[sync]\nenabled = true\n" + text).sync)

        self.assertEqual(interfaces(""), ())  # 0.0.0.0: every interface
        self.assertEqual(interfaces('host = "192.0.2.10"'), ("192.0.2.10",))
        self.assertIsNone(interfaces('host = "127.0.0.1"'))  # nobody on the LAN reaches it
        self.assertEqual(interfaces('host = "127.0.0.1"\ninterfaces = ["127.0.0.1"]'),
                         ("127.0.0.1",))
        self.assertIsNone(interfaces("mdns = false"))
        self.assertIsNone(mdns_interfaces(configuration.from_string("").sync))


# --------------------------------------------------------------------------- in memory


class FakePaths:
    """The link's service, in memory: direct attempts fail until :attr:`direct_ok`; relayed
    attempts wait until the test meets them (:meth:`meet`)."""

    def __init__(self, attempts: int = 2, relay: bool = True) -> None:
        self.attempts = attempts
        self.relay = relay
        self.direct_ok = False
        self.dialled: list[tuple[str, float]] = []
        self.waiting: list[tuple[Deferred[Any], Any]] = []
        self.peers: list[SyncProtocol] = []  # the far ends
        self.pumps: list[iosim.IOPump] = []
        self.clock = Clock()

    def direct_attempts(self) -> int:
        return self.attempts

    def _pair(self, factory: Any) -> SyncProtocol:
        near, far, pump = iosim.connectedServerAndClient(
            lambda: SyncProtocol(MemoryEngine("far", {"notes": None}), peer_id="A"),
            lambda: factory.buildProtocol(None))
        self.peers.append(far)
        self.pumps.append(pump)
        return near  # type: ignore[no-any-return]

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def direct_endpoint(self, link: Any) -> Any:
        paths = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                paths.dialled.append(("direct", paths.clock.seconds()))
                if not paths.direct_ok:
                    return fail(ConnectionRefusedError())
                return succeed(paths._pair(factory))

        return Endpoint()

    def relay_endpoint(self, link: Any) -> Any:
        if not self.relay:
            return None
        paths = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                paths.dialled.append(("relay", paths.clock.seconds()))
                d: Deferred[Any] = Deferred()
                paths.waiting.append((d, factory))
                return d

        from aico.sync.service import _ClientFactory

        return Endpoint(), _ClientFactory(link)

    def meet(self) -> None:
        d, factory = self.waiting.pop(0)
        d.callback(SimpleNamespace(wrappedProtocol=self._pair(factory)))
        self.flush()


def make_link(paths: FakePaths, direct_retry: float = 60.0) -> PeerLink:
    peer = SyncPeer("B", "b", "B", "127.0.0.1", 1, "", "me", "", "", 0.0)
    link = PeerLink(peer, MemoryEngine("near", {"notes": None}), paths.clock, paths,
                    direct_retry=direct_retry)
    link.start()
    return link


class PeerLinkTests(SynchronousTestCase):
    def test_a_peer_added_a_moment_ago_is_first_dialled_a_second_later(self) -> None:
        paths = FakePaths(attempts=2)
        paths.clock.advance(1000.0)
        peer = SyncPeer("B", "b", "B", "127.0.0.1", 1, "", "me", "", "", 999.5)
        PeerLink(peer, MemoryEngine("near", {"notes": None}), paths.clock, paths).start()
        self.assertEqual(paths.dialled, [])  # its gateway may not admit us yet
        paths.clock.advance(1.0)
        self.assertEqual(paths.dialled, [("direct", 1001.0)])

    def test_after_the_direct_attempts_fail_the_relay_is_used(self) -> None:
        paths = FakePaths(attempts=2)
        link = make_link(paths)
        paths.clock.advance(2.1)  # backoff 1 s + jitter < 1 s
        self.assertEqual([k for k, _ in paths.dialled], ["direct", "direct"])
        self.assertEqual(link.direct_failures, 2)
        paths.clock.advance(3.1)  # 2 s + jitter
        self.assertEqual([k for k, _ in paths.dialled], ["direct", "direct", "relay"])
        paths.meet()
        self.assertEqual((link.via, link.connected), ("relay", True))
        self.assertEqual(link.status()["via"], "relay")
        self.assertIsNone(link.last_error)

    def test_a_working_direct_path_replaces_the_relayed_session(self) -> None:
        paths = FakePaths(attempts=1)
        link = make_link(paths, direct_retry=60.0)
        paths.clock.advance(2.1)
        paths.meet()
        relayed = link.proto
        assert relayed is not None
        paths.clock.advance(59)
        self.assertEqual(len(paths.dialled), 2)  # no direct retry before direct_retry
        paths.clock.advance(1.1)
        self.assertEqual(paths.dialled[-1][0], "direct")  # tried, failed: still relayed
        self.assertEqual(link.via, "relay")
        paths.direct_ok = True
        paths.clock.advance(60)
        paths.flush()
        self.assertEqual(link.via, "direct")
        self.assertIsNot(link.proto, relayed)
        self.assertTrue(relayed.transport.disconnecting)  # the relayed session is closed
        self.assertEqual(link.direct_failures, 0)

    def test_without_a_relay_direct_attempts_back_off_to_the_cap(self) -> None:
        paths = FakePaths(attempts=1, relay=False)
        make_link(paths)
        paths.clock.pump([1.0] * 400)
        times = [t for _, t in paths.dialled]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.assertTrue(all(kind == "direct" for kind, _ in paths.dialled))
        self.assertTrue(1 <= gaps[0] <= 2.0, gaps)
        self.assertTrue(all(g <= 61 for g in gaps), gaps)
        self.assertGreaterEqual(gaps[-1], 60)

    def test_a_kick_dials_the_new_address_at_once(self) -> None:
        paths = FakePaths(attempts=5, relay=False)
        link = make_link(paths)
        paths.clock.pump([1.0] * 30)  # backing off: the next attempt is seconds away
        before = len(paths.dialled)
        paths.direct_ok = True
        link.kick()  # mDNS found it
        paths.flush()
        self.assertEqual(len(paths.dialled), before + 1)
        self.assertEqual(link.via, "direct")

    def test_a_lost_relayed_session_tries_direct_once_before_the_relay(self) -> None:
        paths = FakePaths(attempts=3)
        link = make_link(paths)
        paths.clock.pump([1.0] * 20)
        paths.meet()
        n = len(paths.dialled)
        assert link.proto is not None and link.proto.transport is not None
        link.proto.transport.loseConnection()
        paths.flush()
        self.assertIsNone(link.via)
        paths.clock.pump([1.0] * 10)
        self.assertEqual([k for k, _ in paths.dialled[n:]], ["direct", "relay"])

    def test_stopping_cancels_a_wait_at_the_relay(self) -> None:
        paths = FakePaths(attempts=1)
        link = make_link(paths)
        paths.clock.advance(2.1)
        (d, _), = paths.waiting
        link.stop()
        self.assertTrue(d.called)  # cancelled (the relay endpoint closes the connection)
        paths.clock.pump([10.0] * 20)
        self.assertEqual(len(paths.dialled), 2)
