# The twistd dropin for the sync relay: imports nothing but Twisted; the relay loads only when used.
from twisted.application.service import ServiceMaker

aicoRelay = ServiceMaker(
    "aico-relay",
    "aico.sync.relay",
    "A transit relay (magic-wormhole's) for aico-gateway sync: peers that cannot reach "
    "each other meet through it; it sees only their end-to-end TLS.",
    "aico-relay",
)
