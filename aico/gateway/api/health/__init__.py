"""The health domain: ``GET /api/v1/health``, fanned out to every backend module."""
