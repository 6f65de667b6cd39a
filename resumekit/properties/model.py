"""The protocol as an explicit-state model, for the bounded explorer.

The model mirrors :class:`~resumekit.statemachine.ResumableReceiver`,
:class:`~resumekit.statemachine.EmbeddingSender` and the block allocator at the
granularity of one message: the receiver handles one status (or serves its
waiting queues), the sender one post. State changes go through the same
compiled table (``TABLE``) and "already handled?" through the same round
filters, so what the explorer proves is about the same decisions. Blocks hold
one token each, and each block remembers which token of which request was last
written into it (never zeroed), so integrity is checked token by token.

States are immutable tuples (hashable). Three symmetry reductions, each sound
because the protocol never looks at what they erase: allocations are numbered
by age among the live ones (generations are only compared for identity and
order); blocks are renamed by their position in the free list and the
allocations (block numbers are only compared for identity, except by a filter
that remembers them, for which this is off); requests are interchangeable, so
each multiset of totals is explored once. For filters that neither read buffers
nor miss epochs, a freed block's stale content is forgotten too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations_with_replacement
from operator import itemgetter
from typing import Any, Final, NamedTuple

from resumekit.properties.invariants import (
    EXACTLY_ONCE,
    INTEGRITY,
    LIVENESS,
    NO_WRITE_AFTER_FREE,
    InvariantViolation,
    allocation_freed_once,
    allocation_posted_once,
    round_landed_before_consumed,
    tokens_in_place,
    write_into_live_round,
)
from resumekit.statemachine.declaration import TABLE, Action, Event, TransferState
from resumekit.statemachine.dedup import Observation, RoundFilter, Verdict

S = TransferState
_BOOT, _WAIT, _XFER, _OK, _FAIL = (
    S.Bootstrapping,
    S.WaitingForInput,
    S.Transferring,
    S.Success,
    S.Failed,
)
DEAD: Final = -1  # a post's allocation that has been freed
NONE: Final = -1  # no allocation / no epoch

# Why a request failed (kept in the state: liveness needs to know).
ABORTED, PEER_LOST, PROTOCOL = 1, 2, 3

# Sender record status.
S_ACTIVE, S_DONE, S_CANCELLED = 0, 1, 2


@dataclass(frozen=True)
class Bounds:
    """What the explorer enumerates: pool, requests, totals and the fault budget."""

    blocks: int = 4
    requests: int = 2
    max_rounds: int = 4  # totals range over 1..max_rounds tokens: at most that many rounds
    default_blocks: int = 1
    reuse: str = "lifo"
    duplicates: int = 1
    aborts: int = 1
    crashes: int = 1
    pressure: int = 1

    @property
    def faults(self) -> bool:
        return bool(self.duplicates or self.aborts or self.crashes or self.pressure)


class Req(NamedTuple):
    state: TransferState
    epoch: int
    sent: int
    total: int  # 0 until round 0 is consumed
    alloc: int  # index into State.allocs, or NONE
    memo: object
    why: int  # failure reason code (0 while not failed)


class Alloc(NamedTuple):
    blocks: tuple[int, ...]
    owner: int  # request index, or -1 for pool pressure
    posted: int  # how many round posts named it
    written: bool


class Cell(NamedTuple):
    """A block's content: token ``pos`` of request ``rid``; aux row (total, progress marker)."""

    rid: int
    pos: int
    aux_total: int
    aux_marker: int


class State(NamedTuple):
    totals: tuple[int, ...]
    free: tuple[int, ...]
    allocs: tuple[Alloc, ...]
    cells: tuple[Cell | None, ...]
    reqs: tuple[Req, ...]
    admissions: tuple[int, ...]
    resumes: tuple[int, ...]
    quarantine: tuple[tuple[int, int, int], ...]  # (rid, epoch, alloc) sorted
    posts: tuple[tuple[int, ...], ...]  # (1, rid, epoch, alloc, sent, cap) or (0, rid, epoch)
    statuses: tuple[tuple[int, ...], ...]  # sorted multiset, see _status_text
    sender: tuple[tuple[int, int, int], ...]  # per request (sent, next_epoch, S_*)
    sender_alive: bool
    peer_lost: bool
    parked: tuple[int, ...]  # posts the sender holds for requests it no longer knows
    budget: tuple[int, int, int, int]  # duplicates, aborts, crashes, pressure left
    hurt: tuple[bool, ...]  # request touched by an abort or a crash


