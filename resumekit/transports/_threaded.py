"""What the two real transports' ends share: threads block so that the event loop never does.

Each end runs daemon threads that wait on the network and hand what they got to
the event loop through a deque (appends and pops need no lock); a loop with
nothing to do may block in :meth:`ThreadedEnd.wait` instead of sleeping. An end
is one role: :class:`ThreadedReceiverEnd` (posts rounds, hands over statuses, and
declares the peer lost once nothing more can land in a block) or
:class:`ThreadedSenderEnd` (hands over posts). The backends add their threads,
their wire and what a loss means for their memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

from resumekit._check import as_seconds, as_wait_seconds
from resumekit.protocol.messages import PeerLost, Post, Status

DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 86_400.0  # a day: longer would overflow gloo's millisecond timeout

Role = Literal["receiver", "sender"]


def check_timeout(value: object, name: str = "timeout") -> float:
    """``value`` as a peer-lost timeout: seconds in ``(0, MAX_TIMEOUT]``."""
    return as_seconds(value, name, maximum=MAX_TIMEOUT)


# -- what the threads hand the event loop ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection broke or went silent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Arrived:
    """(receiver) A status about round ``key`` came in."""

    key: Any
    status: Status


@dataclass(frozen=True, slots=True)
class PostArrived:
    """(sender) A post or cancel came in."""

    post: Post


@dataclass(frozen=True, slots=True)
class Closed:
    """The other end said it is done (close to the sender, bye to the receiver)."""


class ThreadedEnd:
    """One end whose threads do the waiting; its event-loop calls never block."""

    role: ClassVar[Role]

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.closed = False
        self.finished = False  # (sender) the receiver said close, or is gone
        self.peer_lost: str | None = None
        self.posted = 0
        self.delivered = 0
        self._inbox: deque[Any] = deque()
        self._wake = threading.Event()  # set when a thread delivers; only wait() clears it
        self._closing = False  # threads stop at their next chance
        self._threads: list[threading.Thread] = []

    # -- what each backend provides ------------------------------------------------------

    def check_request_id(self, rid: Hashable) -> None:
        """Refuse an id the wire cannot carry, before any block is taken for it."""
        raise NotImplementedError

    def _stop_threads(self) -> None:
        """Make every thread leave its loop at its next chance."""
        self._closing = True

    def _drain(self, deadline: float) -> None:
        """(shutdown) Wait until what this end sent has gone out, or ``deadline``."""

    def _closed(self) -> None:
        """(close) The threads are out, or the wait ran out: release what this end holds."""

    def _say_goodbye(self) -> None:
        """What this end sends when it shuts down cleanly."""

    def _losing(self) -> bool:
        """Whether the peer is being declared lost (only a receiver end declares it)."""
        return False

    # -- shared ----------------------------------------------------------------------------

    def _deliver(self, item: object) -> None:
        """(thread) Hand ``item`` to the event loop and wake a loop inside :meth:`wait`."""
        self._inbox.append(item)
        self._wake.set()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the threads have delivered something.

        For a loop with nothing else to do, instead of sleeping: it wakes as soon
        as a message, a landed payload or a broken connection arrives, and costs
        no CPU meanwhile. Returns whether something is waiting (a lost peer
        counts once every thread has stopped). Polls never call this.
        """
        timeout = as_wait_seconds(timeout, "timeout")
        if self._losing() and not self.closed:
            # Losing the peer: PeerLost is due once the threads are out, so wait for
            # them, not for the inbox.
            limit = time.monotonic() + timeout
            for t in self._threads:
                t.join(max(0.0, limit - time.monotonic()))
            return not self._threads_alive()
        if self._inbox:
            return True
        self._wake.clear()
        if self._inbox:  # delivered between the check and the clear
            return True
        return self._wake.wait(timeout)

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads if t is not threading.current_thread())

    def shutdown(self, timeout: float = 10.0) -> None:
        """End cleanly: the receiver says close, the sender answers bye, then both close."""
        timeout = as_wait_seconds(timeout, "timeout")
        deadline = time.monotonic() + timeout
        self._say_goodbye()
        self._threads[1].join(max(0.0, deadline - time.monotonic()))  # the control thread
        self._drain(deadline)
        self.close(wait=max(0.0, deadline - time.monotonic()))

    def close(self, wait: float | None = None) -> None:
        """Stop the threads (waiting at most ``wait``, default the timeout and a second),
        then release what this end holds; never hangs."""
        if wait is not None:
            wait = as_wait_seconds(wait, "wait")
        if self.closed:
            return
        self._stop_threads()
        limit = self.timeout + 1.0 if wait is None else wait
        deadline = time.monotonic() + limit
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._closed()


class ThreadedReceiverEnd(ThreadedEnd):
    """The receiver's role: declares the peer lost, and only once nothing more can land."""

    role: ClassVar[Role] = "receiver"

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self._lost_reason: str | None = None
        self._next_check = 0.0

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers bye and stops."""
        raise NotImplementedError

    def _say_goodbye(self) -> None:
        if not self._closing:
            self.finish()

    def _losing(self) -> bool:
        return self._lost_reason is not None

    def _begin_losing(self, reason: str) -> None:
        """Stop the threads; PeerLost goes out once none can still write into a block."""
        self._lost_reason = reason
        self._stop_threads()

    def _lost_now(self) -> bool:
        """(event loop) Whether the threads are out, so that the loss can be reported:
        the backend releases what a peer could still write into, then says yes."""
        raise NotImplementedError

    def _report_lost(self) -> Sequence[Status]:
        """``[PeerLost]`` once nothing more can land in a block; nothing before that."""
        if not self._lost_now():
            return ()
        self.peer_lost = self._lost_reason
        self.delivered += 1
        return [PeerLost(self._lost_reason or "peer lost")]

    def _check_progress(self, now: float, rounds: Iterable[tuple[Any, float]]) -> None:
        """Declare the peer lost when a posted round (``(key, last progress)``) has made
        no progress for the timeout; looks at most every quarter timeout (or second)."""
        if now < self._next_check or self._lost_reason is not None:
            return
        self._next_check = now + min(1.0, self.timeout / 4)
        for (rid, _, epoch), progress in rounds:
            if now - progress > self.timeout:
                self._begin_losing(
                    f"round {epoch} of request {rid} made no progress for {self.timeout:g} s"
                )
                return


class ThreadedSenderEnd(ThreadedEnd):
    """The sender's role: hands over the posts and cancels its threads read, in order."""

    role: ClassVar[Role] = "sender"

    def poll_posts(self) -> Sequence[Post]:
        inbox = self._inbox
        if not inbox:
            return ()
        out: list[Post] = []
        while inbox:
            item = inbox.popleft()
            kind = type(item)
            if kind is PostArrived:
                out.append(item.post)
            elif kind is Closed:
                self.finished = True
            elif kind is Lost:
                self.peer_lost = item.reason
                self.finished = True
        return out
