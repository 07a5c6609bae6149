"""Federated sync end to end: several real gateway processes (``twistd aico-gateway``) on
loopback, paired through the CLI (``aico-gateway pair`` on one side, ``aico-gateway sync
join`` on the other), written to and read through the data API with an admin token, and
stopped (SIGTERM) or killed (SIGKILL) to inject failures (issue 13, "Tests must show").

Convergence is judged from outside the processes: every item of every collection through
``GET /api/v1/sync/collections/NAME/items`` on every gateway, and every collection's
Merkle root computed from what each gateway has on disk (``sync_items`` of its registry
file, tombstones included, read-only), which must agree too.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from aico.gateway.testing.harness import http_client, login
from aico.gateway.testing.processes import GatewayProcess
from aico.gateway.testing.waiting import eventually
from aico.sync.interfaces import EMPTY
from aico.sync.merkle import MerkleTree

#: The collections every gateway of these tests configures (docs/sync.md, "Policies").
SYNC = """
[sync]
enabled = true
host = "127.0.0.1"
port = {port}
[sync.collections.notes]
strategy = "lww"
[sync.collections.letters]
strategy = "keep-both"
[sync.collections.stats]
strategy = "merge"
[sync.collections.scratch]
sync = false
[pairing]
host = "127.0.0.1"
port = 0
"""
SHARED = ("notes", "letters", "stats")
COLLECTIONS = (*SHARED, "scratch")


def free_port() -> int:
    """A free loopback port for a ``sync`` listener: peers store where it listens, so
    it must stay the same across restarts (port 0 would not)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _disk(db: Path) -> dict[str, dict[str, bytes]]:
    """collection → key → digest of every row of ``sync_items`` (tombstones too)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT collection, key, digest FROM sync_items").fetchall()
    finally:
        conn.close()
    out: dict[str, dict[str, bytes]] = {}
    for collection, key, digest in rows:
        out.setdefault(collection, {})[key] = bytes(digest)
    return out


class Node:
    """One gateway process with an admin token for its data API."""

    def __init__(self, test: TestCase, name: str) -> None:
        self.name = name
        self.gw = GatewayProcess(test, name, SYNC.format(port=free_port()))
        self.http = http_client(test)
        self.token = ""
        test.addCleanup(self.check_log)

    def check_log(self) -> None:
        """No gateway logs a critical error or a traceback (an unhandled failure)."""
        bad = [line for line in self.gw.log().splitlines()
               if "#critical]" in line or "#error]" in line or "Traceback" in line]
        assert not bad, f"gateway {self.name} logged errors:\n" + "\n".join(bad[:20])

    def __repr__(self) -> str:
        return f"Node({self.name})"

    async def start(self) -> None:
        await self.gw.start()
        body = await login(self.http, self.gw.url(), "admin", self.gw.admin_password)
        self.token = body["access_token"]

    def _url(self, collection: str, key: str | None = None) -> str:
        base = f"{self.gw.url()}/api/v1/sync/collections/{collection}/items"
        return base if key is None else f"{base}/{quote(key, safe='')}"

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def put(self, collection: str, key: str, value: Any) -> dict[str, Any]:
        r = await self.http.put(self._url(collection, key), json={"value": value},
                                headers=self._auth())
        body = json.loads(await r.content())
        assert r.code == 200, (self.name, r.code, body)
        return body  # type: ignore[no-any-return]

    async def get(self, collection: str, key: str) -> dict[str, Any] | None:
        r = await self.http.get(self._url(collection, key), headers=self._auth())
        body = json.loads(await r.content())
        if r.code == 404:
            return None
        assert r.code == 200, (self.name, r.code, body)
        return body  # type: ignore[no-any-return]

    async def items(self, collection: str) -> dict[str, dict[str, Any]]:
        """Every live item of *collection*, page by page."""
        out: dict[str, dict[str, Any]] = {}
        after = ""
        while True:
            r = await self.http.get(self._url(collection), headers=self._auth(),
                                    params={"after": after, "limit": "1000"})
            body = json.loads(await r.content())
            assert r.code == 200, (self.name, r.code, body)
            out.update((item["key"], item) for item in body["items"])
            if body["next"] is None:
                return out
            after = body["next"]

    async def disk(self) -> dict[str, dict[str, bytes]]:
        return await deferToThread(_disk, self.gw.state_dir / "registry.db")

    async def roots(self) -> dict[str, str]:
        """Each collection's Merkle root of what is on disk."""
        return {c: MerkleTree.build(items.items()).root().hex()
                for c, items in (await self.disk()).items()}

    async def status(self) -> dict[str, Any]:
        """``GET /admin/api/sync`` (the admin listener, on loopback)."""
        r = await self.http.get(self.gw.url("admin") + "/admin/api/sync", headers=self._auth())
        body = json.loads(await r.content())
        assert r.code == 200, (self.name, r.code, body)
        return body  # type: ignore[no-any-return]

    async def peer(self, peer_id: str) -> dict[str, Any]:
        """This gateway's entry for *peer_id* in ``GET /admin/api/sync``."""
        peers = {p["peer_id"]: p for p in (await self.status())["peers"]}
        return peers[peer_id]

    def ports(self) -> dict[str, Any]:
        try:
            ports: dict[str, Any] = json.loads((self.gw.state_dir / "ports.json").read_text())
        except (OSError, ValueError):
            return {}
        return ports

    def log_count(self, text: str) -> int:
        return self.gw.log().count(text)


