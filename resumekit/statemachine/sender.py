"""The encode side: serves rounds of a source embedding into whatever blocks each post names."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from resumekit._check import as_int, check_hashable
from resumekit.allocator.buffers import MROPE_ROWS, EmbeddingTensors
from resumekit.errors import DuplicateRequestError, InvalidArgumentError, LeakError
from resumekit.statemachine.messages import (
    NO_EPOCH,
    Cancel,
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
)

if TYPE_CHECKING:
    from resumekit.statemachine.transport import SenderTransport


class _Source:
    __slots__ = ("data", "mrope_delta", "next_epoch", "sent", "total")

    def __init__(self, data: EmbeddingTensors, mrope_delta: int) -> None:
        self.data = data
        self.total = data.num_tokens
        self.mrope_delta = mrope_delta
        self.sent = 0
        self.next_epoch = 0


class EmbeddingSender:
    """Writes ``min(remaining, capacity)`` tokens per post and reports each round landed.

    A post for a request not yet added waits until :meth:`add` (the encoder
    may finish after the receiver posts round 0). A repeated post (an epoch
    already served) is ignored; a post that skips an epoch or resumes at the
    wrong offset is refused with a :class:`SenderError`.
    """

    def __init__(self, transport: SenderTransport, *, max_tombstones: int = 65_536) -> None:
        self.transport = transport
        self._sources: dict[Hashable, _Source] = {}
        self._parked: dict[Hashable, deque[RoundPost]] = {}
        # Requests cancelled before their source arrived, so a late add() drops it.
        self._cancelled: dict[Hashable, None] = {}
        self.max_tombstones = as_int(max_tombstones, "max_tombstones", minimum=0)
        self.rounds_served = 0
        self.repeated_posts = 0

    def add(self, rid: Hashable, source: EmbeddingTensors, *, mrope_delta: int = 0) -> bool:
        """Make ``source`` available for request ``rid``.

        Returns ``False`` (and keeps nothing) when the receiver already
        cancelled ``rid``: the encoder finished after the language side gave up.
        """
        check_hashable(rid, "rid")
        if rid in self._sources:
            raise DuplicateRequestError(f"request {rid!r} is already being sent")
        _check_source(source)
        mrope_delta = as_int(mrope_delta, "mrope_delta")
        if not -(2**31) <= mrope_delta < 2**31:
            raise InvalidArgumentError("mrope_delta must fit in int32")
        if rid in self._cancelled:
            del self._cancelled[rid]
            return False
        self._sources[rid] = _Source(source, mrope_delta)
        parked = self._parked.pop(rid, None)
        if parked:
            for post in parked:
                self._serve(post)
        return True

    def step(self) -> int:
        """Serve every post that arrived; returns how many rounds were written."""
        posts = self.transport.poll_posts()
        served = self.rounds_served
        for post in posts:
            if isinstance(post, Cancel):
                self._cancel(post)
            else:
                self._serve(post)
        return self.rounds_served - served

    def __len__(self) -> int:
        return len(self._sources)

    def __contains__(self, rid: object) -> bool:
        try:
            return rid in self._sources or rid in self._parked
        except TypeError:
            return False

    def check_quiescent(self) -> None:
        """Raise :class:`LeakError` if any request is still held."""
        if self._sources or self._parked:
            raise LeakError(
                [],
                f"sender still holds {sorted(map(repr, self._sources))} "
                f"and parked posts for {sorted(map(repr, self._parked))}",
            )

    def _cancel(self, cancel: Cancel) -> None:
        known = self._sources.pop(cancel.rid, None) is not None
        self._parked.pop(cancel.rid, None)
        if not known and self.max_tombstones:
            self._cancelled[cancel.rid] = None
            if len(self._cancelled) > self.max_tombstones:
                del self._cancelled[next(iter(self._cancelled))]
        if cancel.epoch != NO_EPOCH:
            # Rounds are written whole within one step, so nothing more lands for it.
            self.transport.report(Cancelled(cancel.rid, cancel.epoch))

    def _serve(self, post: RoundPost) -> None:
        src = self._sources.get(post.rid)
        if src is None:
            self._parked.setdefault(post.rid, deque()).append(post)
            return
        if post.epoch < src.next_epoch:
            self.repeated_posts += 1
            return
        problem = None
        if post.epoch > src.next_epoch:
            problem = f"round {post.epoch} posted before round {src.next_epoch}"
        elif post.sent != src.sent:
            problem = f"round {post.epoch} resumes at token {post.sent}; {src.sent} were sent"
        elif post.capacity_tokens < 1:
            problem = f"round {post.epoch} offers {post.capacity_tokens} tokens"
        if problem is not None:
            del self._sources[post.rid]
            self.transport.report(SenderError(post.rid, post.epoch, problem))
            return
        n = min(src.total - src.sent, post.capacity_tokens)
        if post.expect_tokens is not None and post.expect_tokens != n:
            del self._sources[post.rid]
            self.transport.report(
                SenderError(
                    post.rid,
                    post.epoch,
                    f"round {post.epoch} would carry {n} tokens; the receiver expects "
                    f"{post.expect_tokens}",
                )
            )
            return
        # The total and mRoPE delta travel with round 0 only; the progress marker
        # (aux[2]) with every round, for receivers that dedup by progress.
        if post.epoch == 0:
            aux: tuple[int, ...] = (src.total, src.mrope_delta, src.sent + n)
        else:
            aux = (0, 0, src.sent + n)
        self.transport.write_round(post, src.data.narrow(src.sent, n), aux)
        src.sent += n
        src.next_epoch = post.epoch + 1
        final = src.sent == src.total
        if final:
            del self._sources[post.rid]
        self.rounds_served += 1
        self.transport.report(Landed(post.rid, post.epoch, n, src.total, final))


def _check_source(source: EmbeddingTensors) -> None:
    if not isinstance(source, EmbeddingTensors):
        raise InvalidArgumentError(f"source must be EmbeddingTensors, not {type(source).__name__}")
    emb, fill, mrope = source.embeddings, source.fill_ids, source.mrope
    if not all(isinstance(t, torch.Tensor) for t in (emb, fill, mrope)):
        raise InvalidArgumentError("source fields must be torch tensors")
    if emb.dim() != 2 or emb.shape[0] < 1:
        raise InvalidArgumentError("source.embeddings must be (n >= 1, hidden)")
    n = emb.shape[0]
    if tuple(fill.shape) != (n,) or tuple(mrope.shape) != (MROPE_ROWS, n):
        raise InvalidArgumentError(
            f"source.fill_ids must be ({n},) and source.mrope ({MROPE_ROWS}, {n}); got "
            f"{tuple(fill.shape)} and {tuple(mrope.shape)}"
        )


__all__ = ["EmbeddingSender"]