# Status encodings (sorted tuples keep the multiset canonical):
# (0, rid, epoch, tokens, total, final) Landed; (1, rid, epoch) Cancelled;
# (2, rid, epoch) SenderError; (3,) PeerLost.
LANDED, CANCELLED, SENDER_ERROR, PEER = 0, 1, 2, 3

_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__
TERMINAL: Final = frozenset({S.Success, S.Failed})


class _Work:
    """A mutable copy of a state that one action edits; :meth:`freeze` makes the successor."""

    __slots__ = (
        "admissions",
        "allocs",
        "budget",
        "cells",
        "crash_armed",
        "free",
        "hurt",
        "model",
        "moved",
        "parked",
        "peer_lost",
        "posts",
        "quarantine",
        "reqs",
        "resumes",
        "sender",
        "sender_alive",
        "statuses",
        "totals",
    )

    def __init__(self, model: ProtocolModel, s: State) -> None:
        self.model = model
        (
            self.totals,
            self.free,
            allocs,
            self.cells,
            reqs,
            self.admissions,
            self.resumes,
            self.quarantine,
            self.posts,
            self.statuses,
            self.sender,
            self.sender_alive,
            self.peer_lost,
            self.parked,
            self.budget,
            self.hurt,
        ) = s
        self.allocs = list(allocs)
        self.reqs = list(reqs)
        self.moved = False  # blocks changed hands: the block numbering must be redone
        self.crash_armed = False  # the sender dies right after its next write

    def freeze(self) -> State:
        allocs = tuple(self.allocs)
        cells = self.cells
        if self.moved and self.model.block_symmetry:
            allocs, cells = self._canonical_blocks(allocs, cells)
        return _new(
            State,
            (
                self.totals,
                self.free,
                allocs,
                cells,
                tuple(self.reqs),
                self.admissions,
                self.resumes,
                self.quarantine,
                self.posts,
                self.statuses,
                self.sender,
                self.sender_alive,
                self.peer_lost,
                self.parked,
                self.budget,
                self.hurt,
            ),
        )

    def _canonical_blocks(
        self, allocs: tuple[Alloc, ...], cells: tuple[Cell | None, ...]
    ) -> tuple[tuple[Alloc, ...], tuple[Cell | None, ...]]:
        """Rename blocks by position (free list, then allocations by age): the block symmetry."""
        order = self.free
        for a in allocs:
            order += a.blocks
        if order == self.model.identity:
            return allocs, cells
        key = (order, len(self.free), *(len(a[0]) for a in allocs))
        plan = self.model.renamings.get(key)
        if plan is None:
            at = len(self.free)
            ranges = []
            for a in allocs:
                ranges.append(tuple(range(at, at + len(a[0]))))
                at += len(a[0])
            plan = self.model.renamings[key] = (
                tuple(range(len(self.free))),
                tuple(ranges),
                itemgetter(*order),
            )
        self.free, ranges, permute = plan
        renamed = tuple(
            _new(Alloc, (blocks, a[1], a[2], a[3]))
            for blocks, a in zip(ranges, allocs, strict=True)
        )
        return renamed, permute(cells)

    # -- allocator -------------------------------------------------------------------

    def _take(self, n: int) -> tuple[int, ...]:
        self.moved = True
        if self.model.lifo:
            blocks = self.free[-n:]
            self.free = self.free[:-n]
        else:
            blocks = self.free[:n]
            self.free = self.free[n:]
        return blocks

    def issue(self, n: int, owner: int) -> int:
        self.allocs.append(_new(Alloc, (self._take(n), owner, 0, False)))
        return len(self.allocs) - 1

    def release(self, g: int) -> None:
        """Free allocation ``g`` and renumber the younger ones (the symmetry reduction)."""
        if not 0 <= g < len(self.allocs):
            raise InvariantViolation(EXACTLY_ONCE, allocation_freed_once(g, False) or "")
        allocs = self.allocs
        freed = allocs[g][0]
        self.free += freed
        self.moved = True
        del allocs[g]
        if self.model.erase_stale:
            cells = list(self.cells)
            for b in freed:
                cells[b] = None
            self.cells = tuple(cells)
        if g == len(allocs):
            # The youngest allocation: nothing to renumber, and no post may name it again.
            if self.posts:
                self.posts = tuple(
                    p if p[0] == 0 or p[3] != g else (*p[:3], DEAD, *p[4:]) for p in self.posts
                )
            return
        reqs = self.reqs
        for i, r in enumerate(reqs):
            if r[4] > g:
                reqs[i] = _new(Req, (r[0], r[1], r[2], r[3], r[4] - 1, r[5], r[6]))
        if self.quarantine:
            self.quarantine = tuple(
                (rid, e, a - 1 if a > g else a) for rid, e, a in self.quarantine
            )
        if self.posts and any(p[0] == 1 and p[3] >= g for p in self.posts):
            self.posts = tuple(
                p if p[0] == 0 or p[3] < g else (*p[:3], DEAD if p[3] == g else p[3] - 1, *p[4:])
                for p in self.posts
            )

    # -- transport --------------------------------------------------------------------

    def post(self, p: tuple[int, ...]) -> None:
        if self.sender_alive:
            self.posts = (*self.posts, p)

    def report(self, status: tuple[int, ...]) -> None:
        self.statuses = tuple(sorted((*self.statuses, status)))

    # -- receiver (mirrors ResumableReceiver) -----------------------------------------

    def fire(self, r: int, event: Event, guard: bool = True) -> Action:
        req = self.reqs[r]
        row = TABLE[req[0]][event]
        dest, action = row.if_true if guard else row.if_false
        if dest is not req[0]:
            self.reqs[r] = _new(Req, (dest, *req[1:]))
        return action

    def post_round(self, r: int) -> None:
        req = self.reqs[r]
        a = self.allocs[req.alloc]
        posted = a.posted + 1
        if posted > 1:
            raise InvariantViolation(EXACTLY_ONCE, allocation_posted_once(req.alloc, posted) or "")
        self.allocs[req.alloc] = _new(Alloc, (a[0], a[1], posted, a[3]))
        self.post((1, r, req.epoch, req.alloc, req.sent, len(a.blocks)))

    def _set_alloc(self, r: int, g: int) -> None:
        q = self.reqs[r]
        self.reqs[r] = _new(Req, (q[0], q[1], q[2], q[3], g, q[5], q[6]))

    def try_admit(self, r: int) -> bool:
        n = self.model.bounds.default_blocks
        if n <= len(self.free):
            self._set_alloc(r, self.issue(n, r))
            self.fire(r, Event.ADMIT, True)
            self.post_round(r)
            return True
        self.fire(r, Event.ADMIT, False)
        return False

    def try_resume(self, r: int, *, early: bool = False) -> bool:
        """``ResumableReceiver._try_resume``: ``early`` takes a full round or nothing."""
        req = self.reqs[r]
        want = req.total - req.sent
        if early and want > len(self.free):
            return False
        n = min(want, len(self.free))
        if n >= 1:
            self._set_alloc(r, self.issue(n, r))
            self.fire(r, Event.ALLOCATE, True)
            self.post_round(r)
            return True
        self.fire(r, Event.ALLOCATE, False)
        self.resumes = (*self.resumes, r)
        return False

    def serve_waiting(self) -> None:
        while self.resumes:
            r = self.resumes[0]
            req = self.reqs[r]
            if req.state is not _XFER or req.alloc != NONE:
                self.resumes = self.resumes[1:]
                continue
            if not self.free:
                return
            self.resumes = self.resumes[1:]
            if not self.try_resume(r):
                return
        while self.admissions:
            r = self.admissions[0]
            if self.reqs[r].state is not _WAIT:
                self.admissions = self.admissions[1:]
                continue
            if not self.try_admit(r):
                return
            self.admissions = self.admissions[1:]

    def fail(self, r: int, why: int, *, peer_alive: bool, written: bool = True) -> None:
        req = self.reqs[r]
        g = req.alloc
        in_flight = g != NONE and peer_alive and written
        epoch = req.epoch if g != NONE else NONE
        self.fire(r, Event.FAIL, in_flight)
        q = self.reqs[r]
        self.reqs[r] = _new(Req, (q[0], q[1], q[2], q[3], NONE, q[5], why))
        if g != NONE:
            if in_flight:
                self.quarantine = tuple(sorted((*self.quarantine, (r, req.epoch, g))))
            else:
                self.release(g)
        if peer_alive:
            self.post((0, r, epoch if in_flight else NONE))
        if why == PROTOCOL:
            raise InvariantViolation(
                LIVENESS, f"request r{r} failed with a protocol error though nothing failed it"
            )

    def on_status(self, st: tuple[int, ...]) -> None:
        kind = st[0]
        if kind == PEER:
            self.peer_lost = True
            for r, req in enumerate(self.reqs):
                if req.state not in TERMINAL:
                    self.fail(r, PEER_LOST, peer_alive=False)
            quarantined, self.quarantine = self.quarantine, ()
            for _, _, g in sorted(quarantined, key=lambda q: -q[2]):
                self.release(g)
            return
        r, epoch = st[1], st[2]
        for i, (qr, qe, g) in enumerate(self.quarantine):
            if qr == r and qe == epoch:
                self.quarantine = self.quarantine[:i] + self.quarantine[i + 1 :]
                self.release(g)
                return
        req = self.reqs[r]
        if kind == LANDED:
            self.on_landed(r, st)
        elif req.state in TERMINAL or (req.state is _XFER and 0 <= epoch < req.epoch):
            self.fire(r, Event.STALE)
        else:
            self.fail(r, PROTOCOL, peer_alive=True, written=False)

    def on_landed(self, r: int, st: tuple[int, ...]) -> None:
        req = self.reqs[r]
        if req.state in TERMINAL:
            self.fire(r, Event.STALE)
            return
        _, _, epoch, tokens, total, final = st
        if req.state is not _XFER or epoch < 0:
            self.fail(r, PROTOCOL, peer_alive=True)
            return
        f = self.model.filter
        a = self.allocs[req.alloc] if req.alloc != NONE else None
        known = req.total or None
        marker = None
        if a is not None and (f.reads_buffers or (known is None and not f.sees_epoch)):
            cell = self.cells[a.blocks[0]]
            aux_total, aux_marker = (cell.aux_total, cell.aux_marker) if cell else (0, 0)
            marker = aux_marker if f.reads_buffers else None
            if known is None and not f.sees_epoch:
                known = aux_total
        sees = f.sees_epoch
        obs = Observation(
            bool(final),
            epoch if sees else None,
            tokens if sees else None,
            req.epoch,
            a.blocks if a is not None else None,
            len(a.blocks) if a is not None else 0,
            req.sent,
            known,
            marker,
        )
        verdict, judged = f.judge(obs, req.memo)
        if verdict is Verdict.STALE:
            self.fire(r, Event.STALE)
            return
        if verdict is Verdict.UNEXPECTED or a is None:
            self.fail(r, PROTOCOL, peer_alive=True)
            return
        if not sees:
            tokens, epoch, total = judged, req.epoch, known or 0
        if not self.round_ok(req, a, tokens, total, bool(final)):
            self.fail(r, PROTOCOL, peer_alive=True)
            return
        action = self.fire(r, Event.LANDED, bool(final))
        q = self.reqs[r]
        g, offset = q.alloc, q.sent
        consume = action is Action.CONSUME
        self.reqs[r] = _new(Req, (q[0], q[1] + consume, q[2] + tokens, total, NONE, q[5], q[6]))
        resumed = consume and not self.resumes and self.try_resume(r, early=True)
        self.consume(r, a, g, tokens, offset)
        if consume and not resumed:
            if self.resumes:
                self.resumes = (*self.resumes, r)
            else:
                self.try_resume(r)

    def round_ok(self, req: Req, a: Alloc, tokens: int, total: int, final: bool) -> bool:
        """``ResumableReceiver._check_round``: the same checks, block-sized tokens."""
        if tokens < 1 or tokens > len(a.blocks):
            return False
        if req.total == 0:
            cell = self.cells[a.blocks[0]]
            if total < 1 or (cell.aux_total if cell else 0) != total:
                return False
        elif total != req.total:
            return False
        end = req.sent + tokens
        return end <= total and final == (end == total)

    def consume(self, r: int, a: Alloc, g: int, tokens: int, base: int) -> None:
        """Copy tokens ``[base, base + tokens)`` out of allocation ``g`` and free it, once."""
        req = self.reqs[r]
        if not a.written:
            raise InvariantViolation(
                INTEGRITY, round_landed_before_consumed(f"r{r}", req.epoch, False) or ""
            )
        cells = self.cells
        for i in range(tokens):
            cell = cells[a.blocks[i]]
            if cell is None or cell[0] != r or cell[1] != base + i:
                found = (f"r{cell.rid}", cell.pos) if cell is not None else None
                problem = tokens_in_place(f"r{r}", req.epoch, base + i, found)
                raise InvariantViolation(INTEGRITY, problem or "")
        memo = self.model.filter.remember(req.memo, a.blocks, req.sent)
        self.reqs[r] = _new(Req, (*req[:5], memo, req[6]))
        self.release(g)

    # -- sender (mirrors EmbeddingSender) -------------------------------------------------

    def serve_post(self) -> None:
        p, self.posts = self.posts[0], self.posts[1:]
        r, epoch = p[1], p[2]
        s_sent, s_next, s_state = self.sender[r]
        if p[0] == 0:  # cancel
            if s_state == S_ACTIVE:
                self._sender(r, (s_sent, s_next, S_CANCELLED))
            self.parked = tuple(x for x in self.parked if x != r)
            if epoch != NONE:
                self.report((CANCELLED, r, epoch))
            return
        if s_state != S_ACTIVE:
            self.parked = (*self.parked, r)  # a post for a request it no longer knows
            return
        if epoch < s_next:
            return  # a repeated post
        _, _, _, g, sent, cap = p
        if epoch > s_next or sent != s_sent or cap < 1:
            self._sender(r, (s_sent, s_next, S_CANCELLED))
            self.report((SENDER_ERROR, r, epoch))
            return
        total = self.totals[r]
        n = min(total - s_sent, cap)
        if g == DEAD:
            raise InvariantViolation(
                NO_WRITE_AFTER_FREE, write_into_live_round(f"r{r}", epoch, g, False) or ""
            )
        a = self.allocs[g]
        cells = list(self.cells)
        for i in range(n):
            b = a.blocks[i]
            old = cells[b]
            if i == 0:
                cells[b] = Cell(r, s_sent, total if epoch == 0 else 0, s_sent + n)
            else:
                cells[b] = Cell(
                    r, s_sent + i, old.aux_total if old else 0, old.aux_marker if old else 0
                )
        self.cells = tuple(cells)
        self.allocs[g] = _new(Alloc, (a[0], a[1], a[2], True))
        done = s_sent + n == total
        self._sender(r, (s_sent + n, epoch + 1, S_DONE if done else S_ACTIVE))
        if self.crash_armed:
            self.crash()
            return
        self.report((LANDED, r, epoch, n, total, int(done)))

    def _sender(self, r: int, value: tuple[int, int, int]) -> None:
        self.sender = (*self.sender[:r], value, *self.sender[r + 1 :])

    def crash(self) -> None:
        self.sender_alive = False
        self.crash_armed = False
        self.posts = ()
        self.hurt = (True,) * len(self.hurt)
        self.report((PEER,))