async def pair(joiner: Node, host: Node) -> tuple[str, str]:
    """*joiner* joins *host* through the CLI: ``aico-gateway pair`` on *host*, then
    ``aico-gateway sync join`` on *joiner* at the pairing port the running *host* wrote
    into its ``ports.json``. (peer ID of *host* at *joiner*, of *joiner* at *host*)."""
    status, out, err = await host.gw.cli("pair", "--no-wait", "--minutes", "5")
    assert status == 0, (out, err)
    match = re.search(r"pairing code: (\S+)", out)
    assert match is not None, out
    address = await eventually(lambda: host.ports().get("pairing"), timeout=10)
    status, out, err = await joiner.gw.cli(
        "sync", "join", "--host", "127.0.0.1", "--port", str(address["port"]),
        "--code", match.group(1), "--name", f"gateway-{joiner.name}")
    assert status == 0, (out, err)
    joined = re.search(r"joined .* \((\S+)\)", out)
    there = re.search(r"this gateway there: (\S+)", out)
    assert joined is not None and there is not None, out
    # The window was single use: the pairing listener closes again.
    await eventually(lambda: "pairing" not in host.ports(), timeout=10)
    return joined.group(1), there.group(1)


async def chain(test: TestCase, names: str = "abc") -> list[Node]:
    """Gateways started side by side, then paired in a chain: the first joins the second
    (the window on the second), the second joins the third (the window on the third)."""
    nodes = [Node(test, n) for n in names]
    await gatherResults([Deferred.fromCoroutine(n.start()) for n in nodes])
    for joiner, host in pairwise(nodes):
        await pair(joiner, host)
    return nodes


async def everywhere(nodes: list[Node], collection: str, key: str,
                     timeout: float = 15.0) -> list[dict[str, Any]]:
    """Wait until every gateway shows *key* and shows it the same; those views."""
    async def check() -> list[dict[str, Any]] | None:
        views = [await n.get(collection, key) for n in nodes]
        if any(v is None for v in views) or any(v != views[0] for v in views):
            return None
        return views  # type: ignore[return-value]

    result: list[dict[str, Any]] = await eventually(check, timeout=timeout, interval=0.1)
    return result


