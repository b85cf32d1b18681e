"""deploy/bundle.py: the directory an operator copies to an edge board. Its files are read the
way the board reads them (bash sources node.env, Flower parses the node config, configparser
and `systemd-analyze verify` read the unit, `bash -n` reads install.sh), and one slow test
runs a board's whole flow on loopback: the bundle's register command, `fedfill supernode` started
from the unit's own ExecStart line, online on a TLS SuperLink with SuperNode authentication,
then one round on the board's own data with its rails' energy in the report. The bundle carries
fedfill's own wheel (fedfill is on no package index): it is built once for the module, and
install.sh, run with the commands that need root stubbed, installs fedfill from it.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args

import deploy.bundle
from deploy.bundle import CONTENTS, parse_superlink, unit_command, write_bundle
from deploy.pki import write_pki
from deploy.wheel import build_fedfill_wheel
from tests.venvs import clean_environment, venv_over_this_environment

ROOT = Path(__file__).resolve().parents[1]

NODE_CONFIG = {"data-dir": "/var/lib/fedfill/data", "sysfs-root": "/sys", "partition-id": 2, "eps": 0.05,
               "p-max-w": 15.0, "gain": 1e-05}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sourced(env_file: Path, *names: str) -> list[str]:
    """The variables' values after bash sources the file (what the shell, like systemd, reads)."""
    script = f"set -euo pipefail; source {shlex.quote(str(env_file))}; printf '%s\\0' " + " ".join(
        f'"${{{name}}}"' for name in names)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return result.stdout.split("\0")[:-1]


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read(path)
    return unit


@pytest.fixture(scope="module")
def fedfill_wheel(tmp_path_factory):
    """fedfill's wheel as write_bundle makes it (deploy/wheel.py), built once for the module."""
    return build_fedfill_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(autouse=True)
def built_once(fedfill_wheel, monkeypatch):
    """Every bundle here gets the module's wheel (a copy) where write_bundle would build one."""
    monkeypatch.setattr(deploy.bundle, "build_fedfill_wheel",
                        lambda into: Path(shutil.copy2(fedfill_wheel, into / fedfill_wheel.name)))


@pytest.fixture
def bundle(tmp_path):
    return write_bundle("jetson-01", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki",
                        node_config=NODE_CONFIG)


def test_files_and_modes(bundle, tmp_path):
    assert bundle.dir == (tmp_path / "out" / "jetson-01").resolve()
    assert [p.name for p in bundle.files] == list(CONTENTS)
    assert sorted(p.name for p in bundle.dir.iterdir()) == sorted([*CONTENTS, "wheels"])
    assert [p.name for p in (bundle.dir / "wheels").iterdir()] == ["fedfill-0.1.0-py3-none-any.whl"]
    assert bundle.fedfill_wheel == bundle.dir / "wheels" / "fedfill-0.1.0-py3-none-any.whl"
    assert _mode(bundle.dir) == 0o700  # it holds a private key
    assert _mode(bundle.dir / "supernode.key") == 0o600
    assert _mode(bundle.dir / "install.sh") & 0o111
    assert not list((tmp_path / "out").glob(".*"))  # no staging or old copy left behind


