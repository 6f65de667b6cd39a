"""The language side: lands an embedding of unknown length in as many rounds as it takes.

Every state change goes through the compiled protocol table. Idle polling is a
dict lookup; :meth:`ResumableReceiver.step` does work only for statuses that
arrived and requests waiting for blocks.

One file: :class:`ResumableReceiver` is one state machine, whose one method that runs
a transition (``_fire``) dispatches to the actions beside it; split across files, the
table's actions and the code they name would no longer be read together.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from resumekit._check import (
    as_int,
    check_bool,
    check_hashable,
    check_interface,
    check_str,
)
from resumekit.allocator.block_allocator import Allocation, BlockAllocator
from resumekit.allocator.buffers import AUX_MROPE_DELTA, AUX_TOTAL_TOKENS
from resumekit.errors import (
    DuplicateRequestError,
    InvalidArgumentError,
    InvariantError,
    LeakError,
    RequestNotFinishedError,
    TransportError,
    UnknownRequestError,
)
from resumekit.protocol.declaration import TABLE, Action, Event, TransferState
from resumekit.protocol.messages import (
    NO_EPOCH,
    ROUND_STATUSES,
    Cancelled,
    Landed,
    PeerBack,
    PeerLost,
    RoundPost,
    SenderError,
    Status,
    malformed_status,
)
from resumekit.protocol.policy import SchedulingPolicy, check_policy
from resumekit.protocol.rounds import Verdict, by_epoch
from resumekit.protocol.sizing import (
    DEFAULT_WASTE,
    AutoSizer,
    SizerSnapshot,
    check_waste,
    round0_cap,
)

if TYPE_CHECKING:
    from resumekit.allocator.buffers import BlockBuffers, EmbeddingTensors
    from resumekit.protocol.interfaces import ReceiverTransport

RECEIVER_TRANSPORT_METHODS: Final = ("post_round", "cancel", "poll_statuses", "check_request_id")

DEFAULT_ALLOCATE_TOKENS: Final = 8192
AUTO: Final = "auto"
ENV_DEFAULT_ALLOCATE_TOKENS: Final = "RESUMEKIT_DEFAULT_ALLOCATE_TOKENS"

S = TransferState
_NOTHING: tuple[Hashable, ...] = ()


class RequestRecord:
    """What the receiver keeps per request: small, flat, no back-references (no cycles)."""

    __slots__ = (
        "__weakref__",
        "allocation",
        "epoch",
        "hint",
        "incarnation",
        "mrope_delta",
        "output",
        "passed",
        "reason",
        "rid",
        "rounds",
        "sent",
        "stale",
        "state",
        "total",
    )

    def __init__(self, rid: Hashable, incarnation: int) -> None:
        self.rid = rid
        self.incarnation = incarnation  # this life of the id; never reused by the receiver
        self.state = S.Bootstrapping
        self.epoch = 0  # the round posted, or to be posted next
        self.allocation: Allocation | None = None  # the posted round's blocks, while in flight
        self.sent = 0  # tokens consumed so far
        self.total: int | None = None  # announced with round 0
        self.mrope_delta = 0
        self.output: EmbeddingTensors | None = None
        self.reason: str | None = None
        self.rounds = 0
        self.stale = 0
        self.hint: Hashable = None  # the engine's size hint (auto round-0 sizing)
        self.passed = 0  # admissions served while this resume waited yielding (a policy's)

    def frozen(self) -> RecordState:
        """This record as an immutable value."""
        return RecordState(
            self.rid,
            self.incarnation,
            self.state,
            self.epoch,
            self.allocation,
            self.sent,
            self.total,
            self.mrope_delta,
            self.output,
            self.reason,
            self.rounds,
            self.stale,
            self.hint,
            self.passed,
        )

    @classmethod
    def thawed(cls, state: RecordState) -> RequestRecord:
        """A record holding ``state`` (checked by :meth:`ResumableReceiver.restore`)."""
        rec = cls(state.rid, state.incarnation)
        (
            _,
            _,
            rec.state,
            rec.epoch,
            rec.allocation,
            rec.sent,
            rec.total,
            rec.mrope_delta,
            rec.output,
            rec.reason,
            rec.rounds,
            rec.stale,
            rec.hint,
            rec.passed,
        ) = state
        return rec


class RecordState(NamedTuple):
    """One request's record as a value: the fields of :class:`RequestRecord`."""

    rid: Hashable
    incarnation: int
    state: TransferState
    epoch: int
    allocation: Allocation | None
    sent: int
    total: int | None
    mrope_delta: int
    output: EmbeddingTensors | None  # shared with the record, never copied
    reason: str | None
    rounds: int
    stale: int
    hint: Hashable
    passed: int  # admissions that passed it while it waited yielding (a policy's)