async def converged(nodes: list[Node], collections: tuple[str, ...] = SHARED,
                    timeout: float = 30.0) -> dict[str, dict[str, dict[str, Any]]]:
    """Wait until every gateway holds the same items (data API) and the same Merkle
    roots for every collection in *collections*, both as the running engine has them
    (``GET /admin/api/sync``) and as computed from its disk; the items."""
    last: list[Any] = []

    async def check() -> dict[str, dict[str, dict[str, Any]]] | None:
        disk = [await n.roots() for n in nodes]
        live = [(await n.status())["collections"] for n in nodes]
        roots = [{c: (d.get(c, EMPTY.hex()), v.get(c, {}).get("root", EMPTY.hex()))
                  for c in collections} for d, v in zip(disk, live, strict=True)]
        last[:] = [roots]
        if any(r != roots[0] for r in roots) or any(
                d != v for r in roots for d, v in r.values()):
            return None
        items = {c: [await n.items(c) for n in nodes] for c in collections}
        last[:] = [roots, {c: [len(i) for i in v] for c, v in items.items()}]
        if any(v != vs[0] for vs in items.values() for v in vs):
            return None
        return {c: vs[0] for c, vs in items.items()}

    try:
        result: dict[str, dict[str, dict[str, Any]]] = await eventually(
            check, timeout=timeout, interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"not converged: {last}") from e
    return result


async def put_many(node: Node, collection: str, values: dict[str, Any],
                   parallel: int = 8) -> None:
    sem = DeferredSemaphore(parallel)
    await gatherResults([sem.run(lambda k=k, v=v: Deferred.fromCoroutine(node.put(collection, k, v)))
                         for k, v in values.items()])


class ChainTests(TestCase):
    """Three gateways paired in a chain A-B-C."""

    timeout = 90

    async def test_a_write_on_any_gateway_reaches_the_others_and_a_local_collection_never_leaves(
            self) -> None:
        a, b, c = nodes = await chain(self)
        # A collection with sync = false, written first on both ends of the chain.
        await a.put("scratch", "secret-a", {"pin": 1234})
        await c.put("scratch", "secret-c", {"pin": 5678})
        # A write on each gateway reaches the two others (across B for A and C).
        for node in nodes:
            await node.put("notes", f"from-{node.name}", {"text": f"written on {node.name}"})
        for node in nodes:
            views = await everywhere(nodes, "notes", f"from-{node.name}")
            self.assertEqual(views[0]["value"], {"text": f"written on {node.name}"})
        items = await converged(nodes)
        self.assertEqual(sorted(items["notes"]), ["from-a", "from-b", "from-c"])
        # Rounds ran after the scratch writes (the notes came after them), and still the
        # scratch items are only where they were written: not through the data API,
        # not on disk (no row, so no Merkle root) on the others.
        self.assertEqual(list(await a.items("scratch")), ["secret-a"])
        self.assertEqual(list(await c.items("scratch")), ["secret-c"])
        self.assertEqual(await b.items("scratch"), {})
        self.assertIsNone(await b.get("scratch", "secret-a"))
        self.assertIsNone(await a.get("scratch", "secret-c"))
        self.assertIsNone(await c.get("scratch", "secret-a"))
        statuses = [(await n.status())["collections"]["scratch"] for n in nodes]
        self.assertEqual([s["items"] for s in statuses], [1, 0, 1])
        self.assertEqual(statuses[1]["root"], EMPTY.hex())
        self.assertFalse(statuses[0]["sync"])
        disks = [await n.disk() for n in nodes]
        self.assertEqual(set(disks[0]["scratch"]), {"secret-a"})
        self.assertNotIn("scratch", disks[1])
        self.assertEqual(set(disks[2]["scratch"]), {"secret-c"})

    async def test_concurrent_writes_under_each_strategy_end_identical_everywhere(self) -> None:
        a, b, c = nodes = await chain(self)
        base = {"steps": 10, "tags": ["x"], "title": "start"}
        await a.put("stats", "day", base)
        await everywhere(nodes, "stats", "day")
        # B, the only link between A and C, goes down: A and C write the same keys.
        self.assertEqual(await b.gw.stop(), 0)
        await a.put("notes", "shopping", ["milk"])
        await c.put("notes", "shopping", ["milk", "eggs"])
        await a.put("letters", "letter", "Dear Ann")
        await c.put("letters", "letter", "Dear Anne")
        await a.put("stats", "day", {"steps": 25, "tags": ["x", "a"], "title": "start"})
        await c.put("stats", "day", {"steps": 15, "tags": ["x", "c"], "title": "walk"})
        await b.start()
        items = await converged(nodes)
        # lww: one value everywhere; the other concurrent write kept in overwritten.
        shopping = items["notes"]["shopping"]
        lost = [o["value"] for o in shopping.get("overwritten", [])]
        self.assertEqual(sorted([shopping["value"], *lost]), [["milk"], ["milk", "eggs"]])
        # keep-both: both versions, everywhere.
        letter = items["letters"]["letter"]
        self.assertTrue(letter.get("conflict"), letter)
        self.assertEqual(sorted(v["value"] for v in letter["versions"]), ["Dear Ann", "Dear Anne"])
        # merge: counters add both increments (10 + 15 + 5), sets keep both additions,
        # the other field is one of the two writes.
        day = items["stats"]["day"]["value"]
        self.assertEqual(day["steps"], 30)
        self.assertEqual(sorted(day["tags"]), ["a", "c", "x"])
        self.assertIn(day["title"], ("start", "walk"))
        # A client's resolution on B ends the conflict everywhere.
        await b.put("letters", "letter", "Dear Ann and Anne")
        views = await everywhere(nodes, "letters", "letter")
        self.assertEqual(views[0]["value"], "Dear Ann and Anne")
        self.assertNotIn("conflict", views[0])
        await converged(nodes)


