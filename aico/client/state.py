"""The client's own state: the token pair of ``aico-client login``.

Where the tokens live (one JSON file, mode 0600, written atomically):

* detached mode: ``CERT_DIR/tokens.json``, next to the device's certificate and key;
* coupled mode: ``CLIENT_DIR/tokens/<id>.json``, one file per gateway state directory
  (``<id>``: the first 16 hex digits of the SHA-256 of its resolved path), where
  ``CLIENT_DIR`` is ``--client-dir`` or the per-user state directory of ``aico-client``
  (``platformdirs.user_state_dir``, e.g. ``~/.local/state/aico-client``), mode 0700.

Tokens are secrets: nothing here logs or prints them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

from aico.files import write_atomic

__all__ = ["StoredTokens", "TokenStore", "default_client_dir"]

#: Refresh an access token this many seconds before it expires.
REFRESH_MARGIN = 30.0


def default_client_dir() -> Path:
    """The per-user state directory of ``aico-client``."""
    return Path(platformdirs.user_state_dir("aico-client", appauthor=False))


@dataclass(frozen=True)
class StoredTokens:
    """A token pair as ``POST /api/v1/users/authenticate`` (or ``/refresh``) answered it."""

    access_token: str
    refresh_token: str
    #: Epoch seconds at which the access token expires (now + ``expires_in``).
    expires_at: float
    username: str = ""
    #: What the tokens are for (a URL or a state directory), for people reading the file.
    gateway: str = ""

    @classmethod
    def from_answer(cls, body: Any, username: str, gateway: str,
                    now: float | None = None) -> StoredTokens:
        if not isinstance(body, dict) or not body.get("access_token") or not body.get("refresh_token"):
            raise ValueError("the gateway's answer holds no token pair")
        issued = time.time() if now is None else now
        return cls(str(body["access_token"]), str(body["refresh_token"]),
                   issued + float(body.get("expires_in") or 0), username, gateway)

    def expired(self, now: float | None = None, margin: float = REFRESH_MARGIN) -> bool:
        """Whether the access token expires within *margin* seconds."""
        return (time.time() if now is None else now) + margin >= self.expires_at

    def __repr__(self) -> str:  # never show the tokens themselves
        return f"StoredTokens(username={self.username!r}, expires_at={self.expires_at!r})"


class TokenStore:
    """One token file (see the module docstring for where)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_cert_dir(cls, cert_dir: str | Path) -> TokenStore:
        return cls(Path(cert_dir).expanduser() / "tokens.json")

    @classmethod
    def for_state_dir(cls, state_dir: str | Path, client_dir: str | Path | None = None) -> TokenStore:
        root = Path(client_dir) if client_dir is not None else default_client_dir()
        key = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]
        return cls(root / "tokens" / f"{key}.json")

    def load(self) -> StoredTokens | None:
        """The stored tokens, or ``None`` when there are none (or the file is unreadable)."""
        try:
            data = json.loads(self.path.read_text())
            return StoredTokens(**{k: data[k] for k in ("access_token", "refresh_token", "expires_at")},
                                username=str(data.get("username", "")),
                                gateway=str(data.get("gateway", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, tokens: StoredTokens) -> None:
        """Write the tokens, 0600, creating the directories (0700) as needed."""
        for parent in reversed(self.path.parents):
            if not parent.exists():
                parent.mkdir(mode=0o700)
        write_atomic(self.path, json.dumps(asdict(tokens), indent=2).encode() + b"\n", 0o600)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
