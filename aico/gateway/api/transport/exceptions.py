"""Errors of the transport domain (none of its own: the route is public and total)."""

from __future__ import annotations
