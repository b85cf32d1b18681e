"""Everything one edge board (an NVIDIA Jetson or any Linux box with systemd) needs to join a
fedfill federation as a Flower SuperNode, in one directory the operator copies to the board.

`write_bundle` writes `out_dir/<name>/`:

    supernode.key              the board's SuperNode key (OpenSSH ECDSA P-384, 0600): its identity
    supernode.pub              its public line, what the SuperLink registers
    ca.crt                     the CA that signed the SuperLink's TLS certificate
    node.env                   FEDFILL_SUPERLINK and FEDFILL_NODE_CONFIG (systemd EnvironmentFile)
    fedfill-supernode.service  the systemd unit that runs `fedfill supernode` (Flower's SuperNode,
                               warm: client/supernode.py) from the venv
    install.sh                 run as root on the board: venv, fedfill, /etc/fedfill, the service
    README.txt                 what to copy and what to run on each side
    wheels/                    fedfill's own wheel (deploy/wheel.py), which install.sh installs
                               (fedfill is on no package index); its dependencies as wheels,
                               put here too, make install.sh install offline

The server side lives in `pki_root` (deploy/pki.py's layout): the CA and the SuperLink's
certificate, made there if absent or not covering the host the board dials, and
`boards/<name>.pub`, the copy of each board's public key that the operator registers with
`flwr supernode register`. `Bundle.summary()` (also `render_summary`) is the text the CLI
prints: what was written, what to copy, what to run on each side.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .local import node_config_arg
from .pki import Pki, superlink_pki_for, write_node_key
from .wheel import build_fedfill_wheel

DEFAULT_VENV = "/opt/fedfill/venv"
ETC = "/etc/fedfill"  # where install.sh puts keys, CA and node.env on the board
UNIT_NAME = "fedfill-supernode.service"
SERVICE_USER = "fedfill"
PRIVATE_KEY, PUBLIC_KEY, CA_CERT, NODE_ENV = "supernode.key", "supernode.pub", "ca.crt", "node.env"
INSTALL, README, WHEELS = "install.sh", "README.txt", "wheels"
# The bundle's files and what each is for, in the order the summary and README.txt list them.
CONTENTS = {
    PRIVATE_KEY: "the board's SuperNode key (OpenSSH ECDSA, 0600): its identity; secret",
    PUBLIC_KEY: "its public key, what the SuperLink registers",
    CA_CERT: "the CA that signed the SuperLink's TLS certificate",
    NODE_ENV: "FEDFILL_SUPERLINK and FEDFILL_NODE_CONFIG (systemd EnvironmentFile)",
    UNIT_NAME: "the systemd unit: fedfill supernode (Flower's SuperNode, warm) from the venv",
    INSTALL: "the installer: run it as root on the board",
    README: "what to copy and what to run on each side",
}
_WHEELS_NOTE = "fedfill's wheel, which install.sh installs; its dependencies put here make it install offline"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_CONFIG_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a TOML bare key: Flower's parser reads key=value as TOML
_VENV = re.compile(r"/[A-Za-z0-9._/-]+")  # lands unquoted in the unit's ExecStart and PATH


@dataclass(frozen=True)
class Bundle:
    """A written bundle: where it is, what is in it, and what the operator does next."""

    name: str
    superlink: str  # HOST:PORT as the board dials it
    dir: Path
    venv: str  # the board's virtual environment
    files: list[Path]
    pki: Pki  # the server side's CA and SuperLink certificate
    board_public_key: Path  # pki_root/boards/<name>.pub: what register_command registers
    connection: str  # the `[superlink.<connection>]` entry of $FLWR_HOME/config.toml
    register_command: str
    certificate_written: bool = False  # the SuperLink's certificate (or CA) was made now
    key_kept: bool = False  # force=True kept the key pair of the bundle it replaced
    replaced_registered_key: bool = False  # boards/<name>.pub held another key before
    fedfill_wheel: Path | None = None  # fedfill's wheel in wheels/, which install.sh installs

    def summary(self) -> str:
        return render_summary(self)


def write_bundle(name: str, superlink: str, out_dir: Path, *, pki_root: Path, node_config: dict | None = None,
                 venv: str = DEFAULT_VENV, force: bool = False, connection: str = "fedfill",
                 fedfill_wheel: Path | bool = True) -> Bundle:
    """Write the bundle of board `name` to `out_dir/name/` and return what was written.

    `superlink` is HOST:PORT as the board dials it (TLS; one port serves the Fleet and Control
    APIs in Flower 1.41). `pki_root` is the server side's PKI directory: its CA and a SuperLink
    certificate covering HOST are made if absent or not covering it (the summary then says the
    SuperLink must be (re)started with it), and the board's public key is copied to
    `pki_root/boards/<name>.pub`. `node_config` is the SuperNode's `--node-config` (e.g.
    data-dir, sysfs-root, eps, p-max-w, gain): str, int or float values. `venv` is where
    install.sh makes the board's virtual environment. `connection` names the flwr CLI's
    connection to the SuperLink in the register command.

    `fedfill_wheel`: True puts the running fedfill's wheel in wheels/ (deploy/wheel.py: built
    from its checkout, or repacked from a non-editable install), a path puts that wheel there,
    False none (install.sh then takes fedfill from a wheel the operator put there, else from
    the package index). fedfill is on no package index: a board needs the wheel.

    An existing bundle directory is refused (FileExistsError) unless `force`: then it is
    replaced, but its key pair (already registered with the SuperLink) and its wheels/ are kept,
    less its fedfill wheel where the new bundle brings one. Bad names, addresses or node
    configs raise ValueError; a wheel that cannot be built, UsageError.
    """
    _check_name(name)
    host, port = parse_superlink(superlink)
    superlink = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = dict(node_config or {})
    _check_node_config(config)
    if not _VENV.fullmatch(venv) or "/../" in f"{venv}/":
        raise ValueError(f"venv must be an absolute path of letters, digits and ._/- (it goes unquoted into "
                         f"the systemd unit), not {venv!r}")
    if not _CONFIG_KEY.fullmatch(connection):
        raise ValueError(f"connection must be letters, digits, - or _, not {connection!r}")

    out_dir = Path(out_dir)
    final = out_dir / name
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists; pass force=True (--force) to rewrite it: its key pair, "
                              "which the SuperLink may have registered, is kept")
    pki, certificate_written = superlink_pki_for(Path(pki_root).resolve(), host)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        key_kept = _carry_over(final, staging)
        write_node_key(staging / PRIVATE_KEY, staging / PUBLIC_KEY, comment=f"fedfill-board-{name}")
        shutil.copyfile(pki.ca_cert, staging / CA_CERT)
        _write_text(staging / NODE_ENV, _node_env(name, superlink, config))
        _write_text(staging / UNIT_NAME, _unit(name, venv))
        _write_text(staging / INSTALL, _install_script(name, venv), mode=0o755)
        (staging / WHEELS).mkdir(exist_ok=True)
        wheel = _put_fedfill_wheel(staging / WHEELS, fedfill_wheel)
        board_public_key, replaced = _publish_public_key(staging / PUBLIC_KEY, pki.root, name)
        register_command = shlex.join(["flwr", "supernode", "register", str(board_public_key), connection])
        bundle = Bundle(name=name, superlink=superlink, dir=final.resolve(), venv=venv, pki=pki,
                        files=[final.resolve() / f for f in CONTENTS],
                        board_public_key=board_public_key, connection=connection,
                        register_command=register_command, certificate_written=certificate_written,
                        key_kept=key_kept, replaced_registered_key=replaced,
                        fedfill_wheel=final.resolve() / WHEELS / wheel.name if wheel else None)
        _write_text(staging / README, _readme(bundle, config))
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


def unit_command(bundle_dir: Path) -> tuple[list[str], dict[str, str], dict]:
    """What systemd runs for a bundle's unit: (the ExecStart argv, the environment of its
    Environment= lines and node.env, the node config as Flower parses it). `${VAR}` becomes
    exactly one argument, as in systemd. A container that runs the bundle (the testbed's
    add_board, Dockerfile.jetson) runs this, so what is tested is what a board runs."""
    from flwr.common.config import parse_config_args

    bundle_dir = Path(bundle_dir)
    environment, exec_start = {}, None
    for line in (bundle_dir / UNIT_NAME).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "Environment":
            name, _, text = value.partition("=")
            environment[name] = text
        elif sep and key == "ExecStart":
            exec_start = value
    for line in (bundle_dir / NODE_ENV).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, text = line.partition("=")
            environment[name.strip()] = "".join(shlex.split(text))  # one shell word, quotes removed
    if exec_start is None:
        raise ValueError(f"{bundle_dir / UNIT_NAME}: no ExecStart line")
    argv = []
    for word in shlex.split(exec_start):
        match = re.fullmatch(r"\$\{(\w+)\}", word)
        argv.append(environment[match.group(1)] if match else word)
    config = parse_config_args([environment["FEDFILL_NODE_CONFIG"]]) if environment.get("FEDFILL_NODE_CONFIG") else {}
    return argv, environment, dict(config)


def parse_superlink(address: str) -> tuple[str, int]:
    """HOST and PORT of `HOST:PORT` (IPv6 as `[ADDR]:PORT`), or a ValueError saying what is wrong.
    HOST is what the board dials, so a wildcard address (0.0.0.0, ::) is refused."""
    what = f"superlink must be HOST:PORT as the board dials it (e.g. superlink.lan:9092), not {address!r}"
    if match := re.fullmatch(r"\[([^]]*)\]:(\w+)", address):
        host, port_text = match.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host:
            raise ValueError(what)
        if ":" in host:
            raise ValueError(f"{what}: write an IPv6 address in brackets, [ADDR]:PORT")
        if not _is_ip(host) and not _is_dns_name(host):
            raise ValueError(f"{what}: {host!r} is neither an IP address nor a DNS name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what}: the port must be a number from 1 to 65535")
    if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
        raise ValueError(f"{what}: {host} is where a SuperLink listens, not an address a board can dial")
    return host.lower(), int(port_text)


def render_summary(bundle: Bundle) -> str:
    """What the operator reads after `write_bundle`: the files, what to copy to the board, and
    the commands on each side."""
    pki = bundle.pki
    port = bundle.superlink.rpartition(":")[2]
    lines = [f"Bundle for board {bundle.name!r} in {bundle.dir}:"]
    lines.append(_contents_table("  "))
    lines.append(_wheel_line(bundle))
    if bundle.key_kept:
        lines.append("Kept the key pair of the bundle this one replaced (the SuperLink may have registered it).")
    lines += ["", "1. Server side: the SuperLink needs TLS with these files and SuperNode authentication:",
              "     flower-superlink " + shlex.join([
                  "--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.superlink_cert),
                  "--ssl-keyfile", str(pki.superlink_key), "--enable-supernode-auth",
                  "--host", "0.0.0.0", "--port", port])]
    lines.append(f"   Its CA ({pki.ca_cert.name}, also in the bundle) is valid until {_ca_expiry(pki):%Y-%m-%d}; "
                 "a new CA means new bundles for every board.")
    if bundle.certificate_written:
        lines.append(f"   The CA or the SuperLink certificate in {pki.root} was written now (to cover "
                     f"{bundle.superlink.rpartition(':')[0]}): (re)start the SuperLink with it.")
    lines += ["", "2. Server side: register the board's key (once per key):",
              f"     {bundle.register_command}",
              f"   {bundle.connection!r} is a [superlink.{bundle.connection}] entry in $FLWR_HOME/config.toml "
              "(deploy/flower_cli.py write_flwr_connection), e.g.",
              f"     [superlink.{bundle.connection}]",
              f'     address = "{bundle.superlink}"',
              f'     root-certificates = "{pki.ca_cert}"']
    if bundle.replaced_registered_key:
        lines.append(f"   {bundle.board_public_key} held another key before: the SuperLink may still have it "
                     f"registered; find its node id with `flwr supernode list {bundle.connection}` and remove it "
                     f"with `flwr supernode unregister NODE_ID {bundle.connection}`.")
    lines += ["", "3. Copy the whole directory to the board (it holds a private key: keep it private), e.g.",
              f"     scp -r {shlex.quote(str(bundle.dir))} BOARD:",
              "", "4. On the board, as root (Python >= 3.11 with venv, systemd):",
              f"     sudo bash {bundle.name}/{INSTALL}",
              f"     systemctl status {UNIT_NAME}; journalctl -u {UNIT_NAME} -f",
              f"   Then `flwr supernode list {bundle.connection}` on the server side shows it online.",
              "", f"{README} in the bundle says the same at more length."]
    return "\n".join(lines)


def _ca_expiry(pki: Pki) -> dt.datetime:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).not_valid_after_utc


def _contents_table(indent: str) -> str:
    width = max(len(name) for name in CONTENTS)
    rows = [*CONTENTS.items(), (f"{WHEELS}/", _WHEELS_NOTE)]
    return "\n".join(f"{indent}{name:<{width}}  {what}" for name, what in rows)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"board name must be 1-63 letters, digits, '-' or '_' (it names files and the key), "
                         f"not {name!r}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_dns_name(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _check_node_config(config: dict) -> None:
    """What Flower's --node-config parser reads back as given: bare keys; strings without
    quotes or line breaks; ints and finite floats. Booleans are refused: node_config_arg
    writes Python's True, which is not TOML."""
    for key, value in config.items():
        if not isinstance(key, str) or not _CONFIG_KEY.fullmatch(key):
            raise ValueError(f"node config key {key!r}: use letters, digits, '-' or '_'")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"node config {key}={value!r}: values must be str, int or float")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"node config {key}={value!r}: a float must be finite")
        if isinstance(value, str) and re.search(r"[\"'\n\r]", value):
            raise ValueError(f"node config {key}={value!r}: a string may not hold quotes or line breaks")


