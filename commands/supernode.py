"""`fedfill supernode`: Flower's own SuperNode, with a warm ClientApp and short waits.

    fedfill supernode [--clientapp warm|flower] [--idle-poll-s S] [--active-s S] [--heartbeat-s S]
                      FLOWER-SUPERNODE-ARGS...

What the three changes are, and why, is client/supernode.py's docstring.
"""

from __future__ import annotations

from client.supernode import FLOWER_HEARTBEAT_S, FLOWER_IDLE_S, HEARTBEAT_S, run_supernode
from fedfill.errors import UsageError

PASSES_UNKNOWN_ARGS = True  # fedfill.cli hands every argument it does not know to run() as args.passed


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0] + " Every other argument goes to flower-supernode."
    parser.add_argument("--clientapp", choices=("warm", "flower"), default="warm",
                        help="warm (default): a fork-server starts each task's flwr-clientapp with Flower and the "
                             "app imported, and the node's waits are short; flower: Flower's SuperNode as it ships")
    parser.add_argument("--idle-poll-s", type=float, default=0.3, metavar="S",
                        help="while a run is active, ask the SuperLink for the next message every S seconds "
                             f"(default 0.3; Flower's SuperNode waits {FLOWER_IDLE_S} s)")
    parser.add_argument("--active-s", type=float, default=60.0, metavar="S",
                        help="a run counts as active for S seconds after the node's last message; then the node's "
                             f"wait doubles up to Flower's {FLOWER_IDLE_S} s (default 60)")
    parser.add_argument("--heartbeat-s", type=float, default=HEARTBEAT_S, metavar="S",
                        help=f"the node's heartbeat interval: the SuperLink counts it offline, and a round stops "
                             f"waiting for it, 2 x S after its last heartbeat (default {HEARTBEAT_S}, the least the "
                             f"SuperLink accepts; 0: Flower's {FLOWER_HEARTBEAT_S})")


def run(args) -> int:
    if not 0.01 <= args.idle_poll_s <= FLOWER_IDLE_S:
        raise UsageError(f"--idle-poll-s {args.idle_poll_s}: must be between 0.01 and {FLOWER_IDLE_S} seconds")
    if not 0 <= args.active_s <= 86400:
        raise UsageError(f"--active-s {args.active_s}: must be between 0 and 86400 seconds")
    if not (args.heartbeat_s == 0 or HEARTBEAT_S <= args.heartbeat_s <= 1800):
        raise UsageError(f"--heartbeat-s {args.heartbeat_s}: 0 (Flower's {FLOWER_HEARTBEAT_S} s) or between "
                         f"{HEARTBEAT_S} and 1800 seconds (the SuperLink's range)")
    return run_supernode(args.passed, clientapp=args.clientapp, idle_poll_s=args.idle_poll_s, active_s=args.active_s,
                         heartbeat_s=args.heartbeat_s)
