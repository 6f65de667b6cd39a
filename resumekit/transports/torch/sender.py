"""The sender's end over ``torch.distributed``: reads posts and cancels, writes each
round's payload straight into the receiver's blocks, and reports what became of each
round."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.distributed as dist

from resumekit.allocator.buffers import MROPE_ROWS, EmbeddingTensors
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.protocol.messages import (
    Cancel,
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
    require_post,
    require_status,
)
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Closed,
    PostArrived,
    ThreadedSenderEnd,
)
from resumekit.transports.torch._end import Match, TorchEnd
from resumekit.transports.torch.wire import (
    BYE,
    CANCEL,
    CANCELLED,
    CLOSE,
    DATA,
    LANDED,
    POST,
    SENDER_ERROR,
    TAG_BLOCKS,
    TAG_DATA,
    TAG_REASON,
    TAG_TO_RECEIVER,
    TAG_TO_SENDER,
    Key,
    encode_reason,
    header,
    layout_mismatch,
    runs,
    wire_rid,
)


class TorchSenderEnd(TorchEnd, ThreadedSenderEnd):
    """The encode side's end: ``TorchDistributedTransport("sender", peer)``; ``peer`` is
    the receiver's global rank, the rest as
    :func:`~resumekit.transports.torch.TorchDistributedTransport` says.
    """

    _control_tag: ClassVar[int] = TAG_TO_SENDER
    _heartbeat_tag: ClassVar[int] = TAG_TO_RECEIVER

    def __init__(
        self,
        peer: int,
        *,
        group: dist.ProcessGroup | None = None,
        data_group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        owns_group: bool = False,
        match: Match | None = None,
    ) -> None:
        self._tags: dict[Key, int] = {}  # each posted round's payload tag
        # What the receiver's blocks hold (wire.layout) and its aux rows' size, from its
        # posts: a payload longer than the receive posted for it aborts the receiver.
        self._layout = self._aux_rows = 0
        super().__init__(
            peer,
            group=group,
            data_group=data_group,
            timeout=timeout,
            owns_group=owns_group,
            match=match,
        )

    # -- the event loop's calls ----------------------------------------------------------

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        require_post(post)
        if not isinstance(data, EmbeddingTensors):
            raise InvalidArgumentError(
                f"data must be an EmbeddingTensors, not {type(data).__name__}"
            )
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
        problem = layout_mismatch(self._layout, data.embeddings)
        if problem is None and len(aux or ()) > self._aux_rows:
            problem = f"{len(aux or ())} aux values; the receiver's aux rows hold {self._aux_rows}"
        if problem is not None:
            raise TransportError(problem)
        bs = post.capacity_tokens // len(post.blocks)
        rid = wire_rid(post.rid)
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
        row = torch.zeros(self._aux_rows, dtype=torch.int32, device=data.embeddings.device)
        if aux:
            row[: len(aux)] = torch.tensor(list(aux), dtype=torch.int32)
        self._send(row, tag, group)

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        require_status(status)
        if self._closing:
            return
        rid = wire_rid(status.rid)
        inc = status.incarnation
        if isinstance(status, Landed):
            final = int(status.final)
            self._send_header(
                TAG_TO_RECEIVER, LANDED, rid, inc, status.epoch, status.tokens, status.total, final
            )
            return
        # A round cancelled or refused before it was written never uses its tag.
        self._tags.pop((rid, inc, status.epoch), None)
        if isinstance(status, Cancelled):
            self._send_header(TAG_TO_RECEIVER, CANCELLED, rid, inc, status.epoch)
        else:
            reason = encode_reason(status.reason)
            self._send_header(TAG_TO_RECEIVER, SENDER_ERROR, rid, inc, status.epoch, len(reason))
            self._send(torch.tensor(list(reason), dtype=torch.uint8), TAG_REASON)

    # -- the control thread --------------------------------------------------------------

    def _on_header(self, h: tuple[int, ...]) -> bool:
        if h[0] == POST:
            _, rid, inc, epoch, sent, capacity, n, tag, expect, layout, aux_rows = h
            blocks = torch.zeros(n, dtype=torch.int64)
            self._wait(self._recv(blocks, TAG_BLOCKS))
            self._tags[(rid, inc, epoch)] = tag
            self._layout, self._aux_rows = layout, aux_rows
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
            self._deliver(PostArrived(post))
        elif h[0] == CANCEL:
            self._deliver(PostArrived(Cancel(h[1], h[3], incarnation=h[2])))
        elif h[0] == CLOSE:
            bye = header(BYE)
            self._wait(dist.isend(bye, dst=self.peer, group=self.group, tag=TAG_TO_RECEIVER))
            self._closing = True  # the receiver is done: the heartbeat stops too
            self._deliver(Closed())
            return False
        else:
            raise TransportError(f"unknown control message {h}")
        return True
