"""Errors of the conversations domain."""

from __future__ import annotations

from aico.gateway.errors import BackendUnavailable


class ConversationModuleUnavailable(BackendUnavailable):
    """No conversation module is serving ``conversation/user/input/v1`` right now."""

    def __init__(self) -> None:
        super().__init__("no conversation module is running; try again shortly")