class ReceiverSnapshot(NamedTuple):
    """A receiver's whole state as a value: :meth:`ResumableReceiver.snapshot`.

    ``admissions`` and ``resumes`` hold the very :class:`RecordState` objects of
    ``records`` for the requests still known, in queue order; a queue entry of a
    request taken since (dropped the next time the queue is served) is a state of its own.
    """

    records: tuple[RecordState, ...]  # in the order the requests were added
    admissions: tuple[RecordState, ...]
    resumes: tuple[RecordState, ...]
    quarantine: tuple[tuple[tuple[Hashable, int, int], Allocation], ...]
    finished: tuple[Hashable, ...]
    next_incarnation: int
    stale_statuses: int
    orphan_statuses: int
    malformed_statuses: int
    peer_lost: str | None
    sizer: SizerSnapshot | None


@dataclass(frozen=True, slots=True)
class TransferResult:
    """A finished request, handed over by :meth:`ResumableReceiver.take`."""

    rid: Hashable
    state: TransferState
    output: EmbeddingTensors | None  # Success only
    total_tokens: int | None
    mrope_delta: int
    rounds: int
    stale_statuses: int
    reason: str | None  # Failed only

    @property
    def ok(self) -> bool:
        return self.state is S.Success


class ReceiverObserver:
    """Hooks for tracing a receiver (the simulate table, the property suite); no-ops here."""

    def round_posted(self, post: RoundPost) -> None:
        """A round (epoch 0 or a resume) was posted to the sender."""

    def round_consumed(
        self, rid: Hashable, epoch: int, tokens: int, allocation: Allocation
    ) -> None:
        """Round ``epoch`` was copied out of ``allocation`` (before its blocks are freed)."""

    def request_failed(self, rid: Hashable, reason: str) -> None:
        """The request went to Failed."""


def _unhashable(rid: object) -> UnknownRequestError:
    return UnknownRequestError(f"unknown request {rid!r}: rid must be hashable to be added")


def default_allocate_tokens_from_env() -> int:
    """``RESUMEKIT_DEFAULT_ALLOCATE_TOKENS`` when set, else 8192."""
    raw = os.environ.get(ENV_DEFAULT_ALLOCATE_TOKENS)
    if raw is None or raw == "":
        return DEFAULT_ALLOCATE_TOKENS
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgumentError(
            f"{ENV_DEFAULT_ALLOCATE_TOKENS}={raw!r} is not an integer"
        ) from None
    return as_int(value, ENV_DEFAULT_ALLOCATE_TOKENS, minimum=1)


