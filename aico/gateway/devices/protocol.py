"""The pairing wire protocol, shared by the gateway and the device (``docs/devices.md``).

Frames are length-prefixed (a 4-byte big-endian length, then that many bytes; at most
:data:`MAX_FRAME`), each one JSON object with a ``type``:

1. device → gateway ``hello {version, pake}``: SPAKE2 side A's message (base64);
2. gateway → device ``pake {version, pake}``: side B's message;
3. device → gateway ``confirm {mac}``: HMAC-SHA256 over the transcript, device key;
4. gateway → device ``confirm {mac}``: the same with the gateway's key;
5. device → gateway ``sealed {nonce, box}``: AES-256-GCM of ``{name, csr_pem}``;
6. gateway → device ``sealed {nonce, box}``: AES-256-GCM of the certificate answer.

Either side may instead send ``error {reason}`` (plain text, never a secret) and close.
Every key comes from the SPAKE2 key through HKDF-SHA256 salted with the transcript hash
(see :func:`derive`); the password is the pairing code, normalised.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B

__all__ = [
    "JOIN_VERSION",
    "MAX_FRAME",
    "VERSION",
    "VERSIONS",
    "Machine",
    "PairingProtocolError",
    "SessionKeys",
    "UnexpectedInput",
    "aad",
    "b64d",
    "b64e",
    "decode",
    "derive",
    "device_finish",
    "device_pake",
    "encode",
    "error_frame",
    "gateway_pake",
    "mac",
    "mac_ok",
    "open_box",
    "seal",
]

#: The protocol version a hello carries; a gateway refuses others with ``unsupported_version``.
#: A device pairs with version 1; ``aico-gateway sync join`` with :data:`JOIN_VERSION`.
VERSION = 1
#: Version 2 adds a gateway joining another for sync (``docs/sync-protocol.md``): its
#: request carries ``kind = "sync"`` and its CA, the answer the other gateway's CSR, and
#: a third sealed pair (``final`` / ``done``) returns the certificate issued for it.
JOIN_VERSION = 2
#: The versions a gateway accepts.
VERSIONS = (VERSION, JOIN_VERSION)
#: The largest frame either side accepts (a CSR or a certificate answer is ~2 KiB).
MAX_FRAME = 16 * 1024
#: SPAKE2 identities of the two sides (bound into the SPAKE2 key).
ID_DEVICE = b"aico-pairing-device"
ID_GATEWAY = b"aico-pairing-gateway"
#: Associated data of the two sealed messages (a box cannot be replayed the other way).
AAD_REQUEST = b"aico-pairing v1 request"
AAD_ANSWER = b"aico-pairing v1 answer"


def aad(version: int, what: str) -> bytes:
    """The associated data of sealed message *what* (``request``, ``answer``, ``final``,
    ``done``) under protocol *version* (version 1: :data:`AAD_REQUEST`/:data:`AAD_ANSWER`)."""
    return f"aico-pairing v{version} {what}".encode("ascii")


class PairingProtocolError(Exception):
    """A frame or a message that breaks the protocol; *reason* is the ``error`` reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any) -> bytes:
    if not isinstance(text, str):
        raise PairingProtocolError("bad_message", "expected base64 text")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise PairingProtocolError("bad_message", "not base64") from e


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode(frame: bytes) -> dict[str, Any]:
    """The JSON object of *frame*, which must have a string ``type``."""
    try:
        message = json.loads(frame.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PairingProtocolError("bad_message", "not a JSON frame") from e
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise PairingProtocolError("bad_message", "a frame is an object with a type")
    return message


def error_frame(reason: str) -> dict[str, Any]:
    return {"type": "error", "reason": reason}


# --------------------------------------------------------------------------- SPAKE2


def _password(code: str) -> bytes:
    from aico.gateway.devices.registry import normalise_code

    return normalise_code(code).encode("ascii")


def device_pake(code: str) -> tuple[SPAKE2_A, bytes]:
    """Side A (the device) with *code*: the SPAKE2 object and its message (~15 ms CPU)."""
    side = SPAKE2_A(_password(code), idA=ID_DEVICE, idB=ID_GATEWAY)
    return side, side.start()


def gateway_pake(code: str, message_a: bytes) -> tuple[bytes, bytes]:
    """Side B (the gateway): its message and the SPAKE2 key for *message_a* (~30 ms CPU).

    Raises :class:`PairingProtocolError` (``bad_pake``) for a message that is no SPAKE2
    side-A message.
    """
    side = SPAKE2_B(_password(code), idA=ID_DEVICE, idB=ID_GATEWAY)
    message_b = side.start()
    try:
        key = side.finish(message_a)
    except Exception as e:  # spake2 raises ValueError and its own errors for bad elements
        raise PairingProtocolError("bad_pake", type(e).__name__) from e
    return message_b, key


def device_finish(side: SPAKE2_A, message_b: bytes) -> bytes:
    """The SPAKE2 key of side A for the gateway's *message_b* (~15 ms CPU)."""
    try:
        key: bytes = side.finish(message_b)
    except Exception as e:
        raise PairingProtocolError("bad_pake", type(e).__name__) from e
    return key


# --------------------------------------------------------------------------- key schedule


@dataclass(frozen=True)
class SessionKeys:
    """What both sides derive from the SPAKE2 key and the transcript."""

    transcript: bytes
    device_confirm: bytes
    gateway_confirm: bytes
    device_seal: bytes
    gateway_seal: bytes

    def __repr__(self) -> str:  # never print a key
        return "SessionKeys(…)"


def derive(key: bytes, message_a: bytes, message_b: bytes, version: int = VERSION) -> SessionKeys:
    """Four 32-byte keys from the SPAKE2 *key*, salted with the transcript hash; the
    labels name the protocol *version*, so two versions never agree on a key."""
    label = f"aico-pairing v{version}".encode("ascii")
    transcript = hashlib.sha256(
        label + struct.pack(">I", len(message_a)) + message_a
        + struct.pack(">I", len(message_b)) + message_b).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=transcript,
               info=label + b" keys").derive(key)
    return SessionKeys(transcript, okm[0:32], okm[32:64], okm[64:96], okm[96:128])