class FailureTests(TestCase):
    """Gateways stopped or killed while they sync, and a revoked peer."""

    timeout = 120

    async def test_a_peer_killed_mid_round_written_meanwhile_and_restarted_loses_nothing(
            self) -> None:
        a, b, c = nodes = await chain(self)
        # B is down while A takes many large items: B's catch-up is a long transfer
        # (several Fetch/Push calls of 512 states, each many Part chunks).
        self.assertEqual(await b.gw.stop(), 0)
        big = {f"big-{i:04d}": {"n": i, "pad": "x" * 6000} for i in range(N_BIG)}
        await put_many(a, "notes", big)
        await b.start()
        # Killed (SIGKILL) while items are arriving: some on disk, not all.
        counts: list[int] = []

        async def arriving(more_than: int = 1) -> bool:
            n = sum(k.startswith("big-") for k in (await b.disk()).get("notes", {}))
            counts.append(n)
            return more_than <= n < N_BIG

        await eventually(arriving, timeout=30, interval=0.02)
        self.assertNotEqual(await b.gw.kill(), 0)
        had = sorted(k for k in (await b.disk()).get("notes", {}) if k.startswith("big-"))
        at_kill = len(had)
        # One item B had at the kill is overwritten, another deleted, on A meanwhile (B
        # must not bring the old ones back); and one it did not have yet is overwritten.
        changed, deleted, missing = had[0], had[1], sorted(set(big) - set(had))[0]
        # Meanwhile: A overwrites some big items and deletes one, C writes its own.
        await a.put("notes", changed, {"n": "changed"})
        await a.put("notes", missing, {"n": "changed too"})
        await a.put("letters", "from-a", "written while B was down")
        await c.put("notes", "from-c", {"n": "c"})
        await c.put("stats", "c-count", {"count": 3})
        r = await a.http.delete(a._url("notes", deleted), headers=a._auth())
        self.assertEqual(r.code, 204)
        await b.start()
        await b.put("notes", "from-b", {"n": "b"})
        # Stopped again (SIGTERM: a clean exit) while the rest is arriving.
        await eventually(lambda: Deferred.fromCoroutine(arriving(more_than=at_kill + 1)),
                         timeout=30, interval=0.02)
        self.assertEqual(await b.gw.stop(), 0, b.gw.log()[-3000:])
        await a.put("notes", "late-a", {"n": "late"})
        await b.start()
        items = await converged(nodes, SHARED, timeout=60)
        expected = {k: v for k, v in big.items() if k != deleted}
        expected.update({changed: {"n": "changed"}, missing: {"n": "changed too"},
                         "from-c": {"n": "c"},
                         "from-b": {"n": "b"}, "late-a": {"n": "late"}})
        self.assertEqual({k: i["value"] for k, i in items["notes"].items()}, expected)
        self.assertEqual(items["letters"]["from-a"]["value"], "written while B was down")
        self.assertEqual(items["stats"]["c-count"]["value"], {"count": 3})
        # Every root on disk equal, the tombstone of the deleted item included.
        roots = [await n.roots() for n in nodes]
        self.assertEqual(roots[0], roots[1])
        self.assertEqual(roots[1], roots[2])

    async def test_a_peer_killed_right_after_acknowledging_writes_loses_none_of_them(
            self) -> None:
        a, b = nodes = await chain(self, "ab")
        # Many writes to B at once; SIGKILL as soon as the tenth is acknowledged.
        acked: dict[str, Any] = {}
        tenth: Deferred[None] = Deferred()

        async def write(i: int) -> None:
            key, value = f"w-{i:03d}", {"i": i}
            try:
                await b.put("notes", key, value)
            except Exception:
                return  # the kill came first: never acknowledged
            acked[key] = value
            if len(acked) == 10 and not tenth.called:
                tenth.callback(None)

        writes = [Deferred.fromCoroutine(write(i)) for i in range(50)]
        await tenth
        self.assertNotEqual(await b.gw.kill(), 0)
        await gatherResults(writes)
        # The kill came before B's next round (debounced 0.2 s): some acknowledged
        # writes were nowhere but on B's disk.
        self.assertTrue(set(acked) - set(await a.items("notes")))
        await b.start()
        # Every acknowledged write is there after the restart, and still reaches A.
        items = await b.items("notes")
        for key, value in acked.items():
            self.assertEqual(items[key]["value"], value, key)
        synced = await converged(nodes)
        self.assertLessEqual(set(acked), set(synced["notes"]))

    async def test_a_revoked_peer_is_cut_refused_at_its_next_handshake_and_gets_nothing(
            self) -> None:
        a, b = nodes = await chain(self, "ab")
        b_at_a, a_at_b = await _ids(a, b)

        async def linked() -> bool:
            pa, pb = await a.peer(b_at_a), await b.peer(a_at_b)
            return all(p["state"] == "connected" and p["incoming"] >= 1 and p["rounds"] > 0
                       for p in (pa, pb))

        # Both links up: each gateway dials the other, each admitted the other.
        await eventually(linked, timeout=15, interval=0.1)
        await a.put("notes", "before", {"n": 1})
        await everywhere(nodes, "notes", "before")
        # A revokes B (the CLI writes A's registry; the running A notices it).
        status, out, err = await a.gw.cli("devices", "revoke", b_at_a)
        self.assertEqual(status, 0, (out, err))
        revoked_at = reactor.seconds()

        async def cut() -> bool:
            p = await a.peer(b_at_a)
            return p["revoked"] and p["incoming"] == 0 and p["state"] == "disconnected"

        # At once: B's connection into A is cut, A's own link to B is dropped.
        await eventually(cut, timeout=5, interval=0.05)
        self.assertLess(reactor.seconds() - revoked_at, 2.0)
        self.assertIn(f"device {b_at_a} revoked: closing 1 connection(s)", a.gw.log())
        # B's next handshakes are refused (B keeps trying, with backoff).
        refusals = b.log_count("DEVICE_NOT_ALLOWED")
        await eventually(lambda: b.log_count("DEVICE_NOT_ALLOWED") > refusals, timeout=15)
        self.assertIn("DEVICE_NOT_ALLOWED", (await b.peer(a_at_b))["last_error"] or "")
        # Nothing flows any more, either way: writes on both sides, then B tries again
        # (and is refused again) twice.
        await a.put("notes", "after-a", {"n": 2})
        await b.put("notes", "after-b", {"n": 3})
        seen = b.log_count("DEVICE_NOT_ALLOWED")
        await eventually(lambda: b.log_count("DEVICE_NOT_ALLOWED") >= seen + 2, timeout=20)
        self.assertIsNone(await a.get("notes", "after-b"))
        self.assertIsNone(await b.get("notes", "after-a"))
        self.assertEqual(sorted(await a.items("notes")), ["after-a", "before"])
        self.assertEqual(sorted(await b.items("notes")), ["after-b", "before"])
        p = await a.peer(b_at_a)
        self.assertEqual((p["revoked"], p["incoming"], p["state"]), (True, 0, "disconnected"))


