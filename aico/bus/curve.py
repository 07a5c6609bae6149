"""Where the CurveZMQ certificates live in the state directory, and how they are made.

Layout under ``STATE_DIR/curve/`` (pyzmq/CZMQ certificate format, which
``zmq.auth.load_certificate`` reads):

* ``broker.key`` / ``broker.key_secret`` — the embedded broker's server key pair;
* ``gateway.key`` / ``gateway.key_secret`` — the IPC listener's server key pair;
* ``modules/NAME.key`` — public keys of the bus clients the broker admits (its ZAP
  handler reads this directory at every handshake);
* ``private/NAME.key_secret`` — key pairs of the local bus clients (the gateway's own
  client ``gateway`` and the built-in modules), 0600.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq.auth


@dataclass(frozen=True)
class CurveLayout:
    """Paths of the Curve certificates under one state directory."""

    state_dir: Path

    @property
    def root(self) -> Path:
        return self.state_dir / "curve"

    @property
    def broker_public(self) -> Path:
        return self.root / "broker.key"

    @property
    def broker_secret(self) -> Path:
        return self.root / "broker.key_secret"

    @property
    def gateway_public(self) -> Path:
        return self.root / "gateway.key"

    @property
    def gateway_secret(self) -> Path:
        return self.root / "gateway.key_secret"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    @property
    def private_dir(self) -> Path:
        return self.root / "private"

    def client_secret(self, name: str) -> Path:
        return self.private_dir / f"{name}.key_secret"

    def client_public(self, name: str) -> Path:
        return self.modules_dir / f"{name}.key"


def create_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in *directory* (secret file 0600)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def ensure_client(layout: CurveLayout, name: str) -> bool:
    """Create the key pair of local bus client *name* unless it exists; True if created.

    The secret goes to ``private/``, the public key to ``modules/`` (so the broker admits it).
    """
    secret = layout.client_secret(name)
    if secret.exists():
        return False
    public, _ = create_keypair(layout.private_dir, name)
    layout.modules_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = layout.client_public(name)
    target.write_bytes(public.read_bytes())
    public.unlink()
    return True


def load_public(path: Path) -> bytes:
    """The Z85 public key of the certificate at *path*."""
    public, _ = zmq.auth.load_certificate(path)
    return public


def load_pair(path: Path) -> tuple[bytes, bytes]:
    """The (public, secret) Z85 keys of the secret certificate at *path*."""
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret
