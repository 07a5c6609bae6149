"""The sync data API (``/api/v1/sync/collections/{name}/items[/{key}]``) on the in-memory
gateway: shapes, capabilities, problems, conflicts, paging and WebSocket change events;
and once over real sockets with a real SQLite file: a PUT is on disk when answered."""

from __future__ import annotations

import json
import sqlite3
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase, TestCase

from aico.gateway.testing.harness import http_client, login, start_gateway
from aico.gateway.testing.memory import MemoryGateway
from aico.sync import crdt
from aico.sync.engine import SyncEngine
from aico.sync.interfaces import ItemState

CONFIG = """
[sync.collections.notes]
strategy = "lww"
[sync.collections.drafts]
strategy = "keep-both"
[sync.collections.stats]
strategy = "merge"
[roles]
reader = ["sync:read"]
nobody = ["users:self"]
"""

ITEMS = "/api/v1/sync/collections/{}/items"


def item(collection: str, key: str) -> str:
    return ITEMS.format(collection) + "/" + quote(key, safe="")


class SyncApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gw = MemoryGateway(CONFIG, test=self)
        self.token = self.gw.token()
        self.gw.add_user("ursula", "a-long-password-1", ("user",))
        self.user = self.gw.token("ursula", "a-long-password-1")

    @property
    def engine(self) -> SyncEngine:
        return self.gw.parts.sync

    def put(self, collection: str, key: str, value: Any, token: str | None = None) -> Any:
        return self.gw.request("PUT", item(collection, key), json_body={"value": value},
                               token=token or self.user)

    def test_put_then_get_answers_key_value_and_hlc(self) -> None:
        r = self.put("notes", "shopping", {"items": ["milk"]})
        self.assertEqual(r.code, 200, r.body)
        body = r.json()
        self.assertEqual(set(body), {"key", "value", "hlc"})
        self.assertEqual((body["key"], body["value"]), ("shopping", {"items": ["milk"]}))
        self.assertTrue(body["hlc"].endswith(":" + self.engine.node_id))
        self.assertEqual(self.gw.get(item("notes", "shopping"), token=self.user).json(), body)

    def test_a_key_may_hold_any_character_but_controls_when_encoded(self) -> None:
        key = "notes/2026 Müller?#&"
        self.assertEqual(self.put("notes", key, 1).code, 200)
        self.assertEqual(self.gw.get(item("notes", key), token=self.user).json()["key"], key)

    def test_delete_answers_204_and_the_item_is_404_after(self) -> None:
        self.put("notes", "k", 1)
        self.assertEqual(self.gw.request("DELETE", item("notes", "k"), token=self.user).code, 204)
        for method in ("GET", "DELETE"):
            r = self.gw.request(method, item("notes", "k"), token=self.user)
            self.assertEqual((r.code, r.json()["code"]), (404, "not_found"))
            self.assertIn("holds no item 'k'", r.json()["detail"])
            self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/problem+json"])

    def test_list_pages_by_key_and_leaves_deleted_items_out(self) -> None:
        for k in ("c", "a", "b", "d"):
            self.put("notes", k, k.upper())
        self.gw.request("DELETE", item("notes", "d"), token=self.user)
        r = self.gw.get(ITEMS.format("notes") + "?limit=2", token=self.user)
        self.assertEqual(r.code, 200, r.body)
        page = r.json()
        self.assertEqual(([i["key"] for i in page["items"]], page["next"]), (["a", "b"], "b"))
        page = self.gw.get(ITEMS.format("notes") + "?limit=2&after=b", token=self.user).json()
        self.assertEqual(([i["value"] for i in page["items"]], page["next"]), (["C"], None))
        empty = self.gw.get(ITEMS.format("never-written"), token=self.user).json()
        self.assertEqual(empty, {"collection": "never-written", "items": [], "next": None})
        r = self.gw.get(ITEMS.format("notes") + "?limit=0", token=self.user)
        self.assertEqual((r.code, r.json()["code"]), (400, "bad_request"))

    def test_an_unconfigured_collection_stores_locally(self) -> None:
        self.assertEqual(self.put("scratch", "k", 1).code, 200)
        self.assertEqual(self.gw.get(item("scratch", "k"), token=self.user).json()["value"], 1)
        self.assertNotIn("scratch", self.engine.collections_for("any-peer"))

    def test_bad_names_keys_and_bodies_are_400_with_a_clear_detail(self) -> None:
        cases = [
            (item("bad name", "k"), {"value": 1}, "bad_request", "invalid collection name"),
            (item("notes", "x" * 513), {"value": 1}, "bad_request", "at most 512 characters"),
            (item("notes", "a\u0007b"), {"value": 1}, "bad_request", "control characters"),
            (item("notes", "k"), {"val": 1}, "validation_failed", ""),
            (item("notes", "k"), {"value": 1, "extra": 2}, "validation_failed", ""),
            (item("stats", "k"), {"value": [1, 2]}, "validation_failed", "must be a JSON object"),
        ]
        for path, body, code, detail in cases:
            r = self.gw.request("PUT", path, json_body=body, token=self.user)
            self.assertEqual((r.code, r.json()["code"]), (400, code), (path, r.body))
            self.assertIn(detail, r.json()["detail"])
        self.assertEqual(self.put("notes", "x" * 512, 1).code, 200)
        self.assertEqual(self.gw.get(ITEMS.format("stats"), token=self.user).json()["items"], [])

    def test_capabilities_sync_read_and_sync_write(self) -> None:
        self.gw.add_user("rita", "a-long-password-1", ("reader",))
        self.gw.add_user("nora", "a-long-password-1", ("nobody",))
        reader = self.gw.token("rita", "a-long-password-1")
        nobody = self.gw.token("nora", "a-long-password-1")
        self.put("notes", "k", 1)
        self.assertEqual(self.gw.get(item("notes", "k"), token=reader).code, 200)
        self.assertEqual(self.put("notes", "k", 2, token=reader).code, 403)
        self.assertEqual(self.gw.request("DELETE", item("notes", "k"), token=reader).code, 403)
        self.assertEqual(self.gw.get(item("notes", "k"), token=nobody).code, 403)
        self.assertEqual(self.gw.get(ITEMS.format("notes"), token=nobody).code, 403)
        self.assertEqual(self.gw.get(item("notes", "k")).code, 401)

    def _concurrent(self, collection: str, key: str, value: Any) -> None:
        """A peer's concurrent write of *key* arrives (as the protocol would apply it)."""
        ts = "0000000000001:000000:PEER-B"
        state = crdt.write(self.engine.policy(collection).strategy, None, value, ts)
        d = self.engine.apply(collection, [ItemState(collection, key, state, ts)], "PEER-B")
        self.gw.settle()
        self.successResultOf(d)

    def test_keep_both_get_returns_every_version_until_a_put_resolves_it(self) -> None:
        self.put("drafts", "letter", "Dear A")
        self._concurrent("drafts", "letter", "Dear B")
        r = self.gw.get(item("drafts", "letter"), token=self.user)
        self.assertEqual(r.code, 200, r.body)
        body = r.json()
        self.assertEqual((body["key"], body["conflict"]), ("letter", True))
        self.assertEqual(sorted((v["value"], v["origin"]) for v in body["versions"]),
                         [("Dear A", self.engine.node_id), ("Dear B", "PEER-B")])
        self.assertTrue(all(set(v) == {"value", "hlc", "origin"} for v in body["versions"]))
        listed = self.gw.get(ITEMS.format("drafts"), token=self.user).json()["items"]
        self.assertEqual(listed, [body])
        resolved = self.put("drafts", "letter", "Dear A and B").json()
        self.assertEqual(resolved["value"], "Dear A and B")
        self.assertNotIn("conflict", self.gw.get(item("drafts", "letter"), token=self.user).json())

    def test_lww_shows_the_losing_concurrent_write_as_overwritten(self) -> None:
        self.put("notes", "k", "mine")
        self._concurrent("notes", "k", "older, from B")
        body = self.gw.get(item("notes", "k"), token=self.user).json()
        self.assertEqual(body["value"], "mine")
        self.assertEqual([(o["value"], o["origin"]) for o in body["overwritten"]],
                         [("older, from B", "PEER-B")])

    def test_a_delete_that_won_over_a_concurrent_write_names_it_in_the_404(self) -> None:
        self.engine.peers.append("PEER-B")  # a peer shares notes: the tombstone is kept
        self.put("notes", "k", "first")
        self.gw.request("DELETE", item("notes", "k"), token=self.user)
        self._concurrent("notes", "k", "older, from B")
        r = self.gw.get(item("notes", "k"), token=self.user)
        self.assertEqual(r.code, 404)
        self.assertEqual([o["value"] for o in r.json()["overwritten"]], ["older, from B"])

    def test_merge_collections_count_and_merge_fields(self) -> None:
        self.put("stats", "day", {"steps": 10, "tags": ["walk"]})
        body = self.put("stats", "day", {"steps": 25, "tags": ["walk", "run"], "note": "ok"}).json()
        self.assertEqual(body["value"], {"steps": 25, "tags": ["walk", "run"], "note": "ok"})

    def test_a_websocket_client_with_sync_read_receives_a_collections_changes(self) -> None:
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {self.user}"})
        ws.recv_all()
        ws.send({"type": "subscribe", "topic": "sync/notes/", "id": 1})
        self.assertEqual(ws.recv()["type"], "subscribed")
        self.put("notes", "k", {"v": 1})
        self.put("drafts", "other", 1)  # another collection: not this subscription's
        self.gw.request("DELETE", item("notes", "k"), token=self.user)
        events = [f for f in ws.recv_all() if f["type"] == "event"]
        self.assertEqual([e["topic"] for e in events], ["sync/notes/changed/v1"] * 2)
        first, second = (e["body"] for e in events)
        self.assertEqual((first["collection"], first["key"], first["value"], first["deleted"],
                          first["source"]), ("notes", "k", {"v": 1}, False, "local"))
        self.assertEqual((second["key"], second["deleted"]), ("k", True))

    def test_a_websocket_client_without_sync_read_may_not_subscribe(self) -> None:
        self.gw.add_user("nora", "a-long-password-1", ("nobody",))
        nobody = self.gw.token("nora", "a-long-password-1")
        ws = self.gw.websocket(headers={"Authorization": f"Bearer {nobody}"})
        ws.recv_all()
        ws.send({"type": "subscribe", "topic": "sync/notes/", "id": 1})
        frame = ws.recv()
        self.assertEqual(frame["type"], "error", frame)
        self.assertIn("forbidden", json.dumps(frame))