def test_key_pair_is_what_flower_reads(bundle, tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    private = serialization.load_ssh_private_key((bundle.dir / "supernode.key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((bundle.dir / "supernode.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert public == private.public_key()
    assert (bundle.dir / "supernode.pub").read_text().split()[2] == "fedfill-board-jetson-01"
    # The server side keeps the same public key, the one the register command names.
    assert bundle.board_public_key == (tmp_path / "pki" / "boards" / "jetson-01.pub").resolve()
    assert bundle.board_public_key.read_bytes() == (bundle.dir / "supernode.pub").read_bytes()
    assert try_load_public_key(bundle.board_public_key)


def test_the_ca_signed_a_superlink_certificate_for_the_host(bundle, tmp_path):
    pki = tmp_path / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((pki / "superlink.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert "superlink.lan" in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key((pki / "superlink.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert (bundle.dir / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert bundle.certificate_written and "(re)start the SuperLink" in bundle.summary()


def test_an_existing_pki_is_kept_or_extended_never_narrowed(tmp_path):
    """A testbed's PKI (names superlink, localhost, 127.0.0.1) serves boards too: a host it
    covers leaves it alone; a new host gets a certificate for the old names plus the new one."""
    pki = write_pki(tmp_path / "pki", 1, ("superlink",))
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.superlink_cert, pki.node_private_key(0))}
    covered = write_bundle("a", "localhost:9092", tmp_path / "out", pki_root=pki.root)
    assert not covered.certificate_written
    assert {p: p.read_bytes() for p in before} == before
    assert "(re)start the SuperLink" not in covered.summary()

    extended = write_bundle("b", "10.0.0.7:9092", tmp_path / "out", pki_root=pki.root)
    assert extended.certificate_written
    assert pki.ca_cert.read_bytes() == before[pki.ca_cert]  # same CA: earlier bundles stay valid
    san = x509.load_pem_x509_certificate(pki.superlink_cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.7")}
    assert pki.node_private_key(0).read_bytes() == before[pki.node_private_key(0)]


def test_node_env_sources_and_the_node_config_round_trips(bundle):
    superlink, node_config = _sourced(bundle.dir / "node.env", "FEDFILL_SUPERLINK", "FEDFILL_NODE_CONFIG")
    assert superlink == "superlink.lan:9092"
    assert parse_config_args([node_config]) == NODE_CONFIG  # Flower's own --node-config parser


def test_empty_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    bundle = write_bundle("b", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki")
    [node_config] = _sourced(bundle.dir / "node.env", "FEDFILL_NODE_CONFIG")
    assert node_config == "" and parse_config_args([node_config] if node_config else None) == {}


def test_unit_has_what_the_board_needs(bundle):
    path = bundle.dir / "fedfill-supernode.service"
    unit = _unit(path)
    assert unit["Unit"]["After"] == unit["Unit"]["Wants"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/fedfill/node.env"
    assert (service["Restart"], service["RestartSec"]) == ("on-failure", "10")
    assert service["User"] == "fedfill"
    assert service["ExecStart"] == (
        "/opt/fedfill/venv/bin/fedfill supernode --superlink ${FEDFILL_SUPERLINK} --root-certificates "
        "/etc/fedfill/ca.crt --auth-supernode-private-key /etc/fedfill/supernode.key --isolation subprocess "
        "--node-config ${FEDFILL_NODE_CONFIG}")
    command, environment, node_config = unit_command(bundle.dir)
    assert environment["PATH"] == "/opt/fedfill/venv/bin:/usr/local/bin:/usr/bin:/bin"
    assert environment["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert environment["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    # node.env as bash reads it is what the command carries; the node config, with its spaces,
    # stays one argument after --node-config
    superlink, config = _sourced(bundle.dir / "node.env", "FEDFILL_SUPERLINK", "FEDFILL_NODE_CONFIG")
    assert command[command.index("--superlink") + 1] == superlink == bundle.superlink
    assert command[command.index("--node-config") + 1] == config and " " in config
    assert node_config == parse_config_args([config])
    assert command[command.index("--auth-supernode-private-key") + 1] == "/etc/fedfill/supernode.key"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "fedfill").write_text("#!/bin/sh\n")
    (venv / "bin" / "fedfill").chmod(0o755)  # verify checks that ExecStart's command exists
    bundle = write_bundle("b", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki", venv=str(venv))
    result = subprocess.run(["systemd-analyze", "verify", str(bundle.dir / "fedfill-supernode.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_install_script(bundle):
    script = bundle.dir / "install.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert '-m venv --system-site-packages "$VENV"' in text and "VENV=/opt/fedfill/venv" in text
    assert 'OWN=(--no-index --find-links "$BUNDLE/wheels")' in text  # fedfill: its wheel, never an index
    assert '"${PIP[@]}" ${OWN[@]+"${OWN[@]}"} --force-reinstall --no-deps fedfill\n' in text
    assert 'SOURCE=(--no-index --find-links "$BUNDLE/wheels")' in text  # its dependencies, offline
    assert "install -d -m 0700 -o" in text and 'install -m 0600 -o "$SERVICE_USER"' in text
    assert "useradd --system" in text
    for line in ("systemctl daemon-reload", "systemctl enable fedfill-supernode.service",
                 "systemctl restart fedfill-supernode.service"):
        assert f"\n{line}\n" in text


def test_install_keeps_the_boards_torch_out_of_the_requirements(bundle):
    """The Python the installer runs to list fedfill's other dependencies, run on this
    checkout's installed fedfill: everything but torch and the extras."""
    from importlib.metadata import requires

    program = re.search(r"<<'PY'\n(.*?)\nPY\n", (bundle.dir / "install.sh").read_text(), re.S).group(1)
    listed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout.split("\n")
    expected = [r for r in requires("fedfill") if "extra ==" not in r and not r.startswith("torch")]
    assert [line for line in listed if line] == expected
    assert expected and not any(line.startswith("torch") for line in listed)


def test_an_existing_bundle_is_refused_and_force_keeps_its_key(bundle, tmp_path):
    with pytest.raises(FileExistsError, match="exists; pass force=True"):
        write_bundle("jetson-01", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki")
    key, public = (bundle.dir / "supernode.key").read_bytes(), bundle.board_public_key.read_bytes()
    wheels = bundle.dir / "wheels"
    (wheels / "numpy-2.0.0-py3-none-any.whl").write_bytes(b"a wheel the operator put here")
    (wheels / "fedfill-0.0.9-py3-none-any.whl").write_bytes(b"an older fedfill")

    again = write_bundle("jetson-01", "other.lan:9093", tmp_path / "out", pki_root=tmp_path / "pki", force=True)
    assert again.key_kept and not again.replaced_registered_key
    assert (again.dir / "supernode.key").read_bytes() == key and _mode(again.dir / "supernode.key") == 0o600
    assert again.board_public_key.read_bytes() == public
    # the operator's wheels are kept; fedfill's is the new bundle's only
    assert sorted(p.name for p in (again.dir / "wheels").iterdir()) == [
        "fedfill-0.1.0-py3-none-any.whl", "numpy-2.0.0-py3-none-any.whl"]
    assert _sourced(again.dir / "node.env", "FEDFILL_SUPERLINK") == ["other.lan:9093"]
    assert "Kept the key pair" in again.summary()


def _package_sources(root: Path) -> set[str]:
    """The .py files of the packages pyproject's [tool.setuptools.packages.find] includes."""
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = [d for d in root.iterdir() if d.is_dir() and (d / "__init__.py").is_file()
            and any(Path(d.name).match(pattern.split(".")[0]) for pattern in include)]
    return {p.relative_to(root).as_posix() for top in tops for p in top.rglob("*.py") if "__pycache__" not in p.parts}


def test_the_bundled_wheel_is_the_running_fedfill(fedfill_wheel):
    """Built from this checkout: its packages' modules as they are here, its metadata and licence."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert fedfill_wheel.name == f"fedfill-{project['version']}-py3-none-any.whl"
    info = f"fedfill-{project['version']}.dist-info"
    with zipfile.ZipFile(fedfill_wheel) as wheel:
        names = set(wheel.namelist())
        assert {n for n in names if n.endswith(".py")} == _package_sources(ROOT)
        assert wheel.read("deploy/bundle.py") == (ROOT / "deploy" / "bundle.py").read_bytes()
        metadata = wheel.read(f"{info}/METADATA").decode()
        assert "\nName: fedfill\n" in metadata and "\nLicense-Expression: Apache-2.0\n" in metadata
        assert wheel.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "fedfill = fedfill.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
        assert not any(n.startswith(("build/", "tests/")) or "__pycache__" in n or ".egg-info" in n for n in names)


def test_a_bundle_with_a_given_wheel_or_none(fedfill_wheel, tmp_path):
    given = write_bundle("given", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki",
                         fedfill_wheel=fedfill_wheel)
    assert given.fedfill_wheel.read_bytes() == fedfill_wheel.read_bytes()
    none = write_bundle("none", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki",
                        fedfill_wheel=False)
    assert none.fedfill_wheel is None and not list((none.dir / "wheels").iterdir())
    for text in (none.summary(), (none.dir / "README.txt").read_text()):
        assert "No fedfill wheel in wheels/" in text and "where it is not published" in text
    with pytest.raises(ValueError, match="fedfill_wheel must be True, False or fedfill's wheel file"):
        write_bundle("bad", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki",
                     fedfill_wheel=tmp_path / "numpy-2.0.0-py3-none-any.whl")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_sh_installs_fedfill_from_the_bundles_wheel(bundle, tmp_path):
    """install.sh as on a board, with the commands that need root stubbed (they log their
    arguments) and no package index at all (PIP_NO_INDEX): fedfill goes into the venv from the
    bundle's wheel; its dependencies are those the venv already sees (this environment's, as a
    board's venv sees its JetPack torch). The venv is made beforehand, over this environment
    (install.sh keeps an existing one). Then the installed fedfill, a non-editable install,
    repacks itself (deploy/wheel.py) into the wheel it was installed from."""
    venv = tmp_path / "venv"
    python = venv_over_this_environment(venv)
    bundle = write_bundle("b", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki", venv=str(venv))
    stubs, log = tmp_path / "stubs", tmp_path / "stubs.log"
    stubs.mkdir()
    for command, status in {"id": 0, "useradd": 0, "usermod": 0, "getent": 2, "install": 0, "systemctl": 0}.items():
        (stubs / command).write_text(f'#!/bin/sh\necho "{command} $*" >>{shlex.quote(str(log))}\n'
                                     + ("echo 0\n" if command == "id" else "") + f"exit {status}\n")
        (stubs / command).chmod(0o755)
    env = {**clean_environment(), "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "PIP_NO_INDEX": "1"}
    done = subprocess.run(["bash", str(bundle.dir / "install.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"installing fedfill from its wheel in {bundle.dir / 'wheels'}\n" in done.stdout
    assert "systemctl restart fedfill-supernode.service" in log.read_text()
    assert (venv / "bin" / "flower-superexec").is_file()  # written by the installed fedfill

    installed = subprocess.run([str(python), "-c", "import sys, fedfill, deploy.wheel\n"
                                "from pathlib import Path\n"
                                "print(fedfill.__file__)\n"
                                "print(deploy.wheel.source_checkout())\n"
                                "print(deploy.wheel.build_fedfill_wheel(Path(sys.argv[1])))",
                                str(tmp_path / "repacked")], cwd=tmp_path, env=clean_environment(),
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    where, checkout, repacked = installed.stdout.split()
    assert Path(where).is_relative_to(venv) and checkout == "None", installed.stdout
    with zipfile.ZipFile(bundle.fedfill_wheel) as ours, zipfile.ZipFile(repacked) as again:
        assert Path(repacked).name == bundle.fedfill_wheel.name
        assert sorted(ours.namelist()) == sorted(again.namelist())
        for name in ours.namelist():
            if name.endswith("/RECORD"):  # the same lines, maybe in another order
                assert sorted(ours.read(name).split()) == sorted(again.read(name).split())
            else:
                assert ours.read(name) == again.read(name), name


def test_a_new_key_for_a_registered_name_is_flagged(bundle, tmp_path):
    shutil.rmtree(bundle.dir)  # the bundle is lost; the server side still has the key it registered
    fresh = write_bundle("jetson-01", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki")
    assert fresh.replaced_registered_key and not fresh.key_kept
    assert "flwr supernode unregister NODE_ID fedfill" in fresh.summary()


def test_register_command_and_summary(bundle, tmp_path):
    assert bundle.register_command == f"flwr supernode register {bundle.board_public_key} fedfill"
    summary = bundle.summary()
    pki = (tmp_path / "pki").resolve()
    for needed in (bundle.register_command, f"--ssl-ca-certfile {pki / 'ca.crt'}",
                   f"--ssl-certfile {pki / 'superlink.crt'}", f"--ssl-keyfile {pki / 'superlink.key'}",
                   "--enable-supernode-auth", "[superlink.fedfill]", 'address = "superlink.lan:9092"',
                   "sudo bash jetson-01/install.sh", *CONTENTS):
        assert needed in summary, needed
    assert bundle.register_command in (bundle.dir / "README.txt").read_text()


@pytest.mark.parametrize("name", ["", "a" * 64, "has space", "dot.ted", "slash/y", "ümlaut"])
def test_bad_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="board name must be 1-63 letters, digits, '-' or '_'"):
        write_bundle(name, "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki")
    assert not (tmp_path / "pki").exists()  # nothing written before the checks


@pytest.mark.parametrize(("address", "why"), [
    ("superlink.lan", "superlink must be HOST:PORT"),
    (":9092", "superlink must be HOST:PORT"),
    ("superlink.lan:0", "port must be a number from 1 to 65535"),
    ("superlink.lan:65536", "port must be a number from 1 to 65535"),
    ("superlink.lan:http", "port must be a number from 1 to 65535"),
    ("super link:9092", "neither an IP address nor a DNS name"),
    ("-bad-.lan:9092", "neither an IP address nor a DNS name"),
    ("::1:9092", "IPv6 address in brackets"),
    ("[zz::1]:9092", "is not an IPv6 address"),
    ("0.0.0.0:9092", "not an address a board can dial"),
])
def test_bad_superlink_addresses_are_refused(address, why, tmp_path):
    with pytest.raises(ValueError, match=re.escape(why)):
        write_bundle("b", address, tmp_path / "out", pki_root=tmp_path / "pki")


def test_good_superlink_addresses():
    assert parse_superlink("SuperLink.LAN:9092") == ("superlink.lan", 9092)
    assert parse_superlink("192.168.1.10:1") == ("192.168.1.10", 1)
    assert parse_superlink("[fd00::5]:65535") == ("fd00::5", 65535)


@pytest.mark.parametrize(("config", "why"), [
    ({"flag": True}, "values must be str, int or float"),
    ({"bad key": 1}, "use letters, digits"),
    ({"s": 'has "quotes"'}, "may not hold quotes"),
    ({"x": float("nan")}, "must be finite"),
])
def test_bad_node_configs_are_refused(config, why, tmp_path):
    with pytest.raises(ValueError, match=re.escape(why)):
        write_bundle("b", "superlink.lan:9092", tmp_path / "out", pki_root=tmp_path / "pki", node_config=config)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_board_from_its_bundle_joins_trains_on_its_data_and_meters_its_energy_on_loopback(tmp_path):
    """The board flow without Docker (tests/test_testbed.py has it in containers): a TLS
    SuperLink with --enable-supernode-auth on loopback; the bundle's register command, run as
    printed; `fedfill supernode` (Flower's, warm) from the unit's ExecStart with node.env's values, the bundle's key
    and CA, a copy of an Orin NX's sysfs tree and the board's own 60 images; the SuperLink lists
    it online; one round of the job reports the board's f_max and the rails' energy."""
    import csv
    import json
    import sys

    import numpy as np

    from deploy.flower_cli import list_supernodes, write_flwr_connection
    from deploy.local import flower_environment, free_port, group_left, stop_group, wait_for_port
    from fedfill.config import RunConfig
    from jobs import run_split
    from tests.board_trees import EXPECTED, write_tree

    start_s = 90.0  # the machine may be busy
    home = tmp_path / "flwr"
    env = flower_environment(home)  # home/bin holds Flower's commands and fedfill's: the bundle's venv is `home`
    port = free_port()
    tree = write_tree("orin-nx", tmp_path / "orin-nx")
    own = run_split(RunConfig()).clients.subset(np.arange(0, 240, 4))  # the board's own 60 images
    np.savez(tmp_path / "own.npz", images=own.images, labels=own.labels)
    bundle = write_bundle("board-1", f"127.0.0.1:{port}", tmp_path / "out", pki_root=tmp_path / "pki",
                          node_config={"data-dir": str(tmp_path / "own.npz"), "sysfs-root": str(tree)},
                          venv=str(home))
    pki = bundle.pki
    processes: dict[str, subprocess.Popen] = {}

    def spawn(name: str, command: list[str]) -> Path:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            processes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                               start_new_session=True)
        return log

    try:
        spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.superlink_cert),
            "--ssl-keyfile", str(pki.superlink_key), "--enable-supernode-auth", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation"])
        wait_for_port(port, start_s, processes["superlink"])
        write_flwr_connection(home, bundle.superlink, root_certificates=pki.ca_cert, name=bundle.connection)
        registered = subprocess.run(shlex.split(bundle.register_command), env=env, cwd=home, capture_output=True,
                                    text=True, timeout=start_s)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        [node] = list_supernodes(home, bundle.connection, timeout_s=start_s)
        assert node["status"] == "registered"
        node_id = int(node["node-id"])

        # the unit's command, its files where the bundle holds them here (/etc/fedfill on a board)
        command = [word.replace("/etc/fedfill/", f"{bundle.dir}/") for word in unit_command(bundle.dir)[0]]
        assert command[:2] == [str(home / "bin" / "fedfill"), "supernode"]
        # Its own runtime API port: on a board the default 9094 is free, here it may not be.
        log = spawn("supernode", [*command, "--port", str(free_port())])

        deadline = time.monotonic() + start_s
        status = None
        while time.monotonic() < deadline and status != "online":
            assert processes["supernode"].poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(1.0)
            status = {int(n["node-id"]): n["status"]
                      for n in list_supernodes(home, bundle.connection, timeout_s=start_s)}.get(node_id)
        assert status == "online", log.read_text(errors="replace")[-3000:]
        assert f"SuperNode ID: {node_id}" in log.read_text(errors="replace")

        out = tmp_path / "run"
        job = subprocess.run([sys.executable, "-m", "fedfill", "run", "--superlink", bundle.superlink,
                              "--root-certificates", str(pki.ca_cert), "--generator", "none", "--nodes", "1",
                              "--rounds", "1", "--out", str(out)], env=env, capture_output=True, text=True,
                             timeout=420)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + log.read_text(errors="replace")[-3000:]
    finally:
        for process in reversed(processes.values()):
            stop_group(process)
        left = [name for name, process in processes.items() if group_left(process)]
        assert not left, f"processes left running: {left}"
    profile = json.loads((out / "profiles.json").read_text())[str(node_id)]
    assert (profile["f_max_hz"], profile["measured"], profile["d_loc"]) == (EXPECTED["orin-nx"]["f_max_hz"], "f_max_hz", 60)
    with open(out / "devices.csv") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["status"] == "used", row
    assert float(row["measured_energy_j"]) == pytest.approx(EXPECTED["orin-nx"]["power_w"] * float(row["measured_s"]),
                                                             rel=1e-6)
    assert float(row["measured_s"]) >= float(row["train_s"]) > 0 and float(row["e_cmp_j"]) > 0


def test_the_board_bundle_command(tmp_path, capsys):
    from fedfill.cli import main

    args = ["board", "bundle", "--name", "orin-7", "--superlink", "10.0.0.5:9092", "--out", str(tmp_path / "out"),
            "--pki", str(tmp_path / "pki"), "--node-config", 'sysfs-root="/" data-dir="/data" eps=5e-28']
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode register" in printed and "install.sh" in printed
    assert unit_command(tmp_path / "out" / "orin-7")[2] == {"sysfs-root": "/", "data-dir": "/data", "eps": 5e-28}
    assert main(args) == 2 and "--force" in capsys.readouterr().err, "an existing bundle is refused"
    assert main([*args, "--force"]) == 0
    assert main([*args[:-1], "data-dir=/unquoted/path", "--force"]) == 2, "Flower's node-config syntax is checked"
