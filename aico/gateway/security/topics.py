"""Who may subscribe to which bus topics (WebSocket and IPC subscriptions).

A subscription matches by topic *prefix*, as ZeroMQ's do, so the rule looks at what a
prefix could match, not only at the string itself. The rules, first match wins
(``docs/protocols.md`` has the same table):

=============================  ======================================================
subscription prefix            who may subscribe
=============================  ======================================================
no principal (anonymous)       nobody
empty, or no ``/`` after the   nobody (``"con"`` would also match ``"config/…"``)
first segment
``reply/…``                    nobody: private reply topics of bus requests
``system/…``                   capability ``admin:events``
``user/<subject>/…``           that user (``principal.subject == <subject>``), or
                               ``admin:events``; the subject segment must be complete
                               (``user/al`` would match ``user/alice/…``)
``sync/…``                     capability ``sync:read`` (a sync collection's change
                               events, ``docs/sync.md``), or ``admin:events``
``<segment>/…`` (any other)    capability ``events:<segment>`` (e.g.
                               ``events:conversation`` for ``conversation/…``), or
                               ``admin:events``
=============================  ======================================================

Anything else is refused (default deny).
"""

from __future__ import annotations

from aico.gateway.routing.messages import Principal
from aico.gateway.security.capabilities import grants

#: Grants every topic except the private reply topics.
ADMIN_EVENTS = "admin:events"
#: The capability for ``<segment>/…`` topics is this prefix plus the segment.
EVENTS_PREFIX = "events:"
#: Segments whose events are granted by a capability of their own, not ``events:…``.
_OWN_CAPABILITY = {"sync": "sync:read"}

_NEVER = frozenset({"reply"})
#: Longest topic prefix accepted at all.
MAX_TOPIC_LENGTH = 256


def required_capability(topic: str) -> str | None:
    """The capability that grants *topic* outright, or ``None`` when none does.

    ``user/<subject>/…`` topics need only the matching subject, which is checked by
    :func:`may_subscribe`; their capability here is ``admin:events``.
    """
    if not topic or len(topic) > MAX_TOPIC_LENGTH or "/" not in topic:
        return None
    segment = topic.split("/", 1)[0]
    if not segment or segment in _NEVER:
        return None
    if segment in ("system", "user"):
        return ADMIN_EVENTS
    return _OWN_CAPABILITY.get(segment, EVENTS_PREFIX + segment)


def may_subscribe(principal: Principal | None, topic: str) -> bool:
    """Whether *principal* may receive events whose topic starts with *topic*."""
    if principal is None:
        return False
    needed = required_capability(topic)
    if needed is None:
        return False
    caps = principal.caps
    if grants(caps, ADMIN_EVENTS):
        return True
    segment, _, rest = topic.partition("/")
    if segment == "user":
        subject, slash, _ = rest.partition("/")
        return bool(slash) and bool(subject) and subject == principal.subject
    return grants(caps, needed)
