"""The protocol across two processes over ``torch.distributed`` point-to-point messages.

One receiver rank and one sender rank. Control messages are small int64
tensors with tags on a gloo group; each round's payload goes straight into the
receiver's blocks of :class:`~resumekit.allocator.BlockBuffers` (one receive per
run of adjacent blocks and tensor, under a tag of its own), on the same group,
or on ``data_group`` (NCCL) when the buffers are on CUDA. The wire format is in
:mod:`~resumekit.statemachine.wire`; the two ends in
:mod:`~resumekit.statemachine.torch_receiver` and
:mod:`~resumekit.statemachine.torch_sender`; this module is what they share.

gloo completes a point-to-point operation only inside ``wait()``, so each end
runs daemon threads that block in ``wait()`` and hand what completed to the
event loop through a deque: the loop itself never blocks, locks or waits.
Each end sends a heartbeat every quarter ``timeout``, and every wait is
bounded by ``timeout``, so only a dead peer (the wait fails at once) or a
silent one (it times out) ends a wait early; a round with no progress for
``timeout`` is declared lost too. The transport then stops its threads and
reports :class:`PeerLost` only once none of them can still be inside a wait,
after destroying a group it owns: nothing more can land in any block.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import torch
import torch.distributed as dist

from resumekit._check import as_int, check_bool
from resumekit.allocator.buffers import BlockBuffers
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.statemachine.messages import (
    Cancelled,
    Landed,
    Post,
    RoundPost,
    SenderError,
    Status,
)
from resumekit.statemachine.wire import PING, Key, header, runs, why, wire_rid

if TYPE_CHECKING:
    from resumekit.allocator.buffers import EmbeddingTensors

DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 86_400.0  # a day: longer would overflow gloo's millisecond timeout

Role = Literal["receiver", "sender"]
Match = Literal["tag", "order"]  # how a payload's receives find their sends


# -- what the threads hand the event loop ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lost:
    """The connection broke or went silent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Announced:
    """(receiver) The sender announced round ``key``'s payload: it is arriving."""

    key: Key


@dataclass(frozen=True, slots=True)
class PayloadLanded:
    """(receiver) Every receive of round ``key``'s payload completed."""

    key: Key


@dataclass(frozen=True, slots=True)
class Arrived:
    """(receiver) A status about round ``key`` came in."""

    key: Key
    status: Status


@dataclass(frozen=True, slots=True)
class PostArrived:
    """(sender) A post or cancel came in."""

    post: Post


@dataclass(frozen=True, slots=True)
class Closed:
    """The other end said it is done (CLOSE to the sender, BYE to the receiver)."""


Delivery = Lost | Announced | PayloadLanded | Arrived | PostArrived | Closed


