"""Certificates and SuperNode keys for a testbed: a private CA, the SuperLink's TLS
certificate signed by it, and one authentication key pair per SuperNode.

Flower's SuperNode authentication (`flower-superlink --enable-supernode-auth`) needs TLS, and
identifies a SuperNode by an elliptic-curve key on a NIST curve: the SuperNode reads its private
key with `load_ssh_private_key` (`--auth-supernode-private-key`, OpenSSH format, any EC key) and
`flwr supernode register` reads the public key with `load_ssh_public_key` (an OpenSSH line, NIST
curves only). So node keys here are ECDSA P-384 (the curve Flower's docs name), private keys in
OpenSSH format, public keys as `ecdsa-sha2-nistp384 ...` lines.

`write_pki` is idempotent: a restarted testbed keeps its CA and its node identities (what the
SuperLink has registered), gains keys for nodes it did not have, and gets a new SuperLink
certificate only when the names it must cover changed or it is near its end. Private keys are
0600 in a 0700 directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_CURVE = ec.SECP384R1()
# A certificate this close to its end is renewed rather than kept.
_RENEW_BEFORE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Pki:
    """Paths of a testbed's certificates and keys, all under `root`."""

    root: Path
    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path

    @classmethod
    def at(cls, root: Path) -> "Pki":
        """The paths under `root` (what write_pki made there; nothing is read or written)."""
        root = Path(root)
        return cls(root=root, ca_cert=root / "ca.crt", superlink_cert=root / "superlink.crt",
                   superlink_key=root / "superlink.key")

    def node_private_key(self, k: int) -> Path:
        """SuperNode k's private key (OpenSSH ECDSA): `--auth-supernode-private-key`."""
        return self.root / "nodes" / f"node-{k}.key"

    def node_public_key(self, k: int) -> Path:
        """SuperNode k's public key (OpenSSH line): what `flwr supernode register` takes."""
        return self.root / "nodes" / f"node-{k}.pub"


def write_pki(root: Path, nodes: int, superlink_names: Sequence[str] = ("superlink",), *,
              days: int = 30) -> Pki:
    """Make (or keep) the CA, the SuperLink's certificate for `superlink_names` plus localhost
    and 127.0.0.1, and key pairs for SuperNodes 0..nodes-1 under `root`."""
    if nodes < 0 or days < 1:
        raise ValueError("nodes must be >= 0 and days >= 1")
    root = Path(root)
    pki = Pki.at(root)
    _private_dir(root)
    _private_dir(root / "nodes")
    names = list(dict.fromkeys([*superlink_names, "localhost", "127.0.0.1"]))
    now = dt.datetime.now(dt.UTC)
    validity = dt.timedelta(days=days)

    ca_key_path = root / "ca.key"
    ca = _load_ca(pki.ca_cert, ca_key_path, now)
    ca_renewed = ca is None
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfill testbed CA")])
        ca_cert = (_builder(subject, subject, ca_key.public_key(), now, validity)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA384()))
        _write_private(ca_key_path, _pem_key(ca_key))
        _write(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        ca = (ca_cert, ca_key)
    ca_cert, ca_key = ca

    if ca_renewed or not _server_cert_current(pki, ca_cert, names, now):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), ca_cert.subject,
                         key.public_key(), now, validity)
                .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(pki.superlink_key, _pem_key(key))
        _write(pki.superlink_cert, cert.public_bytes(serialization.Encoding.PEM))

    for k in range(nodes):
        _ensure_node_key(pki.node_private_key(k), pki.node_public_key(k), comment=f"fedfill-node-{k}")
    return pki


def write_node_key(private_path: Path, public_path: Path, comment: str) -> None:
    """One SuperNode key pair at the given paths, outside write_pki's numbered testbed nodes
    (an edge board's, deploy/bundle.py): an existing key is kept, since it is what the
    SuperLink has registered; a missing one is made; the public line ends with `comment`."""
    _ensure_node_key(Path(private_path), Path(public_path), comment)


def superlink_pki_for(root: Path, host: str, *, days: int = 365) -> tuple[Pki, bool]:
    """The CA and a SuperLink certificate under `root` that covers `host` (the name or address
    edge boards dial), written only where needed. A certificate that already covers `host` and
    is current is kept; otherwise it is issued again for the names it covered plus `host`, so a
    running testbed's names stay covered. `days` is the validity of what is made now (a CA that
    exists keeps its own). Returns the paths and whether the SuperLink's certificate (or the
    CA) was written: then the SuperLink must be restarted with it."""
    pki = Pki.at(root)
    before = _read_or_none(pki.superlink_cert), _read_or_none(pki.ca_cert)
    write_pki(root, 0, [*_certificate_names(pki.superlink_cert), host], days=days)
    return pki, (_read_or_none(pki.superlink_cert), _read_or_none(pki.ca_cert)) != before


def _certificate_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate covers, in its order; none if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name.value) for name in sans if isinstance(name, (x509.DNSName, x509.IPAddress))]


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime,
             validity: dt.timedelta) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # clocks of other hosts may lag
            .not_valid_after(now + validity))


def _load_ca(cert_path: Path, key_path: Path, now: dt.datetime):
    """The CA certificate and key if both exist, match and the certificate is not near its end."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if cert.public_key() != key.public_key() or cert.not_valid_after_utc - _RENEW_BEFORE < now:
        return None
    return cert, key


def _server_cert_current(pki: Pki, ca_cert: x509.Certificate, names: list[str], now: dt.datetime) -> bool:
    """Whether the SuperLink's certificate and key exist, match, are signed by this CA, cover
    exactly `names` and are not near their end."""
    try:
        cert = x509.load_pem_x509_certificate(pki.superlink_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.superlink_key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (cert.public_key() == key.public_key() and cert.not_valid_after_utc - _RENEW_BEFORE >= now
            and set(sans) == {_general_name(n) for n in names})


def _ensure_node_key(private_path: Path, public_path: Path, comment: str) -> None:
    """Keep an existing EC private key (the node's identity); make one if absent or unreadable;
    (re)write the public line when it is missing or does not match."""
    key = None
    try:
        loaded = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            key = loaded
    except (OSError, ValueError, TypeError):
        pass
    if key is None:
        key = ec.generate_private_key(NODE_CURVE)
        _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
    else:
        os.chmod(private_path, 0o600)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    expected = line + f" {comment}\n".encode()
    try:
        current = public_path.read_bytes()
    except OSError:
        current = b""
    if current.split()[:2] != line.split()[:2]:
        _write(public_path, expected)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 (never readable by others, not even briefly), then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
