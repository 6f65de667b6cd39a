"""The encode side: serves rounds of a source embedding into whatever blocks each post names."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch

from resumekit._check import as_int, check_hashable, check_interface
from resumekit.allocator.buffers import MROPE_ROWS, EmbeddingTensors
from resumekit.errors import (
    DuplicateRequestError,
    InvalidArgumentError,
    LeakError,
    TransportError,
)
from resumekit.protocol.messages import (
    NO_EPOCH,
    Cancel,
    Cancelled,
    Landed,
    RoundPost,
    SenderError,
    malformed_post,
)

if TYPE_CHECKING:
    from resumekit.protocol.interfaces import SenderTransport

SENDER_TRANSPORT_METHODS = ("poll_posts", "write_round", "report", "check_request_id")


class _Source:
    __slots__ = ("data", "incarnation", "mrope_delta", "next_epoch", "sent", "total")

    def __init__(self, data: EmbeddingTensors, mrope_delta: int) -> None:
        self.data = data
        self.total = data.num_tokens
        self.mrope_delta = mrope_delta
        self.sent = 0
        self.next_epoch = 0
        self.incarnation: int | None = None  # the life it serves, bound by its first post

    def frozen(self) -> SourceState:
        return SourceState(
            self.data, self.incarnation, self.mrope_delta, self.next_epoch, self.sent, self.total
        )


class SourceState(NamedTuple):
    """One source the sender holds, as a value."""

    data: EmbeddingTensors  # shared, never copied
    incarnation: int | None  # None until a post names the life it serves
    mrope_delta: int
    next_epoch: int
    sent: int
    total: int


class SenderSnapshot(NamedTuple):
    """A sender's whole state as a value: :meth:`EmbeddingSender.snapshot`."""

    lives: tuple[tuple[Hashable, tuple[SourceState, ...]], ...]  # per id, in added order
    parked: tuple[tuple[Hashable, tuple[RoundPost, ...]], ...]  # posts waiting for a source
    cancelled: tuple[tuple[Hashable, tuple[int, ...]], ...]  # lives whose source is to drop
    ended: tuple[tuple[Hashable, int], ...]  # the newest life ended per id, oldest first
    rounds_served: int
    repeated_posts: int
    stale_posts: int
    malformed_posts: int


