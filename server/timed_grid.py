"""A Grid that polls for replies quickly and remembers when each message was pushed and each
reply pulled.

Flower's Grid.send_and_receive pushes the messages, then pulls the replies every 3 s, so a
round ends up to 3 s after its last reply came, and a reply's arrival is known only to
within 3 s. TimedGrid wraps the ServerApp's grid: every method goes to the wrapped grid,
except send_and_receive, which pulls every `poll_s` (0.1 s by default) and stamps each reply
with the wall-clock time its pull returned.

Measured upload seconds of a reply = the time its pull returned - `reply.metadata.created_at`,
the time the ClientApp built the reply (after training and quantizing). The figure therefore
includes, besides the upload itself, the hand-off from the ClientApp to its SuperNode (which
checks for finished replies every 0.5 s), the SuperLink's store, up to one poll interval and
the ServerApp's own pull of the reply from the SuperLink. The two times come from two
processes' clocks: it is meaningful when they are the same host's clock (the loopback
deployment engine) or NTP-synchronised hosts (the container testbed, whose containers share
the host's clock); a skew between the hosts adds to it one for one. Measured on the loopback
deployment engine (2 cores, load 5-12, no shaping), a 388 KB reply took 1.2-4.9 s this way:
Flower's hand-offs set that floor, and a link shaped to the plan's rate adds its T_com on top.

The cost of the short poll is the SuperLink's: each pull is a request and a database query
(measured: about 10 s more SuperLink CPU and 3 s more ServerApp CPU per 100 s of waiting).
`poll_s` trades it against the measurement's resolution. Two floats and a node id per
message are kept.

Replies apart. Flower's HttpGrid.pull_messages asks the SuperLink for the waiting replies in
one request (which hands each reply over once and forgets it), then pulls the objects of each
reply in turn; a reply whose sender died mid-upload has objects that never arrive, and Flower
retries them until the sender's object-push session expires (180 s), while every reply after
it in that pull waits. Measured on the 5-node testbed: a round with a node killed mid-upload
took 186 s against 9 s. Here (for the HttpGrid of flwr FLOWER_VERSION, whose pull_messages
this splits in two: `reply_split_found`) one request still asks for every waiting reply, but
each reply handed over has its objects pulled in a thread of its own, so a stuck one holds no
other. A reply whose objects are still being pulled after `liveness_s` is abandoned once its
node is no longer online (the SuperLink marks a node offline when its heartbeats stop for
twice its interval: 20 s with the 10 s interval `fedfill supernode` sets), and its place
taken by an error reply saying the node went offline mid-upload (and how many of its objects
had come); a grace after the others were in was the other candidate, but it would also cut
a healthy slow upload, which a live node's heartbeats keep apart from a dead one. A node that
dies before its reply reaches the SuperLink is answered by the SuperLink itself with Flower's
node-unavailable error, once its heartbeats lapse; its reason is rewritten here to say so.
Either way the round closes on the others: measured on the loopback deployment engine (5
nodes, 2 cores, `--kill-at`, docs/running.md#faults), a round with a node killed mid-upload
took 17.9 s against 183.3 s before, one killed in training 17.8 s against 46.2 s (rounds
without a kill: 2-5 s). Any other grid, or another Flower version, is pulled with its own
pull_messages, as before (a warning says so).
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from collections.abc import Iterable
from importlib.metadata import version
from logging import WARNING

from flwr.app import Error, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

FLOWER_VERSION = "1.41.0"  # the flwr whose HttpGrid.pull_messages `_SplitPull` splits in two
# sha256 of inspect.getsource(HttpGrid.pull_messages) in flwr 1.41.0: any change to the method
# this re-states turns the split off (tests/test_replies_apart.py fails on it)
PULL_MESSAGES_SHA256 = "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83"
MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE = 3, 5  # flwr.common.constant.ErrorCode's
OFFLINE_BEFORE_REPLY = ("the node went offline before any of its reply reached the SuperLink: its heartbeats "
                        "stopped before or while it trained")


class TimedGrid(Grid):
    """Delegates to `grid`; `send_and_receive` polls every `poll_s` and times each reply."""

    def __init__(self, grid: Grid, poll_s: float = 0.1, liveness_s: float = 1.0):
        self.grid = grid
        self.poll_s, self.liveness_s = poll_s, liveness_s
        found, which = reply_split_found(grid)
        self._split = _SplitPull(grid) if found else None
        if not found and type(grid).__name__ == "HttpGrid":
            log(WARNING, "fedfill: %s: replies are pulled with Flower's pull_messages, in turn (a reply whose "
                "sender died mid-upload holds the others until its push session expires)", which)
        self._pulled_at: dict[str, float] = {}  # instruction message id -> wall-clock time its reply was pulled
        self._pushed_at: dict[str, float] = {}  # instruction message id -> wall-clock time it was pushed
        self._sent_to: dict[str, int] = {}  # instruction message id -> the node it was sent to

    # ---------------------------------------------------------------- delegated
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        started = time.time()  # a SuperNode may take a message before its objects are all pushed
        message_ids = list(self.grid.push_messages(messages))  # in the messages' order, None where not pushed
        for message, message_id in zip(messages, message_ids):
            if message_id:
                self._pushed_at[message_id] = started
                self._sent_to[message_id] = message.metadata.dst_node_id
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._stamp(replies)
        return replies

    def __getattr__(self, name):  # anything else a concrete grid offers (close, node, ...)
        if name == "grid":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)

    # ---------------------------------------------------------------- timed
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every `poll_s` until every message has a reply or `timeout` seconds
        passed (None: no limit), as Flower's Grid does with its 3 s sleep; each reply's objects
        pulled apart where the grid allows it (module docstring)."""
        waiting = {message_id for message_id in self.push_messages(messages) if message_id}  # "" or None: not pushed
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pulls: dict[str, _ReplyPull] = {}  # handed over by the SuperLink, objects being pulled
        checked = time.monotonic()
        while waiting or pulls:
            if waiting and self._split is not None:
                for proto, tree in self._split.headers(waiting):
                    message_id = proto.metadata.reply_to_message_id
                    waiting.discard(message_id)
                    pulls[message_id] = _ReplyPull(self._split, proto, tree)
            elif waiting:
                pulled = list(self.grid.pull_messages(waiting))
                self._stamp(pulled)
                replies.extend(self._explained(reply) for reply in pulled)
                waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            for message_id, pull in list(pulls.items()):
                if pull.reply is not None:
                    self._pulled_at[message_id] = pull.finished_at
                    replies.append(self._explained(pull.reply))
                    del pulls[message_id]
            now = time.monotonic()
            stuck = [m for m, pull in pulls.items() if now - pull.started > self.liveness_s]
            if stuck and now - checked >= self.liveness_s:
                checked = now
                online = set(self.grid.get_node_ids())
                for message_id in stuck:
                    if self._sent_to.get(message_id) not in online:
                        replies.append(pulls.pop(message_id).abandon(
                            NODE_UNAVAILABLE, "the node went offline mid-upload: its heartbeats stopped with {} "
                            "objects of its reply in"))
            if not (waiting or pulls):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                replies.extend(pull.abandon(MESSAGE_UNAVAILABLE, "its upload was still incomplete at the reply timeout: {} objects "
                                            "of its reply in") for pull in pulls.values())
                break
            time.sleep(self.poll_s if left is None else min(self.poll_s, left))
        return replies

    def _explained(self, reply: Message) -> Message:
        """A reply as pulled, with Flower's node-unavailable error for a node that never
        replied reworded to say what happened (the strategy's drop reason quotes it)."""
        if reply.has_error() and reply.error.code == NODE_UNAVAILABLE and reply.metadata.reply_to_message_id in self._sent_to:
            reply.error = Error(code=NODE_UNAVAILABLE, reason=OFFLINE_BEFORE_REPLY)
        return reply

    def _stamp(self, replies: list[Message]) -> None:
        now = time.time()  # the clock Flower's created_at uses (Unix seconds)
        for reply in replies:
            self._pulled_at[reply.metadata.reply_to_message_id] = now

    def pulled_at(self, reply: Message) -> float | None:
        """Wall-clock time (Unix seconds) the reply was pulled, None for one this grid did not pull."""
        return self._pulled_at.get(reply.metadata.reply_to_message_id)

    def pushed_at(self, reply: Message) -> float | None:
        """Wall-clock time (Unix seconds) the push of the instruction this reply answers began."""
        return self._pushed_at.get(reply.metadata.reply_to_message_id)

    def addressee(self, reply: Message) -> int | None:
        """The node the instruction this reply answers was sent to: for an error the SuperLink
        or the ServerApp's own pull makes in its own name (a node gone, a reply whose objects
        never all arrived), the node it is about."""
        return self._sent_to.get(reply.metadata.reply_to_message_id)

    def upload_seconds(self, reply: Message) -> float | None:
        """Measured upload seconds of a reply (see the module docstring for what it includes),
        None for a reply this grid did not pull."""
        pulled = self.pulled_at(reply)
        return None if pulled is None else pulled - reply.metadata.created_at


