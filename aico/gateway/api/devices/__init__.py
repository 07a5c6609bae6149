"""The devices domain: ``GET /api/v1/devices/me``, what a paired device may do."""
