"""Fault injection: a node that holds in a phase of a round until it is killed, so that the
kill of `fedfill run --kill-at NODE:ROUND:PHASE` and `fedfill testbed kill --at PHASE` lands in
that phase on any machine.

On loopback a round's training takes about 0.1 s and a 388 KB upload a few milliseconds: a
kill timed from outside would land between phases. So the node is told (a one-line file named
by FEDFILL_HOLD_FILE: "PHASE ROUND", ROUND a number or "next") and, in that round, holds:

- `train`: the ClientApp's train handler holds at its start (the node pulled the instruction
  and launched the task; nothing of its reply exists);
- `upload`: the ClientApp trains, and the SuperNode pushes its reply (the message and its
  object tree, then objects) but holds after the first object: the SuperLink has the reply
  with objects missing, what a node that died mid-upload leaves behind.

Either way it first logs HOLD_LINE (in the node's log, where the killer looks for it) and
removes the file, so the hold happens once. A hold nobody ends lasts HOLD_MAX_S, then the node
goes on, so a mistaken spec costs a slow round, not a hung run.
"""

from __future__ import annotations

import os
import re
import threading
import time
from logging import WARNING
from pathlib import Path

HOLD_FILE_ENV = "FEDFILL_HOLD_FILE"
PHASES = ("train", "upload")
HOLD_MAX_S = 300.0
#: what a holding node logs; the killer matches it (round, phase)
HOLD_LINE = re.compile(r"fedfill fault: round (\d+): holding in (train|upload) until killed")
_UPLOAD_NOW = "upload-now"  # the ClientApp's word to its SuperNode: this round's reply holds


def write_hold(path: Path, phase: str, server_round: int | str) -> None:
    """Ask the node whose FEDFILL_HOLD_FILE is `path` to hold in `phase` of `server_round`
    (a number, or "next": its next train task)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: one of {', '.join(PHASES)}")
    aside = path.with_name(path.name + ".new")
    aside.write_text(f"{phase} {server_round}\n")
    os.replace(aside, path)  # whole: a node reads it at any moment


def _read() -> tuple[str, str] | None:
    name = os.environ.get(HOLD_FILE_ENV)
    if not name:
        return None
    try:
        words = Path(name).read_text().split()
    except OSError:
        return None
    return (words[0], words[1]) if len(words) == 2 else None


def _clear() -> None:
    try:
        Path(os.environ[HOLD_FILE_ENV]).unlink()
    except (KeyError, OSError):
        pass


def hold(phase: str, server_round: int, detail: str = "") -> None:
    """Log the hold line, forget the request, and wait to be killed (at most HOLD_MAX_S)."""
    from flwr.common import log

    _clear()
    log(WARNING, "fedfill fault: round %d: holding in %s until killed%s", server_round, phase,
        f" ({detail})" if detail else "")
    threading.Event().wait(HOLD_MAX_S)
    log(WARNING, "fedfill fault: round %d: nobody killed the node in %.0f s; going on", server_round, HOLD_MAX_S)


def at_training(server_round: int) -> None:
    """The ClientApp's train handler, at its start: hold here (train), or tell the SuperNode
    that this round's reply holds its upload (upload)."""
    spec = _read()
    if spec is None or spec[1] not in (str(server_round), "next"):
        return
    if spec[0] == "train":
        hold("train", server_round, "the task started, no reply made")
    elif spec[0] == "upload":
        Path(os.environ[HOLD_FILE_ENV]).write_text(f"{_UPLOAD_NOW} {server_round}\n")


def upload_hold_round() -> int | None:
    """The round whose reply the SuperNode is to hold mid-upload, None when none is."""
    spec = _read()
    return int(spec[1]) if spec is not None and spec[0] == _UPLOAD_NOW and spec[1].isdigit() else None


def holding_push_messages(push_messages):
    """Flower's SuperNode `_push_messages(state=, object_store=, send=, push_object=)`, whose
    push of a train reply holds after its first object when the ClientApp asked for it (all of
    a one-object reply's push holds)."""

    def push_messages_or_hold(*, state, object_store, send, push_object):
        reply: dict = {}

        def send_noting(message, object_tree, clientapp_runtime):
            objects, session_id = send(message, object_tree, clientapp_runtime)
            reply.update(train=message.metadata.message_type == "train", objects=len(objects), started=0,
                         lock=threading.Lock())
            return objects, session_id

        def push_object_or_hold(run_id, session_id, object_id, contents):
            if reply.get("train"):
                server_round = upload_hold_round()
                if server_round is not None:
                    with reply["lock"]:
                        reply["started"] += 1
                        through = reply["started"] <= min(1, reply["objects"] - 1)
                    if not through:
                        hold("upload", server_round, f"{min(1, reply['objects'] - 1)} of the reply's "
                                                     f"{reply['objects']} objects pushed")
            return push_object(run_id, session_id, object_id, contents)

        return push_messages(state=state, object_store=object_store, send=send_noting,
                             push_object=push_object_or_hold)

    return push_messages_or_hold


def install_upload_hold() -> bool:
    """Wrap the SuperNode loop's `_push_messages` when FEDFILL_HOLD_FILE is set (the node may
    be asked to hold); False where it is not set."""
    if not os.environ.get(HOLD_FILE_ENV):
        return False
    import flwr.supernode.start_client_internal as loop

    loop._push_messages = holding_push_messages(loop._push_messages)
    return True


def wait_for_hold(log_path: Path, phase: str, server_round: int | None, timeout_s: float,
                  alive=lambda: True, poll_s: float = 0.1) -> str | None:
    """The hold line of `phase` (and `server_round`, None: any) once it is in the log, None
    after `timeout_s` or once `alive()` says the node is gone. Reads what the log grew by."""
    deadline = time.monotonic() + timeout_s
    offset, partial = 0, ""
    while time.monotonic() < deadline and alive():
        try:
            with open(log_path, "rb") as log_file:
                log_file.seek(offset)
                grown = log_file.read()
        except OSError:
            grown = b""
        offset += len(grown)
        text = partial + grown.decode(errors="replace")
        text, _, partial = text.rpartition("\n")  # an unfinished last line waits for its end
        line = find_hold(text, phase, server_round)
        if line:
            return line
        time.sleep(poll_s)
    return None


def find_hold(text: str, phase: str, server_round: int | None) -> str | None:
    for line in text.splitlines():
        found = HOLD_LINE.search(line)
        if found and found[2] == phase and (server_round is None or int(found[1]) == server_round):
            return line.strip()
    return None
