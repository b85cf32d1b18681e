"""`fedfill board`: what a node learns from the board it runs on.

  profile   this board's cores, CPU frequency, memory, GPU and power rails, read from sysfs
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


def run(args) -> int:
    return {"profile": _profile}[args.action](args)


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
