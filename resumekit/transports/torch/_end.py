"""What both ends over ``torch.distributed`` share: threads, heartbeats, bounded waits.

One receiver rank and one sender rank. Control messages are small int64
tensors with tags on a gloo group; each round's payload goes straight into the
receiver's blocks of :class:`~resumekit.allocator.BlockBuffers` (one receive per
run of adjacent blocks and tensor, under a tag of its own), on the same group,
or on ``data_group`` (NCCL) when the buffers are on CUDA. The wire format is in
:mod:`~resumekit.transports.torch.wire`; the two ends in
:mod:`~resumekit.transports.torch.receiver` and :mod:`~resumekit.transports.torch.sender`.

gloo completes a point-to-point operation only inside ``wait()``, so each end
runs daemon threads that block in ``wait()`` and hand what completed to the
event loop (:class:`~resumekit.transports._threaded.ThreadedEnd`).
Each end sends a heartbeat every quarter ``timeout``, and every wait is
bounded by ``timeout``, so only a dead peer (the wait fails at once) or a
silent one (it times out) ends a wait early; a round with no progress for
``timeout`` is declared lost too. The receiver end then stops its threads and
reports :class:`~resumekit.protocol.messages.PeerLost` only once none of them can
still be inside a wait, after destroying a group it owns: nothing more can land.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from resumekit._check import as_int, check_bool
from resumekit.allocator.buffers import BlockBuffers
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Lost,
    Role,
    ThreadedEnd,
    check_timeout,
)
from resumekit.transports.torch.wire import PING, Key, header, why, wire_rid

Match = Literal["tag", "order"]  # how a payload's receives find their sends


@dataclass(frozen=True, slots=True)
class Announced:
    """(receiver) The sender announced round ``key``'s payload: it is arriving."""

    key: Key


@dataclass(frozen=True, slots=True)
class PayloadLanded:
    """(receiver) Every receive of round ``key``'s payload completed."""

    key: Key


class TorchEnd(ThreadedEnd):
    """What both ends over ``torch.distributed`` share: the send and control threads,
    heartbeats, bounded waits and the group. Made through
    :func:`~resumekit.transports.torch.TorchDistributedTransport`."""

    _control_tag: ClassVar[int]  # the tag this end reads headers on
    _heartbeat_tag: ClassVar[int]  # the tag the other end reads headers on

    def __init__(
        self,
        peer: int,
        *,
        buffers: BlockBuffers | None = None,
        group: dist.ProcessGroup | None = None,
        data_group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        owns_group: bool = False,
        match: Match | None = None,
    ) -> None:
        peer, timeout = _check_arguments(
            self.role, peer, buffers, group, data_group, timeout, owns_group, match
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
        super().__init__(timeout)
        self.peer = peer
        self.buffers = buffers
        self.group = group
        self.data_group = data
        self.owns_group = owns_group
        self._sends: queue.SimpleQueue[tuple[Any, torch.Tensor] | None] = queue.SimpleQueue()
        self._queued = 0  # sends posted by the event loop (only it writes this)
        self._queued_by_thread = 0  # heartbeats (only the send thread writes this)
        self._completed = 0  # sends completed (only the send thread writes this)
        self._wait_limit = timedelta(seconds=self.timeout)
        # gloo matches by tag, so a round whose size is known is received into its
        # blocks as soon as it is posted; NCCL matches by order and has no tags.
        self.match: Match = match or ("tag" if backend == "gloo" else "order")
        self._nccl = backend == "nccl"
        self._tagged = self.match == "tag"
        role = self.role
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
        super()._stop_threads()
        self._sends.put(None)

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

    def check_request_id(self, rid: object) -> None:
        """Refuse an id this transport cannot carry (it sends int64s), before any block is taken."""
        wire_rid(rid)

    def _drain(self, deadline: float) -> None:
        while self.pending_sends() and time.monotonic() < deadline and not self._closing:
            time.sleep(0.0005)

    def _closed(self) -> None:
        self.closed = True
        if self.owns_group and dist.is_initialized() and not self._threads_alive():
            dist.destroy_process_group()

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


# -- argument checks ------------------------------------------------------------------


def _check_arguments(
    role: Role,
    peer: object,
    buffers: object,
    group: object,
    data_group: object,
    timeout: object,
    owns_group: object,
    match: object,
) -> tuple[int, float]:
    """The constructor's checks that need no process group: (peer, timeout)."""
    peer_rank = as_int(peer, "peer", minimum=0)
    if role == "receiver" and not isinstance(buffers, BlockBuffers):
        raise InvalidArgumentError(
            "buffers: the receiver end needs the BlockBuffers rounds land in, not "
            f"{type(buffers).__name__}"
        )
    seconds = check_timeout(timeout)
    check_bool(owns_group, "owns_group")
    if match not in (None, "tag", "order"):
        raise InvalidArgumentError(f"match must be 'tag', 'order' or None, not {match!r}")
    for name, g in (("group", group), ("data_group", data_group)):
        if g is not None and not isinstance(g, dist.ProcessGroup):
            raise InvalidArgumentError(
                f"{name} must be a torch.distributed ProcessGroup or None, not {type(g).__name__}"
            )
    return peer_rank, seconds