class TorchDistributedTransport:
    """One end of the protocol over ``torch.distributed``; ``role`` says which.

    ``peer`` is the other end's global rank; ``group`` carries control messages
    (the default group if ``None``); ``data_group`` carries payloads (give an
    NCCL group when the buffers are on CUDA); the receiver end needs the
    ``buffers`` its rounds land in. Request ids must be int64s. ``owns_group``:
    :meth:`close` destroys the default process group. ``match``: ``"tag"`` (the
    default on gloo) gives each round's payload a tag of its own and posts its
    receives with the round; ``"order"`` (the default otherwise: NCCL has no
    tags) posts them when the sender announces the payload, in the order it
    sends; both ends must agree. Call it from one event loop; its threads wait
    on transfers and post the receives that the messages they read announce.

    ``TorchDistributedTransport("receiver", ...)`` is a
    :class:`~resumekit.statemachine.torch_receiver.TorchReceiverEnd`, ``"sender"``
    a :class:`~resumekit.statemachine.torch_sender.TorchSenderEnd`; a call that
    belongs to the other end raises :class:`TransportError`.
    """

    role: ClassVar[Role]
    _ends: ClassVar[dict[str, type[TorchDistributedTransport]]] = {}
    _control_tag: ClassVar[int]  # the tag this end reads headers on
    _heartbeat_tag: ClassVar[int]  # the tag the other end reads headers on

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "role" in cls.__dict__:
            TorchDistributedTransport._ends.setdefault(cls.role, cls)

    def __new__(cls, role: Role, *args: Any, **kwargs: Any) -> TorchDistributedTransport:
        end = cls
        if cls is TorchDistributedTransport:
            # The ends import this module, so they are imported (and registered) here.
            import resumekit.statemachine.torch_receiver  # noqa: PLC0415
            import resumekit.statemachine.torch_sender  # noqa: F401, PLC0415

            try:
                end = TorchDistributedTransport._ends[role]
            except (KeyError, TypeError):
                raise InvalidArgumentError(
                    f"role must be 'receiver' or 'sender', not {role!r}"
                ) from None
        return super().__new__(end)

    def __init__(
        self,
        role: Role,
        peer: int,
        *,
        buffers: BlockBuffers | None = None,
        group: dist.ProcessGroup | None = None,
        data_group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        aux_size: int = 16,
        owns_group: bool = False,
        match: Match | None = None,
    ) -> None:
        if role != self.role:
            raise InvalidArgumentError(f"role must be {self.role!r} for {type(self).__name__}")
        peer, timeout, aux_size = _check_arguments(
            role, peer, buffers, group, data_group, timeout, aux_size, owns_group, match
        )
        if not dist.is_available() or not dist.is_initialized():
            raise TransportError("torch.distributed is not initialised")
        data = data_group if data_group is not None else group
        backend = dist.get_backend(data)
        if buffers is not None and (buffers.device.type == "cuda") != (backend == "nccl"):
            raise InvalidArgumentError(
                f"{buffers.device.type} buffers cannot take payloads over {backend}: CUDA "
                "buffers need an NCCL data_group, CPU buffers a gloo one"
            )
        if peer >= dist.get_world_size() or peer == dist.get_rank():
            raise InvalidArgumentError(
                f"peer must be another rank of the {dist.get_world_size()}, got {peer} "
                f"(this is rank {dist.get_rank()})"
            )
        self.peer = peer
        self.buffers = buffers
        self.group = group
        self.data_group = data
        self.timeout = timeout
        self.aux_size = buffers.aux_size if buffers is not None else aux_size
        self.owns_group = owns_group
        self.closed = False
        self.finished = False  # (sender) the receiver said CLOSE, or is gone
        self.peer_lost: str | None = None
        self.posted = 0
        self.delivered = 0
        # What the threads completed, for the event loop: appends and pops need no lock.
        self._inbox: deque[Delivery] = deque()
        self._wake = threading.Event()  # set when a thread delivers; only wait() clears it
        self._sends: queue.SimpleQueue[tuple[Any, torch.Tensor] | None] = queue.SimpleQueue()
        self._queued = 0  # sends posted by the event loop (only it writes this)
        self._queued_by_thread = 0  # heartbeats (only the send thread writes this)
        self._completed = 0  # sends completed (only the send thread writes this)
        self._closing = False  # threads stop at their next chance
        self._wait_limit = timedelta(seconds=self.timeout)
        # gloo matches by tag, so a round whose size is known is received into its
        # blocks as soon as it is posted; NCCL matches by order and has no tags.
        self.match: Match = match or ("tag" if backend == "gloo" else "order")
        self._nccl = backend == "nccl"
        self._tagged = self.match == "tag"
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"resumekit-{role}-send", daemon=True),
            threading.Thread(
                target=self._control_loop, name=f"resumekit-{role}-control", daemon=True
            ),
            *self._more_threads(),
        ]
        for t in self._threads:
            t.start()

    # -- what each end provides ----------------------------------------------------------

    def _more_threads(self) -> list[threading.Thread]:
        """Threads this end needs beside the send and control loops."""
        return []

    def _on_header(self, h: tuple[int, ...]) -> bool:
        """(control thread) One header from the peer; ``False`` ends the loop."""
        raise NotImplementedError

    def _stop_threads(self) -> None:
        """Make every thread leave its loop at its next chance."""
        self._closing = True
        self._sends.put(None)

    # -- the other end's calls -----------------------------------------------------------

    def _belongs_to(self, role: Role) -> TransportError:
        return TransportError(f"this is the {self.role} end; that call belongs to the {role}")

    def post_round(self, post: RoundPost) -> None:
        raise self._belongs_to("receiver")

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        raise self._belongs_to("receiver")

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers BYE and exits."""
        raise self._belongs_to("receiver")

    def poll_statuses(self) -> Sequence[Status]:
        raise self._belongs_to("receiver")

    def poll_posts(self) -> Sequence[Post]:
        raise self._belongs_to("sender")

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        raise self._belongs_to("sender")

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        raise self._belongs_to("sender")

    # -- plumbing ------------------------------------------------------------------------

    def _send(self, tensor: torch.Tensor, tag: int, group: Any = None) -> None:
        if group is not None and group is not self.group and not self._tagged:
            tag = 0
        work = dist.isend(tensor, dst=self.peer, group=group or self.group, tag=tag)
        self._queued += 1
        self._sends.put((work, tensor))  # the tensor stays alive until the send completes

    def _recv(self, tensor: torch.Tensor, tag: int, group: Any = None) -> Any:
        if group is not None and group is not self.group and not self._tagged:
            tag = 0
        return dist.irecv(tensor, src=self.peer, group=group or self.group, tag=tag)

    def _send_header(self, tag: int, *values: int) -> None:
        self._send(header(*values), tag)

    def _wait(self, work: Any, cuda: bool = False) -> None:
        """Block until ``work`` completes; raise if that takes longer than the timeout.

        A healthy peer sends a heartbeat every quarter timeout, so only a silent
        or dead one makes a wait fail (and gloo then closes the connection).
        """
        if cuda:  # NCCL: wait() only orders streams; the data is there once completed
            deadline = time.monotonic() + self.timeout
            while not work.is_completed():
                if time.monotonic() > deadline:
                    raise TransportError(f"no progress for {self.timeout:g} s")
                time.sleep(0.0001)
        else:
            work.wait(self._wait_limit)

    def _deliver(self, item: Delivery) -> None:
        """(thread) Hand ``item`` to the event loop and wake a loop inside :meth:`wait`."""
        self._inbox.append(item)
        self._wake.set()

    def check_request_id(self, rid: object) -> None:
        """Refuse an id this transport cannot carry (it sends int64s), before any block is taken."""
        wire_rid(rid)

    def _losing(self) -> bool:
        """Whether the peer is being declared lost (only the receiver end declares it)."""
        return False

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the threads have delivered something.

        For a loop with nothing else to do, instead of sleeping: it wakes as soon
        as a message, a landed payload or a broken connection arrives, and costs
        no CPU meanwhile. Returns whether something is waiting (a lost peer
        counts once every thread has stopped). Polls never call this.
        """
        timeout = _wait_seconds(timeout, "timeout")
        if self._losing() and not self.closed:
            # Losing the peer: PeerLost is due once the threads are out (what is left
            # in the inbox is dropped then), so wait for them, not for the inbox.
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

    def _lost(self, error: BaseException, key: Key | None = None) -> None:
        """(thread) Report a broken or silent connection, unless closing anyway."""
        if self._closing:
            return
        text = why(error)
        if "timeout" in text.lower() or "timed out" in text.lower():
            what = "the peer" if key is None else f"round {key[2]} of request {key[0]}"
            self._deliver(Lost(f"{what} made no progress for {self.timeout:g} s"))
        else:
            self._deliver(Lost(f"connection lost: {text}"))

    def _send_loop(self) -> None:
        ping = header(PING)
        while not self._closing:
            try:
                item = self._sends.get(timeout=self.timeout / 4)
            except queue.Empty:
                work = dist.isend(ping, dst=self.peer, group=self.group, tag=self._heartbeat_tag)
                item = (work, ping)
                self._queued_by_thread += 1
            if item is None:
                return
            work, tensor = item
            try:
                self._wait(work, tensor.is_cuda)
            except Exception as error:  # the peer is gone or silent
                self._lost(error)
                return
            self._completed += 1

    def _control_loop(self) -> None:
        try:
            while not self._closing:
                h = torch.zeros_like(header())
                self._wait(self._recv(h, self._control_tag))
                values = tuple(int(v) for v in h.tolist())
                if values[0] != PING and not self._on_header(values):
                    return
        except Exception as error:
            self._lost(error)

    def pending_sends(self) -> int:
        """Sends not yet completed; a clean shutdown waits for zero."""
        return self._queued + self._queued_by_thread - self._completed

    def shutdown(self, timeout: float = 10.0) -> None:
        """End cleanly: the receiver says CLOSE, the sender answers BYE, sends drain, then close."""
        timeout = _wait_seconds(timeout, "timeout")
        deadline = time.monotonic() + timeout
        self._say_goodbye()
        self._threads[1].join(max(0.0, deadline - time.monotonic()))
        while self.pending_sends() and time.monotonic() < deadline and not self._closing:
            time.sleep(0.0005)
        self.close(wait=max(0.0, deadline - time.monotonic()))

    def _say_goodbye(self) -> None:
        """What this end sends when it shuts down cleanly."""

    def close(self, wait: float | None = None) -> None:
        """Stop the threads, then, if this end owns the group, destroy it: nothing more arrives.

        Waits for the threads first (a wait ends within the timeout, heartbeat or
        not): destroying a group while a thread is inside ``wait()`` aborts the
        process.
        """
        if wait is not None:
            wait = _wait_seconds(wait, "wait")
        if self.closed:
            return
        self._stop_threads()
        limit = self.timeout + 1.0 if wait is None else wait
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(limit)
        self.closed = True
        if self.owns_group and dist.is_initialized() and not self._threads_alive():
            dist.destroy_process_group()

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads if t is not threading.current_thread())