def _carry_over(old: Path, staging: Path) -> bool:
    """Move what a replaced bundle keeps into the new one: its key pair and its wheels/.
    Returns whether a key pair was kept."""
    kept = False
    if (old / PRIVATE_KEY).is_file():
        shutil.copy2(old / PRIVATE_KEY, staging / PRIVATE_KEY)
        if (old / PUBLIC_KEY).is_file():
            shutil.copy2(old / PUBLIC_KEY, staging / PUBLIC_KEY)
        kept = True
    if (old / WHEELS).is_dir():
        shutil.copytree(old / WHEELS, staging / WHEELS)
    return kept


def _put_fedfill_wheel(wheels: Path, fedfill_wheel: Path | bool) -> Path | None:
    """fedfill's wheel into wheels/, in place of any the replaced bundle had (install.sh would
    take the highest version of them); returns it, or None where the bundle brings none."""
    if fedfill_wheel is None or fedfill_wheel is False:
        return None
    for old in wheels.glob("fedfill-*.whl"):
        old.unlink()
    if fedfill_wheel is True:
        return build_fedfill_wheel(wheels)
    source = Path(fedfill_wheel)
    if not source.name.startswith("fedfill-") or source.suffix != ".whl" or not source.is_file():
        raise ValueError(f"fedfill_wheel must be True, False or fedfill's wheel file, not {fedfill_wheel!r}")
    return Path(shutil.copy2(source, wheels / source.name))


