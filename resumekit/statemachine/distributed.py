"""The protocol across two processes over ``torch.distributed`` point-to-point messages.

One receiver rank and one sender rank. Control messages are small int64
tensors with tags on a gloo group; each round's payload goes straight into the
receiver's blocks of :class:`~resumekit.allocator.BlockBuffers` (one receive per
run of adjacent blocks and tensor, under a tag of its own), on the same group,
or on ``data_group`` (NCCL) when the buffers are on CUDA.

gloo completes a point-to-point operation only inside ``wait()``, so each end
runs daemon threads that block in ``wait()`` and hand what completed to the
event loop through a deque: the loop itself never blocks, locks or waits.
Each end sends a heartbeat every quarter ``timeout``, and every wait is
bounded by ``timeout``, so only a dead peer (the wait fails at once) or a
silent one (it times out) ends a wait early; a round with no progress for
``timeout`` is declared lost too. The transport then stops its threads and
reports :class:`PeerLost` only once none of them can still be inside a wait,
after destroying a group it owns: nothing more can land in any block.

Wire format (int64 headers of 10 values; ``inc`` is the request's incarnation):

- receiver to sender (tag 1): POST ``[1, rid, inc, epoch, sent, capacity, n,
  tag, expect]`` with the ``n`` block indices on tag 4; CANCEL ``[2, rid, inc,
  epoch]``; CLOSE ``[3]``; PING ``[4]``.
- sender to receiver (tag 2): DATA ``[10, rid, inc, epoch, tokens, tag]``
  announces a round's payload (on the round's own ``tag``: per run of blocks
  the embeddings, fill ids and three mRoPE rows, then the aux row of the first
  block; when the post says how many tokens to ``expect``, the receiver has
  posted those receives already); LANDED ``[11, rid, inc, epoch, tokens, total,
  final]``; CANCELLED ``[12, rid, inc, epoch]``; SENDER_ERROR ``[13, rid, inc,
  epoch, n]`` with ``n`` bytes of reason on tag 5; BYE ``[14]`` answers CLOSE;
  PING ``[4]``.

A status for a round whose payload is still arriving is held back until the
payload has landed: the receiver may free the blocks on any status.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from resumekit._check import as_int, check_bool
from resumekit.allocator.buffers import MROPE_ROWS, BlockBuffers
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.statemachine.messages import (
    Cancel,
    Cancelled,
    Landed,
    PeerLost,
    Post,
    RoundPost,
    SenderError,
    Status,
)

if TYPE_CHECKING:
    from resumekit.allocator.buffers import EmbeddingTensors

HEADER = 10
# Headers only on 1 and 2 (so heartbeats may interleave); their trailers on tags of their own.
TAG_TO_SENDER, TAG_TO_RECEIVER, TAG_DATA, TAG_BLOCKS, TAG_REASON = 1, 2, 3, 4, 5
FIRST_ROUND_TAG, ROUND_TAGS = 16, 1 << 30  # each round's payload has a tag of its own
POST, CANCEL, CLOSE, PING = 1, 2, 3, 4
DATA, LANDED, CANCELLED, SENDER_ERROR, BYE = 10, 11, 12, 13, 14
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 86_400.0  # a day: longer would overflow gloo's millisecond timeout
_EMPTY: tuple[Any, ...] = ()

Role = Literal["receiver", "sender"]
Match = Literal["tag", "order"]  # how a payload's receives find their sends
Key = tuple[int, int, int]  # (rid, incarnation, epoch)


def runs(blocks: Sequence[int], tokens: int, block_size: int) -> list[tuple[int, int]]:
    """``tokens`` tokens laid over ``blocks`` as (first block, tokens) runs of adjacent blocks."""
    out: list[tuple[int, int]] = []
    left = tokens
    for b in blocks:
        if left <= 0:
            break
        n = min(block_size, left)
        if out and out[-1][1] % block_size == 0 and out[-1][0] + out[-1][1] // block_size == b:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((b, n))
        left -= n
    return out


_INT64 = 1 << 63


def _rid(rid: Hashable) -> int:
    if type(rid) is not int or not -_INT64 <= rid < _INT64:
        raise InvalidArgumentError(
            f"rid must be an int64 over TorchDistributedTransport, not {rid!r}"
        )
    return rid


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


@dataclass
class _Round:
    """A round the receiver posted and has not had answered yet."""

    post: RoundPost
    progress: float
    tag: int = TAG_DATA
    ready: list[Any] | None = None  # receives posted before the payload was announced
    stream: Any = None  # (CUDA) the loop's stream when it posted: receives wait for it
    arriving: bool = False  # its payload is announced and not fully landed
    after: list[Status] = field(default_factory=list)  # statuses held until it has


class TorchDistributedTransport:
    """One end of the protocol over ``torch.distributed``; ``role`` says which.

    ``peer`` is the other end's global rank; ``group`` carries control messages
    (the default group if ``None``); ``data_group`` carries payloads (give an
    NCCL group when the buffers are on CUDA); the receiver end needs the
    ``buffers`` its rounds land in. Request ids must be ints. ``owns_group``:
    :meth:`close` destroys the default process group. ``match``: ``"tag"`` (the
    default on gloo) gives each round's payload a tag of its own and posts its
    receives with the round; ``"order"`` (the default otherwise: NCCL has no
    tags) posts them when the sender announces the payload, in the order it
    sends; both ends must agree. Call it from one event loop; its threads wait
    on transfers and post the receives that the messages they read announce.
    """

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
        if role not in ("receiver", "sender"):
            raise InvalidArgumentError(f"role must be 'receiver' or 'sender', not {role!r}")
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
        self.role = role
        self.peer = peer
        self.buffers = buffers
        self.group = group
        self.data_group = data
        self.timeout = float(timeout)
        self.aux_size = buffers.aux_size if buffers is not None else aux_size
        self.owns_group = owns_group
        self.closed = False
        self.finished = False  # (sender) the receiver said CLOSE, or is gone
        self.peer_lost: str | None = None
        self.posted = 0
        self.delivered = 0
        # What the threads completed, for the event loop: appends and pops need no lock.
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()  # set when a thread delivers; only wait() clears it
        self._sends: queue.SimpleQueue[tuple[Any, torch.Tensor] | None] = queue.SimpleQueue()
        self._queued = 0  # sends posted by the event loop (only it writes this)
        self._queued_by_thread = 0  # heartbeats (only the send thread writes this)
        self._completed = 0  # sends completed (only the send thread writes this)
        self._closing = False  # threads stop at their next chance
        self._lost_reason: str | None = None
        self._wait_limit = timedelta(seconds=self.timeout)
        self._rounds: dict[Key, _Round] = {}
        self._payloads: queue.SimpleQueue[tuple[Key, list[Any]] | None] = queue.SimpleQueue()
        self._next_check = 0.0
        # gloo matches by tag, so a round whose size is known is received into its
        # blocks as soon as it is posted; NCCL matches by order and has no tags.
        self.match: Match = match or ("tag" if backend == "gloo" else "order")
        self._nccl = backend == "nccl"
        self._cuda = buffers is not None and buffers.device.type == "cuda"
        self._tagged = self.match == "tag"
        self._next_tag = FIRST_ROUND_TAG
        self._tags: dict[Key, int] = {}  # (sender) each posted round's payload tag
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"resumekit-{role}-send", daemon=True),
            threading.Thread(
                target=self._control_loop, name=f"resumekit-{role}-control", daemon=True
            ),
        ]
        if role == "receiver":
            self._threads.append(
                threading.Thread(target=self._data_loop, name="resumekit-data", daemon=True)
            )
        for t in self._threads:
            t.start()

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
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        self._send(header, tag)

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

    def _deliver(self, item: tuple[Any, ...]) -> None:
        """(thread) Hand ``item`` to the event loop and wake a loop inside :meth:`wait`."""
        self._inbox.append(item)
        self._wake.set()

    def check_request_id(self, rid: object) -> None:
        """Refuse an id this transport cannot carry (it sends int64s), before any block is taken."""
        _rid(rid)

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the threads have delivered something.

        For a loop with nothing else to do, instead of sleeping: it wakes as soon
        as a message, a landed payload or a broken connection arrives, and costs
        no CPU meanwhile. Returns whether something is waiting (a lost peer
        counts once every thread has stopped). Polls never call this.
        """
        timeout = _wait_seconds(timeout, "timeout")
        if self._lost_reason is not None and not self.closed:
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
        why = _why(error)
        if "timeout" in why.lower() or "timed out" in why.lower():
            what = "the peer" if key is None else f"round {key[2]} of request {key[0]}"
            self._deliver(("lost", f"{what} made no progress for {self.timeout:g} s"))
        else:
            self._deliver(("lost", f"connection lost: {why}"))

    def _send_loop(self) -> None:
        ping = torch.zeros(HEADER, dtype=torch.int64)
        ping[0] = PING
        tag = TAG_TO_SENDER if self.role == "receiver" else TAG_TO_RECEIVER
        while not self._closing:
            try:
                item = self._sends.get(timeout=self.timeout / 4)
            except queue.Empty:
                item = (dist.isend(ping, dst=self.peer, group=self.group, tag=tag), ping)
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
        tag = TAG_TO_RECEIVER if self.role == "receiver" else TAG_TO_SENDER
        handle = self._on_receiver_header if self.role == "receiver" else self._on_sender_header
        try:
            while not self._closing:
                header = torch.zeros(HEADER, dtype=torch.int64)
                self._wait(self._recv(header, tag))
                h = tuple(int(v) for v in header.tolist())
                if h[0] != PING and not handle(h):
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
        if self.role == "receiver" and not self._closing:
            self.finish()
        self._threads[1].join(max(0.0, deadline - time.monotonic()))
        while self.pending_sends() and time.monotonic() < deadline and not self._closing:
            time.sleep(0.0005)
        self.close(wait=max(0.0, deadline - time.monotonic()))

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
        self._closing = True
        self._sends.put(None)
        self._payloads.put(None)
        limit = self.timeout + 1.0 if wait is None else wait
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(limit)
        self.closed = True
        if self.owns_group and dist.is_initialized() and not self._threads_alive():
            dist.destroy_process_group()

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads if t is not threading.current_thread())

    def _require(self, role: Role) -> None:
        if self.role != role:
            raise TransportError(f"this is the {self.role} end; that call belongs to the {role}")

    # -- receiver end --------------------------------------------------------------------

    def post_round(self, post: RoundPost) -> None:
        self._require("receiver")
        if self._closing:
            return  # the peer is gone: PeerLost is (about to be) reported
        rid = _rid(post.rid)
        tag = self._next_tag
        self._next_tag = FIRST_ROUND_TAG + (tag + 1 - FIRST_ROUND_TAG) % ROUND_TAGS
        expect = post.expect_tokens
        ready = None
        if expect is not None and self._tagged:
            ready = self._receive_payload(post, expect, tag)
        # On CUDA the receives are issued by the control thread, on its own current
        # stream; they must wait for the loop's, where the copy-out that emptied
        # these blocks was queued.
        stream = None
        if self._cuda:
            assert self.buffers is not None
            stream = torch.cuda.current_stream(self.buffers.device)
        key = (rid, post.incarnation, post.epoch)
        self._rounds[key] = _Round(post, time.monotonic(), tag, ready, stream)
        self.posted += 1
        self._send_header(
            TAG_TO_SENDER,
            POST,
            rid,
            post.incarnation,
            post.epoch,
            post.sent,
            post.capacity_tokens,
            len(post.blocks),
            tag,
            -1 if expect is None else expect,
        )
        self._send(torch.tensor(post.blocks, dtype=torch.int64), TAG_BLOCKS)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        self._require("receiver")
        if not self._closing:
            self._send_header(TAG_TO_SENDER, CANCEL, _rid(rid), incarnation, epoch)

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers BYE and exits."""
        self._require("receiver")
        if not self._closing:
            self._send_header(TAG_TO_SENDER, CLOSE)

    def poll_statuses(self) -> Sequence[Status]:
        self._require("receiver")
        inbox = self._inbox
        if self._lost_reason is not None:
            return self._report_lost()
        if not inbox and (not self._rounds or time.monotonic() < self._next_check):
            return _EMPTY
        out: list[Status] = []
        now = time.monotonic()
        while inbox:
            item = inbox.popleft()
            kind = item[0]
            if kind == "status":
                self._pass_or_hold(item[1], item[2], now, out)
            elif kind == "announced":
                rnd = self._rounds.get(item[1])
                if rnd is not None:
                    rnd.arriving = True
                    rnd.progress = now
            elif kind == "landed":
                rnd = self._rounds.get(item[1])
                if rnd is not None:
                    rnd.arriving = False
                    rnd.progress = now
                    if rnd.after:
                        del self._rounds[item[1]]
                        out.extend(rnd.after)
            elif kind == "lost":
                self._begin_losing(item[1])
                return self._report_lost()
            elif kind == "bye":
                pass
        if self._rounds and now >= self._next_check:
            self._next_check = now + min(1.0, self.timeout / 4)
            for (rid, _, epoch), rnd in self._rounds.items():
                if now - rnd.progress > self.timeout:
                    self._begin_losing(
                        f"round {epoch} of request {rid} made no progress for {self.timeout:g} s"
                    )
                    return self._report_lost()
        if not out:
            return _EMPTY
        self.delivered += len(out)
        return out

    def _pass_or_hold(self, key: Key, status: Status, now: float, out: list[Status]) -> None:
        rnd = self._rounds.get(key)
        if rnd is None:
            out.append(status)  # no round of ours: the receiver will count it stale
        elif rnd.arriving:
            rnd.after.append(status)
            rnd.progress = now
        else:
            del self._rounds[key]
            out.append(status)

    def _begin_losing(self, reason: str) -> None:
        """Stop the threads; PeerLost goes out once none can still write into a block."""
        self._lost_reason = reason
        self._closing = True
        self._sends.put(None)
        self._payloads.put(None)

    def _report_lost(self) -> Sequence[Status]:
        """``[PeerLost]`` once every thread is out of its waits (each ends within the
        timeout), after destroying an owned group; nothing before that."""
        if self.closed or self._threads_alive():
            return _EMPTY
        self.closed = True
        self.peer_lost = self._lost_reason
        self._rounds.clear()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.delivered += 1
        return [PeerLost(self._lost_reason or "peer lost")]

    def _on_receiver_header(self, h: tuple[int, ...]) -> bool:
        """(control thread) One header from the sender; ``False`` ends the loop."""
        kind, rid, inc, epoch = h[0], h[1], h[2], h[3]
        key = (rid, inc, epoch)
        if kind == DATA:
            rnd = self._rounds.get(key)
            if rnd is None:
                raise TransportError(f"payload for round {epoch} of request {rid}, never posted")
            if rnd.ready is not None:
                if h[4] != rnd.post.expect_tokens:
                    raise TransportError(
                        f"round {epoch} of request {rid} announces {h[4]} tokens, "
                        f"{rnd.post.expect_tokens} were expected"
                    )
                works = rnd.ready
            else:
                with torch.cuda.stream(rnd.stream) if rnd.stream is not None else nullcontext():
                    works = self._receive_payload(rnd.post, h[4], rnd.tag)
            self._deliver(("announced", key))
            self._payloads.put((key, works))
        elif kind == LANDED:
            landed = Landed(rid, epoch, h[4], h[5], bool(h[6]), incarnation=inc)
            self._deliver(("status", key, landed))
        elif kind == CANCELLED:
            self._deliver(("status", key, Cancelled(rid, epoch, incarnation=inc)))
        elif kind == SENDER_ERROR:
            reason = torch.zeros(h[4], dtype=torch.uint8)
            self._wait(self._recv(reason, TAG_REASON))
            text = bytes(reason.tolist()).decode("utf-8", "replace")
            self._deliver(("status", key, SenderError(rid, epoch, text, incarnation=inc)))
        elif kind == BYE:
            self._deliver(("bye",))
            return False
        else:
            raise TransportError(f"unknown control message {h}")
        return True

    def _data_loop(self) -> None:
        assert self.buffers is not None
        cuda = self.buffers.device.type == "cuda"
        while (item := self._payloads.get()) is not None:
            key, works = item
            try:
                for work in works:
                    self._wait(work, cuda)
            except Exception as error:
                self._lost(error, key)
                return
            self._deliver(("landed", key))

    def _receive_payload(self, post: RoundPost, tokens: int, tag: int) -> list[Any]:
        """Post the receives for one round straight into its blocks.

        They reach the data thread only once the sender announces the payload:
        a round cancelled before that never sends it, and its receives stay
        unmatched under a tag nothing else uses.
        """
        buffers = self.buffers
        assert buffers is not None
        allocation = post.allocation
        if allocation is not None and not buffers.allocator.is_live(allocation):
            raise TransportError(
                f"round {post.epoch} of request {post.rid} would land in freed blocks"
            )
        if not 1 <= tokens <= post.capacity_tokens:
            raise TransportError(f"round {post.epoch} announces {tokens} tokens")
        bs, hidden = buffers.block_size, buffers.hidden_size
        emb = buffers.embeddings.view(-1, hidden)
        fill = buffers.fill_ids.view(-1)
        mrope = buffers.mrope.view(MROPE_ROWS, -1)
        group = self.data_group
        works = []
        for first, n in runs(post.blocks, tokens, bs):
            at = first * bs
            pieces = [emb[at : at + n], fill[at : at + n]]
            pieces += [mrope[r, at : at + n] for r in range(MROPE_ROWS)]
            works += [self._recv(piece, tag, group) for piece in pieces]
        works.append(self._recv(buffers.aux[post.blocks[0]], tag, group))
        return works

    # -- sender end ----------------------------------------------------------------------

    def poll_posts(self) -> Sequence[Post]:
        self._require("sender")
        inbox = self._inbox
        if not inbox:
            return _EMPTY
        out: list[Post] = []
        while inbox:
            item = inbox.popleft()
            if item[0] == "post":
                out.append(item[1])
            elif item[0] == "close":
                self.finished = True
            elif item[0] == "lost":
                self.peer_lost = item[1]
                self.finished = True
        return out

    def _on_sender_header(self, h: tuple[int, ...]) -> bool:
        """(control thread) One header from the receiver; ``False`` ends the loop."""
        if h[0] == POST:
            _, rid, inc, epoch, sent, capacity, n, tag, expect, _ = h
            blocks = torch.zeros(n, dtype=torch.int64)
            self._wait(self._recv(blocks, TAG_BLOCKS))
            self._tags[(rid, inc, epoch)] = tag
            post = RoundPost(
                rid,
                epoch,
                tuple(blocks.tolist()),
                capacity,
                sent,
                None,
                None if expect < 0 else expect,
                incarnation=inc,
            )
            self._deliver(("post", post))
        elif h[0] == CANCEL:
            self._deliver(("post", Cancel(h[1], h[3], incarnation=h[2])))
        elif h[0] == CLOSE:
            bye = torch.zeros(HEADER, dtype=torch.int64)
            bye[0] = BYE
            self._wait(dist.isend(bye, dst=self.peer, group=self.group, tag=TAG_TO_RECEIVER))
            self._closing = True  # the receiver is done: the heartbeat stops too
            self._deliver(("close",))
            return False
        else:
            raise TransportError(f"unknown control message {h}")
        return True

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        self._require("sender")
        if self._closing:
            return
        n = data.num_tokens
        if data.embeddings.is_cuda != self._nccl:
            raise InvalidArgumentError(
                f"{data.embeddings.device.type} tensors cannot go over this data group: CUDA "
                "sources need an NCCL data_group, CPU ones a gloo one"
            )
        if not post.blocks or post.capacity_tokens % len(post.blocks):
            raise TransportError(f"round {post.epoch} post has an inconsistent capacity")
        bs = post.capacity_tokens // len(post.blocks)
        rid = _rid(post.rid)
        tag = self._tags.pop((rid, post.incarnation, post.epoch), TAG_DATA)
        self._send_header(TAG_TO_RECEIVER, DATA, rid, post.incarnation, post.epoch, n, tag)
        group = self.data_group
        offset = 0
        for _first, count in runs(post.blocks, n, bs):
            end = offset + count
            self._send(data.embeddings[offset:end].contiguous(), tag, group)
            self._send(data.fill_ids[offset:end].contiguous(), tag, group)
            for r in range(MROPE_ROWS):
                self._send(data.mrope[r, offset:end].contiguous(), tag, group)
            offset = end
        row = torch.zeros(self.aux_size, dtype=torch.int32, device=data.embeddings.device)
        if aux:
            row[: len(aux)] = torch.tensor(list(aux), dtype=torch.int32)
        self._send(row, tag, group)

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        self._require("sender")
        if self._closing:
            return
        rid = _rid(status.rid)
        if isinstance(status, Landed):
            self._send_header(
                TAG_TO_RECEIVER,
                LANDED,
                rid,
                status.incarnation,
                status.epoch,
                status.tokens,
                status.total,
                int(status.final),
            )
            return
        # A round cancelled or refused before it was written never uses its tag.
        inc = status.incarnation
        self._tags.pop((rid, inc, status.epoch), None)
        if isinstance(status, Cancelled):
            self._send_header(TAG_TO_RECEIVER, CANCELLED, rid, inc, status.epoch)
        else:
            reason = status.reason.encode()[:4096] or b"?"
            self._send_header(TAG_TO_RECEIVER, SENDER_ERROR, rid, inc, status.epoch, len(reason))
            self._send(torch.tensor(list(reason), dtype=torch.uint8), TAG_REASON)


def _why(error: BaseException) -> str:
    """The first sentence of a gloo error, without its source location."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]


__all__ = ["DEFAULT_TIMEOUT", "Match", "TorchDistributedTransport", "runs"]
