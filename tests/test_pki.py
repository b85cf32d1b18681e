"""deploy/pki.py: the testbed's CA, SuperLink certificate and SuperNode keys, in the formats
Flower 1.41 reads, kept across calls (a restarted testbed keeps its node identities)."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.pki import write_pki


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set, set]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), set(san.get_values_for_type(x509.IPAddress))


@pytest.fixture
def pki(tmp_path):
    return write_pki(tmp_path / "pki", 2, ("superlink", "10.1.2.3"))


def test_paths(pki, tmp_path):
    root = tmp_path / "pki"
    assert (pki.root, pki.ca_cert, pki.superlink_cert, pki.superlink_key) == (
        root, root / "ca.crt", root / "superlink.crt", root / "superlink.key")
    assert pki.node_private_key(1) == root / "nodes" / "node-1.key"
    assert pki.node_public_key(1) == root / "nodes" / "node-1.pub"


def test_ca_signs_the_superlink_certificate(pki):
    ca, cert = _cert(pki.ca_cert), _cert(pki.superlink_cert)
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(pki.superlink_key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_sans_cover_the_names_localhost_and_loopback(pki):
    dns, ips = _sans(_cert(pki.superlink_cert))
    assert dns == {"superlink", "localhost"}
    assert ips == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}


def test_secrets_are_private(pki):
    assert _mode(pki.root) == 0o700 and _mode(pki.root / "nodes") == 0o700
    for secret in (pki.root / "ca.key", pki.superlink_key, pki.node_private_key(0), pki.node_private_key(1)):
        assert _mode(secret) == 0o600, secret


def test_node_keys_are_what_flower_reads(pki):
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, any EC key;
    # flwr supernode register: load_ssh_public_key, an EC key on a NIST curve.
    from flwr.cli.supernode.register import try_load_public_key

    private = serialization.load_ssh_private_key(pki.node_private_key(0).read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    public = serialization.load_ssh_public_key(pki.node_public_key(0).read_bytes())
    assert public == private.public_key()
    assert pki.node_public_key(0).read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(pki.node_public_key(0))  # Flower's own check passes
    assert pki.node_public_key(0).read_bytes() != pki.node_public_key(1).read_bytes()


def test_second_call_keeps_everything(pki, tmp_path):
    files = sorted(p for p in pki.root.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    again = write_pki(tmp_path / "pki", 2, ("superlink", "10.1.2.3"))
    assert again == pki
    assert {p: p.read_bytes() for p in files} == before


def test_more_nodes_later_keep_the_first(pki, tmp_path):
    first = [(pki.node_private_key(k).read_bytes(), pki.node_public_key(k).read_bytes()) for k in range(2)]
    ca = pki.ca_cert.read_bytes()
    write_pki(tmp_path / "pki", 4, ("superlink", "10.1.2.3"))
    assert [(pki.node_private_key(k).read_bytes(), pki.node_public_key(k).read_bytes()) for k in range(2)] == first
    assert pki.node_private_key(3).exists() and pki.node_public_key(3).exists()
    assert pki.ca_cert.read_bytes() == ca


def test_changed_names_renew_only_the_superlink_certificate(pki, tmp_path):
    ca, node = pki.ca_cert.read_bytes(), pki.node_private_key(0).read_bytes()
    write_pki(tmp_path / "pki", 2, ("superlink", "edge-server"))
    dns, ips = _sans(_cert(pki.superlink_cert))
    assert dns == {"superlink", "edge-server", "localhost"} and ips == {ipaddress.ip_address("127.0.0.1")}
    _cert(pki.superlink_cert).verify_directly_issued_by(_cert(pki.ca_cert))
    assert pki.ca_cert.read_bytes() == ca and pki.node_private_key(0).read_bytes() == node


def test_a_lost_public_key_is_rewritten_from_the_private_one(pki, tmp_path):
    public = pki.node_public_key(0).read_bytes()
    pki.node_public_key(0).unlink()
    write_pki(tmp_path / "pki", 2, ("superlink", "10.1.2.3"))
    assert pki.node_public_key(0).read_bytes() == public