def _publish_public_key(public_key: Path, pki_root: Path, name: str) -> tuple[Path, bool]:
    """Copy the board's public key to pki_root/boards/<name>.pub; returns that path and whether
    a different key was there (the SuperLink may hold it registered)."""
    boards = pki_root / "boards"
    boards.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = boards / f"{name}.pub"
    new = public_key.read_bytes()
    try:
        replaced = target.read_bytes().split()[:2] != new.split()[:2]
    except OSError:
        replaced = False
    _write_text(target, new.decode())
    return target.resolve(), replaced


def _swap_in(staging: Path, final: Path) -> None:
    """Put the finished bundle in place; the one it replaces goes only once the new one is there."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


def _node_env(name: str, superlink: str, config: dict) -> str:
    # Single quotes (shlex.quote) mean the same to bash and to systemd's EnvironmentFile parser,
    # and keep the double quotes Flower needs around string values.
    return (f"# Environment of {UNIT_NAME} on board {name!r} (written by deploy/bundle.py): a systemd\n"
            "# EnvironmentFile, also valid bash. Edit it on the board, then: systemctl restart fedfill-supernode\n"
            "# The SuperLink as the board dials it (HOST:PORT, TLS checked against ca.crt):\n"
            f"FEDFILL_SUPERLINK={shlex.quote(superlink)}\n"
            "# flower-supernode --node-config: space-separated key=value, strings in double quotes:\n"
            f"FEDFILL_NODE_CONFIG={shlex.quote(node_config_arg(config))}\n")


def _unit(name: str, venv: str) -> str:
    # ${VAR} stands for exactly one argument in ExecStart (whitespace and all); $VAR would split.
    return f"""\