# -- argument checks ------------------------------------------------------------------


def _wait_seconds(value: object, name: str) -> float:
    """``value`` as a finite number of seconds >= 0 (how long to block)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds, not {type(value).__name__}"
        )
    if not 0 <= value < float("inf"):
        raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _seconds(value: object, name: str) -> float:
    """``value`` as a finite, positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds, not {type(value).__name__}"
        )
    seconds = float(value)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidArgumentError(
            f"{name} must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value!r}"
        )
    return seconds


def _check_arguments(
    role: Role,
    peer: object,
    buffers: object,
    group: object,
    data_group: object,
    timeout: object,
    aux_size: object,
    owns_group: object,
    match: object,
) -> tuple[int, float, int]:
    """The constructor's checks that need no process group: peer, timeout and aux_size."""
    peer_rank = as_int(peer, "peer", minimum=0)
    if buffers is None:
        if role == "receiver":
            raise InvalidArgumentError(
                "buffers: the receiver end needs the BlockBuffers rounds land in"
            )
    elif not isinstance(buffers, BlockBuffers):
        raise InvalidArgumentError(
            f"buffers must be a BlockBuffers or None, not {type(buffers).__name__}"
        )
    seconds = _seconds(timeout, "timeout")
    aux = as_int(aux_size, "aux_size", minimum=2, maximum=1 << 16)
    check_bool(owns_group, "owns_group")
    if match not in (None, "tag", "order"):
        raise InvalidArgumentError(f"match must be 'tag', 'order' or None, not {match!r}")
    for name, g in (("group", group), ("data_group", data_group)):
        if g is not None and not isinstance(g, dist.ProcessGroup):
            raise InvalidArgumentError(
                f"{name} must be a torch.distributed ProcessGroup or None, not {type(g).__name__}"
            )
    return peer_rank, seconds, aux


__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "Match", "Role", "TorchDistributedTransport", "runs"]
