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
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


class TimedGrid(Grid):
    """Delegates to `grid`; `send_and_receive` polls every `poll_s` and times each reply."""

    def __init__(self, grid: Grid, poll_s: float = 0.1):
        self.grid = grid
        self.poll_s = poll_s
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
        passed (None: no limit), as Flower's Grid does with its 3 s sleep."""
        waiting = {message_id for message_id in self.push_messages(messages) if message_id}  # "" or None: not pushed
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.grid.pull_messages(waiting))
            self._stamp(pulled)
            replies.extend(pulled)
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            time.sleep(self.poll_s if left is None else min(self.poll_s, left))
        return replies

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
