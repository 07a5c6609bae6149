"""The topic authorization rules of aico.gateway.security.topics (default deny)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.routing.messages import Principal
from aico.gateway.security.topics import may_subscribe, required_capability


def user(subject: str = "alice", *caps: str) -> Principal:
    return Principal(subject=subject, roles=("user",), caps=frozenset(caps))


class TopicRuleTests(SynchronousTestCase):
    def test_anonymous_may_subscribe_to_nothing(self) -> None:
        for topic in ("conversation/", "user/alice/", "system/", "x/"):
            self.assertFalse(may_subscribe(None, topic))

    def test_domain_topics_need_the_events_capability_of_their_segment(self) -> None:
        self.assertEqual(required_capability("conversation/user/output/v1"), "events:conversation")
        self.assertTrue(may_subscribe(user("a", "events:conversation"), "conversation/"))
        self.assertTrue(may_subscribe(user("a", "events:conversation"), "conversation/user/out"))
        self.assertFalse(may_subscribe(user("a", "events:conversation"), "health/"))
        self.assertFalse(may_subscribe(user("a"), "conversation/"))

    def test_a_prefix_must_name_its_whole_first_segment(self) -> None:
        # "con" would also match "config/…" topics, "" everything.
        for topic in ("", "con", "conversation"):
            self.assertFalse(may_subscribe(user("a", "events:conversation", "admin:events"), topic))

    def test_users_read_only_their_own_user_topics(self) -> None:
        alice = user("alice")
        self.assertTrue(may_subscribe(alice, "user/alice/"))
        self.assertTrue(may_subscribe(alice, "user/alice/notifications/v1"))
        self.assertFalse(may_subscribe(alice, "user/bob/"))
        self.assertFalse(may_subscribe(alice, "user/alice"))  # would match user/alicex/…
        self.assertFalse(may_subscribe(alice, "user/ali"))
        self.assertFalse(may_subscribe(alice, "user/"))

    def test_system_topics_need_admin_events(self) -> None:
        self.assertFalse(may_subscribe(user("alice", "events:system"), "system/"))
        admin = user("root", "admin:events")
        self.assertTrue(may_subscribe(admin, "system/module/heartbeat/v1"))
        self.assertTrue(may_subscribe(admin, "user/bob/"))
        self.assertTrue(may_subscribe(admin, "conversation/"))

    def test_reply_topics_are_never_readable(self) -> None:
        admin = user("root", "admin:events", "events:reply")
        self.assertFalse(may_subscribe(admin, "reply/"))
        self.assertFalse(may_subscribe(admin, "reply/gateway/abc"))

    def test_overlong_topics_are_refused(self) -> None:
        self.assertFalse(may_subscribe(user("a", "admin:events"), "conversation/" + "x" * 300))


class WildcardCapabilityTests(SynchronousTestCase):
    def test_wildcard_capabilities_grant_topics(self) -> None:
        admin = Principal("root", ("admin",), frozenset({"*"}))
        service = Principal("svc", ("service",), frozenset({"events:*"}))
        self.assertTrue(may_subscribe(admin, "system/"))
        self.assertTrue(may_subscribe(service, "conversation/"))
        self.assertFalse(may_subscribe(service, "system/"))
        self.assertFalse(may_subscribe(admin, "reply/x/"))