class ResumableReceiver:
    """Receives embeddings over ``transport`` into blocks of ``buffers``.

    ``default_allocate_tokens`` sizes round 0 (default: the environment
    variable ``RESUMEKIT_DEFAULT_ALLOCATE_TOKENS``, else 8192); ``"auto"``
    learns it per size hint (:class:`~resumekit.protocol.sizing.AutoSizer`,
    at most ``auto_waste`` expected over-allocation); ``max_resume_tokens`` caps
    what each resume allocates; ``policy`` orders waiting rounds and bounds those in
    flight (:class:`~resumekit.protocol.policy.SchedulingPolicy`; ``None``: resumes
    first, then admissions, each in the order they began to wait); ``observer`` is
    told of every round posted and consumed and every failure (a trace, a ledger).
    """

    def __init__(
        self,
        buffers: BlockBuffers,
        transport: ReceiverTransport,
        default_allocate_tokens: int | Literal["auto"] | None = None,
        *,
        max_resume_tokens: int | None = None,
        observer: ReceiverObserver | None = None,
        auto_waste: float = DEFAULT_WASTE,
        policy: SchedulingPolicy | None = None,
    ) -> None:
        # Duck-typed, so the explorer's token-cell stand-in drives the same code.
        check_interface(buffers, "buffers", "BlockBuffers", ("new_output", "read_into", "read_aux"))
        if not isinstance(getattr(buffers, "allocator", None), BlockAllocator):
            raise InvalidArgumentError("buffers must be a BlockBuffers; its allocator is missing")
        check_interface(transport, "transport", "ReceiverTransport", RECEIVER_TRANSPORT_METHODS)
        if observer is not None:
            check_interface(
                observer,
                "observer",
                "ReceiverObserver",
                ("round_posted", "round_consumed", "request_failed"),
            )
        allocator = buffers.allocator
        auto = default_allocate_tokens == AUTO or (
            default_allocate_tokens is None and os.environ.get(ENV_DEFAULT_ALLOCATE_TOKENS) == AUTO
        )
        if auto:
            default_allocate_tokens = min(
                DEFAULT_ALLOCATE_TOKENS, allocator.num_blocks * allocator.block_size
            )
        elif default_allocate_tokens is None:
            default_allocate_tokens = default_allocate_tokens_from_env()
        default_allocate_tokens = as_int(
            default_allocate_tokens, "default_allocate_tokens", minimum=1
        )
        if allocator.blocks_for(default_allocate_tokens) > allocator.num_blocks:
            raise InvalidArgumentError(
                f"default_allocate_tokens={default_allocate_tokens} needs more blocks than "
                f"the pool's {allocator.num_blocks}: round 0 could never be allocated"
            )
        if max_resume_tokens is not None:
            max_resume_tokens = as_int(max_resume_tokens, "max_resume_tokens", minimum=1)
        check_waste(auto_waste, "auto_waste")  # also when round 0 is fixed: never ignored
        policy = check_policy(policy)
        # Learns round 0's size, up to round0_cap.
        self.sizer = (
            AutoSizer(
                allocator.block_size,
                round0_cap(allocator.num_blocks * allocator.block_size, allocator.block_size),
                fallback=default_allocate_tokens,
                resume_tokens=max_resume_tokens,
                waste=auto_waste,
            )
            if auto
            else None
        )
        self.buffers = buffers
        self.allocator = allocator
        self.transport = transport
        self.default_allocate_tokens = default_allocate_tokens
        self.max_resume_tokens = max_resume_tokens
        self.observer = observer
        pool_tokens = allocator.num_blocks * allocator.block_size
        self.policy = None if policy is None else policy.resolved(pool_tokens, allocator.block_size)
        # The resolved policy's numbers, read on every serve (None: that part is off).
        self._bulk_tokens: int | None = None if self.policy is None else self.policy.bulk_tokens
        chunk = None if self.policy is None else self.policy.bulk_round_tokens
        self._bulk_round_tokens: int = pool_tokens if chunk is None else chunk
        self._window = None if self.policy is None else self.policy.max_rounds_in_flight
        self._max_passed_over = 0 if self.policy is None else self.policy.max_passed_over
        self._yield_tokens = None if self.policy is None else self.policy.yield_tokens
        self._snap: ReceiverSnapshot | None = None  # the last snapshot, while nothing changed
        self._records: dict[Hashable, RequestRecord] = {}
        self._admissions: deque[RequestRecord] = deque()
        self._resumes: deque[RequestRecord] = deque()
        self._quarantine: dict[tuple[Hashable, int, int], Allocation] = {}
        self._finished: list[Hashable] = []
        self._next_incarnation = 1
        self.stale_statuses = 0  # for an old round of a live request
        self.orphan_statuses = 0  # for no life the receiver knows (an earlier one, or none)
        self.malformed_statuses = 0  # items of a batch that were not statuses at all
        self.peer_lost: str | None = None  # set while the transport reports the sender gone

    # -- engine API --------------------------------------------------------------

    def add(self, rid: Hashable, *, bootstrapped: bool = True, size_hint: Hashable = None) -> int:
        """Start receiving ``rid``; ``bootstrapped=False`` waits for :meth:`bootstrapped`.

        ``size_hint`` (the modality, say) groups requests of like sizes for
        ``default_allocate_tokens="auto"``; it changes nothing else.

        Returns the incarnation of this life of ``rid``, never given before; an
        engine that knows it passes it to the sender's ``add``. An id may be added
        again once its earlier life was taken: every message carries the life's
        incarnation, so what is still in flight for the earlier one is counted as
        an orphan and never touches the new one.
        """
        check_hashable(rid, "rid")
        self.transport.check_request_id(rid)
        check_bool(bootstrapped, "bootstrapped")
        check_hashable(size_hint, "size_hint")
        if rid in self._records:
            raise DuplicateRequestError(f"request {rid!r} is already known")
        self._snap = None
        req = RequestRecord(rid, self._next_incarnation)
        req.hint = size_hint
        self._next_incarnation += 1
        self._records[rid] = req
        if self.peer_lost is not None:
            # Nothing can arrive from a dead peer: fail now rather than wait forever, and
            # say so in case a new sender is already connected (a dead link drops it).
            self._fail(req, f"peer lost: {self.peer_lost}", peer_alive=False)
            self.transport.cancel(rid, NO_EPOCH, incarnation=req.incarnation)
        elif bootstrapped:
            self._fire(req, Event.BOOTSTRAPPED)
        return req.incarnation

    def bootstrapped(self, rid: Hashable) -> None:
        """The peer of ``rid`` is known: the request may be admitted."""
        req = self._record(rid)
        if TABLE[req.state].get(Event.BOOTSTRAPPED) is None:
            raise InvalidArgumentError(f"request {rid!r} is {req.state.name}, not Bootstrapping")
        self._snap = None
        self._fire(req, Event.BOOTSTRAPPED)

    def poll(self, rid: Hashable) -> TransferState:
        """The request's state: one dict lookup, for event loops that poll every request."""
        try:
            return self._records[rid].state
        except KeyError:
            raise UnknownRequestError(f"unknown request {rid!r}") from None
        except TypeError:
            raise _unhashable(rid) from None

    def abort(self, rid: Hashable, reason: str = "aborted by the engine") -> bool:
        """Fail ``rid`` now; ``False`` if it had already finished."""
        req = self._record(rid)
        check_str(reason, "reason")
        if req.state.terminal:
            return False
        self._snap = None
        self._fail(req, reason, peer_alive=True)
        return True

    def step(self) -> Sequence[Hashable]:
        """One event-loop iteration; returns the ids that finished since the last step."""
        statuses = self.transport.poll_statuses()
        if statuses:
            self._snap = None
            for status in statuses:
                self._on_status(status)
        if self._resumes or self._admissions:
            self._snap = None
            self._serve_waiting()
        if not self._finished:
            return _NOTHING
        self._snap = None
        finished, self._finished = self._finished, []
        return finished

    def take(self, rid: Hashable) -> TransferResult:
        """Hand over a finished request; nothing of it remains in the receiver."""
        req = self._record(rid)
        if not req.state.terminal:
            raise RequestNotFinishedError(f"request {rid!r} is {req.state.name}")
        self._snap = None
        del self._records[rid]
        return TransferResult(
            rid,
            req.state,
            req.output if req.state is S.Success else None,
            req.total,
            req.mrope_delta,
            req.rounds,
            req.stale,
            req.reason,
        )

    # -- introspection -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, rid: object) -> bool:
        try:
            return rid in self._records
        except TypeError:
            return False

    def record(self, rid: Hashable) -> RequestRecord:
        """The live record of ``rid`` (read it, do not change it)."""
        return self._record(rid)

    def quarantined(self) -> dict[tuple[Hashable, int, int], Allocation]:
        """Rounds of failed requests whose blocks may still be written.

        Keyed by (rid, incarnation, epoch).
        """
        return dict(self._quarantine)

    def check_quiescent(self) -> None:
        """Raise :class:`LeakError` unless no request, quarantined round or allocation remains."""
        if self._records or self._quarantine:
            held = [r.allocation for r in self._records.values() if r.allocation is not None]
            raise LeakError(
                [*held, *self._quarantine.values()],
                f"{len(self._records)} request(s) not taken {list(self._records)[:8]}, "
                f"{len(self._quarantine)} round(s) in quarantine {list(self._quarantine)[:8]}",
            )
        self.allocator.check_quiescent()

    def snapshot(self) -> ReceiverSnapshot:
        """The whole state as an immutable value: what a checker reads, copies and keys.

        Outputs are shared, not copied. :meth:`restore` puts a receiver back into it.
        Until the receiver changes, it returns the same object.
        """
        if self._snap is not None:
            return self._snap
        frozen: dict[int, RecordState] = {}
        records = []
        for rec in self._records.values():
            state = frozen[id(rec)] = rec.frozen()
            records.append(state)

        def queue(waiting: deque[RequestRecord]) -> tuple[RecordState, ...]:
            return tuple([frozen.get(id(r)) or r.frozen() for r in waiting])

        snap = self._snap = ReceiverSnapshot(
            tuple(records),
            queue(self._admissions),
            queue(self._resumes),
            tuple(self._quarantine.items()),
            tuple(self._finished),
            self._next_incarnation,
            self.stale_statuses,
            self.orphan_statuses,
            self.malformed_statuses,
            self.peer_lost,
            None if self.sizer is None else self.sizer.snapshot(),
        )
        return snap

    def restore(self, snapshot: ReceiverSnapshot) -> None:
        """Put this receiver into ``snapshot`` (taken of it, or of one on the same pool).

        Every allocation it names must be live in this receiver's allocator (restore
        the allocator first). Raises :class:`InvalidArgumentError` and changes
        nothing otherwise.
        """
        if snapshot is self._snap and snapshot is not None:
            return  # it holds that state already
        if not isinstance(snapshot, ReceiverSnapshot):
            raise InvalidArgumentError(
                f"snapshot must be a ReceiverSnapshot, not {type(snapshot).__name__}"
            )
        if (snapshot.sizer is None) != (self.sizer is None):
            raise InvalidArgumentError(
                "snapshot: its round-0 sizing (fixed or auto) is not this receiver's"
            )
        thawed: dict[int, RequestRecord] = {}

        def thaw(state: object) -> RequestRecord:
            rec = thawed.get(id(state))
            if rec is None:
                if not isinstance(state, RecordState) or not isinstance(state.state, TransferState):
                    raise InvalidArgumentError(f"snapshot holds {state!r}, not a RecordState")
                self._check_held(state.allocation)
                rec = thawed[id(state)] = RequestRecord.thawed(state)
            return rec

        records: dict[Hashable, RequestRecord] = {}
        for state in snapshot.records:
            rec = thaw(state)
            if rec.rid in records:
                raise InvalidArgumentError(f"snapshot holds request {rec.rid!r} twice")
            records[rec.rid] = rec
        admissions = deque([thaw(s) for s in snapshot.admissions])
        resumes = deque([thaw(s) for s in snapshot.resumes])
        quarantine = dict(snapshot.quarantine)
        for allocation in quarantine.values():
            self._check_held(allocation)
        if self.sizer is not None:
            assert snapshot.sizer is not None
            self.sizer.restore(snapshot.sizer)
        self._records, self._admissions, self._resumes = records, admissions, resumes
        self._quarantine = quarantine
        self._finished = list(snapshot.finished)
        self._next_incarnation = snapshot.next_incarnation
        self.stale_statuses = snapshot.stale_statuses
        self.orphan_statuses = snapshot.orphan_statuses
        self.malformed_statuses = snapshot.malformed_statuses
        self.peer_lost = snapshot.peer_lost
        self._snap = snapshot

    def _check_held(self, allocation: object) -> None:
        if allocation is not None and not (
            isinstance(allocation, Allocation) and self.allocator.is_live(allocation)
        ):
            raise InvalidArgumentError(
                f"snapshot names {allocation!r}, which is not live in this receiver's allocator"
            )

    # -- statuses ------------------------------------------------------------------

    def _on_status(self, status: Status) -> None:
        """Handle one item of a batch; a bad item fails at most its own request."""
        kind = type(status)
        if kind in ROUND_STATUSES:
            problem = malformed_status(status)
            if problem is not None:
                self._on_malformed(status, problem)
                return
            s: Landed | Cancelled | SenderError = status  # type: ignore[assignment]
            key = (s.rid, s.incarnation, s.epoch)
            held = self._quarantine.pop(key, None) if self._quarantine else None
            if held is not None:
                self.allocator.free(held)  # that round can no longer be written
                return
            req = self._records.get(s.rid)
            if req is None or req.incarnation != s.incarnation:
                self.orphan_statuses += 1  # no life of ours, or an earlier life of this id
                return
            try:
                if kind is Landed:
                    self._on_landed(req, s)  # type: ignore[arg-type]
                else:
                    self._on_refused(req, s)  # type: ignore[arg-type]
            except (InvalidArgumentError, TransportError) as error:
                # Bad values that got past the checks: this request's problem alone. A
                # status about the round in flight means the sender writes it no more.
                if req.state.terminal:
                    raise
                done = req.allocation is not None and s.epoch == req.epoch
                self._fail(req, f"protocol error: {error}", peer_alive=True, written=not done)
        elif kind is PeerLost:
            self._on_peer_lost(status)  # type: ignore[arg-type]
        elif kind is PeerBack:
            self.peer_lost = None  # a new sender: requests added from now on are served
        else:
            self._on_malformed(status, f"{kind.__name__} is not a status")

    def _on_malformed(self, status: object, problem: str) -> None:
        """Count a malformed item; fail the one live request it names, if it names one."""
        self.malformed_statuses += 1
        rid = getattr(status, "rid", None)
        incarnation = getattr(status, "incarnation", None)
        try:
            req = self._records.get(rid)
        except TypeError:
            return
        if req is not None and req.incarnation == incarnation and not req.state.terminal:
            self._fail(req, f"protocol error: malformed status ({problem})", peer_alive=True)

    def _on_landed(self, req: RequestRecord, status: Landed) -> None:
        if req.state.terminal:
            self._stale(req)
            return
        verdict, landed = (
            self._classify(req, status)
            if req.state is S.Transferring and status.epoch >= 0
            else (Verdict.UNEXPECTED, status)
        )
        allocation = req.allocation
        if verdict is Verdict.STALE:
            self._stale(req)
            return
        if verdict is Verdict.UNEXPECTED or allocation is None:
            self._fail(
                req,
                f"protocol error: status for round {status.epoch}, "
                f"but the round in flight is {self._in_flight_epoch(req)}",
                peer_alive=True,
            )
            return
        problem = self._check_round(req, allocation, landed)
        if problem is not None:
            self._fail(req, f"protocol error: {problem}", peer_alive=True)
            return
        self._fire(req, Event.LANDED, landed.final, landed)

    def _classify(self, req: RequestRecord, status: Landed) -> tuple[Verdict, Landed]:
        """Whether ``status`` is ``req``'s round in flight, and the status to consume.

        resumekit decides by epoch alone (:func:`~resumekit.protocol.rounds.by_epoch`).
        This is the one hook a subclass may override: the checkers' reference
        designs (``resumekit.properties.strategies``) decide here what a KVPoll-only
        engine would, from what it sees (the status without its epoch, the posted
        blocks, the buffers), and return the status they believe arrived.
        """
        return by_epoch(req.epoch, status.epoch, req.allocation is not None), status

    def _check_round(
        self, req: RequestRecord, allocation: Allocation, status: Landed
    ) -> str | None:
        """Why the current round's status cannot be right, or ``None``."""
        tokens, total = status.tokens, status.total
        if tokens < 1:
            return f"round {status.epoch} carries {tokens} tokens"
        if tokens > allocation.capacity_tokens:
            return (
                f"round {status.epoch} reports {tokens} tokens; its allocation holds "
                f"{allocation.capacity_tokens}"
            )
        if req.total is None:
            if total < 1:
                return f"announced total of {total} tokens"
            # Round 0 is the only round whose aux row is written: read it once, here.
            aux = self.buffers.read_aux(allocation)
            if aux[AUX_TOTAL_TOKENS] != total:
                return f"status announces {total} tokens but aux[0] says {aux[AUX_TOTAL_TOKENS]}"
            if req.sent + tokens > total or status.final != (req.sent + tokens == total):
                return self._check_span(req, status)
            try:
                output = self.buffers.new_output(total)
            except (RuntimeError, MemoryError, InvalidArgumentError) as error:
                return f"no room for the output of {total} tokens ({type(error).__name__})"
            req.total = total
            if self.sizer is not None:
                self.sizer.observe(req.hint, total)
            req.mrope_delta = aux[AUX_MROPE_DELTA]
            req.output = output
            return None
        if total != req.total:
            return f"total changed from {req.total} to {total} tokens"
        return self._check_span(req, status)

    @staticmethod
    def _check_span(req: RequestRecord, status: Landed) -> str | None:
        end = req.sent + status.tokens
        if end > status.total:
            return f"round {status.epoch} ends at token {end}, past the total {status.total}"
        if status.final != (end == status.total):
            return (
                f"round {status.epoch} ends at token {end} of {status.total} "
                f"but says final={status.final}"
            )
        return None

    def _on_refused(self, req: RequestRecord, status: Cancelled | SenderError) -> None:
        """The sender will not write round ``status.epoch``: stale if old, else a failure.

        Only a refusal of the round in flight frees its blocks at once; a refusal
        of a round never posted is a protocol error, and the round in flight (the
        sender may still write it) goes to quarantine like any failed request's.
        """
        if req.state.terminal or (req.state is S.Transferring and 0 <= status.epoch < req.epoch):
            self._stale(req)
            return
        why = status.reason if isinstance(status, SenderError) else "cancelled the round"
        if req.state is S.Transferring and status.epoch == req.epoch and req.allocation is not None:
            # The round in flight will not be written: its blocks go straight back.
            self._fail(req, f"sender error: {why}", peer_alive=True, written=False)
            return
        self._fail(
            req,
            f"protocol error: sender error ({why}) for round {status.epoch}, "
            f"but the round in flight is {self._in_flight_epoch(req)}",
            peer_alive=True,
        )

    def _on_peer_lost(self, status: PeerLost) -> None:
        self.peer_lost = status.reason
        for req in list(self._records.values()):
            if not req.state.terminal:
                self._fail(req, f"peer lost: {status.reason}", peer_alive=False)
        quarantine, self._quarantine = self._quarantine, {}
        for allocation in quarantine.values():
            self.allocator.free(allocation)  # a dead peer writes nothing more

    def _stale(self, req: RequestRecord) -> None:
        req.stale += 1
        self.stale_statuses += 1
        self._fire(req, Event.STALE)

    # -- transitions -----------------------------------------------------------------

    def _fire(
        self,
        req: RequestRecord,
        event: Event,
        guard: bool = True,
        status: Landed | None = None,
    ) -> Action:
        """Apply ``event`` through the compiled table and run the action it names; returns it."""
        row = TABLE[req.state].get(event)
        if row is None:
            raise InvariantError(f"event {event.value!r} is illegal in state {req.state.name}")
        dest, action = row.if_true if guard else row.if_false
        if action is not Action.FINISH:  # FINISH: Success once the last round is copied out
            req.state = dest
        if action is Action.IGNORE:
            return action
        if action is Action.POST_ROUND:
            self._post_round(req)
        elif action is Action.CONSUME or action is Action.FINISH:
            assert status is not None
            landed = req.allocation
            assert landed is not None
            offset = req.sent
            req.allocation = None
            req.sent += status.tokens
            req.rounds += 1
            resumed = False
            if action is Action.CONSUME:
                req.epoch += 1
                # Post the next round first when blocks are free: the sender fills them
                # while this round is copied out (never the landed round's own blocks).
                resumed = not self._must_wait(req) and self._try_resume(req, early=True)
            self._consume(req, status, landed, offset)
            if action is Action.FINISH:
                req.state = dest
                self._finished.append(req.rid)
            elif not resumed:
                if self._must_wait(req):
                    self._resumes.append(req)  # older resumes first
                else:
                    self._try_resume(req)
        elif action is Action.QUEUE_ADMISSION:
            self._admissions.append(req)
        elif action is Action.WAIT_FOR_BLOCKS and dest is S.Transferring:
            self._resumes.append(req)
        # An admission that waits for blocks stays at the head of its queue.
        return action

    def _post_round(self, req: RequestRecord) -> None:
        allocation = req.allocation
        assert allocation is not None
        capacity = allocation.capacity_tokens
        expect = None if req.total is None else min(req.total - req.sent, capacity)
        req.passed = 0
        post = RoundPost(
            req.rid,
            req.epoch,
            allocation.blocks,
            capacity,
            req.sent,
            allocation,
            expect,
            incarnation=req.incarnation,
        )
        if self.observer is not None:
            self.observer.round_posted(post)
        self.transport.post_round(post)

    def _consume(
        self, req: RequestRecord, status: Landed, allocation: Allocation, offset: int
    ) -> None:
        """Copy the landed round out at ``offset`` and free its blocks, once."""
        assert req.output is not None  # made when round 0 was checked
        try:
            self.buffers.read_into(allocation, status.tokens, req.output, offset)
        except BaseException:
            # The round landed, so nothing writes its blocks any more: they go back
            # before the request fails (an early resume may already be in flight;
            # _fire took the landed allocation off the request before this call).
            self.allocator.free(allocation)
            raise
        if self.observer is not None:
            self.observer.round_consumed(req.rid, status.epoch, status.tokens, allocation)
        self.allocator.free(allocation)

    def _try_resume(self, req: RequestRecord, *, early: bool = False) -> bool:
        """Allocate and post the next round.

        ``early`` (before the landed round is freed) takes a full-size round from
        the free blocks or nothing, and changes nothing when it takes nothing:
        it overlaps the next round with this copy-out without shrinking rounds.
        """
        assert req.total is not None
        want = req.total - req.sent
        if self.max_resume_tokens is not None and want > self.max_resume_tokens:
            want = self.max_resume_tokens
        if self._bulk(req) and want > self._bulk_round_tokens:
            want = self._bulk_round_tokens
        if early:
            if self.allocator.blocks_for(want) > self.allocator.num_free_blocks:
                return False
            allocation = self.allocator.allocate(want, req.rid)
        else:
            allocation = self.allocator.allocate_up_to(want, req.rid)
        req.allocation = allocation
        self._fire(req, Event.ALLOCATE, allocation is not None)
        return allocation is not None

    def _try_admit(self, req: RequestRecord) -> bool:
        sizer = self.sizer
        tokens = self.default_allocate_tokens if sizer is None else sizer.choose(req.hint)
        req.allocation = self.allocator.allocate(tokens, req.rid)
        self._fire(req, Event.ADMIT, req.allocation is not None)
        return req.allocation is not None

    def _serve_waiting(self) -> None:
        """Resumes first, then admissions, each in arrival order, while blocks are free."""
        if self.policy is not None:
            self._serve_by_policy()
            return
        resumes = self._resumes
        while resumes:
            req = resumes[0]
            if req.state is not S.Transferring or req.allocation is not None:
                resumes.popleft()  # failed (or served) while it waited
                continue
            if self.allocator.num_free_blocks == 0:
                return
            resumes.popleft()
            if not self._try_resume(req):
                return  # it queued itself again at the back; keep arrival order
        admissions = self._admissions
        while admissions:
            req = admissions[0]
            if req.state is not S.WaitingForInput:
                admissions.popleft()
                continue
            if not self._try_admit(req):
                return
            admissions.popleft()

    # -- a scheduling policy (resumekit.protocol.policy) ------------------------------

    def _bulk(self, req: RequestRecord) -> bool:
        """Whether ``req`` is a bulk request of the policy (its total exceeds bulk_tokens)."""
        bulk = self._bulk_tokens
        return bulk is not None and req.total is not None and req.total > bulk

    def _yields(self, req: RequestRecord) -> bool:
        """Whether waiting resume ``req`` yields: bulk, or more than ``yield_tokens`` left,
        and passed over fewer than ``max_passed_over`` times."""
        if req.passed >= self._max_passed_over:
            return False
        if self._bulk(req):
            return True
        limit = self._yield_tokens
        return limit is not None and req.total is not None and req.total - req.sent > limit

    def _in_flight(self) -> int:
        """Rounds posted and not yet landed (a scan: only under a policy)."""
        n = 0
        for rec in self._records.values():
            if rec.allocation is not None:
                n += 1
        return n

    def _window_full(self) -> bool:
        """Whether the policy's rounds in flight are all taken."""
        window = self._window
        return window is not None and self._in_flight() >= window

    def _must_wait(self, req: RequestRecord) -> bool:
        """Whether ``req``'s next round, due now, must queue behind others waiting."""
        if self.policy is None:
            return bool(self._resumes)
        # No window check: the round that just landed left a slot, which this one takes.
        if any(_waits(r) and not self._yields(r) for r in self._resumes):
            return True
        if not self._yields(req):
            return False
        # It yields: behind anything waiting, and until the link is idle.
        return (
            any(_waits(r) for r in self._resumes)
            or any(r.state is S.WaitingForInput for r in self._admissions)
            or self._in_flight() > 0
        )

    def _next_by_policy(self) -> tuple[RequestRecord, bool, bool] | None:
        """The next to serve, whether it is an admission and whether it yields; drops
        entries no longer waiting."""
        resumes, admissions = self._resumes, self._admissions
        if any(not _waits(r) for r in resumes):
            self._resumes = resumes = deque([r for r in resumes if _waits(r)])
        while admissions and admissions[0].state is not S.WaitingForInput:
            admissions.popleft()
        for req in resumes:
            if not self._yields(req):
                return req, False, False
        if admissions:
            return admissions[0], True, False
        # All yield: the fewest tokens left first (the oldest of equals), bulk last.
        best: RequestRecord | None = None
        for req in resumes:
            if not self._bulk(req) and (best is None or _left(req) < _left(best)):
                best = req
        if best is None and resumes:
            best = resumes[0]
        return None if best is None else (best, False, True)

    def _serve_by_policy(self) -> None:
        """Resumes that do not yield in queue order, then admissions, then yielding
        resumes, these only on an idle link."""
        while (picked := self._next_by_policy()) is not None:
            req, admission, yields = picked
            if self._window_full():
                return
            if admission:
                if not self._try_admit(req):
                    return
                self._admissions.popleft()
                for waiting in self._resumes:
                    waiting.passed += 1  # all yield: one that does not would have gone first
                continue
            if self.allocator.num_free_blocks == 0 or (yields and self._in_flight() > 0):
                return
            self._resumes.remove(req)
            if not self._try_resume(req):
                return  # it queued itself again at the back

    def _fail(
        self, req: RequestRecord, reason: str, *, peer_alive: bool, written: bool = True
    ) -> None:
        """Fail ``req``; a round the sender may still write goes to quarantine, not the pool."""
        allocation = req.allocation
        # The table decides: a round the sender may still write is quarantined.
        action = self._fire(req, Event.FAIL, allocation is not None and peer_alive and written)
        quarantined = False
        req.reason = reason
        req.allocation = None
        if allocation is not None:
            if action is Action.QUARANTINE:
                self._quarantine[(req.rid, req.incarnation, req.epoch)] = allocation
                quarantined = True
            else:
                self.allocator.free(allocation)
        if peer_alive:
            self.transport.cancel(
                req.rid, req.epoch if quarantined else NO_EPOCH, incarnation=req.incarnation
            )
        if self.observer is not None:
            self.observer.request_failed(req.rid, reason)
        self._finished.append(req.rid)

    # -- helpers -------------------------------------------------------------------

    def _record(self, rid: Hashable) -> RequestRecord:
        try:
            return self._records[rid]
        except KeyError:
            raise UnknownRequestError(f"unknown request {rid!r}") from None
        except TypeError:
            raise _unhashable(rid) from None

    @staticmethod
    def _in_flight_epoch(req: RequestRecord) -> str:
        return str(req.epoch) if req.allocation is not None else "none"


def _left(req: RequestRecord) -> int:
    """Tokens ``req`` has still to receive (its total is known once round 0 landed)."""
    assert req.total is not None
    return req.total - req.sent


def _waits(req: RequestRecord) -> bool:
    """Whether ``req`` waits for blocks for its next resume."""
    return req.state is S.Transferring and req.allocation is None