class ProtocolModel:
    """Initial states, actions and successor function of the protocol under ``bounds``."""

    def __init__(self, bounds: Bounds, round_filter: RoundFilter) -> None:
        self.bounds = bounds
        self.filter = round_filter
        self.lifo = bounds.reuse == "lifo"
        self.identity = tuple(range(bounds.blocks))
        # What a freed block held can only matter to a filter that reads buffers or
        # learns totals from them; for the others it is forgotten, which merges states
        # that differ only in stale bytes (a premature read still finds nothing there).
        self.erase_stale = round_filter.sees_epoch and not round_filter.reads_buffers
        # Block numbers are interchangeable unless a filter remembers them (seed-index).
        self.block_symmetry = not getattr(round_filter, "remembers_blocks", False)
        self.renamings: dict[tuple[object, ...], tuple[Any, ...]] = {}
        self._handlers = {
            "bootstrap": self._on_bootstrap,
            "serve": self._on_serve,
            "deliver": self._on_deliver,
            "send": self._on_send,
            "duplicate": self._on_duplicate,
            "abort": self._on_abort,
            "crash": self._on_crash,
            "crash-mid-round": self._on_crash_mid_round,
            "squeeze": self._on_squeeze,
            "unsqueeze": self._on_unsqueeze,
        }

    def initial_states(self) -> Iterator[State]:
        b = self.bounds
        n = b.requests

        # Requests are interchangeable (nothing but a tie-break after the peer is lost,
        # when nothing is read any more, depends on their order): explore each multiset
        # of totals once, in non-decreasing order. That is the request symmetry.
        for combo in combinations_with_replacement(range(1, b.max_rounds + 1), n):
            yield State(
                totals=combo,
                free=tuple(range(b.blocks)),
                allocs=(),
                cells=(None,) * b.blocks,
                reqs=tuple(Req(_BOOT, 0, 0, 0, NONE, None, 0) for _ in range(n)),
                admissions=(),
                resumes=(),
                quarantine=(),
                posts=(),
                statuses=(),
                sender=tuple((0, 0, S_ACTIVE) for _ in range(n)),
                sender_alive=True,
                peer_lost=False,
                parked=(),
                budget=(b.duplicates, b.aborts, b.crashes, b.pressure),
                hurt=(False,) * n,
            )

    def actions(self, s: State) -> list[tuple[object, ...]]:
        """Every action enabled in ``s`` (Stateright's ``actions``)."""
        out: list[tuple[object, ...]] = [
            ("bootstrap", r) for r, req in enumerate(s.reqs) if req.state is _BOOT
        ]
        if (s.admissions or s.resumes) and self._serve_changes(s):
            out.append(("serve",))
        prev = None
        for st in s.statuses:
            if st != prev:  # identical copies give identical successors
                out.append(("deliver", st))
            prev = st
        if s.posts and s.sender_alive:
            out.append(("send", s.posts[0]))
        dups, aborts, crashes, pressure = s.budget
        if dups:
            prev = None
            for st in s.statuses:
                if st != prev and st[0] != PEER:
                    out.append(("duplicate", st))
                prev = st
        if aborts:
            out.extend(("abort", r) for r, req in enumerate(s.reqs) if req.state not in TERMINAL)
        if crashes and s.sender_alive:
            out.append(("crash",))
            if s.posts and self._writes_next(s):
                out.append(("crash-mid-round", s.posts[0]))
        if pressure and s.free:
            out.append(("squeeze",))
        if any(a.owner == -1 for a in s.allocs):
            out.append(("unsqueeze",))
        return out

    @staticmethod
    def _writes_next(s: State) -> bool:
        """Whether the sender's next post makes it write a round.

        Dying right after that write is the only crash that differs from dying
        now, so it is the one mid-round crash the model needs.
        """
        p = s.posts[0]
        if p[0] != 1:
            return False
        sent, next_epoch, state = s.sender[p[1]]
        return state == S_ACTIVE and p[2] == next_epoch and p[4] == sent and p[5] >= 1

    def _serve_changes(self, s: State) -> bool:
        """Whether serving the waiting queues would do anything (else it is no action)."""
        reqs = s.reqs
        for r in s.resumes:
            q = reqs[r]
            if q.state is not _XFER or q.alloc != NONE or s.free:
                return True
        if s.admissions:
            q = reqs[s.admissions[0]]
            return q.state is not _WAIT or len(s.free) >= self.bounds.default_blocks
        return False

    def next_state(self, s: State, action: tuple[object, ...]) -> State:
        """The state after ``action`` (Stateright's ``next_state``); raises if one breaks."""
        result: State = self._handlers[action[0]](s, action)  # type: ignore[index]
        return result

    # -- one handler per action kind ---------------------------------------------------

    def _on_bootstrap(self, s: State, action: tuple[object, ...]) -> State:
        r = action[1]
        assert isinstance(r, int)
        w = _Work(self, s)
        if w.peer_lost:
            w.hurt = (*s.hurt[:r], True, *s.hurt[r + 1 :])
            w.fail(r, PEER_LOST, peer_alive=False)
        else:
            w.fire(r, Event.BOOTSTRAPPED)
            w.admissions = (*s.admissions, r)
        return w.freeze()

    def _on_serve(self, s: State, action: tuple[object, ...]) -> State:
        w = _Work(self, s)
        w.serve_waiting()
        return w.freeze()

    def _on_deliver(self, s: State, action: tuple[object, ...]) -> State:
        st: tuple[int, ...] = action[1]  # type: ignore[assignment]
        statuses = s.statuses
        i = statuses.index(st)
        rest = statuses[:i] + statuses[i + 1 :]
        if st[0] != PEER and s.reqs[st[1]].state in TERMINAL:
            key = st[1:3]
            for q in s.quarantine:
                if q[:2] == key:
                    break
            else:
                # A status for a finished request that releases nothing: only counted.
                return _new(State, (*s[:9], rest, *s[10:]))
        w = _Work(self, s)
        w.statuses = rest
        w.on_status(st)
        return w.freeze()

    def _on_send(self, s: State, action: tuple[object, ...]) -> State:
        w = _Work(self, s)
        w.serve_post()
        return w.freeze()

    def _on_duplicate(self, s: State, action: tuple[object, ...]) -> State:
        d, a, c, p = s.budget
        statuses = tuple(sorted((*s.statuses, action[1])))  # type: ignore[type-var]
        return _new(State, (*s[:9], statuses, *s[10:14], (d - 1, a, c, p), s[15]))

    def _on_abort(self, s: State, action: tuple[object, ...]) -> State:
        r = action[1]
        assert isinstance(r, int)
        d, a, c, p = s.budget
        w = _Work(self, s)
        w.budget = (d, a - 1, c, p)
        w.hurt = (*s.hurt[:r], True, *s.hurt[r + 1 :])
        w.fail(r, ABORTED, peer_alive=True)
        return w.freeze()

    def _on_crash(self, s: State, action: tuple[object, ...]) -> State:
        d, a, c, p = s.budget
        w = _Work(self, s)
        w.budget = (d, a, c - 1, p)
        w.crash()
        return w.freeze()

    def _on_crash_mid_round(self, s: State, action: tuple[object, ...]) -> State:
        """The sender writes its next round and dies before reporting it."""
        d, a, c, p = s.budget
        w = _Work(self, s)
        w.budget = (d, a, c - 1, p)
        w.crash_armed = True
        w.serve_post()
        return w.freeze()

    def _on_squeeze(self, s: State, action: tuple[object, ...]) -> State:
        d, a, c, p = s.budget
        w = _Work(self, s)
        w.budget = (d, a, c, p - 1)
        w.issue(1, -1)
        return w.freeze()

    def _on_unsqueeze(self, s: State, action: tuple[object, ...]) -> State:
        w = _Work(self, s)
        w.release(next(g for g, a in enumerate(s.allocs) if a.owner == -1))
        return w.freeze()

    # -- properties --------------------------------------------------------------------

    @staticmethod
    def is_done(s: State) -> bool:
        """Every request terminal, nothing in flight, no pool pressure held."""
        return (
            all(r.state in TERMINAL for r in s.reqs)
            and not s.statuses
            and (not s.posts or not s.sender_alive)
            and all(a.owner != -1 for a in s.allocs)
        )

    @staticmethod
    def done_problems(s: State) -> list[tuple[str, str]]:
        """Invariants 2 and 6 at a done state: nothing left, unhurt requests succeeded."""
        from resumekit.properties.invariants import (  # noqa: PLC0415
            NO_LEAK,
            nothing_left,
            succeeds_without_faults,
        )

        problems: list[tuple[str, str]] = []
        sender_left = (
            sum(1 for x in s.sender if x[2] == S_ACTIVE) + len(s.parked) if s.sender_alive else 0
        )
        leak = nothing_left(len(s.allocs), len(s.quarantine), 0, sender_left)
        if leak is not None:
            problems.append((NO_LEAK, leak))
        for r, req in enumerate(s.reqs):
            if not s.hurt[r]:
                why = succeeds_without_faults(f"r{r}", req.state.name, _why_text(req.why))
                if why is not None:
                    problems.append((LIVENESS, why))
        return problems