# fedfill's Flower SuperNode on board {name!r} (written by deploy/bundle.py; install.sh copies it to
# /etc/systemd/system/). Its settings are in {ETC}/{NODE_ENV}.
[Unit]
Description=fedfill Flower SuperNode ({name})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
EnvironmentFile={ETC}/{NODE_ENV}
# fedfill supernode runs Flower's flower-supernode with a warm ClientApp (a fork-server that
# imports Flower and fedfill once per boot, not once per task); --isolation subprocess starts
# flower-superexec from PATH: the venv's, which imports fedfill.
Environment=PATH={venv}/bin:/usr/local/bin:/usr/bin:/bin
# Runtime dependency installation would `uv sync` a fresh environment per run and replace the
# board's CUDA torch; and no update check.
Environment=FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
Environment=FLWR_DISABLE_UPDATE_CHECK=1
Environment=FLWR_HOME=/var/lib/fedfill/flwr
Environment=HOME=/var/lib/fedfill
Environment=PYTHONUNBUFFERED=1
StateDirectory=fedfill
WorkingDirectory=/var/lib/fedfill
ExecStart={venv}/bin/fedfill supernode --superlink ${{FEDFILL_SUPERLINK}} --root-certificates {ETC}/{CA_CERT} --auth-supernode-private-key {ETC}/{PRIVATE_KEY} --isolation subprocess --node-config ${{FEDFILL_NODE_CONFIG}}
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
"""


def _install_script(name: str, venv: str) -> str:
    return f"""\
