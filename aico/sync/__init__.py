"""Federated sync between a person's gateways (docs/sync.md, docs/sync-protocol.md)."""
