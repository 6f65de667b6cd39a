"""What the bounded explorer explores: the real protocol objects under an adversary.

Stateright's shape: :meth:`Harness.initial_worlds`, :meth:`Harness.actions`,
:meth:`Harness.apply` (the next state, computed by calling the real receiver,
sender and allocator) and the properties (:meth:`Harness.done_problems`, and the
liveness the explorer proves over the graph). The harness owns only what the
engine and the network do: which request is added when, which status is
delivered, which post the sender reads, and the faults within :class:`Bounds`.
Every decision about rounds, blocks and failures is made by the shipped code.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass, fields
from itertools import combinations_with_replacement
from operator import itemgetter
from typing import Any, Final

from resumekit.errors import ResumeKitError
from resumekit.properties.invariants import (
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    PROGRESS,
    InvariantViolation,
    nothing_left,
    output_intact,
    stale_changes_nothing,
    succeeds_without_faults,
)
from resumekit.properties.world import (
    PRESSURE,
    CellBuffers,
    CheckedAllocator,
    ExplorerTransport,
    Ledger,
    TokenSource,
    clone,
    share_as_immutable,
)
from resumekit.statemachine import messages as msg
from resumekit.statemachine.declaration import TransferState
from resumekit.statemachine.dedup import RoundFilter
from resumekit.statemachine.receiver import ResumableReceiver
from resumekit.statemachine.sender import EmbeddingSender

S = TransferState
CRASH: Final = "crash"  # the real code raised: reported like a violated invariant
MROPE_BASE: Final = 1000  # life ``label`` announces mRoPE delta ``MROPE_BASE + label``


# Far past what an exhaustive search finishes (the state space grows exponentially in
# each), and small enough that nothing is built per unit of a bound before it starts.
MAX_BOUND: Final = {
    "blocks": 64,
    "requests": 16,
    "max_rounds": 64,
    "default_blocks": 64,
    "block_size": 64,
}
MAX_FAULTS: Final = 16


@dataclass(frozen=True)
class Bounds:
    """What the explorer enumerates: pool, requests, totals and the fault budget.

    ``block_size`` tokens per block; totals range over ``1..max_rounds`` blocks'
    worth of tokens, so a request takes at most ``max_rounds`` rounds. Each
    fault may happen up to its budget, anywhere: ``duplicates`` (a status sent
    twice), ``aborts``, ``crashes`` (the sender dies, maybe right after a write),
    ``pressure`` (blocks another pool user takes right after a free, before the
    freer can allocate again), ``squeezes`` (blocks it takes from the free pool
    at any step; it may keep for good all but a default round's worth, and gives
    back the rest at some point), ``forgeries`` (a status for a round never posted),
    ``reuses`` (an id added again after its life was taken, old statuses still in
    flight), ``restarts`` (the sender dies and a fresh one takes over) and
    ``poisons`` (a malformed status or post). ``batches`` also delivers every
    status in flight in one batch; ``late_sources`` lets the encoder finish a
    request at any point instead of before the receiver starts it.
    """

    blocks: int = 4
    requests: int = 2
    max_rounds: int = 4
    default_blocks: int = 1
    reuse: str = "lifo"
    block_size: int = 1
    duplicates: int = 1
    aborts: int = 1
    crashes: int = 1
    pressure: int = 1
    squeezes: int = 0
    forgeries: int = 0
    reuses: int = 0
    restarts: int = 0
    poisons: int = 0
    batches: bool = False
    late_sources: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "reuse":
                if value not in ("lifo", "fifo"):
                    raise InvalidBounds(f"reuse must be lifo or fifo, not {value!r}")
            elif f.name in ("batches", "late_sources"):
                if not isinstance(value, bool):
                    raise InvalidBounds(f"{f.name} must be a bool")
            elif type(value) is not int:
                raise InvalidBounds(f"{f.name} must be an int, not {type(value).__name__}")
        for name in ("blocks", "requests", "max_rounds", "default_blocks", "block_size"):
            if not 1 <= getattr(self, name) <= MAX_BOUND[name]:
                raise InvalidBounds(
                    f"{name} must be in 1..{MAX_BOUND[name]}, got {getattr(self, name)}"
                )
        for name in FAULTS:
            if not 0 <= getattr(self, name) <= MAX_FAULTS:
                raise InvalidBounds(f"{name} must be in 0..{MAX_FAULTS}, got {getattr(self, name)}")
        if self.default_blocks > self.blocks:
            raise InvalidBounds(
                f"default_blocks ({self.default_blocks}) must not exceed blocks ({self.blocks})"
            )
        if self.pressure + self.squeezes > self.blocks:
            raise InvalidBounds(
                f"pressure {self.pressure} and squeezes {self.squeezes} exceed the pool's "
                f"{self.blocks} blocks"
            )

    @property
    def budget(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in FAULTS)


FAULTS: Final = (
    "duplicates",
    "aborts",
    "crashes",
    "pressure",
    "squeezes",
    "forgeries",
    "reuses",
    "restarts",
    "poisons",
)
DUP, ABORT, CRASHES, GRAB, SQUEEZE, FORGE, REUSE, RESTART, POISON = range(len(FAULTS))


class InvalidBounds(ResumeKitError, ValueError):
    """Bounds that would explore nothing, or a pool that could never serve round 0."""


class World:
    """One state: the real objects, plus what the adversary has left to do."""

    receiver: ResumableReceiver
    sender: EmbeddingSender
    allocator: CheckedAllocator
    buffers: CellBuffers
    transport: ExplorerTransport
    ledger: Ledger
    # Tuples, replaced on change, so that copying a world shares them.
    totals: tuple[int, ...]  # per request, in tokens
    added: tuple[bool, ...]  # per request: its current life has been added to the receiver
    encoded: tuple[bool, ...]  # per request: its current life's source went to the sender
    lives: tuple[int, ...]  # per request: how many lives it has had (the current one counts)
    budget: tuple[int, ...]
    hurt: tuple[bool, ...]  # per request: a fault aimed at its current life


class Harness:
    """Initial worlds, enabled actions and successors of the real protocol under ``bounds``."""

    def __init__(self, bounds: Bounds, round_filter: RoundFilter) -> None:
        self.bounds = bounds
        self.filter = round_filter
        self.remembers_blocks = bool(getattr(round_filter, "remembers_blocks", False))
        share_as_immutable(type(round_filter))
        self.sources: dict[tuple[int, int], TokenSource] = {}

    # -- initial states ----------------------------------------------------------------

    def initial_totals(self) -> Iterator[tuple[int, ...]]:
        """Each multiset of totals once: requests are interchangeable (the request symmetry)."""
        b = self.bounds
        sizes = [k * b.block_size for k in range(1, b.max_rounds + 1)]
        yield from combinations_with_replacement(sizes, b.requests)

    def initial_world(self, totals: tuple[int, ...]) -> World:
        b = self.bounds
        ledger = Ledger()
        allocator = CheckedAllocator(b.blocks, b.block_size, reuse=b.reuse)  # type: ignore[arg-type]
        allocator.ledger = ledger
        buffers = CellBuffers(allocator, ledger)
        transport = ExplorerTransport(buffers, ledger)
        receiver = ResumableReceiver(
            buffers,  # type: ignore[arg-type]
            transport,
            b.default_blocks * b.block_size,
            round_filter=self.filter,
        )
        w = World()
        w.receiver, w.allocator = receiver, allocator
        w.buffers, w.transport, w.ledger = buffers, transport, ledger
        w.sender = EmbeddingSender(transport)
        w.totals = totals
        w.added = (False,) * len(totals)
        w.encoded = (False,) * len(totals)
        w.lives = (1,) * len(totals)
        w.budget = b.budget
        w.hurt = (False,) * len(totals)
        for r in range(len(totals)):
            ledger.labels[r] = self._label(w, r)
            if not b.late_sources:
                self._encode(w, r)
        return w

    def _label(self, w: World, r: int) -> int:
        """The current life of request ``r``: its tokens are ``(label, i)``."""
        return r + len(w.totals) * (w.lives[r] - 1)

    def _encode(self, w: World, r: int) -> None:
        """The encode side finishes request ``r``'s current life: its source goes to the sender."""
        label = w.ledger.labels[r]
        w.encoded = _set(w.encoded, r, True)
        total = w.totals[r]
        src = self.sources.get((label, total))
        if src is None:
            src = self.sources[(label, total)] = TokenSource.make(label, total)
        w.sender.add(r, src, mrope_delta=MROPE_BASE + label)

    # -- actions -----------------------------------------------------------------------

    def actions(self, w: World) -> list[tuple[Any, ...]]:
        """Every action enabled in ``w``."""
        out: list[tuple[Any, ...]] = [("add", r) for r, done in enumerate(w.added) if not done]
        out.extend(("encode", r) for r, done in enumerate(w.encoded) if not done)
        receiver, t, allocator = w.receiver, w.transport, w.allocator
        if receiver._resumes or receiver._admissions or t.loss_seen:
            out.append(("step",))
        statuses = sorted(set(t.statuses), key=status_order)
        out.extend(("deliver", s) for s in statuses)
        if t.events:
            out.append(("event",))
        if self.bounds.batches and len(t.statuses) + len(t.events) > 1:
            out.append(("deliver-all",))
        if t.posts and t.sender_alive:
            out.append(("send",))
        dups, aborts, crashes, grab, squeeze, forge, reuse, restart, poison = w.budget
        if dups:
            out.extend(("duplicate", s) for s in statuses if type(s) in msg.ROUND_STATUSES)
        n = len(w.totals)
        live = [r for r in range(n) if w.added[r] and not receiver.poll(r).terminal]
        if aborts:
            out.extend(("abort", r) for r in live)
        if crashes and t.sender_alive:
            out.append(("crash",))
            if t.posts and type(t.posts[0]) is msg.RoundPost:
                out.append(("crash-mid-round",))
        if squeeze and allocator.num_free_blocks:
            out.append(("squeeze",))
        if grab and not allocator.grab_armed:
            out.append(("grab",))
        if allocator.pressure:
            out.append(("unsqueeze",))
        if forge:
            for r in live:
                out.extend(("forge", r, kind, far) for kind in FORGED for far in (False, True))
                if receiver.record(r).allocation is not None:
                    out.append(("forge", r, "oversized", False))
        if reuse:
            out.extend(("reuse", r) for r in range(n) if w.added[r] and receiver.poll(r).terminal)
        if restart and t.sender_alive:
            out.append(("restart",))
        if poison:
            for r in live:
                out.append(("poison", r))
                if t.sender_alive:
                    out.append(("poison-post", r))
        return out

    def apply(self, w: World, action: tuple[Any, ...]) -> None:
        """Perform ``action`` on ``w`` in place, through the real objects' public API."""
        handler = _HANDLERS.get(action[0])
        if handler is None:
            raise ValueError(f"unknown action {action!r}")
        handler(self, w, action)

    # -- one handler per action kind: the engine's, the network's, the faults' --------

    def _deliver(self, w: World, action: tuple[Any, ...]) -> None:
        status, t, receiver = action[1], w.transport, w.receiver
        i = t.statuses.index(status)
        t.statuses = t.statuses[:i] + t.statuses[i + 1 :]
        before = self._stale_snapshot(w, status)
        t.deliver = (status,)
        self._receiver_step(w)
        if before is not None:
            problem = stale_changes_nothing(status.rid, before, _record_view(receiver, status.rid))
            if problem is not None:
                raise InvariantViolation(PROGRESS, problem)

    def _event(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.deliver, t.events = t.events[:1], t.events[1:]
        self._receiver_step(w)

    def _deliver_all(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.deliver = t.events + tuple(sorted(t.statuses, key=status_order))
        t.statuses, t.events = (), ()
        self._receiver_step(w)

    def _step(self, w: World, action: tuple[Any, ...]) -> None:
        self._receiver_step(w)

    def _receiver_step(self, w: World) -> None:
        """One receiver step (fairness checked); after a restart, the new sender connects."""
        _checked_step(w)
        if w.transport.new_sender:
            self._connect_new_sender(w)

    def _send(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.hand_over, t.posts = t.posts[:1], t.posts[1:]
        w.sender.step()

    def _add(self, w: World, action: tuple[Any, ...]) -> None:
        r, t, receiver = action[1], w.transport, w.receiver
        w.added = _set(w.added, r, True)
        if t.restarting or receiver.peer_lost is not None or not t.sender_alive:
            w.hurt = _set(w.hurt, r, True)  # added while the sender is (known) gone:
            w.encoded = _set(w.encoded, r, True)  # its source is lost with the link
        receiver.add(r)
        w.ledger.lives[receiver.record(r).incarnation] = w.lives[r]

    def _duplicate(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, DUP)
        w.transport.statuses += (action[1],)

    def _abort(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, ABORT)
        w.hurt = _set(w.hurt, action[1], True)
        w.receiver.abort(action[1])

    def _crash(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, CRASHES)
        w.hurt = (True,) * len(w.hurt)
        t = w.transport
        if action[0] == "crash":
            t.crash()
            return
        t.crash_armed = True  # crash-mid-round: write the next round, die before reporting
        t.hand_over, t.posts = t.posts[:1], t.posts[1:]
        w.sender.step()
        if t.sender_alive:  # the post wrote nothing: the sender dies all the same
            t.crash()

    def _squeeze(self, w: World, action: tuple[Any, ...]) -> None:
        if action[0] == "squeeze":
            w.budget = _spend(w.budget, SQUEEZE)
            w.allocator.squeeze()
        else:
            w.budget = _spend(w.budget, GRAB)
            w.allocator.grab_armed = True

    def _unsqueeze(self, w: World, action: tuple[Any, ...]) -> None:
        allocator = w.allocator
        allocator.free(allocator.pressure[-1])
        allocator.pressure = allocator.pressure[:-1]

    def _forge(self, w: World, action: tuple[Any, ...]) -> None:
        """Deliver at once a status for a round of ``r`` not posted: the next, or a far one."""
        w.budget = _spend(w.budget, FORGE)
        r, what, far = action[1], action[2], action[3]
        w.hurt = _set(w.hurt, r, True)
        rec = w.receiver.record(r)
        epoch, inc = rec.epoch + (2 * self.bounds.max_rounds if far else 1), rec.incarnation
        forged: msg.Status
        if what == "oversized":  # the round in flight, with more tokens than its blocks hold
            assert rec.allocation is not None
            tokens = rec.allocation.capacity_tokens + 1
            forged = msg.Landed(r, rec.epoch, tokens, rec.sent + tokens, True, incarnation=inc)
        elif what == "landed":
            forged = msg.Landed(r, epoch, 1, w.totals[r], False, incarnation=inc)
        elif what == "cancelled":
            forged = msg.Cancelled(r, epoch, incarnation=inc)
        else:
            forged = msg.SenderError(r, epoch, "forged", incarnation=inc)
        w.transport.deliver = (forged,)
        self._receiver_step(w)

    def _reuse_id(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, REUSE)
        self._reuse(w, action[1])

    def _restart(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, RESTART)
        w.hurt = tuple(h or a for h, a in zip(w.hurt, w.added, strict=True))
        # What the old encoder had not finished for started requests dies with it.
        w.encoded = tuple(e or a for e, a in zip(w.encoded, w.added, strict=True))
        w.transport.crash("sender restarted")
        w.transport.restarting = True

    def _poison(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = _spend(w.budget, POISON)
        r = action[1]
        w.hurt = _set(w.hurt, r, True)
        rec = w.receiver.record(r)
        garbled: Any = None  # a field of the wrong type, as a broken decoder would make it
        if action[0] == "poison":
            bad: Any = msg.Landed(r, garbled, 1, w.totals[r], False, incarnation=rec.incarnation)
            w.transport.statuses += (bad,)
            return
        bad = msg.RoundPost(
            r, rec.epoch, (garbled,), 1, rec.sent, None, None, incarnation=rec.incarnation
        )
        w.transport.hand_over = (bad,)
        w.sender.step()

    def _encode_late(self, w: World, action: tuple[Any, ...]) -> None:
        self._encode(w, action[1])

    def _connect_new_sender(self, w: World) -> None:
        """After a restart: a fresh sender, given the sources of lives not yet added."""
        w.transport.new_sender = False
        w.sender = EmbeddingSender(w.transport)
        for r, added in enumerate(w.added):
            if not added and w.encoded[r]:
                self._encode(w, r)

    def _reuse(self, w: World, r: int) -> None:
        """The engine takes ``r``'s finished life and adds the id again for a new request."""
        result = w.receiver.take(r)
        for invariant, problem in self._judge(w, r, result):
            raise InvariantViolation(invariant, problem)
        if not w.encoded[r]:
            # Sources are bound in the order they are added: the encoder finishes the
            # old life (its source is dropped) before the new one's.
            self._encode(w, r)
        w.lives = _set(w.lives, r, w.lives[r] + 1)
        w.added = _set(w.added, r, False)
        w.encoded = _set(w.encoded, r, False)
        w.ledger.labels[r] = self._label(w, r)
        w.hurt = _set(w.hurt, r, not w.transport.sender_alive and not w.transport.restarting)
        if not self.bounds.late_sources:
            self._encode(w, r)

    def _stale_snapshot(self, w: World, status: msg.Status) -> tuple[object, ...] | None:
        """For a status of an already consumed round or an earlier life: what it must not change."""
        if type(status) not in msg.ROUND_STATUSES or self.filter.name != "epoch":
            return None
        rid = getattr(status, "rid", None)
        if rid not in w.receiver or msg.malformed_status(status) is not None:
            return None
        rec = w.receiver.record(rid)
        s: msg.Landed = status  # type: ignore[assignment]
        if s.incarnation == rec.incarnation and (
            rec.state is not S.Transferring or s.epoch >= rec.epoch
        ):
            return None
        if (rid, s.incarnation, s.epoch) in w.receiver.quarantined():
            return None
        if rec.state is S.WaitingForInput or (
            rec.state is S.Transferring and rec.allocation is None
        ):
            return None  # waiting for blocks: the step may serve it, whatever the status
        return _record_view(w.receiver, rid)

    # -- properties --------------------------------------------------------------------

    def is_done(self, w: World) -> bool:
        """Every life added and terminal, nothing in flight (pool pressure may stay held)."""
        t = w.transport
        if t.statuses or t.events or (t.posts and t.sender_alive) or t.loss_seen:
            return False
        if not all(w.added):
            return False
        if not all(w.encoded):
            return False
        receiver = w.receiver
        return all(receiver.poll(r).terminal for r in range(len(w.totals)))

    def _judge(self, w: World, r: int, result: Any) -> list[tuple[str, str]]:
        """What is wrong with the taken result of ``r``'s current life."""
        problems: list[tuple[str, str]] = []
        label, total = w.ledger.labels[r], w.totals[r]
        if result.ok:
            expected = [(label, i) for i in range(total)]
            if result.output != expected or result.total_tokens != total:
                problems.append((INTEGRITY, output_intact(f"r{r} life {w.lives[r]}", False) or ""))
            if result.mrope_delta != MROPE_BASE + label:
                problems.append(
                    (
                        INTEGRITY,
                        f"request {r!r} reports mRoPE delta {result.mrope_delta}, "
                        f"the sender announced {MROPE_BASE + label}",
                    )
                )
        if not w.hurt[r]:
            why = succeeds_without_faults(r, result.state.name, result.reason)
            if why is not None:
                problems.append((LIVENESS, why))
        return problems

    def done_problems(self, w: World) -> list[tuple[str, str]]:
        """At a done state (on a copy): outputs intact, unhurt requests succeeded, nothing left."""
        w = clone(w, {})
        problems: list[tuple[str, str]] = []
        for r in range(len(w.totals)):
            problems += self._judge(w, r, w.receiver.take(r))
        held = [a for a in w.allocator.outstanding() if a.owner != PRESSURE]
        sender_left = len(w.sender) + len(w.sender._parked) if w.transport.sender_alive else 0
        leak = nothing_left(len(held), len(w.receiver.quarantined()), len(w.receiver), sender_left)
        if leak is not None:
            problems.append((NO_LEAK, leak))
        return problems

    # -- the abstraction -----------------------------------------------------------------

    def key(self, w: World) -> tuple[Any, ...]:
        """A hashable abstraction of ``w``; worlds with equal keys have the same futures.

        Live allocations are named by age and their blocks by position (the
        ledger proved each post names its allocation's blocks); free blocks and
        their stale bytes are left out; only a round filter that remembers block
        numbers (``seed-index``) needs the blocks of dead allocations renamed.
        Incarnations are named by the life of their id they belong to: the code
        compares them only for equality and order within one id.
        """
        allocator = w.allocator
        live = allocator._live
        rank = {id(a): i for i, a in enumerate(live.values())}
        rank[id(None)] = -1
        lives = w.ledger.lives
        receiver = w.receiver
        renamed = None
        if self.remembers_blocks:
            order = allocator._free.snapshot()
            for a in live.values():
                order.extend(a.blocks)
            renamed = {b: i for i, b in enumerate(order)}
        # Live records keep their order (a lost peer fails them in it, freeing blocks in
        # it). Finished ones are inert (a status for one changes counters only), so only
        # what the take is judged by stays: not their order, reason text or progress.
        live_records: list[tuple[object, ...]] = []
        finished: list[tuple[object, ...]] = []
        running: list[Any] = []
        consumed = w.ledger.consumed
        row: tuple[object, ...]
        for rid, rec in receiver._records.items():
            if rec.state is S.Failed:
                finished.append((rid, lives.get(rec.incarnation), False, rec.reason is None))
                continue
            if rec.state is S.Success:
                output: Any = rec.output
                finished.append(
                    (
                        rid,
                        lives.get(rec.incarnation),
                        True,
                        tuple(output),
                        rec.total,
                        rec.mrope_delta,
                    )
                )
                continue
            memo = rec.memo
            if renamed is not None and type(memo) is tuple:
                memo = tuple(renamed.get(b, -1 - b) for b in memo)
            output = rec.output  # the cells CellBuffers made
            row = (
                rid,
                lives.get(rec.incarnation),
                rec.state,
                rec.epoch,
                rec.sent,
                rec.total,
                rec.mrope_delta,
                rank.get(id(rec.allocation), "dead"),
                None if output is None else tuple(output),
                rec.reason,
                memo,
            )
            live_records.append(row)
            running.append(rid)
        if len(finished) > 1:
            finished.sort(key=itemgetter(0))
        cells, aux, bs = w.buffers.cells, w.buffers.aux, allocator.block_size
        rounds = w.ledger.rounds
        slots = range(bs)
        allocations = tuple(
            (
                a.owner,
                tuple([cells[b * bs + i] for b in a.blocks for i in slots]),
                rounds.get(g),
                *aux[a.blocks[0]][:3],
            )
            for g, a in live.items()
        )
        t = w.transport
        return (
            w.added,
            w.encoded,
            w.lives,
            w.budget,
            w.hurt,
            tuple([rank.get(id(a), "dead") for a in allocator.pressure]),
            allocator.grab_armed,
            allocator.num_free_blocks,
            allocations,
            tuple(live_records),
            tuple(finished),
            tuple([r.rid for r in receiver._admissions]),
            tuple([r.rid for r in receiver._resumes]),
            tuple(
                [
                    (k[0], lives.get(k[1]), k[2], rank.get(id(a), "dead"))
                    for k, a in receiver._quarantine.items()
                ]
            ),
            receiver.peer_lost,
            _sender_key(w, rank, lives),
            tuple([_post_key(p, rank, lives) for p in t.posts]),
            tuple(sorted([_status_key(s, lives) for s in t.statuses])) if t.statuses else (),
            t.events,
            t.sender_alive,
            t.restarting,
            t.loss_seen,
            # The last epoch consumed, for lives still running (a finished life's is inert).
            tuple([consumed.get(w.ledger.labels[r], -1) for r in running]),
        )


FORGED: Final = ("landed", "cancelled", "error")


def _set(values: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
    return (*values[:i], value, *values[i + 1 :])


def _spend(budget: tuple[int, ...], i: int) -> tuple[int, ...]:
    return _set(budget, i, budget[i] - 1)


def _checked_step(w: World) -> None:
    """One receiver step, checking that no request is admitted while a resume waits.

    Within a step, statuses come first and waiting resumes are served before
    admissions, so in a correct receiver a round 0 posted in the step leaves no
    resume waiting for blocks (an admission needs a block the resume could use).
    """
    t = w.transport
    posted = t.admitted
    w.receiver.step()
    if t.admitted != posted:
        waiting = [
            rid
            for rid, rec in w.receiver._records.items()
            if rec.state is S.Transferring and rec.allocation is None
        ]
        if waiting:
            raise InvariantViolation(
                PROGRESS,
                f"a request was admitted while the resume of {waiting[0]!r} waits for blocks "
                "(waiting resumes are served first)",
            )


_HANDLERS: Final[dict[str, Any]] = {
    "deliver": Harness._deliver,
    "deliver-all": Harness._deliver_all,
    "event": Harness._event,
    "step": Harness._step,
    "send": Harness._send,
    "add": Harness._add,
    "encode": Harness._encode_late,
    "duplicate": Harness._duplicate,
    "abort": Harness._abort,
    "crash": Harness._crash,
    "crash-mid-round": Harness._crash,
    "squeeze": Harness._squeeze,
    "grab": Harness._squeeze,
    "unsqueeze": Harness._unsqueeze,
    "forge": Harness._forge,
    "reuse": Harness._reuse_id,
    "restart": Harness._restart,
    "poison": Harness._poison,
    "poison-post": Harness._poison,
}


def _sender_key(w: World, rank: dict[int, int], lives: dict[int, int]) -> object:
    """What the sender holds; nothing, once it is dead for good (nothing reaches it)."""
    t = w.transport
    if not (t.sender_alive or t.restarting or t.loss_seen):
        return None
    sender = w.sender
    parked = sender._parked
    return (
        tuple(
            [
                (
                    rid,
                    tuple(
                        [
                            (
                                s.data.label,  # type: ignore[attr-defined]
                                lives.get(s.incarnation),  # type: ignore[arg-type]
                                s.sent,
                                s.next_epoch,
                                s.total,
                                s.mrope_delta,
                            )
                            for s in sources
                        ]
                    ),
                )
                for rid, sources in sender._lives.items()
            ]
        ),
        tuple([(rid, tuple([_post_key(p, rank, lives) for p in ps])) for rid, ps in parked.items()])
        if parked
        else (),
        # Both dicts keep recency order only to evict beyond max_tombstones: sorted.
        tuple(sorted(sender._cancelled.items())),
        tuple(sorted([(rid, lives.get(inc, 0)) for rid, inc in sender._ended.items()])),
    )


def _post_key(p: msg.Post, rank: dict[int, int], lives: dict[int, int]) -> tuple[object, ...]:
    if type(p) is msg.Cancel:
        return ("cancel", p.rid, lives.get(p.incarnation, p.incarnation), p.epoch)
    return (
        p.rid,
        lives.get(p.incarnation, p.incarnation),
        p.epoch,
        rank.get(id(p.allocation), "dead"),  # type: ignore[union-attr]
        p.capacity_tokens,  # type: ignore[union-attr]
        p.sent,  # type: ignore[union-attr]
        p.expect_tokens,  # type: ignore[union-attr]
    )


_ORDERS: dict[Any, tuple[Any, ...]] = {}


def _status_key(s: msg.Status, lives: dict[int, int]) -> tuple[Any, ...]:
    """``status_order`` with the incarnation named by its life (cached per status)."""
    order = _ORDERS.get(s)
    if order is None:
        if len(_ORDERS) > 65_536:
            _ORDERS.clear()
        order = _ORDERS[s] = status_order(s)
    if len(order) > 2 and type(order[2]) is int:
        return (*order[:2], lives.get(order[2], order[2]), *order[3:])
    return order


def status_order(s: object) -> tuple[Any, ...]:
    """A total order on statuses (for the multiset in flight), malformed ones included."""
    kind = type(s)
    if kind is msg.Landed:
        landed: msg.Landed = s  # type: ignore[assignment]
        return (
            0,
            landed.rid,
            landed.incarnation,
            repr(landed.epoch),
            landed.tokens,
            landed.total,
            landed.final,
        )
    if kind is msg.Cancelled:
        c: msg.Cancelled = s  # type: ignore[assignment]
        return (1, c.rid, c.incarnation, repr(c.epoch))
    if kind is msg.SenderError:
        e: msg.SenderError = s  # type: ignore[assignment]
        return (2, e.rid, e.incarnation, repr(e.epoch), e.reason)
    return (3, kind.__name__, repr(s))


def _record_view(receiver: ResumableReceiver, rid: Hashable) -> tuple[object, ...]:
    rec = receiver.record(rid)
    a = rec.allocation
    return (rec.state.name, rec.epoch, rec.sent, rec.total, None if a is None else a.generation)


# -- text for counterexamples ------------------------------------------------------------


def _life(w: World, rid: Any, incarnation: Any) -> str:
    life = w.ledger.lives.get(incarnation)
    return f"r{rid}" if life in (None, 1) and max(w.lives) == 1 else f"r{rid}#{life or '?'}"


def status_text(s: object, w: World | None = None) -> str:
    kind = type(s)
    if kind not in msg.ROUND_STATUSES:
        return f"{kind.__name__}({getattr(s, 'reason', '')})"
    st: msg.Landed = s  # type: ignore[assignment]
    who = f"r{st.rid}" if w is None else _life(w, st.rid, st.incarnation)
    if msg.malformed_status(s) is not None:
        return f"a malformed {kind.__name__} for {who} (epoch {st.epoch!r})"
    if kind is msg.Landed:
        final = ", final" if st.final else ""
        return f"Landed({who}, epoch {st.epoch}, {st.tokens} token(s) of {st.total}{final})"
    if kind is msg.Cancelled:
        return f"Cancelled({who}, epoch {st.epoch})"
    return f"SenderError({who}, epoch {st.epoch}: {s.reason})"  # type: ignore[attr-defined]


def post_text(p: msg.Post, w: World | None = None) -> str:
    who = f"r{p.rid}" if w is None else _life(w, p.rid, p.incarnation)
    if type(p) is msg.Cancel:
        return f"Cancel({who}, epoch {p.epoch})"
    assert isinstance(p, msg.RoundPost)
    return (
        f"round {p.epoch} of {who} from token {p.sent} ({p.capacity_tokens} token(s)) "
        f"into blocks {list(p.blocks)}"
    )


def action_text(action: tuple[Any, ...], before: World) -> str:
    """One line of a counterexample, describing ``action`` taken from world ``before``."""
    kind = action[0]
    t, w = before.transport, before
    if kind == "add":
        r = action[1]
        life = "" if w.lives[r] == 1 else f" again (life {w.lives[r]})"
        return f"engine adds r{r}{life} ({w.totals[r]} token(s))"
    if kind == "encode":
        return f"encoder finishes r{action[1]}: its source goes to the sender"
    if kind == "step":
        return "receiver steps with no status (serves requests waiting for blocks)"
    if kind == "deliver":
        return f"receiver steps and gets {status_text(action[1], w)}"
    if kind == "event":
        return f"receiver steps and gets {status_text(t.events[0], w)}"
    if kind == "deliver-all":
        batch = ", ".join(
            status_text(s, w) for s in (*t.events, *sorted(t.statuses, key=status_order))
        )
        return f"receiver steps and gets the batch [{batch}]"
    if kind == "send":
        p = t.posts[0]
        verb = "gets" if type(p) is msg.Cancel else "writes"
        return f"sender {verb} {post_text(p, w)}"
    if kind == "duplicate":
        return f"transport duplicates {status_text(action[1], w)}"
    if kind == "abort":
        return f"engine aborts r{action[1]}"
    if kind == "crash":
        return "sender crashes"
    if kind == "crash-mid-round":
        return f"sender writes {post_text(t.posts[0], w)}, then crashes before reporting it"
    if kind == "squeeze":
        return "another pool user takes a free block"
    if kind == "grab":
        return "another pool user will take a block right after the next free"
    if kind == "unsqueeze":
        return "the other pool user returns a block"
    if kind == "forge":
        which = "a far-future round" if action[3] else "its next round (not posted)"
        return f"receiver steps and gets a forged {action[2]} status for r{action[1]}'s {which}"
    if kind == "reuse":
        return f"engine takes r{action[1]} and will add the id again for a new request"
    if kind == "restart":
        return "sender restarts (a fresh sender with no records takes over)"
    if kind == "poison":
        return f"transport corrupts a status for r{action[1]}"
    if kind == "poison-post":
        return f"sender gets a corrupted post for r{action[1]}"
    return repr(action)


__all__ = [
    "CRASH",
    "FORGED",
    "Bounds",
    "Harness",
    "InvalidBounds",
    "World",
    "action_text",
    "post_text",
    "status_order",
    "status_text",
]