#!/usr/bin/env bash
# Installs fedfill's Flower SuperNode for board {name!r} (written by deploy/bundle.py).
# Run as root on the board, from anywhere:   sudo bash install.sh
# A rerun (a newer bundle, a newer wheel in wheels/) upgrades in place and restarts the service.
# fedfill comes from its wheel in wheels/ (it is on no package index), its dependencies from the
# package index, or from wheels/ alone (offline) where more wheels were put there.
# PYTHON=/path/to/python3 picks the interpreter (>= 3.11; the one whose CUDA torch the board has).
set -euo pipefail

BUNDLE=$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)
VENV={venv}
ETC={ETC}
UNIT=/etc/systemd/system/{UNIT_NAME}
SERVICE_USER={SERVICE_USER}
PYTHON=${{PYTHON:-python3}}

die() {{ echo "install.sh: $*" >&2; exit 1; }}

[[ $(id -u) -eq 0 ]] || die "run me as root: sudo bash $0"
command -v systemctl >/dev/null || die "no systemctl: this installs a systemd service"
command -v "$PYTHON" >/dev/null || die "no $PYTHON; set PYTHON=/path/to/python3.11+"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \\
    || die "$PYTHON is older than 3.11, which fedfill needs: set PYTHON=, or run the container" \
           "image (deploy/docker/Dockerfile.jetson)"
