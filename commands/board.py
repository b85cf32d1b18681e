"""`fedfill board`: what a node learns from the board it runs on, and what a board needs.

  profile   this board's cores, CPU frequency, memory, GPU and power rails, read from sysfs
  bundle    the directory one board needs to join as a SuperNode (deploy/bundle.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from fedfill.errors import UsageError


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    profile = sub.add_parser("profile", help="read this board's profile and power rails from sysfs")
    profile.add_argument("--sysfs-root", default="/", metavar="DIR",
                         help="the root holding the board's sys/ and proc/meminfo (default /: this board)")
    profile.add_argument("--json", action="store_true", help="print every field as JSON")

    bundle = sub.add_parser("bundle", help="write what one board needs: its SuperNode key pair, the CA, its node "
                                           "config, a systemd unit and an install script")
    bundle.add_argument("--name", required=True, help="the board's name (letters, digits, - and _)")
    bundle.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink as the board dials it")
    bundle.add_argument("--out", required=True, metavar="DIR", help="the bundle goes to DIR/NAME")
    bundle.add_argument("--pki", default=str(Path.home() / ".fedfill" / "pki"), metavar="DIR",
                        help="the server side's CA and SuperLink certificate, made there if absent "
                             "(default ~/.fedfill/pki; a testbed's: its state directory's pki/)")
    bundle.add_argument("--node-config", default='sysfs-root="/"', metavar="'KEY=VALUE ...'",
                        help="the node config, in flower-supernode's syntax, e.g. 'data-dir=\"/data\" eps=0.05' "
                             "(default sysfs-root=\"/\": read the board's profile and meter its energy)")
    bundle.add_argument("--venv", default=None, help="the board's virtual environment (default /opt/fedfill/venv)")
    bundle.add_argument("--force", action="store_true", help="replace an existing bundle of that name (its key is kept)")
    bundle.add_argument("--no-fedfill-wheel", dest="fedfill_wheel", action="store_false",
                        help="leave fedfill's own wheel out of wheels/ (by default the bundle carries it, built from "
                             "this checkout or repacked from this non-editable install: fedfill is on no package "
                             "index, so install.sh then needs one put there by hand)")


def run(args) -> int:
    return {"profile": _profile, "bundle": _bundle}[args.action](args)


def _profile(args) -> int:
    from fedfill.board import read_board

    root = Path(args.sysfs_root)
    if not root.is_dir():
        raise UsageError(f"--sysfs-root {root}: no such directory")
    profile = read_board(root)
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
        return 0
    print(f"board at {root}")
    for label, value in _summary(profile):
        print(f"  {label:<15}{value}")
    for warning in profile.warnings:
        print(f"  note: {warning}")
    return 0


def _summary(profile) -> list[tuple[str, str]]:
    def known(value, text: str) -> str:
        return "unknown" if value is None else text

    rails = ", ".join(f"{name} {watts:.2f} W" for name, watts in profile.rails.items()) or "none"
    return [
        ("cores", known(profile.cores, str(profile.cores))),
        ("f_max", known(profile.f_max_hz, f"{(profile.f_max_hz or 0) / 1e6:.0f} MHz")),
        ("memory", known(profile.memory_bytes, f"{(profile.memory_bytes or 0) / 2**30:.1f} GiB")),
        ("gpu", profile.gpu or "none found"),
        ("power", known(profile.power_w, f"{profile.power_w or 0:.2f} W (measured by {profile.energy_counter})")),
        ("rails", rails),
    ]


def _bundle(args) -> int:
    from flwr.common.config import parse_config_args

    from deploy.bundle import DEFAULT_VENV, write_bundle

    try:
        config = parse_config_args([args.node_config]) if args.node_config.strip() else {}
    except Exception as err:  # noqa: BLE001 - Flower's parser raises several kinds
        raise UsageError(f"--node-config {args.node_config!r}: {err}") from None
    try:
        bundle = write_bundle(args.name, args.superlink, Path(args.out), pki_root=Path(args.pki),
                              node_config=dict(config), venv=args.venv or DEFAULT_VENV, force=args.force,
                              fedfill_wheel=args.fedfill_wheel)
    except FileExistsError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(bundle.summary())
    return 0
