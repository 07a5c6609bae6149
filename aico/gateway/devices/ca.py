"""The device CA: the gateway's own certificate authority for mutual TLS.

The CA (ECDSA P-256, self-signed, ``CA:TRUE, pathlen:0``) lives in ``STATE_DIR/ca/``. It
issues two kinds of leaf certificates:

* the gateway's server certificate (``serverAuth``), for the ``tls`` and ``sync``
  listeners;
* client certificates for paired devices (``clientAuth``), made from the device's CSR
  with the device's name as the subject common name.

A device is identified by its *device ID*: the SHA-256 of its DER certificate in
Syncthing's text form (base32, four Luhn check characters, groups of seven).

Everything here is synchronous and CPU-cheap (one ECDSA signature per certificate), so
it may run on the reactor thread; the file helpers block on disk (and private keys are
sealed with :mod:`aico.keystore`) and belong at start-up or
in the CLI.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aico.files import write_atomic
from aico.keystore import Keystore

__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "SERVER_DAYS",
    "CSRError",
    "DeviceCA",
    "DeviceIDError",
    "create_ca",
    "create_csr",
    "device_id",
    "format_device_id",
    "generate_key",
    "issue_client_cert",
    "issue_server_cert",
    "load_certificate",
    "load_private_key",
    "parse_device_id",
    "save_certificate",
    "save_private_key",
]

#: Validity of the device CA certificate (10 years).
CA_DAYS = 3650
#: Validity of the gateway's server certificate.
SERVER_DAYS = 825
#: Default validity of a device's client certificate.
CLIENT_DAYS = 3650

#: Backdating of ``not_valid_before``, so a peer whose clock lags a little accepts a new cert.
_BACKDATE = datetime.timedelta(minutes=5)
#: Longest device name accepted in a certificate (X.520 ``ub-common-name``).
_MAX_NAME = 64


class CSRError(ValueError):
    """A certificate signing request that cannot be accepted."""


class DeviceIDError(ValueError):
    """A device ID string that is malformed or whose check characters are wrong."""


# --------------------------------------------------------------------------- keys and certs


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _serial() -> int:
    # 159 bits of randomness: positive and within the 20-octet limit of RFC 5280.
    return x509.random_serial_number()


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def create_ca(
    name: str = "aico-gateway device CA", days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed device CA: ECDSA P-256, ``CA:TRUE`` with ``pathlen:0``.

    The common name gets a random suffix so that two gateways' CAs never share a subject
    (a client that trusts both can still tell their chains apart).
    """
    key = generate_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AICO"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {uuid.uuid4().hex[:8]}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = ("127.0.0.1", "::1"),
    days: int = SERVER_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new server key (P-256) and its certificate signed by the CA (``serverAuth``).

    *hostnames* become DNS SANs and *ips* IP SANs; the first hostname (or IP) is the CN.
    """
    if not hostnames and not ips:
        raise ValueError("a server certificate needs at least one hostname or IP address")
    key = generate_key()
    addresses = [ipaddress.ip_address(ip) if isinstance(ip, str) else ip for ip in ips]
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(a) for a in addresses]
    cn = hostnames[0] if hostnames else str(addresses[0])
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def create_csr(key: ec.EllipticCurvePrivateKey, device_name: str) -> x509.CertificateSigningRequest:
    """A CSR for *key* naming *device_name* (what a pairing device sends)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_name)]))
        .sign(key, hashes.SHA256())
    )


def _check_device_name(name: str) -> str:
    if not name or len(name) > _MAX_NAME:
        raise CSRError(f"device name must be 1 to {_MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise CSRError("device name must not contain control characters")
    return name


def issue_client_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    csr: x509.CertificateSigningRequest | bytes,
    device_name: str,
    days: int = CLIENT_DAYS,
) -> x509.Certificate:
    """Sign the device's *csr* (PEM bytes or a parsed CSR) as a ``clientAuth`` certificate.

    The CSR's self-signature must verify, and its key must be ECDSA P-256 or Ed25519;
    anything in the CSR's subject or extensions is ignored: the subject is exactly
    ``CN=device_name`` and the extensions are ours. Raises :class:`CSRError`.
    """
    if isinstance(csr, bytes):
        try:
            csr = x509.load_pem_x509_csr(csr)
        except ValueError as e:
            raise CSRError("not a PEM certificate signing request") from e
    try:
        valid = csr.is_signature_valid
        public = csr.public_key()
    except (ValueError, InvalidSignature) as e:
        raise CSRError("unreadable certificate signing request") from e
    if not valid:
        raise CSRError("the CSR's signature does not verify")
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise CSRError(f"unsupported curve {public.curve.name}; use P-256")
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise CSRError("unsupported key type; use ECDSA P-256 or Ed25519")
    name = _check_device_name(device_name)
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------- device IDs

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _luhn32(s: str) -> str:
    """Syncthing's check character over base32 *s*.

    Note: like Syncthing's, this is not textbook Luhn mod N (the doubling starts from
    the left); it is bug-compatible on purpose, so IDs match Syncthing's.
    """
    factor, total, n = 1, 0, 32
    for ch in s:
        addend = factor * _B32.index(ch)
        factor = 1 if factor == 2 else 2
        total += addend // n + addend % n
    return _B32[(n - total % n) % n]