class EmbeddingSender:
    """Writes ``min(remaining, capacity)`` tokens per post and reports each round landed.

    A post for a request not yet added waits until :meth:`add` (the encoder
    may finish after the receiver posts round 0). A repeated post (an epoch
    already served) is ignored; a post that skips an epoch or resumes at the
    wrong offset is refused with a :class:`SenderError`, and so is a round whose
    write fails: each post of a batch is handled on its own.

    Request ids may be reused. Each life of an id has the incarnation the
    receiver gave it (:meth:`~resumekit.protocol.receiver.ResumableReceiver.add`
    returns it), carried by every post and cancel. :meth:`add` with
    ``incarnation`` binds a source to exactly that life; without it, sources are
    bound to the lives of their id in the order they were added, so the encoder
    must add them in that order (one per life, a cancelled life's too: its late
    source is dropped). Messages of a life that has ended here are stale.
    """

    def __init__(self, transport: SenderTransport, *, max_tombstones: int = 65_536) -> None:
        check_interface(transport, "transport", "SenderTransport", SENDER_TRANSPORT_METHODS)
        self.max_tombstones = as_int(max_tombstones, "max_tombstones", minimum=0)
        self.transport = transport
        self._lives: dict[Hashable, list[_Source]] = {}  # per id, its sources in added order
        self._parked: dict[Hashable, deque[RoundPost]] = {}  # posts waiting for their source
        # Per id, the lives that ended before their source came, oldest first: the next
        # unnamed add is the oldest one's source (dropped), a named add drops its own.
        self._cancelled: dict[Hashable, list[int]] = {}
        self._ended: dict[Hashable, int] = {}  # per id, the newest life that ended here
        self.rounds_served = 0
        self.repeated_posts = 0
        self.stale_posts = 0  # posts and cancels of lives that had ended here
        self.malformed_posts = 0
        self._snap: SenderSnapshot | None = None  # the last snapshot, while nothing changed

    def add(
        self,
        rid: Hashable,
        source: EmbeddingTensors,
        *,
        mrope_delta: int = 0,
        incarnation: int | None = None,
    ) -> bool:
        """Make ``source`` available for a life of request ``rid``.

        ``incarnation`` names the life (what the receiver's ``add`` returned);
        without it the source is for the oldest life of ``rid`` not yet given
        one. Returns ``False`` (and keeps nothing) when the receiver already
        cancelled that life: the encoder finished after the language side gave up.
        Raises :class:`DuplicateRequestError` (and keeps nothing) when the life named by
        ``incarnation`` already has its source.
        """
        check_hashable(rid, "rid")
        self.transport.check_request_id(rid)
        _check_source(source)
        mrope_delta = as_int(mrope_delta, "mrope_delta")
        if not -(2**31) <= mrope_delta < 2**31:
            raise InvalidArgumentError("mrope_delta must fit in int32")
        if incarnation is not None:
            incarnation = as_int(incarnation, "incarnation", minimum=1)
            if any(src.incarnation == incarnation for src in self._lives.get(rid, ())):
                raise DuplicateRequestError(
                    f"life {incarnation} of request {rid!r} already has its source"
                )
        self._snap = None
        if incarnation is not None:
            if incarnation <= self._ended.get(rid, 0):
                # That life ended here before its source came: this is that source.
                self._untombstone(rid, incarnation)
                return False
        else:
            waiting = self._cancelled.get(rid)
            if waiting:
                self._untombstone(rid, waiting[0])  # the oldest such life's source
                return False
        src = _Source(source, mrope_delta)
        src.incarnation = incarnation
        self._lives.setdefault(rid, []).append(src)
        self._serve_parked(rid)
        return True

    def step(self) -> int:
        """Serve every post that arrived; returns how many rounds were written."""
        posts = self.transport.poll_posts()
        if posts:
            self._snap = None
        served = self.rounds_served
        for post in posts:
            problem = malformed_post(post)
            if problem is not None:
                self._on_malformed(post, problem)
            elif type(post) is Cancel:
                self._cancel(post)
            else:
                self._serve(post)  # type: ignore[arg-type]
        return self.rounds_served - served

    def __len__(self) -> int:
        return sum(map(len, self._lives.values()))

    def __contains__(self, rid: object) -> bool:
        try:
            return rid in self._lives or rid in self._parked
        except TypeError:
            return False

    @property
    def parked_posts(self) -> int:
        """Posts waiting for their source (the encoder has not finished those requests)."""
        return sum(map(len, self._parked.values()))

    def check_quiescent(self) -> None:
        """Raise :class:`LeakError` if any request is still held."""
        if self._lives or self._parked:
            raise LeakError(
                [],
                f"sender still holds sources for [{_ids(self._lives)}] "
                f"and parked posts for [{_ids(self._parked)}]",
            )

    def snapshot(self) -> SenderSnapshot:
        """The whole state as an immutable value (sources are shared, not copied);
        :meth:`restore` puts a sender back into it. Until the sender changes, it
        returns the same object."""
        if self._snap is not None:
            return self._snap
        snap = self._snap = SenderSnapshot(
            tuple([(rid, tuple([s.frozen() for s in srcs])) for rid, srcs in self._lives.items()]),
            tuple([(rid, tuple(posts)) for rid, posts in self._parked.items()]),
            tuple([(rid, tuple(lives)) for rid, lives in self._cancelled.items()]),
            tuple(self._ended.items()),
            self.rounds_served,
            self.repeated_posts,
            self.stale_posts,
            self.malformed_posts,
        )
        return snap

    def restore(self, snapshot: SenderSnapshot) -> None:
        """Put this sender into ``snapshot``; :class:`InvalidArgumentError` (and no
        change) for anything :meth:`snapshot` cannot have made."""
        if snapshot is self._snap and snapshot is not None:
            return  # it holds that state already
        if not isinstance(snapshot, SenderSnapshot):
            raise InvalidArgumentError(
                f"snapshot must be a SenderSnapshot, not {type(snapshot).__name__}"
            )
        lives: dict[Hashable, list[_Source]] = {}
        for rid, states in snapshot.lives:
            sources = []
            for st in states:
                if not isinstance(st, SourceState) or not isinstance(st.data, EmbeddingTensors):
                    raise InvalidArgumentError(f"snapshot holds {st!r}, not a SourceState")
                src = _Source.__new__(_Source)
                src.data, src.incarnation, src.mrope_delta = st.data, st.incarnation, st.mrope_delta
                src.next_epoch, src.sent, src.total = st.next_epoch, st.sent, st.total
                sources.append(src)
            if sources:
                lives[rid] = sources
        parked = {rid: deque(posts) for rid, posts in snapshot.parked if posts}
        for posts in parked.values():
            if not all(type(p) is RoundPost for p in posts):
                raise InvalidArgumentError("snapshot parks something that is not a RoundPost")
        cancelled = {rid: list(lives) for rid, lives in snapshot.cancelled if lives}
        if not all(type(i) is int for lives in cancelled.values() for i in lives):
            raise InvalidArgumentError("snapshot's cancelled lives must be ints")
        ended = dict(snapshot.ended)
        if not all(type(i) is int for i in ended.values()):
            raise InvalidArgumentError("snapshot's ended lives must be ints")
        # Only now, everything checked: a refused snapshot changes nothing.
        self._lives, self._parked = lives, parked
        self._cancelled, self._ended = cancelled, ended
        self.rounds_served, self.repeated_posts = snapshot.rounds_served, snapshot.repeated_posts
        self.stale_posts, self.malformed_posts = snapshot.stale_posts, snapshot.malformed_posts
        self._snap = snapshot

    # -- lives -----------------------------------------------------------------------

    def _stale(self, rid: Hashable, incarnation: int) -> bool:
        """Whether a post or cancel belongs to a life of ``rid`` that has ended here."""
        if incarnation <= self._ended.get(rid, 0):
            self.stale_posts += 1
            return True
        return False

    def _source(self, rid: Hashable, incarnation: int) -> _Source | None:
        """The source of life ``incarnation`` of ``rid``, binding the oldest unnamed one.

        Posts and cancels travel in order, so a message of a newer life means the
        lives before it are over here, even where their end never reached us.
        """
        sources = self._lives.get(rid)
        if not sources:
            return None
        for src in list(sources):
            if src.incarnation is not None and src.incarnation < incarnation:
                self._end(rid, src.incarnation)
        sources = self._lives.get(rid, [])
        for src in sources:
            if src.incarnation == incarnation:
                return src
        for src in sources:
            if src.incarnation is None:
                src.incarnation = incarnation
                return src
        return None

    def _end(self, rid: Hashable, incarnation: int) -> None:
        """Life ``incarnation`` of ``rid`` is over here: its source goes, its messages are stale."""
        sources = self._lives.get(rid)
        if sources is not None:
            sources[:] = [s for s in sources if s.incarnation != incarnation]
            if not sources:
                del self._lives[rid]
        ended = self._ended
        if incarnation > ended.pop(rid, 0):  # re-inserted: the dict's order is recency
            ended[rid] = incarnation
            if len(ended) > self.max_tombstones:
                del ended[next(iter(ended))]
        parked = self._parked.get(rid)
        if parked and parked[0].incarnation <= incarnation:
            del self._parked[rid]  # posts of that life, which nothing will serve now

    def _serve_parked(self, rid: Hashable) -> None:
        parked = self._parked.pop(rid, None)
        if parked:
            for post in parked:
                self._serve(post)

    def _tombstone(self, rid: Hashable, incarnation: int) -> None:
        """Life ``incarnation`` of ``rid`` ended before its source came: drop that source."""
        if not self.max_tombstones:
            return
        lives = self._cancelled.pop(rid, [])  # re-inserted: the dict's order is recency
        lives.append(incarnation)
        if len(lives) > self.max_tombstones:
            del lives[0]
        self._cancelled[rid] = lives
        if len(self._cancelled) > self.max_tombstones:
            del self._cancelled[next(iter(self._cancelled))]

    def _untombstone(self, rid: Hashable, incarnation: int) -> None:
        """The source of ended life ``incarnation`` came (and is dropped): forget it."""
        lives = self._cancelled.get(rid)
        if lives and incarnation in lives:
            lives.remove(incarnation)
            if not lives:
                del self._cancelled[rid]

    def _cancel(self, cancel: Cancel) -> None:
        rid, incarnation = cancel.rid, cancel.incarnation
        if cancel.epoch != NO_EPOCH:
            # Rounds are written whole within one step, so nothing more lands for it.
            self.transport.report(Cancelled(rid, cancel.epoch, incarnation=incarnation))
        if not self._stale(rid, incarnation):
            self._drop_life(rid, incarnation)

    def _drop_life(self, rid: Hashable, incarnation: int) -> None:
        """Life ``incarnation`` of ``rid`` ends here, whatever it had."""
        if self._source(rid, incarnation) is None:
            # This life had no source yet: drop the one the encoder may still add.
            self._tombstone(rid, incarnation)
        self._end(rid, incarnation)

    def _on_malformed(self, post: object, problem: str) -> None:
        """Count a malformed post; refuse the round it names, if it names one not yet served."""
        self.malformed_posts += 1
        rid = getattr(post, "rid", None)
        epoch = getattr(post, "epoch", None)
        incarnation = getattr(post, "incarnation", None)
        try:
            hash(rid)
        except TypeError:
            return
        if type(epoch) is not int or type(incarnation) is not int or epoch < 0:
            return
        if self._stale(rid, incarnation):
            return
        src = self._source(rid, incarnation)
        if src is not None and epoch < src.next_epoch:
            return  # a garbled repeat of a round already served: it changes nothing
        if src is None:
            self._tombstone(rid, incarnation)
        self._end(rid, incarnation)
        self.transport.report(
            SenderError(rid, epoch, f"malformed post: {problem}", incarnation=incarnation)
        )

    def _refuse(self, post: RoundPost, problem: str) -> None:
        self._end(post.rid, post.incarnation)
        self.transport.report(
            SenderError(post.rid, post.epoch, problem, incarnation=post.incarnation)
        )

    def _serve(self, post: RoundPost) -> None:
        rid, incarnation = post.rid, post.incarnation
        if self._stale(rid, incarnation):
            return
        src = self._source(rid, incarnation)
        if src is None:
            self._parked.setdefault(rid, deque()).append(post)
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
            self._refuse(post, problem)
            return
        n = min(src.total - src.sent, post.capacity_tokens)
        if post.expect_tokens is not None and post.expect_tokens != n:
            self._refuse(
                post,
                f"round {post.epoch} would carry {n} tokens; the receiver expects "
                f"{post.expect_tokens}",
            )
            return
        # The total and mRoPE delta travel with round 0 only; later rounds zero the row.
        aux = (src.total, src.mrope_delta) if post.epoch == 0 else None
        try:
            self.transport.write_round(post, src.data.narrow(src.sent, n), aux)
        except (InvalidArgumentError, TransportError) as error:
            # This source cannot go into these blocks (a wrong dtype or hidden size, say):
            # this request fails, the rest of the batch goes on.
            self._refuse(post, f"round {post.epoch} could not be written: {error}")
            return
        src.sent += n
        src.next_epoch = post.epoch + 1
        final = src.sent == src.total
        if final:
            self._end(rid, incarnation)
        self.rounds_served += 1
        self.transport.report(Landed(rid, post.epoch, n, src.total, final, incarnation=incarnation))


