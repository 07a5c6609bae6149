"""``sync join`` end to end: two real gateways (state directories, SQLite files, the
pairing listener and the ``sync`` listener on 127.0.0.1 port 0), joined over the
pairing protocol v2, then mutual-TLS AMP both ways; a revoked peer is dropped."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import TestCase

from aico.gateway.store import SyncDatabase
from aico.gateway.testing.harness import RunningGateway, start_gateway
from aico.gateway.testing.waiting import eventually
from aico.sync.join import JoinFailed, join
from aico.sync.peers import PeerStore

SYNC = """
[sync]
enabled = true
host = "127.0.0.1"
port = 0
[sync.collections.notes]
strategy = "lww"
[pairing]
host = "127.0.0.1"
port = 0
"""


def engine(gw: RunningGateway) -> Any:
    return gw.parts.sync_service.engine


async def join_into(a: RunningGateway, b: RunningGateway, code: str | None = None) -> Any:
    """*a* joins *b* (a pairing window opened on *b*), as ``aico-gateway sync join`` does
    it: from another connection to *a*'s registry file (another process, for *a*)."""
    window = await b.parts.pairing.open_window(opened_by="test")
    pa = a.parts
    ca = pa.materials.device_ca
    db = SyncDatabase(pa.materials.paths.registry_db)
    try:
        return await join(reactor, ca=ca, keystore=pa.materials.paths.sealer, db=db,
                          host="127.0.0.1", port=int(window["port"]),
                          code=code or window["code"], name="gateway-a",
                          node_id=ca.fingerprint, sync_address=a.ports.get("sync"), timeout=10)
    finally:
        db.close()


class JoinTests(TestCase):
    timeout = 30

    async def test_join_pairs_both_ways_and_they_sync_over_mutual_tls(self) -> None:
        a = await start_gateway(self, SYNC)
        b = await start_gateway(self, SYNC)
        self.assertIn("sync", a.ports)
        result = await join_into(a, b)
        # Both registries hold the other as a sync device, both sync_peers a row.
        peers_a = await PeerStore(a.parts.db).list()
        peers_b = await PeerStore(b.parts.db).list()
        self.assertEqual([p.peer_id for p in peers_a], [result.peer_id])
        self.assertEqual([p.peer_id for p in peers_b], [result.our_device_id])
        self.assertEqual((await a.parts.devices.get(result.peer_id)).paired_for, "sync")
        self.assertEqual((await b.parts.devices.get(result.our_device_id)).paired_for, "sync")
        # The running joiner picks its new peer up without a restart; both dial out.
        sa, sb = a.parts.sync_service, b.parts.sync_service

        def both_connected() -> bool:
            return all(s.status() and s.status()[0]["state"] == "connected" and
                       s.status()[0]["incoming"] == 1 and s.status()[0]["rounds"] > 0
                       for s in (sa, sb))

        await eventually(both_connected, timeout=10)
        # A write on either side reaches the other.
        await maybeDeferred(engine(a).put, "notes", "from-a", {"v": 1})
        await maybeDeferred(engine(b).put, "notes", "from-b", {"v": 2})
        await eventually(lambda: engine(a).root("notes") == engine(b).root("notes")
                         and len(engine(a).states("notes", ["from-a", "from-b"])) == 2,
                         timeout=10)
        status = sa.status()[0]
        self.assertEqual(status["collections"]["notes"], engine(a).root("notes").hex())
        self.assertIsNone(status["last_error"])

    async def test_a_revoked_peer_is_dropped_at_once_and_refused_after(self) -> None:
        a = await start_gateway(self, SYNC)
        b = await start_gateway(self, SYNC)
        result = await join_into(a, b)
        sa, sb = a.parts.sync_service, b.parts.sync_service
        await eventually(lambda: sb.status() and sb.status()[0]["incoming"] == 1
                         and sa.status() and sa.status()[0]["state"] == "connected", timeout=10)
        # b revokes a: a's connection into b is cut, b's own link to a stops.
        revoked_at = reactor.seconds()
        await b.parts.device_gate.revoke(result.our_device_id)
        await eventually(lambda: sa.status()[0]["state"] == "disconnected", timeout=5)
        await eventually(lambda: sb.server.live == {}, timeout=5)
        self.assertLess(reactor.seconds() - revoked_at, 1.0)
        self.assertEqual(sb.links, {})
        self.assertTrue(sb.status()[0]["revoked"])
        # a keeps redialling (backoff); each handshake is refused: never connected again.
        link = sa.links[result.peer_id]
        await eventually(lambda: link.last_error is not None, timeout=8)
        self.assertEqual(sb.server.live, {})

    async def test_a_wrong_code_is_refused(self) -> None:
        a = await start_gateway(self, SYNC)
        b = await start_gateway(self, SYNC)
        with self.assertRaises(JoinFailed) as caught:
            await join_into(a, b, code="2222-2222")
        self.assertEqual(caught.exception.reason, "wrong_code")
        self.assertEqual(await PeerStore(a.parts.db).list(), [])
        self.assertEqual(await PeerStore(b.parts.db).list(), [])


class ForeignCertificateTests(TestCase):
    timeout = 30

    async def test_a_certificate_from_another_ca_is_refused_on_first_read(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.internet.protocol import Factory

        from aico.gateway.devices.ca import DeviceCA, create_csr, generate_key
        from aico.keystore import Keystore
        from aico.sync.peers import SyncPeer, client_options, seal_key
        from aico.sync.protocol import SyncProtocol
        from aico.sync.testing import MemoryEngine

        a = await start_gateway(self, SYNC)
        other = DeviceCA.create()  # a third gateway's CA
        key = generate_key()
        cert = other.issue_client_cert(create_csr(key, "intruder"), "intruder")
        keystore = Keystore.ephemeral()
        pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
        peer = SyncPeer("X", "a", "X", "127.0.0.1", a.ports["sync"]["port"],
                        pem(a.parts.materials.device_ca.cert), "me", pem(cert),
                        seal_key(keystore, key), 0.0)
        endpoint = wrapClientTLS(client_options(peer, keystore),
                                 HostnameEndpoint(reactor, "127.0.0.1", peer.port))
        proto = await endpoint.connect(Factory.forProtocol(
            lambda: SyncProtocol(MemoryEngine("intruder", {"notes": None}), peer_id="X")))
        with self.assertRaises(Exception) as caught:
            await proto.hello_remote()
        self.assertIn("unknown ca", repr(caught.exception).lower())
        self.assertEqual(a.parts.sync_service.server.live, {})
