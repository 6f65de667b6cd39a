"""The receiver's end over ``torch.distributed``: posts rounds, receives their payloads
straight into the blocks, and hands the event loop a status only once its round's
payload has landed (the receiver may free the blocks on any status)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from resumekit.allocator.buffers import MROPE_ROWS, BlockBuffers
from resumekit.errors import TransportError
from resumekit.protocol.messages import (
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
    Status,
    require_cancel,
    require_post,
)
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Arrived,
    Closed,
    Lost,
    ThreadedReceiverEnd,
)
from resumekit.transports.torch._end import Announced, Match, PayloadLanded, TorchEnd
from resumekit.transports.torch.wire import (
    BYE,
    CANCEL,
    CANCELLED,
    CLOSE,
    DATA,
    FIRST_ROUND_TAG,
    LANDED,
    POST,
    SENDER_ERROR,
    TAG_BLOCKS,
    TAG_DATA,
    TAG_REASON,
    TAG_TO_RECEIVER,
    TAG_TO_SENDER,
    Key,
    layout,
    next_round_tag,
    runs,
    wire_rid,
)

_EMPTY: tuple[Status, ...] = ()


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


class TorchReceiverEnd(TorchEnd, ThreadedReceiverEnd):
    """The language side's end: ``TorchDistributedTransport("receiver", peer, buffers=...)``.

    ``peer`` is the sender's global rank; ``buffers`` the :class:`BlockBuffers` rounds
    land in; the rest as :func:`~resumekit.transports.torch.TorchDistributedTransport`.
    """

    _control_tag: ClassVar[int] = TAG_TO_RECEIVER
    _heartbeat_tag: ClassVar[int] = TAG_TO_SENDER

    def __init__(
        self,
        peer: int,
        *,
        buffers: BlockBuffers,
        group: dist.ProcessGroup | None = None,
        data_group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        owns_group: bool = False,
        match: Match | None = None,
    ) -> None:
        self._rounds: dict[Key, _Round] = {}
        self._payloads: queue.SimpleQueue[tuple[Key, list[Any]] | None] = queue.SimpleQueue()
        self._next_tag = FIRST_ROUND_TAG
        self._cuda = isinstance(buffers, BlockBuffers) and buffers.device.type == "cuda"
        # What a token's embedding is in the blocks, and their aux rows: each post says.
        self._layout = (
            layout(buffers.hidden_size, buffers.dtype) if isinstance(buffers, BlockBuffers) else 0
        )
        self.aux_size = buffers.aux_size if isinstance(buffers, BlockBuffers) else 0
        super().__init__(  # starts the threads: set what they read first
            peer,
            buffers=buffers,
            group=group,
            data_group=data_group,
            timeout=timeout,
            owns_group=owns_group,
            match=match,
        )

    def _more_threads(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._data_loop, name="resumekit-data", daemon=True)]

    def _stop_threads(self) -> None:
        super()._stop_threads()
        self._payloads.put(None)

    # -- the event loop's calls ----------------------------------------------------------

    def post_round(self, post: RoundPost) -> None:
        require_post(post)
        if self._closing:
            return  # the peer is gone: PeerLost is (about to be) reported
        rid = wire_rid(post.rid)
        tag = self._next_tag
        self._next_tag = next_round_tag(tag)
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
            self._layout,
            self.aux_size,
        )
        self._send(torch.tensor(post.blocks, dtype=torch.int64), TAG_BLOCKS)

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        require_cancel(rid, epoch, incarnation)
        if not self._closing:
            self._send_header(TAG_TO_SENDER, CANCEL, wire_rid(rid), incarnation, epoch)

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers BYE and exits."""
        if not self._closing:
            self._send_header(TAG_TO_SENDER, CLOSE)

    def poll_statuses(self) -> Sequence[Status]:
        inbox = self._inbox
        if self._lost_reason is not None:
            return self._report_lost()
        if not inbox and (not self._rounds or time.monotonic() < self._next_check):
            return _EMPTY
        out: list[Status] = []
        now = time.monotonic()
        while inbox:
            item = inbox.popleft()
            kind = type(item)
            if kind is Arrived:
                self._pass_or_hold(item.key, item.status, now, out)
            elif kind is Announced:
                rnd = self._rounds.get(item.key)
                if rnd is not None:
                    rnd.arriving = True
                    rnd.progress = now
            elif kind is PayloadLanded:
                key = item.key
                rnd = self._rounds.get(key)
                if rnd is not None:
                    rnd.arriving = False
                    rnd.progress = now
                    if rnd.after:
                        del self._rounds[key]
                        out.extend(rnd.after)
            elif kind is Lost:
                self._begin_losing(item.reason)
                break
        if self._rounds:
            self._check_progress(now, ((k, r.progress) for k, r in self._rounds.items()))
        if self._lost_reason is not None:
            # Statuses passed before the loss still count (their payloads are in);
            # those held for a payload still arriving are dropped with the peer.
            self.delivered += len(out)
            out.extend(self._report_lost())  # which counts its PeerLost
            return out
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

    def _lost_now(self) -> bool:
        """Once every thread is out of its waits (each ends within the timeout): destroy
        an owned group, and the loss may be reported."""
        if self.closed or self._threads_alive():
            return False
        self.closed = True
        self._rounds.clear()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        return True

    # -- the threads ---------------------------------------------------------------------

    def _on_header(self, h: tuple[int, ...]) -> bool:
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
            self._deliver(Announced(key))
            self._payloads.put((key, works))
        elif kind == LANDED:
            self._deliver(Arrived(key, Landed(rid, epoch, h[4], h[5], bool(h[6]), incarnation=inc)))
        elif kind == CANCELLED:
            self._deliver(Arrived(key, Cancelled(rid, epoch, incarnation=inc)))
        elif kind == SENDER_ERROR:
            reason = torch.zeros(h[4], dtype=torch.uint8)
            self._wait(self._recv(reason, TAG_REASON))
            text = bytes(reason.tolist()).decode("utf-8", "replace")
            self._deliver(Arrived(key, SenderError(rid, epoch, text, incarnation=inc)))
        elif kind == BYE:
            self._deliver(Closed())
            return False
        else:
            raise TransportError(f"unknown control message {h}")
        return True

    def _data_loop(self) -> None:
        while (item := self._payloads.get()) is not None:
            key, works = item
            try:
                for work in works:
                    self._wait(work, self._cuda)
            except Exception as error:
                self._lost(error, key)
                return
            self._deliver(PayloadLanded(key))

    def _receive_payload(self, post: RoundPost, tokens: int, tag: int) -> list[Any]:
        """Post the receives for one round straight into its blocks.

        They reach the data thread only once the sender announces the payload:
        a round cancelled before that never sends it, and its receives stay
        unmatched under a tag nothing else uses.
        """
        buffers = self.buffers
        assert isinstance(buffers, BlockBuffers)
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