def _ids(ids: Iterable[Hashable]) -> str:
    return ", ".join(sorted(map(repr, ids)))


def _check_source(source: EmbeddingTensors) -> None:
    if not isinstance(source, EmbeddingTensors):
        raise InvalidArgumentError(f"source must be EmbeddingTensors, not {type(source).__name__}")
    emb, fill, mrope = source.embeddings, source.fill_ids, source.mrope
    if not all(isinstance(t, torch.Tensor) for t in (emb, fill, mrope)):
        raise InvalidArgumentError("source fields must be torch tensors")
    if emb.dim() != 2 or emb.shape[0] < 1:
        raise InvalidArgumentError(
            f"source.embeddings must be (n >= 1, hidden), got {tuple(emb.shape)}"
        )
    n = emb.shape[0]
    if n >= 2**31:
        raise InvalidArgumentError(f"source has {n} tokens; the total must fit in int32")
    if tuple(fill.shape) != (n,) or tuple(mrope.shape) != (MROPE_ROWS, n):
        raise InvalidArgumentError(
            f"source.fill_ids must be ({n},) and source.mrope ({MROPE_ROWS}, {n}); got "
            f"{tuple(fill.shape)} and {tuple(mrope.shape)}"
        )
    if not emb.dtype.is_floating_point:
        raise InvalidArgumentError(f"source.embeddings must be floating point, not {emb.dtype}")
    if fill.dtype != torch.int32 or mrope.dtype != torch.int32:
        raise InvalidArgumentError(
            f"source.fill_ids and source.mrope must be int32, not {fill.dtype} and {mrope.dtype}"
        )
    if not emb.device == fill.device == mrope.device:
        raise InvalidArgumentError(
            f"source tensors are on {emb.device}, {fill.device} and {mrope.device}; "
            "they must share one device"
        )
    if emb.requires_grad:
        raise InvalidArgumentError(
            "source.embeddings requires grad; pass embeddings.detach() (the transfer copies "
            "bytes and must not join an autograd graph)"
        )