def _why_text(code: int) -> str | None:
    return {0: None, ABORTED: "aborted", PEER_LOST: "peer lost", PROTOCOL: "protocol error"}[code]


def status_text(st: tuple[int, ...]) -> str:
    if st[0] == LANDED:
        _, r, e, n, total, final = st
        return f"Landed(r{r}, epoch {e}, {n} token(s) of {total}{', final' if final else ''})"
    if st[0] == CANCELLED:
        return f"Cancelled(r{st[1]}, epoch {st[2]})"
    if st[0] == SENDER_ERROR:
        return f"SenderError(r{st[1]}, epoch {st[2]})"
    return "PeerLost"


def post_text(p: tuple[int, ...], state: State | None = None) -> str:
    if p[0] == 0:
        return f"Cancel(r{p[1]}, epoch {p[2]})"
    _, r, e, g, sent, cap = p
    if g == DEAD:
        where = "a freed allocation"
    elif state is not None and g < len(state.allocs):
        where = f"blocks {list(state.allocs[g].blocks)}"
    else:
        where = f"allocation #{g}"
    return f"round {e} of r{r} from token {sent} ({cap} token(s)) into {where}"


def action_text(action: tuple[object, ...], before: State) -> str:
    """One line of a counterexample."""
    kind = action[0]
    if kind == "bootstrap":
        return f"r{action[1]} is added (peer known)"
    if kind == "serve":
        return "receiver serves waiting requests (allocates, posts rounds)"
    if kind == "deliver":
        return f"receiver gets {status_text(action[1])}"  # type: ignore[arg-type]
    if kind == "send":
        post: tuple[int, ...] = action[1]  # type: ignore[assignment]
        verb = "gets" if post[0] == 0 else "writes"
        return f"sender {verb} {post_text(post, before)}"
    if kind == "duplicate":
        return f"transport duplicates {status_text(action[1])}"  # type: ignore[arg-type]
    if kind == "abort":
        return f"engine aborts r{action[1]}"
    if kind == "crash":
        return "sender crashes"
    if kind == "crash-mid-round":
        return f"sender writes {post_text(action[1], before)}, then crashes before reporting it"  # type: ignore[arg-type]
    if kind == "squeeze":
        return "another pool user takes a free block"
    if kind == "unsqueeze":
        return "the other pool user returns its block"
    return str(action)


__all__ = [
    "Bounds",
    "ProtocolModel",
    "State",
    "action_text",
    "post_text",
    "status_text",
]