class RealSocketTests(TestCase):
    timeout = 30

    async def test_a_put_is_on_disk_in_sqlite_when_it_is_answered(self) -> None:
        gw = await start_gateway(self, CONFIG)
        anon = http_client(self)
        tokens = await login(anon, gw.base, "admin", gw.admin_password)
        http = http_client(self, token=tokens["access_token"])
        r = await http.request("PUT", gw.base + item("notes", "on disk"),
                               json={"value": {"kept": True}})
        body = json.loads(await r.content())
        self.assertEqual(r.code, 200, body)
        # A second connection, as another process would open the file.
        paths = gw.parts.materials.paths
        assert paths is not None
        conn = sqlite3.connect(str(paths.registry_db))
        self.addCleanup(conn.close)
        row = conn.execute("SELECT state, hlc, deleted FROM sync_items WHERE collection = "
                           "'notes' AND key = 'on disk'").fetchone()
        self.assertIsNotNone(row)
        self.assertEqual((row[1], row[2]), (body["hlc"], 0))
        self.assertEqual(crdt.view(json.loads(row[0])).value, {"kept": True})
        # the node name is the gateway's device CA's ID
        assert gw.parts.materials.device_ca is not None
        self.assertTrue(body["hlc"].endswith(":" + gw.parts.materials.device_ca.fingerprint))
