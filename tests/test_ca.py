"""The device CA: certificates it issues, CSR checks, and device IDs."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from aico.gateway.devices import ca as ca_mod
from aico.gateway.devices.ca import (
    CSRError,
    DeviceCA,
    DeviceIDError,
    create_csr,
    device_id,
    format_device_id,
    generate_key,
    parse_device_id,
)
from aico.keystore import Keystore, KeystoreError

# Syncthing's own test vector (lib/protocol/deviceid_test.go).
SYNCTHING_RAW = "P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICQ"
SYNCTHING_FORMATTED = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"


class _CA:
    ca = DeviceCA.create()


def _tampered_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR whose signature no longer matches its content (one subject byte changed)."""
    der = bytearray(create_csr(key, "phone-a").public_bytes(serialization.Encoding.DER))
    i = der.index(b"phone-a")
    der[i] = ord("q")
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


class CATests(SynchronousTestCase):
    def test_ca_is_self_signed_p256_with_pathlen_zero_for_ten_years(self) -> None:
        cert = _CA.ca.cert
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(_CA.ca.key.curve.name, "secp256r1")
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        self.assertEqual(bc.value.path_length, 0)
        cert.verify_directly_issued_by(cert)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreaterEqual(lifetime.days, 3650)

    def test_client_cert_from_csr_names_the_device_and_chains_to_ca(self) -> None:
        key = generate_key()
        csr_pem = create_csr(key, "ignored-by-ca").public_bytes(serialization.Encoding.PEM)
        cert = _CA.ca.issue_client_cert(csr_pem, "Kitchen tablet", days=30)
        cert.verify_directly_issued_by(_CA.ca.cert)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        self.assertEqual([a.value for a in cn], ["Kitchen tablet"])
        self.assertEqual(cert.public_key(), key.public_key())
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertTrue(_CA.ca.issued(cert))

    def test_client_cert_accepts_an_ed25519_csr(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, None)
        )
        cert = _CA.ca.issue_client_cert(csr, "laptop")
        self.assertEqual(cert.public_key(), key.public_key())

    def test_csr_with_bad_signature_is_refused(self) -> None:
        bad = _tampered_csr(generate_key())
        with self.assertRaises(CSRError) as cm:
            _CA.ca.issue_client_cert(bad, "phone")
        self.assertIn("signature", str(cm.exception))

    def test_garbage_csr_is_refused(self) -> None:
        self.assertRaises(CSRError, _CA.ca.issue_client_cert, b"not a csr", "phone")

    def test_csr_with_other_curve_is_refused(self) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256())
        )
        self.assertRaises(CSRError, _CA.ca.issue_client_cert, csr, "phone")

    def test_device_name_with_control_characters_is_refused(self) -> None:
        csr = create_csr(generate_key(), "x")
        self.assertRaises(CSRError, _CA.ca.issue_client_cert, csr, "evil\nname")
        self.assertRaises(CSRError, _CA.ca.issue_client_cert, csr, "")
        self.assertRaises(CSRError, _CA.ca.issue_client_cert, csr, "x" * 65)

    def test_server_cert_has_localhost_sans_and_server_auth(self) -> None:
        cert, key = _CA.ca.issue_server_cert(("localhost",), ("127.0.0.1", "::1"))
        cert.verify_directly_issued_by(_CA.ca.cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            [str(a) for a in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1", "::1"]
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(cert.public_key(), key.public_key())

    def test_cert_from_another_ca_is_not_issued_by_this_one(self) -> None:
        other = DeviceCA.create()
        cert = other.issue_client_cert(create_csr(generate_key(), "x"), "x")
        self.assertFalse(_CA.ca.issued(cert))


class DeviceIDTests(SynchronousTestCase):
    def test_format_matches_syncthing_vector(self) -> None:
        digest = base64.b32decode(SYNCTHING_RAW + "====")
        self.assertEqual(format_device_id(digest), SYNCTHING_FORMATTED)

    def test_parse_accepts_syncthing_spellings(self) -> None:
        digest = base64.b32decode(SYNCTHING_RAW + "====")
        for text in (
            SYNCTHING_FORMATTED,
            SYNCTHING_FORMATTED.lower(),
            SYNCTHING_RAW,
            "P561017MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMT88Z4TJXZWICQ2",  # typo-fixed
        ):
            self.assertEqual(parse_device_id(text), digest, text)

    def test_parse_refuses_wrong_check_character(self) -> None:
        wrong = SYNCTHING_FORMATTED[:-1] + "3"
        self.assertRaises(DeviceIDError, parse_device_id, wrong)
        self.assertRaises(DeviceIDError, parse_device_id, "a")

    def test_device_id_is_sha256_of_der_and_stable(self) -> None:
        cert = _CA.ca.cert
        der = cert.public_bytes(serialization.Encoding.DER)
        first = device_id(cert)
        self.assertEqual(first, device_id(der))
        self.assertEqual(first, device_id(x509.load_der_x509_certificate(der)))
        self.assertRegex(first, r"^([A-Z2-7]{7}-){7}[A-Z2-7]{7}$")
        h = hashes.Hash(hashes.SHA256())
        h.update(der)
        self.assertEqual(parse_device_id(first), h.finalize())
        self.assertNotEqual(first, device_id(DeviceCA.create().cert))


class FileTests(SynchronousTestCase):
    def test_private_key_written_sealed_0600_and_never_overwritten(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        keystore = Keystore.ephemeral()
        ca = DeviceCA.create()
        ca.save(d / "ca.pem", d / "ca.key", keystore)
        self.assertEqual(stat.S_IMODE((d / "ca.key").stat().st_mode), 0o600)
        before = (d / "ca.key").read_bytes()
        self.assertTrue(before.startswith(b"-----BEGIN AICO ENCRYPTED KEY-----"))
        self.assertRaises(ValueError, serialization.load_pem_private_key, before, None)
        self.assertRaises(FileExistsError, DeviceCA.create().save, d / "ca.pem", d / "ca.key",
                          keystore)
        self.assertEqual((d / "ca.key").read_bytes(), before)
        loaded = DeviceCA.load(d / "ca.pem", d / "ca.key", keystore)
        self.assertEqual(loaded.cert, ca.cert)
        self.assertEqual([p.name for p in sorted(d.iterdir())], ["ca.key", "ca.pem"])

    def test_load_refuses_mismatched_key(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        keystore = Keystore.ephemeral()
        ca_mod.save_certificate(d / "ca.pem", DeviceCA.create().cert)
        ca_mod.save_private_key(d / "ca.key", generate_key(), keystore)
        self.assertRaises(ValueError, DeviceCA.load, d / "ca.pem", d / "ca.key", keystore)

    def test_key_of_another_role_or_master_secret_is_refused_naming_the_file(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        keystore = Keystore.ephemeral()
        ca = DeviceCA.create()
        ca.save(d / "ca.pem", d / "ca.key", keystore)
        (d / "server.key").write_bytes((d / "ca.key").read_bytes())
        with self.assertRaises(KeystoreError) as swapped:
            ca_mod.load_private_key(d / "server.key", keystore)
        self.assertIn(str(d / "server.key"), str(swapped.exception))
        self.assertIn("swapped", str(swapped.exception))
        with self.assertRaises(KeystoreError) as wrong:
            DeviceCA.load(d / "ca.pem", d / "ca.key", Keystore.ephemeral())
        self.assertIn(str(d / "ca.key"), str(wrong.exception))
        self.assertIn("wrong master secret", str(wrong.exception))

    def test_a_plain_pem_key_is_sealed_in_place_when_loaded(self) -> None:
        d = Path(self.mktemp())
        d.mkdir()
        key = generate_key()
        plain = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        (d / "server.key").write_bytes(plain)
        keystore = Keystore.ephemeral()
        loaded = ca_mod.load_private_key(d / "server.key", keystore)
        self.assertEqual(loaded.private_numbers(), key.private_numbers())
        self.assertTrue((d / "server.key").read_bytes().startswith(b"-----BEGIN AICO ENCRYPTED"))
        self.assertEqual(ca_mod.load_private_key(d / "server.key", keystore).private_numbers(),
                         key.private_numbers())
