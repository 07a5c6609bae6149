"""Mutual TLS for the detached client: our CA only, a pinned server certificate, the name.

A device that paired with a gateway holds a *certificate directory* (written by
``aico-client pair``, SPEC §7):

* ``device.pem`` — the device's client certificate, issued by the gateway's device CA;
* ``device.key`` — its private key (read through :func:`load_device_key` only);
* ``ca.pem`` — the gateway's device CA certificate;
* ``gateway.json`` — ``{fingerprint, host, port, tls_port, name, device_id}``: the
  gateway's server-certificate fingerprint (device-ID text form of the SHA-256 of its
  DER, as :func:`aico.gateway.devices.ca.device_id` writes it), where it was found,
  its name and our own device ID.

Every connection made with :class:`PinnedClientTLS` (HTTPS through treq with
:class:`PinnedPolicy`, WSS through Autobahn) is TLS 1.3 only, presents the device
certificate, and accepts the server only if all of these hold:

1. its chain ends at ``ca.pem`` — the platform's trust store is never consulted;
2. its certificate names the host we dialled (``service-identity``: a DNS name or an IP
   address in the subject alternative names);
3. its certificate is exactly the one pinned at pairing (``gateway.json``'s
   ``fingerprint``): a different certificate is refused even when our CA signed it.

A refusal fails the handshake; the reason (:class:`ServerIdentityError`) is what the
connection reports as lost, and is also kept in :attr:`PinnedClientTLS.last_error`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from OpenSSL.crypto import X509
from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER, Connection
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from aico.gateway.devices.ca import DeviceIDError, device_id, parse_device_id
from aico.keystore import Keystore, client_keystore

__all__ = [
    "CATrust",
    "PairedGateway",
    "PinnedClientTLS",
    "PinnedPolicy",
    "ServerIdentityError",
    "load_device_key",
]

DevicePrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class ServerIdentityError(Exception):
    """The gateway's certificate is not the one we paired with, or not for this host."""


class CertDirError(ValueError):
    """A certificate directory that is missing a file or holds something unusable."""


@functools.lru_cache(maxsize=16)
def _keystore(cert_dir: Path) -> Keystore:
    """A certificate directory's keystore, its key derived (Argon2id) once per process."""
    return client_keystore(cert_dir)


def load_device_key(cert_dir: str | Path) -> DevicePrivateKey:
    """The device's private key from ``cert_dir/device.key``.

    The one place the key is read. It is sealed at rest (:func:`aico.keystore.client_keystore`:
    the master secret from the keyring, ``$AICO_MASTER_PASSWORD`` or ``cert_dir/master-key``);
    a plain PEM from before is sealed in place on first read. EC P-256 or Ed25519.
    """
    path = Path(cert_dir).expanduser() / "device.key"
    try:
        pem = _keystore(path.parent.absolute()).read_sealed(path, "device.key")
        key = serialization.load_pem_private_key(pem, password=None)
    except (OSError, ValueError, TypeError) as e:
        raise CertDirError(f"cannot read the device key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise CertDirError(f"{path} is not an EC or Ed25519 private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CertDirError(f"cannot read the certificate {path}: {e}") from e


@dataclass(frozen=True)
class PairedGateway:
    """What a certificate directory says about the gateway we paired with, and who we are."""

    cert_dir: Path
    device_cert: x509.Certificate
    device_key: DevicePrivateKey
    ca_cert: x509.Certificate
    #: SHA-256 of the gateway's server certificate (DER), from ``gateway.json``.
    fingerprint: bytes
    host: str = ""
    port: int = 0
    tls_port: int = 0
    name: str = ""
    device_id: str = ""

    @classmethod
    def load(cls, cert_dir: str | Path) -> PairedGateway:
        root = Path(cert_dir).expanduser()
        try:
            info = json.loads((root / "gateway.json").read_text())
        except (OSError, ValueError) as e:
            raise CertDirError(f"cannot read {root / 'gateway.json'}: {e}") from e
        if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), str):
            raise CertDirError(f"{root / 'gateway.json'} has no fingerprint")
        try:
            fingerprint = parse_device_id(info["fingerprint"])
        except DeviceIDError as e:
            raise CertDirError(f"{root / 'gateway.json'}: bad fingerprint: {e}") from e
        device_cert = _load_cert(root / "device.pem")
        key = load_device_key(root)
        if device_cert.public_key() != key.public_key():
            raise CertDirError(f"{root / 'device.key'} is not the key of {root / 'device.pem'}")
        return cls(
            cert_dir=root,
            device_cert=device_cert,
            device_key=key,
            ca_cert=_load_cert(root / "ca.pem"),
            fingerprint=fingerprint,
            host=str(info.get("host") or ""),
            port=int(info.get("port") or 0),
            tls_port=int(info.get("tls_port") or 0),
            name=str(info.get("name") or ""),
            device_id=str(info.get("device_id") or device_id(device_cert)),
        )

    @property
    def url(self) -> str:
        """``https://host:tls_port`` from ``gateway.json`` (empty when it names none)."""
        if not self.host or not self.tls_port:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.tls_port}"

    def options(self) -> CertificateOptions:
        """TLS 1.3 only, our device certificate, trusting ``ca.pem`` alone."""
        return CertificateOptions(
            # cryptography objects: pyOpenSSL takes them without deprecation warnings.
            privateKey=cast(Any, self.device_key),
            certificate=cast(Any, self.device_cert),
            trustRoot=CATrust(self.ca_cert),
            raiseMinimumTo=TLSVersion.TLSv1_3,
        )

    def creator(self, hostname: str) -> PinnedClientTLS:
        return PinnedClientTLS(self.options(), hostname, self.fingerprint)


