"""Both ends in one process: a transport that tests and the checkers play the adversary on.

Posts (receiver to sender) travel in order. Statuses (sender to receiver) may
be delayed, duplicated and reordered by the hooks of :class:`InProcessTransport`;
they are never lost while the sender lives (a lost status is a dead peer, which
the transport reports as :class:`PeerLost`). It is the one backend that is both
roles at once: the link itself, with each role's calls implemented for real.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Hashable, Sequence

from resumekit._check import as_int, check_hashable, check_str
from resumekit.allocator.buffers import BlockBuffers, EmbeddingTensors
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.protocol.messages import (
    Cancelled,
    Landed,
    PeerBack,
    PeerLost,
    Post,
    RoundPost,
    SenderError,
    Status,
    require_cancel,
    require_post,
    require_status,
)

_EMPTY: tuple[Status, ...] = ()
_EVENTS = (PeerLost, PeerBack)


StatusFilter = Callable[[list[Status]], tuple[list[Status], list[Status]]]


class InProcessTransport:
    """Both ends in one process over shared :class:`BlockBuffers`, driven step by step.

    Adversary hooks act on the statuses in flight (``in_flight``): ``hold`` /
    ``release`` delay them, ``duplicate`` and ``shuffle`` rearrange
    them, ``inject`` forges one, ``crash_sender`` kills the sender (optionally
    right after its next write, before it reports), ``restart_sender`` kills it
    and connects a fresh one once the receiver has seen the loss, and
    ``adversary`` may split every batch into what is delivered now and what
    stays in flight.
    """

    def __init__(self, buffers: BlockBuffers) -> None:
        if not isinstance(buffers, BlockBuffers):
            raise InvalidArgumentError(
                f"buffers must be a BlockBuffers, not {type(buffers).__name__}"
            )
        self.buffers = buffers
        self.posts: deque[Post] = deque()
        self.in_flight: list[Status] = []
        self.held = False
        self.sender_alive = True
        self.crash_after_next_write = False
        self.adversary: StatusFilter | None = None
        self.restarting = False  # a restart waits for the receiver to see the loss
        self.loss_seen = False  # ... and to have handled it (the poll after)
        self.posted = 0
        self.delivered = 0

    def check_request_id(self, rid: Hashable) -> None:
        """Any hashable id travels in process."""
        check_hashable(rid, "rid")

    # -- receiver end ----------------------------------------------------------

    def post_round(self, post: RoundPost) -> None:
        require_post(post)
        if not self.sender_alive:
            return  # to a dead sender: PeerLost is (about to be) reported; nothing is kept
        self.posted += 1
        self.posts.append(post)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        cancel = require_cancel(rid, epoch, incarnation)
        if self.sender_alive:
            self.posts.append(cancel)

    def poll_statuses(self) -> Sequence[Status]:
        if self.loss_seen:
            # The receiver has handled the loss: what it posted meanwhile went to the
            # dead sender; the new sender's connection is up from here on.
            self.loss_seen = False
            self.posts.clear()
            self.sender_alive = True
            self.in_flight.append(PeerBack("a new sender is connected"))
        if not self.in_flight or self.held:
            return _EMPTY
        batch = self.in_flight
        if self.adversary is None:
            self.in_flight = []
        else:
            batch, self.in_flight = self.adversary(batch)
        self.delivered += len(batch)
        if self.restarting and any(type(st) is PeerLost for st in batch):
            self.restarting = False
            self.loss_seen = True  # the switch happens at the next poll
        return batch

    # -- sender end ------------------------------------------------------------

    def poll_posts(self) -> Sequence[Post]:
        if not self.posts or not self.sender_alive:
            return ()
        batch = list(self.posts)
        self.posts.clear()
        return batch

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        require_post(post)
        if not isinstance(data, EmbeddingTensors):
            raise InvalidArgumentError(
                f"data must be an EmbeddingTensors, not {type(data).__name__}"
            )
        if not self.sender_alive:
            return
        if post.allocation is None:
            raise TransportError("an in-process round post must carry its allocation")
        self.buffers.write(post.allocation, data.embeddings, data.fill_ids, data.mrope, aux=aux)
        if self.crash_after_next_write:
            self.crash_sender("sender crashed after writing a round")

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        require_status(status)
        if self.sender_alive:
            self.in_flight.append(status)

    # -- adversary -------------------------------------------------------------

    def hold(self) -> None:
        """Deliver nothing until :meth:`release`."""
        self.held = True

    def release(self) -> None:
        self.held = False

    def duplicate(self, index: int = -1) -> None:
        """Send the status at ``index`` of ``in_flight`` twice (a connection event cannot be)."""
        status = self._at(as_int(index, "index"))
        if type(status) is PeerLost or type(status) is PeerBack:
            raise InvalidArgumentError(f"{type(status).__name__} is reported once, not duplicated")
        self.in_flight.append(status)

    def shuffle(self, rng: random.Random) -> None:
        """Shuffle ``in_flight``; connection events keep their order."""
        if not isinstance(rng, random.Random):
            raise InvalidArgumentError(f"rng must be a random.Random, not {type(rng).__name__}")
        events = [s for s in self.in_flight if type(s) in _EVENTS]
        rng.shuffle(self.in_flight)
        self._restore(events)

    def _restore(self, events: list[Status]) -> None:
        if len(events) > 1:
            slots = [i for i, s in enumerate(self.in_flight) if type(s) in _EVENTS]
            for i, event in zip(slots, events, strict=True):
                self.in_flight[i] = event

    def inject(self, status: Status) -> None:
        """Deliver a status the sender never sent (to test the receiver's checks)."""
        self.in_flight.append(status)

    def crash_sender(self, reason: str = "sender crashed") -> None:
        """The sender dies: it processes nothing more; statuses already sent still arrive."""
        check_str(reason, "reason")
        if not self.sender_alive:
            return
        self.sender_alive = False
        self.crash_after_next_write = False
        self.posts.clear()
        self.in_flight.append(PeerLost(reason))

    def restart_sender(self, reason: str = "sender restarted") -> None:
        """The sender dies and a fresh one (that knows nothing) takes its place.

        The receiver gets :class:`PeerLost`, then :class:`PeerBack`; posts made
        before it saw the loss went to the dead sender. The engine makes the new
        :class:`~resumekit.protocol.EmbeddingSender` on this transport.
        """
        check_str(reason, "reason")
        if not self.sender_alive:
            return
        self.crash_sender(reason)
        self.restarting = True

    def _at(self, index: int) -> Status:
        try:
            return self.in_flight[index]
        except IndexError:
            raise InvalidArgumentError(
                f"no status at index {index}; {len(self.in_flight)} in flight"
            ) from None
