"""Throwaway certificates for `shardstate dev --tls` (and tests): a CA, one certificate per node
(subject CN = the cluster's node name, SANs localhost, 127.0.0.1, ::1) and a client certificate.

Layout under DIR (DATA/tls): ca.pem, ca-key.pem, <node>.pem + <node>-key.pem, client.pem +
client-key.pem. Keys are written owner-readable only (0600). Made with `cryptography`, which
the `[server]` extra installs; the client library never imports this module.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardstate.common.tls import DEFAULT_NODE_NAME, TlsFiles

CA_NAME = "shardstate dev CA"
CLIENT_NAME = "shardstate-client"
HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


@dataclass
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


def _x509() -> Any:
    from cryptography import x509

    return x509


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> Any:
    x509 = _x509()
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardstate dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: Any, issuer: Any, public_key: Any) -> Any:
    x509 = _x509()
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def make_ca(common_name: str = CA_NAME) -> Issued:
    """A self-signed CA certificate that may sign leaf certificates only."""
    from cryptography.hazmat.primitives import hashes

    x509 = _x509()
    key = _new_key()
    name = _name(common_name)
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(_pem_cert(cert), _pem_key(key))


def issue(ca: Issued, common_name: str, hosts: Sequence[str] = HOSTS) -> Issued:
    """A leaf certificate signed by `ca` for TLS servers and clients alike (a node is both),
    naming `hosts` (DNS names and IP addresses) as its subject alternative names."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    x509 = _x509()
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = _new_key()
    sans: list[Any] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    b = (_builder(_name(common_name), ca_cert.subject, key.public_key())
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
                        critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(_pem_cert(b.sign(ca_key, hashes.SHA256())), _pem_key(key))  # type: ignore[arg-type]


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by its owner only, created so from the start (never
    world-readable for a moment), replacing any file there atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Key first, then certificate: a server reloading meanwhile sees the pair change together
    once the certificate (whose change it watches with the key's) is in place."""
    write_private(key_path, issued.key)
    write_public(cert_path, issued.cert)


class DevCerts:
    """The certificates of one dev cluster under `root` (DATA/tls), made on first use and kept
    across restarts, so a client given ca.pem keeps working."""

    def __init__(self, root: Path, node_name: str = DEFAULT_NODE_NAME) -> None:
        self.root = root
        self.node_name = node_name
        self.ca_path = root / "ca.pem"
        self.ca_key_path = root / "ca-key.pem"
        self._made_ca = False  # this run made a new CA: certificates of an older one are reissued
        self._issued: set[str] = set()

    def ca(self) -> Issued:
        if self.ca_path.exists() and self.ca_key_path.exists():
            return Issued(self.ca_path.read_bytes(), self.ca_key_path.read_bytes())
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        ca = make_ca()
        save(ca, self.ca_path, self.ca_key_path)
        self._made_ca = True
        return ca

    def files(self, stem: str) -> TlsFiles:
        """Where the certificate `stem` lives (made or not)."""
        return TlsFiles(ca=str(self.ca_path), cert=str(self.root / f"{stem}.pem"),
                        key=str(self.root / f"{stem}-key.pem"))

    def _leaf(self, stem: str, common_name: str) -> TlsFiles:
        files = self.files(stem)
        ca = self.ca()
        stale = self._made_ca and stem not in self._issued
        if stale or not (Path(files.cert).exists() and Path(files.key).exists()):
            save(issue(ca, common_name), Path(files.cert), Path(files.key))
            self._issued.add(stem)
        return files

    def node(self, name: str) -> TlsFiles:
        """The files of node `name` (s1, s1-r1, router): CN is the cluster's node name."""
        return self._leaf(name, self.node_name)

    def client(self) -> TlsFiles:
        """A client certificate of the same CA (CN shardstate-client): enough for direct mode,
        not for node-to-node calls."""
        return self._leaf("client", CLIENT_NAME)