@implementer(IOpenSSLTrustRoot)
class CATrust:
    """A trust root of exactly one CA certificate (a ``cryptography`` object)."""

    def __init__(self, *certs: x509.Certificate) -> None:
        self.certs = certs

    def _addCACertsToContext(self, context: Any) -> None:
        store = context.get_cert_store()
        for cert in self.certs:
            store.add_cert(X509.from_cryptography(cert))


def check_server_certificate(cert: x509.Certificate, hostname: str, fingerprint: bytes) -> None:
    """Raise :class:`ServerIdentityError` unless *cert* names *hostname* and is the pinned one."""
    try:
        address = ip_address(hostname.strip("[]"))
    except ValueError:
        address = None
    try:
        if address is not None:
            verify_certificate_ip_address(cert, str(address))
        else:
            verify_certificate_hostname(cert, hostname)
    except (VerificationError, CertificateError) as e:
        raise ServerIdentityError(f"the gateway's certificate is not valid for {hostname}: {e}") from e
    der = cert.public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).digest() != fingerprint:
        raise ServerIdentityError(
            f"the gateway's certificate {device_id(der)} is not the one pinned at pairing "
            "(gateway.json); pair again if the gateway's certificate was renewed")


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientTLS:
    """Client connections with our certificate options, a name check and the pin."""

    def __init__(self, options: CertificateOptions, hostname: str, fingerprint: bytes) -> None:
        self.options = options
        self.hostname = hostname.strip("[]")
        self.fingerprint = fingerprint
        self.last_error: ServerIdentityError | None = None
        try:
            ip_address(self.hostname)
            self._sni: bytes | None = None  # no SNI for IP literals (RFC 6066)
        except ValueError:
            self._sni = self.hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        connection: Connection = self.options.clientConnectionForTLS(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        protocol: list[Any] = [tlsProtocol]  # dropped after use: no reference cycle

        def verify(conn: Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
            if not ok or depth != 0:
                return bool(ok)  # OpenSSL's chain check against ca.pem decides
            try:
                check_server_certificate(cert.to_cryptography(), self.hostname, self.fingerprint)
            except ServerIdentityError as e:
                self.last_error = e
                if protocol:
                    protocol.pop().failVerification(Failure(e))
                return False
            return True

        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


@implementer(IPolicyForHTTPS)
class PinnedPolicy:
    """treq/Agent policy: every HTTPS connection is a :class:`PinnedClientTLS`."""

    def __init__(self, paired: PairedGateway) -> None:
        self.paired = paired
        self.last: PinnedClientTLS | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> PinnedClientTLS:
        self.last = self.paired.creator(hostname.decode("idna"))
        return self.last