def reply_split_found(grid: Grid | None = None) -> tuple[bool, str]:
    """Whether replies can be pulled apart: the installed Flower is FLOWER_VERSION, its
    HttpGrid.pull_messages the one `_SplitPull` re-states (by the hash of its source), and
    `grid` (when given) that HttpGrid."""
    installed = version("flwr")
    if installed != FLOWER_VERSION:
        return False, f"flwr {installed} (the split is written for {FLOWER_VERSION})"
    from flwr.superlink.grid.http_grid import HttpGrid

    digest = hashlib.sha256(inspect.getsource(HttpGrid.pull_messages).encode()).hexdigest()
    if digest != PULL_MESSAGES_SHA256:
        return False, f"flwr {installed}'s HttpGrid.pull_messages is not the one the split re-states"
    if grid is not None and type(grid) is not HttpGrid:
        return False, f"a {type(grid).__name__}, not Flower's HttpGrid"
    return True, f"flwr {installed}"


class _SplitPull:
    """Flower 1.41's HttpGrid.pull_messages in its two halves, on the grid's own connection:
    `headers` asks the SuperLink for the waiting replies (one request; each reply comes once),
    `reply` pulls one reply's objects and confirms it, as that method does, stopping when told."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def headers(self, message_ids: set[str]) -> list:
        import httpx
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=E0611

        try:
            res = self.grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
        except httpx.HTTPStatusError as err:  # Flower logs a payload too large and returns nothing; so here
            if err.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                log(WARNING, "fedfill: the SuperLink refused a pull of %d replies as too large", len(message_ids))
                return []
            raise
        return list(zip(res.messages_list, res.message_object_trees, strict=True))

    def reply(self, proto, tree, stop: threading.Event, progress: list[int]) -> Message:
        """The reply, or Flower's unavailable-objects error reply where its objects cannot all
        be pulled; `progress` counts [objects pulled, objects]; `stop` ends the pull at its
        next try (ObjectPullError, as an object that is gone)."""
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
        from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
        from flwr.supercore.inflatable.inflatable_utils import (ObjectPullError, inflate_object_from_contents,
                                                               pull_objects)

        grid, run_id = self.grid, self.grid.run.run_id
        object_ids = [t.object_id for t in iterate_object_tree(tree)]
        progress[1] = len(object_ids)
        pull_one = make_pull_object_fn_protobuf(pull_object_protobuf=grid._runtime_client.PullObject,
                                                node=grid.node, run_id=run_id)

        def pull_unless_stopped(object_id: str) -> bytes:
            if stop.is_set():
                raise ObjectPullError(object_id, "the ServerApp stopped waiting for it")
            content = pull_one(object_id)
            progress[0] += 1
            return content

        message_id = proto.metadata.message_id
        try:
            contents = pull_objects(object_ids=object_ids, pull_object_fn=pull_unless_stopped)
        except ObjectPullError as err:
            return self.error(proto.metadata.reply_to_message_id, MESSAGE_UNAVAILABLE,  # as Flower's
                              "Reply message objects are unavailable. The sender may not have completed the upload "
                              f"before the object-push session expired. {err}")
        grid._runtime_client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(
            node=grid.node, run_id=run_id, message_object_id=message_id))
        message = inflate_object_from_contents(message_id, contents)
        message.metadata.__dict__["_message_id"] = message_id
        return message

    def error(self, reply_to: str, code: int, reason: str) -> Message:
        """An error reply in the ServerApp's own name, as Flower's pull makes one."""
        from flwr.app import Metadata
        from flwr.app.message import make_message
        from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
        from flwr.supercore.date import now

        node_id = self.grid.node.node_id
        return make_message(metadata=Metadata(run_id=self.grid.run.run_id, message_id="", src_node_id=node_id,
                                              dst_node_id=node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="",
                                              ttl=0, reply_to_message_id=reply_to, created_at=now().timestamp()),
                            error=Error(code=code, reason=reason))


class _ReplyPull:
    """One reply's objects, pulled in a thread of its own (daemon: an abandoned one ends at its
    next try, within Flower's 10 s backoff cap, and holds nothing meanwhile)."""

    def __init__(self, split: _SplitPull, proto, tree):
        self.split, self.reply_to = split, proto.metadata.reply_to_message_id
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.progress = [0, 0]
        self.reply: Message | None = None
        self.finished_at = 0.0
        threading.Thread(target=self._run, args=(proto, tree), daemon=True, name="fedfill-reply-pull").start()

    def _run(self, proto, tree) -> None:
        try:
            reply = self.split.reply(proto, tree, self.stop, self.progress)
        except Exception as err:  # noqa: BLE001 - a failed pull is that reply's error, never the round's
            reply = self.split.error(self.reply_to, 0, f"its reply could not be pulled: {err}")
        self.finished_at = time.time()
        self.reply = reply

    def abandon(self, code: int, reason: str) -> Message:
        """Stop pulling; the error reply that takes its place, `reason` with "{}" as
        "k of n" objects pulled."""
        self.stop.set()
        pulled, total = self.progress
        return self.split.error(self.reply_to, code, reason.format(f"{pulled} of {total}"))
