"""The sender's end over Mooncake: writes each round straight into the receiver's blocks
(every piece submitted before any is waited on, on a writer thread that sleeps between
looks) and sends the round's status only once the engine says every write completed."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch

from resumekit.allocator.buffers import MROPE_ROWS, EmbeddingTensors
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.protocol.messages import (
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
    Status,
    require_post,
    require_status,
)
from resumekit.transports._threaded import (
    DEFAULT_TIMEOUT,
    Closed,
    PostArrived,
    ThreadedSenderEnd,
)
from resumekit.transports.mooncake import jsonwire
from resumekit.transports.mooncake._end import MooncakeEnd, _encode, _endpoint
from resumekit.transports.mooncake.engine import SourceLedger
from resumekit.transports.mooncake.jsonwire import Key, MalformedMessage, cut_reason, wire_rid

# How long the writer sleeps between looks at a batch in flight. The engine's own
# synchronous calls spin on the batch's status instead: on a host whose CPUs also
# move the bytes (TCP) the spin takes a CPU from the transfer and the copy-out.
_WRITE_POLL_S: Final = 1e-4
_STUCK_POLL_S: Final = 1e-2  # once a batch has been in flight for longer than ``timeout``
_DONE: Final = 1  # transfer_check_status: the batch completed (the engine freed it)
_FAILED: Final = -1  # it failed (freed too); 0 pending, -2 timed out (still the engine's)
_NO_BATCH: Final = (0, -1, 2**64 - 1)  # batch_transfer_async_write could not start it


@dataclass
class _Write:
    """(sender) One round to write: where each piece goes, and the tensors it comes from."""

    key: Key
    session: str
    sources: list[torch.Tensor]
    targets: list[int]
    aux: list[int]
    aux_target: int


def _runs(
    data: EmbeddingTensors, dst: list[list[int]], n: int, bs: int
) -> tuple[list[torch.Tensor], list[int]]:
    """The pieces of ``n`` tokens of ``data`` and where each goes: one per run of blocks
    whose addresses follow on, per tensor (embeddings, fill ids, three mRoPE rows)."""
    rows = [data.embeddings, data.fill_ids, *(data.mrope[r] for r in range(MROPE_ROWS))]
    sources: list[torch.Tensor] = []
    targets: list[int] = []
    for k, src in enumerate(rows):
        per_token = src[:1].numel() * src.element_size()
        start = 0  # the current run: tokens [start, end) to target
        end = 0
        target = following = -1
        for i in range(-(-n // bs)):
            count = min(bs, n - end)
            at = dst[i][k]
            if at != following:
                if end > start:
                    sources.append(src[start:end])
                    targets.append(target)
                start, target = end, at
            end += count
            following = at + count * per_token
        sources.append(src[start:end])
        targets.append(target)
    return sources, targets


class MooncakeSenderEnd(MooncakeEnd, ThreadedSenderEnd):
    """The encode side's end: ``MooncakeTransport("sender", listen=..., peer=...)``."""

    def __init__(
        self,
        *,
        listen: str,
        peer: str,
        engine: Any = None,
        session: str | None = None,
        hostname: str = "127.0.0.1",
        protocol: Literal["tcp", "rdma"] = "tcp",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            listen=listen,
            peer=peer,
            engine=engine,
            session=session,
            hostname=hostname,
            protocol=protocol,
            timeout=timeout,
        )

    def _prepare(self) -> None:
        self._hello: jsonwire.Hello | None = None  # where and how rounds land
        # Each posted round's block addresses, or why the post's addresses are unusable.
        self._dst: dict[Key, list[list[int]] | str] = {}
        self._jobs: queue.SimpleQueue[_Write | Status | None] = queue.SimpleQueue()
        self._failed: dict[Key, str] = {}  # (writer) rounds whose write failed: why
        self._ledger: SourceLedger | None = SourceLedger.join(self.engine)
        # Registered once, as long as the longest aux row: a round writes the receiver's.
        self._aux_stage = torch.zeros(jsonwire.MAX_AUX, dtype=torch.int32)
        address = self._aux_stage.data_ptr()
        if self.engine.register_memory(address, jsonwire.MAX_AUX * 4) != 0:
            raise TransportError("the transfer engine refused to register the aux row")
        self._registered.append(address)

    def _more_threads(self) -> list[threading.Thread]:
        return [self._thread(self._write_loop, "resumekit-write")]

    def _stop_threads(self) -> None:
        super()._stop_threads()
        self._jobs.put(None)

    def _release_memory(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            ledger.leave(id(self))
        super()._release_memory()

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
        key = (wire_rid(post.rid), post.incarnation, post.epoch)
        dst = self._dst.pop(key, None)
        if dst is None:
            raise TransportError(f"round {post.epoch} of request {post.rid} was never posted")
        if isinstance(dst, str):
            raise TransportError(f"round {post.epoch} cannot be written: {dst}")
        n = data.num_tokens
        if not post.blocks or post.capacity_tokens % len(post.blocks):
            raise TransportError(f"round {post.epoch} post has an inconsistent capacity")
        bs = post.capacity_tokens // len(post.blocks)
        if n > post.capacity_tokens or len(dst) != len(post.blocks):
            raise TransportError(f"round {post.epoch} does not fit the blocks it was posted")
        hello = self._hello
        assert hello is not None  # the hello precedes every post
        emb = data.embeddings
        if emb.shape[1] != hello.hidden or emb.dtype != hello.dtype:
            # Written as it is, it would be misread, or spill into the next blocks.
            raise TransportError(
                f"the source's embeddings are {jsonwire.dtype_name(emb.dtype)} x "
                f"{emb.shape[1]}; the receiver's blocks hold "
                f"{jsonwire.dtype_name(hello.dtype)} x {hello.hidden}"
            )
        if len(aux or ()) > hello.aux:
            raise TransportError(
                f"{len(aux or ())} aux values; the receiver's aux rows hold {hello.aux}"
            )
        sources, targets = _runs(data, dst, n, bs)
        row = [0] * hello.aux  # the whole row: nothing of an earlier round's stays
        for i, v in enumerate(aux or ()):
            row[i] = int(v)
        self._jobs.put(_Write(key, hello.session, sources, targets, row, dst[0][5]))

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        require_status(status)
        rid = wire_rid(status.rid)
        if type(status) is not Landed or status.final:
            # That life ends here: a round it posted and never had written (parked
            # until a source that never came, then cancelled) is dropped with it.
            life = (rid, status.incarnation)
            for key in [k for k in list(self._dst) if k[:2] == life]:
                self._dst.pop(key, None)
        if not self._closing:
            self._jobs.put(status)  # after the round's writes, in the writer thread

    # -- the threads ---------------------------------------------------------------------

    def _on_message(self, m: dict[str, Any]) -> bool:
        kind = m["t"]
        if kind == "hello":
            return self._on_hello(m)
        if kind == "post":
            post, dst = jsonwire.post(m)
            self._dst[(post.rid, post.incarnation, post.epoch)] = dst
            self._deliver(PostArrived(post))
        elif kind == "cancel":
            self._deliver(PostArrived(jsonwire.cancel(m)))
        elif kind == "close":
            self._send(t="bye")
            self._closing = True  # the receiver is done: the heartbeat stops too
            self._sends.put(None)
            self._jobs.put(None)
            self._deliver(Closed())
            return False
        else:
            raise MalformedMessage(f"unknown message {kind!r}")
        return True

    def _on_hello(self, m: dict[str, Any]) -> bool:
        """(control thread) A receiver's hello: served (answered hi), or refused."""
        paired = self._hello
        try:
            hello = jsonwire.hello(m)
        except MalformedMessage as error:
            return self._refuse(str(error), m)
        if paired is not None and hello != paired:
            # A second receiver's control socket reached ours: the posts of both
            # would be written to one engine, at the other's addresses.
            return self._refuse(
                f"a receiver at {hello.session} said hello to this end, which is "
                f"paired with {paired.session}: a sender end serves one receiver",
                m,
            )
        if paired is None:
            self._send(t="hi", to=hello.session)  # before any status: says whose they are
        self._hello = hello
        return True

    def _refuse(self, why: str, m: dict[str, Any]) -> bool:
        """(control thread) Answer a hello this end will not serve with ``refused`` and end
        the link: the receiver learns why at once instead of waiting out its timeout."""
        raw = _encode({"t": "refused", "reason": cut_reason(why)})
        to = jsonwire.reply(m)
        if to is None and self._hello is None:
            to = self.peer  # an older receiver, which does not say: most likely the peer
        self._lost(f"refused a receiver's hello: {why}")
        if to == self.peer:
            self._farewell = True  # the send socket lingers to deliver it
            self._sends.put(raw)
        elif to is not None:
            self._answer_once(to, raw)
        self._stop_threads()  # the paired receiver sees the disconnect at once
        return False

    def _answer_once(self, to: str, raw: bytes) -> None:
        """Send ``raw`` to a receiver that is not this end's peer, on a socket of its own
        that lingers (at most the timeout) in the background to deliver it."""
        zmq = self._zmq
        try:
            to = _endpoint(to, "reply")
        except InvalidArgumentError:
            return  # no address to answer at: that receiver waits out its timeout
        push = self._socket(zmq.PUSH)
        try:
            push.setsockopt(zmq.LINGER, int(self.timeout * 1000))
            push.connect(to)
            push.send(raw, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # unreachable: that receiver waits out its timeout, this end is lost anyway
        finally:
            push.close()

    @property
    def pending_posts(self) -> int:
        """Rounds the receiver posted that were neither written nor ended here yet."""
        return len(self._dst)

    def _write_loop(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                if isinstance(job, _Write):
                    self._write(job)
                else:
                    self._pass_on(job)
        except Exception as error:  # an engine call raised: the link goes, nobody waits on it
            self._lost(f"the writer thread failed: {error!r}")
            self._stop_threads()  # the receiver sees the disconnect

    def _write(self, job: _Write) -> None:
        """Write one round; a failure turns the round's status into an error.

        Every piece (each run of blocks per tensor, then the aux row) is submitted
        before any is waited on, each as a batch of one: this engine's
        ``transfer_check_status`` reads a batch's first transfer only, and frees
        the batch when that one is done.
        """
        started: list[int] = []
        problem: str | None = None
        try:
            stage = self._aux_stage[: len(job.aux)]
            stage.copy_(torch.tensor(job.aux, dtype=torch.int32))
            pieces = [(t if t.is_contiguous() else t.contiguous()) for t in job.sources]
            ledger, user = self._ledger, (id(self), *job.key[:2])
            assert ledger is not None  # released only after this thread left
            for t in pieces:
                ledger.use(t, user)
            targets = [*job.targets, job.aux_target]
            for t, target in zip([*pieces, stage], targets, strict=True):
                nbytes = t.numel() * t.element_size()
                batch = self.engine.batch_transfer_async_write(
                    job.session, [t.data_ptr()], [target], [nbytes]
                )
                if batch in _NO_BATCH:
                    problem = "the transfer engine refused to start the round's write"
                    break
                started.append(batch)
        except Exception as error:
            problem = f"the round could not be written: {error}"
        # What was started is waited for even when a later piece failed to start.
        for batch in started:
            if self._finish(batch) != _DONE and problem is None:
                problem = "the transfer engine failed to write the round"
        if problem is not None:
            self._failed[job.key] = problem

    def _finish(self, batch: int) -> int:
        """Wait, sleeping, until the engine says ``batch`` completed or failed.

        Only the engine's word ends the wait (a timed-out batch, -2, is not
        one): a round reported failed while its bytes may still be moving could
        land in blocks the receiver reuses. An engine that never answers leaves
        the round without a status, and the receiver declares the peer lost (and
        unregisters its buffers) after its timeout; the thread then stays alive,
        looking every 10 ms once ``timeout`` has passed, so :meth:`close` keeps
        this end's memory registered and alive for the engine.
        """
        check = self.engine.transfer_check_status
        nap, slow_after = _WRITE_POLL_S, time.monotonic() + self.timeout
        while (status := check(batch)) != _DONE and status != _FAILED:
            time.sleep(nap)
            if nap == _WRITE_POLL_S and time.monotonic() > slow_after:
                nap = _STUCK_POLL_S
        return int(status)

    def _pass_on(self, status: Status) -> None:
        assert isinstance(status, Landed | Cancelled | SenderError)
        rid = wire_rid(status.rid)
        inc, epoch = status.incarnation, status.epoch
        failed = self._failed.pop((rid, inc, epoch), None)
        if isinstance(status, Landed) and failed is None:
            self._send(
                t="landed",
                rid=rid,
                inc=inc,
                epoch=epoch,
                tokens=status.tokens,
                total=status.total,
                final=status.final,
            )
        elif isinstance(status, Cancelled):
            self._send(t="cancelled", rid=rid, inc=inc, epoch=epoch)
        else:
            reason = cut_reason(failed if failed is not None else getattr(status, "reason", ""))
            self._send(t="error", rid=rid, inc=inc, epoch=epoch, reason=reason)
        ends = not isinstance(status, Landed) or status.final or failed is not None
        if ends and self._ledger is not None:
            user = (id(self), rid, inc)
            self._ledger.forget(user.__eq__)
