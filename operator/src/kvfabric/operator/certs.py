"""Certificates the operator makes: the admission webhook's serving certificate (self-signed and
rotated, or files from cert-manager's secret reloaded when they change), and each sharing pool's
agent certificates for mutual TLS between its agents."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def self_signed(hosts: list[str], days: float = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) valid for ``hosts`` (DNS names or IP addresses).

    The certificate is its own CA: the webhook configuration's ``caBundle`` is the certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def pool_certificates(pool: str, days: float = 3650) -> tuple[bytes, bytes, bytes]:
    """(certificate, key, CA certificate) PEMs for the agents of ``pool``: a CA of the pool's own
    signs one client-and-server certificate every agent presents. Peers are named by address, so
    the CA, not a host name, is what a peer checks; another pool's CA never signed it. The CA's
    key is dropped here: nothing else is ever signed with it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvfabric pool CA {pool}")])
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvfabric agent {pool}")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(pem), key_pem, ca.public_bytes(pem)


def not_after(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


class ServingCert:
    """The webhook's certificate and key as files for uvicorn, kept current while it serves.

    Self-signed (``cert_dir`` empty): issued for ``days``; :meth:`rotate_if_due` issues the next one
    when a third of the lifetime is left. The CA bundle to publish holds the new and the previous
    certificate, so the apiserver trusts both while the switch happens. With ``cert_dir``
    (cert-manager) the files change under it. :meth:`reload` loads changed files. Either way the running
    server's SSL context is reloaded in place, so new connections get the new certificate."""

    def __init__(self, hosts: list[str], days: float = 90.0, cert_dir: str = "") -> None:
        self.hosts, self.days, self.cert_dir = hosts, days, cert_dir
        self._tmp = "" if cert_dir else tempfile.mkdtemp(prefix="kvfabric-webhook-")
        self.context: ssl.SSLContext | None = None
        self._previous = b""
        self._stamp: tuple[int, int] = (0, 0)
        if not cert_dir:
            self._issue()
        self._stamp = self._mtimes()

    @property
    def certfile(self) -> Path:
        return Path(self.cert_dir or self._tmp) / "tls.crt"

    @property
    def keyfile(self) -> Path:
        return Path(self.cert_dir or self._tmp) / "tls.key"

    def ca_bundle(self) -> bytes | None:
        """What the webhook configuration's caBundle must hold (None: someone else's CA)."""
        if self.cert_dir:
            return None
        return self.certfile.read_bytes() + self._previous

    def _issue(self) -> None:
        cert, key = self_signed(self.hosts, self.days)
        if self.certfile.exists():
            self._previous = self.certfile.read_bytes()
        for path, data in ((self.keyfile, key), (self.certfile, cert)):
            part = path.with_suffix(".new")
            part.write_bytes(data)
            os.chmod(part, 0o600)
            part.replace(path)

    def _mtimes(self) -> tuple[int, int]:
        try:
            return (self.certfile.stat().st_mtime_ns, self.keyfile.stat().st_mtime_ns)
        except FileNotFoundError:
            return (0, 0)

    def due(self, now: datetime.datetime | None = None) -> bool:
        """A self-signed certificate with a third or less of its lifetime left."""
        if self.cert_dir:
            return False
        now = now or datetime.datetime.now(datetime.UTC)
        left = not_after(self.certfile.read_bytes()) - now
        return left <= datetime.timedelta(days=self.days) / 3

    def rotate_if_due(self, now: datetime.datetime | None = None) -> bool:
        """Issues the next self-signed certificate when due (not served until :meth:`reload`,
        so the caller publishes :meth:`ca_bundle` first); True when it did."""
        if not self.due(now):
            return False
        self._issue()
        return True

    def changed(self) -> bool:
        """The files differ from the certificate being served."""
        return self._mtimes() != self._stamp

    def reload(self) -> bool:
        """Loads changed files into the serving context; True when the served certificate changed."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        if self.context is not None:
            self.context.load_cert_chain(str(self.certfile), str(self.keyfile))
        self._stamp = stamp
        return True

    def close(self) -> None:
        """Removes the self-signed files (the private key never outlives the process)."""
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