def mac(key: bytes, transcript: bytes) -> bytes:
    """The key-confirmation MAC: HMAC-SHA256(*key*, transcript)."""
    return hmac.new(key, transcript, hashlib.sha256).digest()


def mac_ok(key: bytes, transcript: bytes, value: bytes) -> bool:
    return hmac.compare_digest(mac(key, transcript), value)


def seal(key: bytes, body: dict[str, Any], aad: bytes) -> dict[str, Any]:
    """A ``sealed`` frame: *body* as JSON under AES-256-GCM with a random nonce."""
    nonce = os.urandom(12)
    box = AESGCM(key).encrypt(nonce, encode(body), aad)
    return {"type": "sealed", "nonce": b64e(nonce), "box": b64e(box)}


def open_box(key: bytes, message: dict[str, Any], aad: bytes) -> dict[str, Any]:
    """The JSON object inside a ``sealed`` frame; ``undecryptable`` when it does not open."""
    nonce, box = b64d(message.get("nonce")), b64d(message.get("box"))
    if len(nonce) != 12:
        raise PairingProtocolError("bad_message", "a nonce is 12 bytes")
    try:
        plain = AESGCM(key).decrypt(nonce, box, aad)
    except InvalidTag as e:
        raise PairingProtocolError("undecryptable") from e
    body = json.loads(plain.decode("utf-8"))
    if not isinstance(body, dict):
        raise PairingProtocolError("bad_message", "a sealed body is an object")
    return body


# --------------------------------------------------------------------------- state machines


class UnexpectedInput(Exception):
    """An input the machine has no transition for in its current state."""

    def __init__(self, machine: str, state: Enum, event: Enum) -> None:
        super().__init__(f"{machine}: no transition for {event.name} in {state.name}")
        self.state = state
        self.event = event


S = TypeVar("S", bound=Enum)
I = TypeVar("I", bound=Enum)  # noqa: E741


class Machine(Generic[S, I]):
    """An explicit state machine: a table ``(state, input) → (next state, output)``.

    :meth:`feed` looks the pair up, moves to the next state, then runs the output (a
    callable taking the input's arguments, or ``None``). A pair missing from the table
    raises :class:`UnexpectedInput` and leaves the state as it was. *trace* records every
    transition ``(state, input, next)`` (tests read it).
    """

    def __init__(self, name: str, initial: S,
                 table: Mapping[tuple[S, I], tuple[S, Callable[..., object] | None]]) -> None:
        self.name = name
        self.state = initial
        self.table = dict(table)
        self.trace: list[tuple[S, I, S]] = []

    def accepts(self, event: I) -> bool:
        return (self.state, event) in self.table

    def feed(self, event: I, *args: Any) -> None:
        entry = self.table.get((self.state, event))
        if entry is None:
            raise UnexpectedInput(self.name, self.state, event)
        new, output = entry
        self.trace.append((self.state, event, new))
        self.state = new
        if output is not None:
            output(*args)
