"""`fedfill superlink`: Flower's own SuperLink, its SQLite state waiting for its lock.

    fedfill superlink [--busy-timeout-ms MS] FLOWER-SUPERLINK-ARGS...

Why, and what it changes, is server/superlink.py's docstring.
"""

from __future__ import annotations

from server.superlink import BUSY_TIMEOUT_MS, FLOWER_BUSY_TIMEOUT_MS, run_superlink
from fedfill.errors import UsageError

PASSES_UNKNOWN_ARGS = True  # fedfill.cli hands every argument it does not know to run() as args.passed


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0] + " Every other argument goes to flower-superlink."
    parser.add_argument("--busy-timeout-ms", type=int, default=BUSY_TIMEOUT_MS, metavar="MS",
                        help=f"how long a request waits for the SQLite state's write lock (--database) before it "
                             f"fails (default {BUSY_TIMEOUT_MS}; 0: Flower's {FLOWER_BUSY_TIMEOUT_MS})")


def run(args) -> int:
    if not 0 <= args.busy_timeout_ms <= 3_600_000:
        raise UsageError(f"--busy-timeout-ms {args.busy_timeout_ms}: must be between 0 (Flower's "
                         f"{FLOWER_BUSY_TIMEOUT_MS}) and 3600000")
    return run_superlink(args.passed, busy_timeout_ms=args.busy_timeout_ms)
