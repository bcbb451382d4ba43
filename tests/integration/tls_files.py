"""A throwaway CA and a certificate it signed for 127.0.0.1 and localhost, made by the test
(cryptography) for a TLS redis-server and redis-sentinel on loopback, plus a second CA that
signed nothing (a client trusting it must refuse the server)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etl_tasks.local_services import TlsFiles


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(directory: Path, common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / f"{common}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_tls_files(directory: Path) -> TlsFiles:
    """CA `test-ca.crt`, and `redis.crt`/`redis.key` for 127.0.0.1 (serverAuth and
    clientAuth: a replica and a sentinel show it when they connect to another server)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(directory, "test-ca")
    _ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("redis.test"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (directory / "redis.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / "redis.key")
    return TlsFiles(ca=directory / "test-ca.crt", cert=directory / "redis.crt",
                    key=directory / "redis.key")


def other_ca(files: TlsFiles) -> Path:
    """A CA that did not sign the server's certificate."""
    return files.ca.parent / "other-ca.crt"
