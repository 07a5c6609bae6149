"""The transport domain: ``GET /api/v1/transport``, the transports this gateway offers."""
