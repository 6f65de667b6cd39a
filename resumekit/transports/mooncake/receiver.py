"""The receiver's end over Mooncake: registers the block buffers once, posts each round
with its blocks' addresses, and hands over each status the sender sends after its
round's writes completed."""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Final, Literal

from resumekit.allocator.buffers import MROPE_ROWS, BlockBuffers
from resumekit.errors import TransportError
from resumekit.protocol.messages import RoundPost, Status, require_cancel, require_post
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Arrived,
    Closed,
    Lost,
    ThreadedReceiverEnd,
)
from resumekit.transports.mooncake import jsonwire
from resumekit.transports.mooncake._end import MooncakeEnd
from resumekit.transports.mooncake.jsonwire import Key, MalformedMessage, wire_rid

MAX_STATUS_BYTES: Final = 1 << 20  # what the receiver end reads in one message at most
_EMPTY_STATUSES: tuple[Status, ...] = ()


class MooncakeReceiverEnd(MooncakeEnd, ThreadedReceiverEnd):
    """The language side's end: ``MooncakeTransport("receiver", listen=, peer=, buffers=)``."""

    # A status is at most a few dozen KiB (a 1024-character rid, a 4096-byte reason,
    # both JSON-escaped): a peer that sends more is broken, not a reason to hold its bytes.
    _max_message: ClassVar[int] = MAX_STATUS_BYTES

    def __init__(
        self,
        *,
        listen: str,
        peer: str,
        buffers: BlockBuffers,
        engine: Any = None,
        session: str | None = None,
        hostname: str = "127.0.0.1",
        protocol: Literal["tcp", "rdma"] = "tcp",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            listen=listen,
            peer=peer,
            buffers=buffers,
            engine=engine,
            session=session,
            hostname=hostname,
            protocol=protocol,
            timeout=timeout,
        )

    def _prepare(self) -> None:
        self._greeted = False  # the sender answered the hello, naming this end's session
        self._rounds: dict[Key, float] = {}  # posted rounds with no status yet: when posted
        buffers = self.buffers
        assert buffers is not None
        tensors = (buffers.embeddings, buffers.fill_ids, buffers.mrope, buffers.aux)
        for t in tensors:
            address = t.data_ptr()
            if self.engine.register_memory(address, t.numel() * t.element_size()) != 0:
                self._release_memory()
                raise TransportError(
                    "the transfer engine refused to register the block buffers (it refuses "
                    "memory registered already, by its owner or another end): the receiver "
                    "end registers them itself, to unregister them when the peer is lost"
                )
            self._registered.append(address)
        nb, bs = buffers.num_blocks, buffers.block_size
        self._strides = (
            bs * buffers.hidden_size * buffers.embeddings.element_size(),
            bs * buffers.fill_ids.element_size(),
            bs * buffers.mrope.element_size(),
            nb * bs * buffers.mrope.element_size(),  # one mRoPE row to the next
            buffers.aux_size * buffers.aux.element_size(),
        )
        self._send(
            t="hello",
            v=jsonwire.VERSION,
            session=self.session,
            hidden=buffers.hidden_size,
            dtype=jsonwire.dtype_name(buffers.dtype),
            aux=buffers.aux_size,
            reply=self._reply_address(),
        )

    def _reply_address(self) -> str:
        """Where a sender answers a hello it refuses: ``listen``, a wildcard host named as
        this end's engine session names the host."""
        scheme, _, rest = self.listen.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme == "tcp" and host in ("*", "0.0.0.0", "::", "[::]"):
            return f"tcp://{self.session.rpartition(':')[0]}:{port}"
        return self.listen

    def _addresses(self, blocks: Sequence[int]) -> list[list[int]]:
        """Per block: where its embeddings, fill ids, three mRoPE rows and aux row start."""
        emb, fill, mrope, aux = self._registered
        s_emb, s_fill, s_mrope, s_row, s_aux = self._strides
        return [
            [
                emb + b * s_emb,
                fill + b * s_fill,
                *(mrope + r * s_row + b * s_mrope for r in range(MROPE_ROWS)),
                aux + b * s_aux,
            ]
            for b in blocks
        ]

    def post_round(self, post: RoundPost) -> None:
        require_post(post)
        if self._closing:
            return  # the peer is gone: PeerLost is (about to be) reported
        rid = wire_rid(post.rid)
        allocation = post.allocation
        if allocation is not None and self.buffers is not None:
            self.buffers.allocator.check_live(allocation)
        self._rounds[(rid, post.incarnation, post.epoch)] = time.monotonic()
        self.posted += 1
        self._send(
            t="post",
            rid=rid,
            inc=post.incarnation,
            epoch=post.epoch,
            sent=post.sent,
            cap=post.capacity_tokens,
            expect=post.expect_tokens,
            blocks=list(post.blocks),
            dst=self._addresses(post.blocks),
        )

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        require_cancel(rid, epoch, incarnation)
        if not self._closing:
            self._send(t="cancel", rid=wire_rid(rid), inc=incarnation, epoch=epoch)

    def finish(self) -> None:
        """Tell the sender this receiver is done; it answers bye and stops."""
        if not self._closing:
            self._send(t="close")

    def poll_statuses(self) -> Sequence[Status]:
        inbox = self._inbox
        if self._lost_reason is not None:
            return self._report_lost()
        if not inbox and (not self._rounds or time.monotonic() < self._next_check):
            return _EMPTY_STATUSES
        out: list[Status] = []
        now = time.monotonic()
        while inbox:
            item = inbox.popleft()
            if type(item) is Arrived:
                self._rounds.pop(item.key, None)
                out.append(item.status)
            elif type(item) is Lost:
                self._begin_losing(item.reason)
                break
        if self._rounds:
            self._check_progress(now, self._rounds.items())
        if self._lost_reason is not None:
            # What arrived before the loss still counts: a round that landed is the
            # receiver's (its bytes are in), and only then is the peer lost.
            self.delivered += len(out)
            out.extend(self._report_lost())  # which counts its PeerLost
            return out
        if not out:
            return _EMPTY_STATUSES
        self.delivered += len(out)
        return out

    def _begin_losing(self, reason: str) -> None:
        self._link_lost = True
        super()._begin_losing(reason)

    def _lost_now(self) -> bool:
        """Once the threads are out, unregister the buffers: from then on the engine
        refuses any write into the blocks, and the loss may be reported."""
        with self._release_lock:
            if self.closed or not self._all_left():
                return False
            self.closed = True
        self._release()
        self._rounds.clear()
        return True

    def _on_message(self, m: dict[str, Any]) -> bool:
        kind = m["t"]
        if kind == "bye":
            self._deliver(Closed())
            return False
        if kind == "refused":
            refusal = jsonwire.refused(m)
            self._lost(str(refusal), refusal)  # the posted rounds end as for any lost peer
            return False
        if kind == "hi":
            to = jsonwire.hi(m)
            if to != self.session:
                # A sender paired with another receiver sends its statuses here: its
                # keys may match ours while its rounds landed in the other's blocks.
                self._lost(
                    f"a sender that writes to {to} reached this end ({self.session}): "
                    "a receiver end serves one sender"
                )
                return False
            self._greeted = True
            return True
        if not self._greeted:
            raise MalformedMessage(f"{kind!r} before the sender said hi")
        status = jsonwire.status(m)
        key: Any = (status.rid, status.incarnation, status.epoch)  # the rid may be a str here
        self._deliver(Arrived(key, status))
        return True
