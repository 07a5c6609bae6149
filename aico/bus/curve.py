"""Where the CurveZMQ certificates live in the state directory, and how they are made.

Layout under ``STATE_DIR/curve/``:

* ``broker.key`` / ``broker.key_secret`` — the embedded broker's server key pair;
* ``gateway.key`` / ``gateway.key_secret`` — the IPC listener's server key pair;
* ``modules/NAME.key`` — public keys of the bus clients the broker admits (its ZAP
  handler reads this directory at every handshake);
* ``private/NAME.key_secret`` — key pairs of the local bus clients (the gateway's own
  client ``gateway`` and the built-in modules), 0600.

Public files (``*.key``) are pyzmq/CZMQ certificates, which ``zmq.auth.load_certificate``
reads. Secret files (``*.key_secret``) hold the same certificate text, sealed with
:mod:`aico.keystore` (role ``curve:DIR/NAME.key_secret``, DIR being ``curve`` or
``private``); :func:`load_pair` opens them and parses the Z85 keys itself. A plain secret
certificate from before keys were sealed is sealed in place when first read.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from aico.files import write_atomic
from aico.keystore import Keystore


@dataclass(frozen=True)
class CurveLayout:
    """Paths of the Curve certificates under one state directory."""

    state_dir: Path
    #: Seals and opens the secret files; None where only public keys are read.
    keystore: Keystore | None = field(default=None, compare=False, repr=False)

    @property
    def sealer(self) -> Keystore:
        """The keystore; ValueError if this layout has none."""
        return _require(self.keystore)

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


def _certificate(public: bytes, secret: bytes | None) -> bytes:
    """A pyzmq-style certificate: public only, or public and secret."""
    kind = "Secret" if secret is not None else "Public"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} "
        "by aico  ****",
        f"#   ZeroMQ CURVE **{kind}** Certificate",
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions."
        if secret is not None else "#   Exchange securely, or use a secure mechanism to verify "
        "the contents of this file after exchange.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def secret_role(path: Path) -> str:
    """The keystore role of the secret file at *path*: ``curve:DIR/NAME.key_secret``."""
    return f"curve:{path.parent.name}/{path.name}"


def _require(keystore: Keystore | None) -> Keystore:
    if keystore is None:
        raise ValueError("Curve secret keys are sealed: a keystore is needed to read or write them")
    return keystore


def create_keypair(directory: Path, name: str, keystore: Keystore) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (sealed, 0600) in *directory*."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    keystore.write_sealed(secret_file, _certificate(public, secret), secret_role(secret_file))
    write_atomic(public_file, _certificate(public, None), 0o644)
    return public_file, secret_file


def ensure_client(layout: CurveLayout, name: str) -> bool:
    """Create the key pair of local bus client *name* unless it exists; True if created.

    The secret goes to ``private/`` (sealed), the public key to ``modules/`` (so the broker
    admits it).
    """
    secret = layout.client_secret(name)
    if secret.exists():
        return False
    public, _ = create_keypair(layout.private_dir, name, _require(layout.keystore))
    layout.modules_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = layout.client_public(name)
    write_atomic(target, public.read_bytes(), 0o644)
    public.unlink()
    return True


def load_public(path: Path) -> bytes:
    """The Z85 public key of the (public) certificate at *path*."""
    public, _ = zmq.auth.load_certificate(path)
    return public


_KEY_LINE = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]{40})"\s*$', re.MULTILINE)


def parse_pair(text: bytes, name: str) -> tuple[bytes, bytes]:
    """The (public, secret) Z85 keys of certificate *text*; ValueError naming *name*."""
    keys = {m.group(1): m.group(2) for m in _KEY_LINE.finditer(text)}
    if b"public" not in keys or b"secret" not in keys:
        raise ValueError(f"{name} holds no Curve key pair")
    public, secret = keys[b"public"], keys[b"secret"]
    try:
        derived = zmq.curve_public(secret)
    except (ValueError, zmq.ZMQError) as e:
        raise ValueError(f"{name}: malformed Curve secret key") from e
    if derived != public:
        raise ValueError(f"{name}: the public key does not belong to the secret key")
    return public, secret


def load_pair(path: Path, keystore: Keystore | None) -> tuple[bytes, bytes]:
    """The (public, secret) Z85 keys of the sealed secret certificate at *path*."""
    text = _require(keystore).read_sealed(path, secret_role(path))
    return parse_pair(text, str(path))


def migrate_secrets(layout: CurveLayout) -> list[Path]:
    """Seal every plain secret certificate of *layout* in place; the files sealed."""
    keystore = _require(layout.keystore)
    done: list[Path] = []
    for directory in (layout.root, layout.private_dir):
        if directory.is_dir():
            for path in sorted(directory.glob("*.key_secret")):
                if keystore.migrate(path, secret_role(path)):
                    done.append(path)
    return done