def format_device_id(digest: bytes) -> str:
    """Syncthing's text form of a 32-byte digest: ``XXXXXXX-XXXXXXX-…`` (8 groups of 7)."""
    if len(digest) != 32:
        raise ValueError("a device ID is 32 bytes")
    raw = base64.b32encode(digest).decode("ascii").rstrip("=")  # 52 characters
    chunks = [raw[i : i + 13] for i in range(0, 52, 13)]
    luhned = "".join(c + _luhn32(c) for c in chunks)  # 56 characters
    return "-".join(luhned[i : i + 7] for i in range(0, 56, 7))


def parse_device_id(text: str) -> bytes:
    """The 32-byte digest of a device ID in any of Syncthing's accepted spellings.

    Case, dashes and spaces are ignored, and the usual typos (0→O, 1→I, 8→B) are fixed;
    the 56-character form must have correct check characters. Raises DeviceIDError.
    """
    s = text.strip().upper().replace("-", "").replace(" ", "")
    s = s.translate(str.maketrans("018", "OIB"))
    if len(s) == 56:
        chunks = [s[i : i + 14] for i in range(0, 56, 14)]
        for chunk in chunks:
            body, check = chunk[:13], chunk[13]
            if any(c not in _B32 for c in chunk) or _luhn32(body) != check:
                raise DeviceIDError("device ID check character mismatch")
        s = "".join(c[:13] for c in chunks)
    if len(s) != 52 or any(c not in _B32 for c in s):
        raise DeviceIDError("malformed device ID")
    return base64.b32decode(s + "====")


def device_id(cert: x509.Certificate | bytes) -> str:
    """The device ID of *cert* (a certificate, or its DER bytes): SHA-256 of the DER.

    Example: ``P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2``.
    """
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return format_device_id(hashlib.sha256(der).digest())


# --------------------------------------------------------------------------- files


def save_private_key(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    keystore: Keystore,
    *,
    role: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write *key* as PKCS#8 PEM sealed by *keystore*, mode 0600 (never overwrites unless
    asked). The role (associated data) is the file name unless given."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keystore.write_sealed(path, data, role or path.name, overwrite=overwrite)


def save_certificate(path: Path, cert: x509.Certificate, *, overwrite: bool = False) -> None:
    """Write *cert* as PEM, mode 0644 (never overwrites unless asked)."""
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite)


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate at *path*."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_private_key(
    path: Path, keystore: Keystore, *, role: str | None = None
) -> ec.EllipticCurvePrivateKey:
    """The EC private key sealed in *path* (a plain PEM file is sealed in place first).

    Raises :class:`~aico.keystore.KeystoreError` (wrong master secret, swapped file) or
    ValueError (not an EC key), each naming the file.
    """
    data = keystore.read_sealed(path, role or path.name)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} does not hold a PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return key


# --------------------------------------------------------------------------- DeviceCA


@dataclass(frozen=True)
class DeviceCA:
    """The CA certificate and key together, as pairing uses them."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "aico-gateway device CA", days: int = CA_DAYS) -> DeviceCA:
        cert, key = create_ca(name, days)
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, keystore: Keystore) -> DeviceCA:
        """Read the CA from its files (the key sealed by *keystore*); the key must match
        the certificate."""
        cert, key = load_certificate(cert_path), load_private_key(key_path, keystore)
        if cert.public_key() != key.public_key():
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path, keystore: Keystore) -> None:
        """Write the key (sealed, 0600) then the certificate; refuses to overwrite either."""
        save_private_key(key_path, self.key, keystore)
        save_certificate(cert_path, self.cert)

    def issue_server_cert(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = ("127.0.0.1", "::1"),
        days: int = SERVER_DAYS,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return issue_server_cert(self.cert, self.key, hostnames, ips, days)

    def issue_client_cert(
        self,
        csr: x509.CertificateSigningRequest | bytes,
        device_name: str,
        days: int = CLIENT_DAYS,
    ) -> x509.Certificate:
        return issue_client_cert(self.cert, self.key, csr, device_name, days)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether *cert* was signed by this CA (signature and issuer name)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    @property
    def fingerprint(self) -> str:
        """The CA certificate's device-ID form (what a paired device pins)."""
        return device_id(self.cert)
