"""The Merkle tree of a collection: its shape is the wire contract's, updates are
incremental, and the diff (descending only into differing subtrees) finds exactly the
keys a naive full comparison finds; a round with nothing changed asks one root."""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from aico.sync.interfaces import DEPTH, EMPTY, place
from aico.sync.merkle import MerkleTree, Remote, bucket_hash, diff, diff_lazily


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


#: Pairs of keys that share a bucket (found by search), so buckets hold several items.
SAME_BUCKET = ["k202", "k219", "k244", "k273", "k48", "k308", "k471", "k520"]
keys = st.one_of(st.text("abcdefghij/é", min_size=1, max_size=4), st.sampled_from(SAME_BUCKET))
trees = st.dictionaries(keys, st.sampled_from([digest("1"), digest("2"), digest("3")]),
                        max_size=40)


def naive(a: dict[str, bytes], b: dict[str, bytes]) -> set[str]:
    return {k for k in {*a, *b} if a.get(k) != b.get(k)}


class Counting(Remote):
    def __init__(self, tree: MerkleTree) -> None:
        super().__init__(tree.root, tree.children, tree.leaves)
        self.asks: list[tuple[str, str]] = []

    def ask(self, what: tuple[str, str]) -> Any:
        self.asks.append(what)
        return super().ask(what)


class MerkleTests(SynchronousTestCase):
    def test_the_shape_is_the_wire_contracts(self) -> None:
        tree = MerkleTree.build([("k", digest("v"))])
        bucket = place("k")[:DEPTH]
        leaf = hashlib.sha256(b"k\0" + digest("v")).digest()
        self.assertEqual(tree.leaves(bucket), {"k": digest("v")})
        self.assertEqual(bucket_hash({"k": digest("v")}), leaf)
        h = leaf
        for depth in range(DEPTH - 1, -1, -1):
            prefix = bucket[:depth]
            self.assertEqual(tree.children(prefix), [(bucket[: depth + 1], h)])
            slots = [EMPTY] * 16
            slots[int(bucket[depth], 16)] = h
            h = hashlib.sha256(b"".join(slots)).digest()
        self.assertEqual(tree.root(), h)
        self.assertEqual(MerkleTree().root(), EMPTY)

    def test_the_same_bucket_pairs_do_share_a_bucket(self) -> None:
        for a, b in zip(SAME_BUCKET[::2], SAME_BUCKET[1::2], strict=True):
            self.assertEqual(place(a)[:DEPTH], place(b)[:DEPTH])

    def test_bad_prefixes_are_refused(self) -> None:
        tree = MerkleTree()
        self.assertRaises(ValueError, tree.children, "abcd")
        self.assertRaises(ValueError, tree.leaves, "abc")

    @given(trees, st.lists(st.tuples(keys, st.one_of(st.none(), st.just(digest("9")))),
                           max_size=20))
    def test_incremental_updates_equal_a_fresh_build(self, items: dict[str, bytes],
                                                    changes: list[Any]) -> None:
        tree = MerkleTree()
        for k, d in items.items():
            tree.put(k, d)
        for k, d in changes:
            if d is None:
                tree.delete(k)
                items.pop(k, None)
            else:
                tree.put(k, d)
                items[k] = d
        fresh = MerkleTree.build(items.items())
        self.assertEqual(tree.root(), fresh.root())
        self.assertEqual(tree._hashes, fresh._hashes)
        self.assertEqual(tree.items(), items)

    def test_a_put_touches_one_bucket_and_its_ancestors_only(self) -> None:
        tree = MerkleTree.build((f"k{i}", digest(str(i))) for i in range(5000))
        before = dict(tree._hashes)
        tree.put("k17", digest("changed"))
        changed = {p for p in {*before, *tree._hashes} if before.get(p) != tree._hashes.get(p)}
        bucket = place("k17")[:DEPTH]
        self.assertEqual(changed, {bucket[:n] for n in range(DEPTH + 1)})

    def test_deleting_everything_gives_the_empty_root(self) -> None:
        tree = MerkleTree.build([("a", digest("1")), ("b", digest("2"))])
        tree.delete("a")
        tree.delete("b")
        tree.delete("never there")
        self.assertEqual((tree.root(), tree.children(""), tree._hashes), (EMPTY, [], {}))

    @settings(max_examples=200)
    @given(trees, trees)
    def test_diff_equals_a_naive_full_comparison(self, a: dict[str, bytes],
                                                 b: dict[str, bytes]) -> None:
        local, remote = MerkleTree.build(a.items()), MerkleTree.build(b.items())
        self.assertEqual(diff(local, Remote.of(remote)), naive(a, b))

    @settings(max_examples=50)
    @given(trees, trees)
    def test_the_lazy_diff_over_deferreds_gives_the_same_keys(self, a: dict[str, bytes],
                                                              b: dict[str, bytes]) -> None:
        local, remote = MerkleTree.build(a.items()), MerkleTree.build(b.items())
        clock = Clock()

        def later(fn: Any) -> Any:
            return lambda *args: deferLater(clock, 0.01, fn, *args)

        d: Deferred[set[str]] = diff_lazily(
            local, Remote(later(remote.root), later(remote.children), later(remote.leaves)))
        for _ in range(200):
            clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), naive(a, b))
        d2 = diff_lazily(local, Remote(lambda: succeed(remote.root()), remote.children,
                                       remote.leaves))
        self.assertEqual(self.successResultOf(d2), naive(a, b))

    def test_an_unchanged_round_asks_one_root_for_10_and_for_100000_items(self) -> None:
        for n in (10, 100_000):
            items = [(f"item-{i}", digest(str(i))) for i in range(n)]
            local, same = MerkleTree.build(items), MerkleTree.build(items)
            remote = Counting(same)
            self.assertEqual(diff(local, remote), set())
            self.assertEqual(remote.asks, [("root", "")], n)
            # one changed item: one path down, DEPTH children lists and one bucket
            same.put("item-5", digest("changed"))
            remote.asks.clear()
            self.assertEqual(diff(local, remote), {"item-5"})
            self.assertEqual(len(remote.asks), 1 + DEPTH + 1, n)
