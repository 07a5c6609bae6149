"""Errors of the health domain."""

from __future__ import annotations


class ModuleHealthError(Exception):
    """A module answered its health request, but not with ``200 {status}``."""
