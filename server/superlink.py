"""Flower's own SuperLink with a SQLite state that waits for its lock (`fedfill superlink`,
commands/superlink.py, is its command line): the testbed's SuperLink, whose `--database` file
keeps registrations and runs across a killed SuperLink.

Why: a SQLite state has one writer at a time, and Flower 1.41 gives every connection
`busy_timeout` 5000 ms (SQLITE_PRAGMAS in flwr.supercore.constant, applied on connect by
flwr.supercore.sql_mixin; WAL already on, so readers never wait). On a loaded host a request
that holds the write lock can lose the CPU for longer than that, and the next writer fails
with `sqlite3.OperationalError: database is locked`, which the SuperLink answers with HTTP
500. Flower's SuperNode and heartbeat senders retry only transport errors and 502-504: a 500
on a SuperNode's pull ends the node, one on its heartbeat or an app's task heartbeat ends
that heartbeat thread for good, so the node is counted offline 20 s later or the app's task
token expires 60 s later
(`Runtime task-token authentication failed`), and the run dies. This waits instead:
`busy_timeout` BUSY_TIMEOUT_MS (60 s), over the 30 s after which Flower's HTTP clients time
out and retry a request (a transport error, which every one of them retries), so a lock held
that long costs a retry, never a 500. Nothing else in Flower's pragmas changes. Measured with
a real lock held 12 s by another connection: with Flower's pragmas the node's pull-messages
and heartbeat got 500 `database is locked`, and the node terminated and was unregistered;
with this, nothing failed and it stayed online (tests/test_flower_under_load.py, 8 s).

The loopback engine (deploy/local.py) needs none of this: its SuperLink runs Flower's
in-memory state (InMemoryLinkState, InMemoryObjectStore: Python objects under locks, no
SQLite), as does every SuperNode (InMemoryNodeState); the reported `database is locked` came
from runs made while its SuperLink still had `--database` (before commit 5084892).

The pragmas are a tuple Flower reads at each connect, with no option, so this replaces it,
for FLOWER_VERSION only (`sqlite_pragmas_found`; tests/test_flower_under_load.py fails when an
upgrade changes it); another Flower runs with its own pragmas and says so.
"""

from __future__ import annotations

import inspect
import sys
from importlib.metadata import version
from logging import INFO, WARNING

FLOWER_VERSION = "1.41.0"  # the flwr whose SQLite pragmas this was written for
FLOWER_BUSY_TIMEOUT_MS = 5000  # flwr 1.41 SQLITE_PRAGMAS' busy_timeout
BUSY_TIMEOUT_MS = 60_000  # over the 30 s timeout of Flower's HTTP clients (ProtobufClient)


def sqlite_pragmas_found() -> tuple[bool, str]:
    """Whether the installed Flower sets the SQLite pragmas this replaces, where it does: the
    pinned version, its busy_timeout of 5000 ms among SQLITE_PRAGMAS, read on each connect by
    sql_mixin's `_set_sqlite_pragmas` from its module's SQLITE_PRAGMAS."""
    import flwr.supercore.constant as constant
    import flwr.supercore.sql_mixin as mixin

    installed = version("flwr")
    if installed != FLOWER_VERSION:
        return False, f"flwr {installed} (the SQLite busy timeout is set for {FLOWER_VERSION})"
    pragmas = dict(getattr(mixin, "SQLITE_PRAGMAS", ()))
    if pragmas != dict(getattr(constant, "SQLITE_PRAGMAS", ())) or pragmas.get("busy_timeout") != str(
            FLOWER_BUSY_TIMEOUT_MS):
        return False, f"flwr {installed}'s SQLite pragmas are not the ones this was written for: {pragmas}"
    setter = getattr(mixin, "_set_sqlite_pragmas", None)
    if setter is None or "in SQLITE_PRAGMAS" not in inspect.getsource(setter):
        return False, f"flwr {installed}'s SQL states no longer set SQLITE_PRAGMAS on connect"
    return True, f"flwr {installed}"


def set_sqlite_busy_timeout(milliseconds: int = BUSY_TIMEOUT_MS) -> bool:
    """How long each SQLite connection of this process's Flower states waits for a lock
    (module docstring); False, and Flower's 5 s, where the installed Flower is not the one
    this was written for. Call before the states connect."""
    import flwr.supercore.sql_mixin as mixin
    from flwr.common import log

    found, which = sqlite_pragmas_found()
    if not found:
        log(WARNING, "fedfill: %s: the SuperLink's SQLite state keeps Flower's %d ms busy timeout", which,
            FLOWER_BUSY_TIMEOUT_MS)
        return False
    mixin.SQLITE_PRAGMAS = tuple((name, str(milliseconds) if name == "busy_timeout" else value)
                                 for name, value in mixin.SQLITE_PRAGMAS)
    log(INFO, "fedfill: SQLite busy timeout %d ms (Flower's: %d ms)", milliseconds, FLOWER_BUSY_TIMEOUT_MS)
    return True


def run_superlink(flower_args: list[str], *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> int:
    """Flower's flower-superlink, in this process, with `flower_args` and the busy timeout."""
    if busy_timeout_ms:
        set_sqlite_busy_timeout(busy_timeout_ms)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()
    return 0