for file in {PRIVATE_KEY} {PUBLIC_KEY} {CA_CERT} {NODE_ENV} {UNIT_NAME}; do
    [[ -f $BUNDLE/$file ]] || die "$BUNDLE/$file is missing: copy the whole bundle directory"
done

# 1. The user that runs the SuperNode; it may use the GPU (groups video and render, where they exist).
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/fedfill --shell /usr/sbin/nologin "$SERVICE_USER"
fi
for group in video render; do
    if getent group "$group" >/dev/null; then usermod -aG "$group" "$SERVICE_USER"; fi
done

# 2. The venv. --system-site-packages: a torch already on the board (JetPack's CUDA build) is
# used as it is, never replaced.
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV" \\
        || die "could not make a venv (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip install --upgrade --upgrade-strategy only-if-needed)
if compgen -G "$BUNDLE/{WHEELS}/fedfill-*.whl" >/dev/null; then
    # fedfill itself from its wheel in the bundle, never from an index.
    echo "installing fedfill from its wheel in $BUNDLE/{WHEELS}"
    OWN=(--no-index --find-links "$BUNDLE/{WHEELS}")
else
    echo "no fedfill wheel in $BUNDLE/{WHEELS}: installing fedfill from the package index"
    OWN=()
fi
DEPENDENCY_WHEELS=no
for wheel in "$BUNDLE/{WHEELS}"/*.whl; do
    if [[ -f $wheel && ${{wheel##*/}} != fedfill-* ]]; then DEPENDENCY_WHEELS=yes; fi
done
if [[ $DEPENDENCY_WHEELS == yes ]]; then
    # Offline: the dependencies from the wheels put in the bundle's wheels/.
    echo "installing fedfill's dependencies from $BUNDLE/{WHEELS} (offline)"
    SOURCE=(--no-index --find-links "$BUNDLE/{WHEELS}")
else
    # Online: from the package index pip is configured for (PIP_INDEX_URL; PyPI by default);
    # --find-links: `pip install fedfill` below (no torch on the board) finds fedfill in wheels/.
    echo "installing fedfill's dependencies from the package index"
    SOURCE=(--find-links "$BUNDLE/{WHEELS}")
fi

# 3. fedfill itself, reinstalled on every run (a rebuilt wheel may keep its version number), then
# its dependencies. Its torch pin is for x86 CPU installs: where the venv already sees a torch
# (the board's), the other dependencies go in with torch held at the board's version.
"${{PIP[@]}}" ${{OWN[@]+"${{OWN[@]}}"}} --force-reinstall --no-deps fedfill
if TORCH=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null); then
    echo "keeping the board's torch $TORCH"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$VENV/bin/python" - >"$WORK/requirements.txt" <<'PY'
import re
from importlib.metadata import requires

for requirement in requires("fedfill") or []:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
    if "extra ==" not in requirement and name != "torch":
        print(requirement)
PY
    echo "torch==$TORCH" >"$WORK/constraints.txt"
    "${{PIP[@]}}" ${{SOURCE[@]+"${{SOURCE[@]}}"}} -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"
else
    "${{PIP[@]}}" ${{SOURCE[@]+"${{SOURCE[@]}}"}} fedfill  # torch included
fi
# Flower's commands must be the venv's, so that flwr-clientapp imports fedfill: a flwr seen
# through the system site-packages brings none, so write them (deploy/local.py).
if [[ ! -x $VENV/bin/flower-superexec || ! -x $VENV/bin/flwr-clientapp ]]; then
    "$VENV/bin/python" -c 'import sys; from pathlib import Path; from deploy.local import write_flower_commands
write_flower_commands(Path(sys.argv[1]))' "$VENV/bin"
fi
"$VENV/bin/python" -c 'import fedfill, flwr, torch
print("fedfill ready; torch", torch.__version__, "CUDA", torch.cuda.is_available())'

