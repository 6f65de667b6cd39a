"""The connector's worker ranks, apart from vLLM's types: the resumekit drivers each rank runs.

A :class:`ConsumerRank` lands items in its block pool with a
:class:`~resumekit.protocol.receiver.ResumableReceiver` (round 0 at the default
size, resumed as often as it takes, no size message first), keeps each whole
item's tensor until the scheduler releases it, and puts it into vLLM's encoder
cache, keyed by vLLM's identifier, when the scheduler says vLLM allocated it. A
:class:`ProducerRank` hands each encoder output to one
:class:`~resumekit.protocol.sender.EmbeddingSender` per consumer rank. Both are
driven by the hooks vLLM calls every step; neither blocks. A producer rank whose
transports can wait (Mooncake's) also serves posts from a thread per consumer rank,
so that the encoder's forward pass, which holds vLLM's step, does not hold the
rounds of items already encoded; every call into a sender is made under one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import MutableMapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from resumekit.allocator.buffers import EmbeddingTensors
from resumekit.errors import TransportError
from resumekit.integrations.vllm.orders import ItemSpec, Orders, RankReport
from resumekit.protocol.receiver import ResumableReceiver
from resumekit.protocol.sender import EmbeddingSender

EncoderCache = MutableMapping[str, torch.Tensor]
logger = logging.getLogger("resumekit.integrations.vllm")


class ConsumerRank:
    """One tensor-parallel rank of the language side."""

    def __init__(self, rank: int, receiver: ResumableReceiver) -> None:
        self.rank = rank
        self.receiver = receiver
        self.landing: dict[str, ItemSpec] = {}  # rid -> what is landing under it
        self.whole: dict[str, torch.Tensor] = {}  # rid -> the landed embeddings
        self._report = RankReport(rank)
        self._busy = False  # as last reported

    def apply(self, orders: Orders, encoder_cache: EncoderCache) -> None:
        """``start_load_caches``: release, start, make progress, then load what vLLM
        allocated (it must be in the encoder cache before the forward pass)."""
        receiver = self.receiver
        for rid in orders.release:
            self.landing.pop(rid, None)
            self.whole.pop(rid, None)
            if rid in receiver:
                if not receiver.poll(rid).terminal:
                    receiver.abort(rid, "released: no unfinished request needs it")
                receiver.take(rid)  # a round in flight stays quarantined in the receiver
        for rid in orders.cancel:
            if rid not in receiver:
                # A life that ends before it starts: its cancel tells the encode side.
                receiver.add(rid)
                receiver.abort(rid, "the request ended before its item was asked for")
                receiver.take(rid)
        for spec in orders.start:
            self.landing[spec.rid] = spec
            receiver.add(spec.rid, size_hint=spec.hint)
        self.pump()
        for rid, identifier in orders.load:
            encoder_cache[identifier] = self.whole[rid]

    def pump(self) -> None:
        """One step of the receiver: statuses in, rounds out, items that finished taken."""
        receiver = self.receiver
        for rid in receiver.step():
            spec = self.landing.get(rid) if isinstance(rid, str) else None
            if spec is None or rid not in receiver or not receiver.poll(rid).terminal:
                continue  # released since (a new life of its id may be landing)
            result = receiver.take(rid)
            del self.landing[spec.rid]
            if result.output is None:
                self._report.failed[spec.rid] = result.reason or "failed"
            elif result.total_tokens != spec.tokens:
                self._report.failed[spec.rid] = (
                    f"the encoder sent {result.total_tokens} tokens for {spec.identifier}; "
                    f"its placeholder takes {spec.tokens}"
                )
            else:
                self.whole[spec.rid] = result.output.embeddings
                self._report.completed.append(spec.rid)

    def report(self) -> RankReport | None:
        """``build_connector_worker_meta``: what changed since the last report, or ``None``
        (an empty step sends nothing)."""
        report = self._report
        busy = bool(len(self.receiver) or self.receiver.quarantined())
        if not report.completed and not report.failed and busy == self._busy:
            return None
        report.busy, self._busy = busy, busy
        self._report = RankReport(self.rank)
        return report

    def holds(self) -> int:
        """Landed items kept for the scheduler (outside the pool)."""
        return len(self.whole)

    def held_bytes(self) -> int:
        """Memory outside the pool: the outputs of items landing (each made whole-size at
        round 0) and of items kept for the scheduler."""
        landing = sum(
            rec.output.embeddings.nbytes + rec.output.fill_ids.nbytes + rec.output.mrope.nbytes
            for rec in self.receiver.snapshot().records
            if rec.output is not None
        )
        return landing + sum(t.nbytes for t in self.whole.values())


def _source(embeddings: torch.Tensor) -> EmbeddingTensors:
    """An encoder output as the sender writes it: its rows, a fill id per row (its index)
    and zero mRoPE rows (vLLM computes positions on the language side)."""
    n = int(embeddings.shape[0])
    device = embeddings.device
    return EmbeddingTensors(
        embeddings.detach(),
        torch.arange(n, dtype=torch.int32, device=device),
        torch.zeros(3, n, dtype=torch.int32, device=device),
    )


@runtime_checkable
class WaitableEnd(Protocol):
    """A sender end that can be served from a thread: Mooncake's (any ``ThreadedEnd``)."""

    finished: bool  # the receiver said close, or is gone: nothing more will arrive
    peer_lost: str | None

    def wait(self, timeout: float) -> bool: ...


