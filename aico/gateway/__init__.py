"""The AICO API gateway: listeners, security chain, router, and their wiring (``tap``)."""