# 4. Keys, CA and settings, readable by the service's user only.
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$ETC"
install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$BUNDLE/{PRIVATE_KEY}" "$ETC/{PRIVATE_KEY}"
install -m 0644 -o "$SERVICE_USER" -g "$SERVICE_USER" "$BUNDLE/{PUBLIC_KEY}" "$BUNDLE/{CA_CERT}" "$ETC/"
install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$BUNDLE/{NODE_ENV}" "$ETC/{NODE_ENV}"

# 5. The service: enabled at boot and (re)started now, so a rerun takes the new files.
install -m 0644 -o root -g root "$BUNDLE/{UNIT_NAME}" "$UNIT"
systemctl daemon-reload
systemctl enable {UNIT_NAME}
systemctl restart {UNIT_NAME}
echo "fedfill-supernode started; follow it with: journalctl -u {UNIT_NAME} -f"
"""


def _wheel_line(bundle: Bundle) -> str:
    if bundle.fedfill_wheel is not None:
        return f"install.sh installs fedfill from its wheel in {WHEELS}/, {bundle.fedfill_wheel.name}."
    return (f"No fedfill wheel in {WHEELS}/: put one there (`pip wheel --no-deps -w {WHEELS} .` in a checkout), "
            "else install.sh looks for fedfill on the package index, where it is not published.")


def _readme(bundle: Bundle, config: dict) -> str:
    config_lines = "\n".join(f"    {key} = {value!r}" for key, value in config.items()) or "    (none)"
    title = f"fedfill SuperNode bundle for board {bundle.name!r}"
    return f"""\
{title}
{'=' * len(title)}
Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by deploy/bundle.py. The board joins the SuperLink at
{bundle.superlink} as a Flower SuperNode over TLS, authenticated by its own key.

What is here
{_contents_table("  ")}
The server side keeps a copy of {PUBLIC_KEY}: {bundle.board_public_key}.
{_wheel_line(bundle)}
Its dependencies come from the package index. For an offline install put them in {WHEELS}/ too,
as wheels for the board's platform and Python, e.g.
  pip download --only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.12 -d wheels ...
leaving torch out where the board has its own.

Node config:
{config_lines}

On the server side (once)
  Start the SuperLink with TLS and SuperNode authentication:
    flower-superlink --ssl-ca-certfile {bundle.pki.ca_cert} \\
        --ssl-certfile {bundle.pki.superlink_cert} \\
        --ssl-keyfile {bundle.pki.superlink_key} \\
        --enable-supernode-auth --host 0.0.0.0 --port {bundle.superlink.rpartition(':')[2]}
  Register this board's key:
    {bundle.register_command}
  ({bundle.connection!r} is the [superlink.{bundle.connection}] entry of $FLWR_HOME/config.toml: address =
  "{bundle.superlink}", root-certificates = "{bundle.pki.ca_cert}".)

On the board
  Needs: Linux with systemd, Python >= 3.11 with venv (PYTHON=... picks another interpreter). A
  torch already installed for that Python (JetPack's CUDA build) is kept: the venv sees it
  (--system-site-packages) and the installer never replaces it.
  Copy this whole directory to the board, then:
    sudo bash {bundle.name}/{INSTALL}
  It makes the venv {bundle.venv}, installs fedfill into it, copies the keys, CA and node.env
  to {ETC}/ (0700, user {SERVICE_USER}), installs and starts {UNIT_NAME}.
  Rerun it to upgrade. Watch it:
    systemctl status {UNIT_NAME}
    journalctl -u {UNIT_NAME} -f
  Data named in the node config (data-dir) must be readable by user {SERVICE_USER}.
  To change the node config: edit {ETC}/{NODE_ENV}, then systemctl restart {UNIT_NAME}.

  Without Python >= 3.11 on the board (JetPack 6 on Ubuntu 22.04 has 3.10), run the container
  image instead: see the header of deploy/docker/Dockerfile.jetson.
"""