class ProducerRank:
    """The encode side's rank: each output goes to every consumer rank's sender.

    ``serve=True`` starts a thread per sender that serves its posts as they arrive
    (its transport must be a :class:`WaitableEnd`) and, once its link has ended,
    drops the sender with what it held (that consumer rank failed those transfers);
    call :meth:`close` to stop them. A failure in a thread is raised by the next call
    from the engine.
    """

    def __init__(
        self, rank: int, senders: Sequence[EmbeddingSender], *, serve: bool = False
    ) -> None:
        if serve:
            for sender in senders:
                if not isinstance(sender.transport, WaitableEnd):
                    raise TransportError(
                        f"{type(sender.transport).__name__} cannot wait for posts: serve=False "
                        "pumps its senders from the engine's steps instead"
                    )
        self.rank = rank
        self.senders = list(senders)  # those whose link has not ended
        self.ended: dict[int, str] = {}  # consumer rank -> how its link ended
        self.waiting: dict[str, list[str]] = {}  # identifier -> rids not yet handed over
        self._sources = -1  # as last reported
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._broken: BaseException | None = None
        self._threads = [
            threading.Thread(
                target=self._serve, args=(i, s), name=f"resumekit-producer-{rank}-{i}", daemon=True
            )
            for i, s in enumerate(self.senders if serve else ())
        ]
        for thread in self._threads:
            thread.start()

    def apply(self, orders: Orders, encoder_cache: EncoderCache) -> None:
        """``start_save_caches``: note what to send, hand over what the encoder cache holds."""
        self._check()
        for identifier, rid in orders.send:
            self.waiting.setdefault(identifier, []).append(rid)
        for identifier in list(self.waiting):
            if identifier in encoder_cache:
                self.saved(identifier, encoder_cache)
        self.pump()

    def saved(self, identifier: str, encoder_cache: EncoderCache) -> None:
        """``save_caches``: the encoder computed ``identifier``; hand it to the senders."""
        self._check()
        rids = self.waiting.pop(identifier, None)
        if not rids:
            return
        source = _source(encoder_cache[identifier])
        with self._lock:
            for rid in rids:
                for sender in self.senders:
                    sender.add(rid, source)

    def pump(self) -> None:
        self._check()
        with self._lock:
            for sender in self.senders:
                sender.step()

    def held(self) -> int:
        """Sources and parked posts the live senders hold."""
        with self._lock:
            return sum(len(s) + s.parked_posts for s in self.senders)

    def report(self) -> RankReport | None:
        self._check()
        sources = self.held()
        if sources == self._sources:
            return None
        self._sources = sources
        return RankReport(self.rank, sources=sources, busy=sources > 0)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the serving threads (before the transports close)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _serve(self, peer_rank: int, sender: EmbeddingSender) -> None:
        end = sender.transport
        assert isinstance(end, WaitableEnd)
        try:
            while not self._stop.is_set():
                if not end.wait(0.05):
                    continue
                with self._lock:
                    served = sender.step()
                    if end.finished:
                        self._drop(peer_rank, sender, end.peer_lost or "the consumer closed")
                        return
                if not served:
                    self._stop.wait(0.0005)  # what woke it was no post (a cancel, say)
        except BaseException as exc:  # handed to the engine's next call
            self._broken = exc

    def _drop(self, peer_rank: int, sender: EmbeddingSender, how: str) -> None:
        """(under the lock) The link to ``peer_rank`` ended: nothing it held can go out."""
        held = len(sender) + sender.parked_posts
        self.senders.remove(sender)
        self.ended[peer_rank] = how
        logger.warning(
            "resumekit: producer rank %d: the link to consumer rank %d ended (%s); "
            "dropped %d source(s) and parked post(s)",
            self.rank,
            peer_rank,
            how,
            held,
        )

    def _check(self) -> None:
        if self._broken is not None:
            raise TransportError(
                f"producer rank {self.rank}: a serving thread failed: {self._broken!r}"
            ) from self._broken


__all__ = ["ConsumerRank", "EncoderCache", "ProducerRank", "WaitableEnd"]