async def _ids(a: Node, b: Node) -> tuple[str, str]:
    """(B's device ID in A's registry, A's in B's), from ``devices list`` on each."""
    ids = []
    for node in (a, b):
        status, out, err = await node.gw.cli("devices", "list")
        assert status == 0, (out, err)
        ids.append([line.split("\t")[0] for line in out.splitlines() if "paired for sync" in line])
    assert len(ids[0]) == 1 and len(ids[1]) == 1, ids
    return ids[0][0], ids[1][0]


N_BIG = 1500


class RelayProcessTests(TestCase):
    """Two gateway processes that can reach only a relay process (``twistd aico-relay``)
    still converge, through mutual TLS end to end over the relay."""

    timeout = 120

    async def relay(self) -> int:
        import os
        import sys

        from aico.gateway.testing.processes import ProcessOutput

        port_file = Path(os.path.abspath(self.mktemp()))
        twistd = str(Path(sys.executable).parent / "twistd")
        proto = ProcessOutput()
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            proto, twistd, [twistd, "-n", "--pidfile=", "--logfile=-", "aico-relay",
                            "--port", "tcp:0:interface=127.0.0.1", "--port-file", str(port_file)],
            env=dict(os.environ))
        self.addCleanup(lambda: None if proto.ended.called
                        else (transport.signalProcess("KILL"), proto.ended)[1])
        address = await eventually(
            lambda: port_file.exists() and port_file.stat().st_size and
            json.loads(port_file.read_text()), timeout=20)
        return int(address["port"])

    async def test_gateways_that_reach_only_the_relay_converge_through_it(self) -> None:
        import tomllib

        from aico.gateway.testing.harness import merge
        from aico.gateway.testing.processes import _toml

        relay_port = await self.relay()
        a, b = await chain(self, "ab")
        ids = {n.name: [p["peer_id"] for p in (await n.status())["peers"]] for n in (a, b)}
        closed = free_port()  # nothing listens there: every direct attempt fails
        for node, peer_ids in ((a, ids["a"]), (b, ids["b"])):
            await node.gw.stop()
            extra = (f'[sync]\nrelay = "127.0.0.1:{relay_port}"\ndirect_attempts = 1\n'
                     + "".join(f'[sync.peers."{p}"]\nhost = "127.0.0.1"\nport = {closed}\n'
                               for p in peer_ids))
            config = merge(tomllib.loads(node.gw.config_path.read_text()), tomllib.loads(extra))
            node.gw.config_path.write_text(_toml(config))
        await gatherResults([Deferred.fromCoroutine(n.start()) for n in (a, b)])

        async def on_relay(node: Node) -> bool | None:
            peers = (await node.status())["peers"]
            return (bool(peers) and peers[0]["state"] == "connected"
                    and peers[0]["via"] == "relay") or None

        for node in (a, b):
            await eventually(lambda node=node: on_relay(node), timeout=40, interval=0.2)
        await a.put("notes", "from-a", "over the relay")
        await b.put("notes", "from-b", "and back")
        await everywhere([a, b], "notes", "from-a", timeout=20)
        await everywhere([a, b], "notes", "from-b", timeout=20)
        await converged([a, b])
        for node in (a, b):
            self.assertEqual((await node.status())["peers"][0]["address"]["port"], closed)
