"""The protocol's invariants, each a plain named check reused by every checker.

A check returns ``None`` when it holds, or a sentence saying what broke;
:func:`require` turns that into an :class:`InvariantViolation` naming the
invariant. The Hypothesis machines feed the checks what they observe of the
real receiver, sender and allocator (through :class:`Ledger`); the bounded
explorer feeds them what its world of the same objects observes
(:mod:`resumekit.properties.world`).

One file: :data:`INVARIANTS` is the one list every checker names; split, a check
and its name would live apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from resumekit.protocol import messages as msg
from resumekit.protocol.declaration import TransferState

if TYPE_CHECKING:
    from resumekit.allocator.block_allocator import Allocation, BlockAllocator
    from resumekit.protocol.messages import RoundPost
    from resumekit.protocol.policy import SchedulingPolicy
    from resumekit.protocol.receiver import ReceiverSnapshot, RecordState, ResumableReceiver
    from resumekit.protocol.sender import EmbeddingSender, SenderSnapshot

EXACTLY_ONCE: Final = "exactly-once"
NO_LEAK: Final = "no-leak"
INTEGRITY: Final = "integrity"
PROGRESS: Final = "progress"
NO_WRITE_AFTER_FREE: Final = "no-write-after-free"
LIVENESS: Final = "liveness"
SERVED_IN_ORDER: Final = "served-in-order"
ACCOUNTED: Final = "accounted"
#: Every invariant, by name: the one list the explorer, the fuzzer and ``verify`` report.
INVARIANTS: Final = (
    EXACTLY_ONCE,
    NO_LEAK,
    INTEGRITY,
    PROGRESS,
    NO_WRITE_AFTER_FREE,
    LIVENESS,
    SERVED_IN_ORDER,
    ACCOUNTED,
)
#: Not an invariant: the real code raised where it must not, reported like a violation.
CRASH: Final = "crash"


class InvariantViolation(AssertionError):
    """An invariant broke; ``invariant`` names it, ``detail`` says how."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"[{invariant}] {detail}")


def require(invariant: str, problem: str | None) -> None:
    """Raise :class:`InvariantViolation` if ``problem`` is not ``None``."""
    if problem is not None:
        raise InvariantViolation(invariant, problem)


# -- 1. exactly once -------------------------------------------------------------


def round_consumed_once(rid: Hashable, epoch: int, already_consumed: bool) -> str | None:
    if already_consumed:
        return f"round {epoch} of request {rid!r} was consumed twice"
    return None


def allocation_freed_once(generation: int, live: bool) -> str | None:
    if not live:
        return f"allocation generation {generation} was freed while not live (a double free)"
    return None


def allocation_posted_once(generation: int, times_posted: int) -> str | None:
    if times_posted > 1:
        return f"allocation generation {generation} was named by {times_posted} round posts"
    return None


def failed_cancelled(
    after: ReceiverSnapshot,
    finished: Sequence[Hashable],
    batch: Sequence[object],
    cancelled: Callable[[Hashable, int], bool],
) -> str | None:
    """Each life a step hands over as failed was cancelled (once, with
    :func:`cancelled_once`), unless the step learned that the peer is lost: only a lost
    peer fails lives without telling the sender, which could still hold their sources."""
    if any(type(item) is msg.PeerLost for item in batch):
        return None
    ended = set(finished)
    for r in after.records:
        if (
            r.rid in ended
            and r.state is TransferState.Failed
            and not cancelled(r.rid, r.incarnation)
        ):
            return f"life {r.incarnation} of request {r.rid!r} failed and was never cancelled"
    return None


def cancel_names_quarantined(
    rid: Hashable,
    incarnation: int,
    epoch: int,
    quarantined: Mapping[tuple[Hashable, int, int], object],
) -> str | None:
    """A Cancel names a round exactly when that round is quarantined (its blocks wait for
    the sender's word that nothing more lands); otherwise it names none (``NO_EPOCH``)."""
    if epoch != msg.NO_EPOCH and (rid, incarnation, epoch) not in quarantined:
        return (
            f"the Cancel of life {incarnation} of request {rid!r} names round {epoch}, "
            "which is not quarantined"
        )
    if epoch == msg.NO_EPOCH and any(k[0] == rid and k[1] == incarnation for k in quarantined):
        return (
            f"the Cancel of life {incarnation} of request {rid!r} names no round, "
            "though one of its rounds waits in quarantine"
        )
    return None


def cancelled_once(rid: Hashable, incarnation: int, times: int) -> str | None:
    """A life is cancelled at most once: only failing it cancels, and a failed life
    never fails again (the sender would count the second as an orphan)."""
    if times > 1:
        return f"life {incarnation} of request {rid!r} was cancelled {times} times"
    return None


# -- 2. no leak -------------------------------------------------------------------


def nothing_left(
    outstanding: int, quarantined: int, receiver_records: int, sender_records: int
) -> str | None:
    """At quiescence: no allocation, quarantined round or record may remain."""
    parts = []
    if outstanding:
        parts.append(f"{outstanding} allocation(s) outstanding")
    if quarantined:
        parts.append(f"{quarantined} round(s) still in quarantine")
    if receiver_records:
        parts.append(f"{receiver_records} receiver record(s) left")
    if sender_records:
        parts.append(f"{sender_records} sender record(s) or parked post(s) left")
    return "at quiescence " + ", ".join(parts) if parts else None


def quarantined_while_written(
    before: ReceiverSnapshot, after: ReceiverSnapshot, batch: Sequence[object]
) -> str | None:
    """A step quarantines only rounds the sender may still write: none a well-formed refusal
    of the step was about (the sender says it will not write it), and none once the peer is
    lost (a dead peer writes nothing). A landed status that fails its checks proves nothing,
    so its round may be quarantined. Quarantined blocks come back a round trip later, so a
    needless quarantine starves the pool without leaking."""
    if not after.quarantine:
        return None
    if after.peer_lost is not None:
        return (
            f"{len(after.quarantine)} round(s) stayed in quarantine after the peer was lost "
            f"({after.peer_lost!r})"
        )
    held = {k for k, _ in before.quarantine}
    added = [k for k, _ in after.quarantine if k not in held]
    if not added:
        return None
    told = set()
    for item in batch:
        kind = type(item)
        if (kind is msg.Cancelled or kind is msg.SenderError) and not _malformed_status(item):
            s: msg.Cancelled | msg.SenderError = item  # type: ignore[assignment]
            told.add((s.rid, s.incarnation, s.epoch))
    for key in added:
        if key in told:
            return (
                f"round {key[2]} of {key[0]!r} (life {key[1]}) went to quarantine in the step "
                "that handled the sender's refusal of it, though the sender will not write it: "
                "its blocks belong back in the pool"
            )
    return None


def tombstone_dropped(rid: Hashable, incarnation: int | None, left: Sequence[int]) -> str | None:
    """A source handed over for a life that had ended at the sender leaves no tombstone of
    that life behind: nothing else would ever forget it."""
    if incarnation in left:
        return f"the sender kept life {incarnation} of {rid!r} to drop after its source came"
    return None


def record_collected(rid: Hashable, alive: bool) -> str | None:
    if alive:
        return f"the record of request {rid!r} is still referenced after it was taken"
    return None


# -- 3. integrity -----------------------------------------------------------------


def round_landed_before_consumed(rid: Hashable, epoch: int, written: bool) -> str | None:
    if not written:
        return f"round {epoch} of request {rid!r} was consumed before the sender wrote it"
    return None


def tokens_in_place(
    rid: Hashable, epoch: int, offset: int, found: tuple[object, int] | None
) -> str | None:
    """The block holding output token ``offset`` holds that token of that request."""
    if found != (rid, offset):
        return (
            f"round {epoch} of request {rid!r} put {found!r} at output token {offset}, "
            f"not token {offset} of {rid!r}"
        )
    return None


def output_intact(rid: Hashable, equal: bool) -> str | None:
    if not equal:
        return f"the output of request {rid!r} differs from the sender's source"
    return None


# -- 4. progress ------------------------------------------------------------------


def sent_advances(rid: Hashable, sent_before: int, sent_after: int) -> str | None:
    if sent_after <= sent_before:
        return f"request {rid!r} consumed a round but sent went {sent_before} -> {sent_after}"
    return None


def record_view(receiver: ResumableReceiver, rid: Hashable) -> tuple[object, ...]:
    """What a stale status must not change of ``rid``'s record."""
    rec, a = receiver.record(rid), receiver.record(rid).allocation
    return (rec.state.name, rec.epoch, rec.sent, rec.total, None if a is None else a.generation)


def stale_view(receiver: ResumableReceiver, status: object) -> tuple[object, ...] | None:
    """For a status of an already consumed round or an earlier life: what it must not change
    (:func:`record_view`); ``None`` for any other status."""
    if type(status) not in msg.ROUND_STATUSES:
        return None
    rid = getattr(status, "rid", None)
    if rid not in receiver or msg.malformed_status(status) is not None:
        return None
    rec, s = receiver.record(rid), status
    T = TransferState
    if s.incarnation == rec.incarnation and (  # type: ignore[attr-defined]
        rec.state is not T.Transferring or s.epoch >= rec.epoch  # type: ignore[attr-defined]
    ):
        return None
    if (rid, s.incarnation, s.epoch) in receiver.quarantined():  # type: ignore[attr-defined]
        return None
    if rec.state is T.WaitingForInput or (rec.state is T.Transferring and rec.allocation is None):
        return None  # waiting for blocks: the step may serve it, whatever the status
    return record_view(receiver, rid)


def stale_changes_nothing(rid: Hashable, before: object, after: object) -> str | None:
    if before != after:
        return f"a status for an old round changed request {rid!r}: {before!r} -> {after!r}"
    return None


# -- 5. no write after free -------------------------------------------------------


def write_into_live_round(rid: Hashable, epoch: int, generation: int, live: bool) -> str | None:
    if not live:
        return (
            f"the sender wrote round {epoch} of request {rid!r} into allocation generation "
            f"{generation}, which is no longer live"
        )
    return None


# -- 6. liveness ------------------------------------------------------------------


def terminates(unfinished: list[Hashable], bound: int) -> str | None:
    if unfinished:
        return f"{len(unfinished)} request(s) not terminal after {bound} fair steps: {unfinished}"
    return None


def succeeds_without_faults(rid: Hashable, state: str, reason: str | None) -> str | None:
    if state != "Success":
        return f"request {rid!r} ended {state} ({reason}) though no abort or crash touched it"
    return None


# -- 7. served in order ------------------------------------------------------------


def _waiting(snapshot: ReceiverSnapshot) -> list[tuple[Hashable, int]]:
    """The lives whose resume waits for blocks, in the receiver's queue order."""
    return [
        (r.rid, r.incarnation)
        for r in snapshot.resumes
        if r.state is TransferState.Transferring and r.allocation is None
    ]


_WAITING: Final = TransferState.WaitingForInput


def _generation(r: RecordState) -> int | None:
    return None if r.allocation is None else r.allocation.generation


def _bulk(r: RecordState, policy: SchedulingPolicy | None) -> bool:
    bulk = None if policy is None else policy.bulk_tokens
    return bulk is not None and r.total is not None and r.total > bulk


def _yields(r: RecordState, policy: SchedulingPolicy | None) -> bool:
    """Whether ``r``'s resume (its next round) yields under ``policy``: bulk, or more than
    ``yield_tokens`` left, and passed over fewer than ``max_passed_over`` times."""
    if policy is None or r.total is None or r.passed >= policy.max_passed_over:
        return False
    big = policy.yield_tokens
    return _bulk(r, policy) or (big is not None and r.total - r.sent > big)


def _yield_order(r: RecordState, policy: SchedulingPolicy | None) -> tuple[bool, int]:
    """Where a yielding resume goes among those yielding: fewest tokens left first, bulk
    last (a stable sort keeps queue order among equals)."""
    if _bulk(r, policy):
        return True, 0
    assert r.total is not None
    return False, r.total - r.sent


def served_in_order(
    before: ReceiverSnapshot, after: ReceiverSnapshot, policy: SchedulingPolicy | None = None
) -> str | None:
    """Who gets freed blocks first, across one receiver step, under the receiver's ``policy``.

    Resumes waiting for blocks keep the order they began to wait in (one that begins
    to wait joins the back), and are served in it; until each has blocks, nothing
    else gets any: not a resume behind it, not an early post of a next round, not an
    admission. With a :class:`~resumekit.protocol.policy.SchedulingPolicy` that holds
    for every waiting resume except one that yields (bulk, or more than ``yield_tokens``
    left, passed over fewer than ``max_passed_over`` times): admissions and the rounds
    of requests that do not yield may pass it, and yielding resumes are served fewest
    tokens left first, bulk last, and are passed by no yielding round of a request that
    did not wait; each admission that passes one counts (from none when it begins to
    wait), none is passed more often than that, and at most ``max_rounds_in_flight``
    rounds are ever in flight. Allocations
    are told apart, and ordered, by their never-reused, increasing generations.
    """
    window = None if policy is None else policy.max_rounds_in_flight
    if window is not None:
        in_flight = sum(1 for r in after.records if r.allocation is not None)
        if in_flight > window:
            return f"{in_flight} rounds in flight, more than the policy's {window}"
    waited = _waiting(before)
    if policy is not None and after.resumes:
        problem = _passes_from_none(before, after, waited)
        if problem is not None:
            return problem
    if not waited:
        return None
    waits = _waiting(after)
    kept = [life for life in waits if life in waited]
    if kept != [life for life in waited if life in kept] or waits[: len(kept)] != kept:
        return (
            f"the queue of waiting resumes went from {waited} to {waits}: a resume that "
            "began to wait later got ahead of one waiting longer"
        )
    old = {(r.rid, r.incarnation): _generation(r) for r in before.records}
    new = {
        (r.rid, r.incarnation): (g, r)
        for r in after.records
        if (g := _generation(r)) is not None and old.get((r.rid, r.incarnation)) != g
    }
    was = {(r.rid, r.incarnation): r for r in before.resumes}
    limit = 0 if policy is None else policy.max_passed_over
    yields = [w for w in waited if _yields(was[w], policy)]
    first = [w for w in waited if w not in yields]
    problem = _served_first(first, kept, new, lambda life, r: True)
    if problem is not None or not yields:
        return problem
    problem = _yielders_in_order(yields, kept, new, was, policy)
    if problem is not None:
        return problem
    admitted = sum(1 for _, r in new.values() if r.epoch == 0)
    now = {(r.rid, r.incarnation): r for r in after.resumes}
    for life in yields:
        if life in kept:
            count, expect = now[life].passed, was[life].passed + admitted
            if count != expect:
                return (
                    f"the yielding resume of {life[0]!r} counts {count} admissions passing it, "
                    f"but {expect} did"
                )
            if count > limit:
                return (
                    f"the yielding resume of {life[0]!r} was passed over {count} times, more "
                    f"than the policy's {limit}"
                )
    return None


def _passes_from_none(
    before: ReceiverSnapshot, after: ReceiverSnapshot, waited: list[tuple[Hashable, int]]
) -> str | None:
    """A resume that begins to wait in a step counts no passes but the step's admissions."""
    fresh = {r.rid: r.passed for r in after.resumes if r.passed}
    if not fresh:
        return None
    old = {(r.rid, r.incarnation): _generation(r) for r in before.records}
    admitted = sum(
        1
        for r in after.records
        if r.epoch == 0
        and (g := _generation(r)) is not None
        and old.get((r.rid, r.incarnation)) != g
    )
    for rid, incarnation in _waiting(after):
        if fresh.get(rid, 0) > admitted and (rid, incarnation) not in waited:
            return (
                f"the resume of {rid!r} begins to wait with {fresh[rid]} pass(es) counted, "
                f"though {admitted} admission(s) were served: passes count per wait, from none"
            )
    return None


def _yielders_in_order(
    yields: list[tuple[Hashable, int]],
    kept: list[tuple[Hashable, int]],
    new: dict[tuple[Hashable, int], tuple[int, RecordState]],
    was: dict[tuple[Hashable, int], RecordState],
    policy: SchedulingPolicy | None,
) -> str | None:
    """Whether yielding resumes got blocks fewest tokens left first (the older of equals),
    bulk last, with no yielding round of a request that did not wait (``was`` holds those
    that did) ahead of its turn."""
    order = {w: (_yield_order(was[w], policy), i) for i, w in enumerate(yields)}
    for life, (g, r) in new.items():
        if life in order:
            mine = order[life]
        elif life not in was and r.epoch > 0 and _yields(r, policy):
            mine = (_yield_order(r, policy), len(yields))  # it joined the queue's back
        else:
            continue
        for w, key in order.items():
            if key < mine and (w in kept or (w in new and new[w][0] > g)):
                return (
                    f"request {r.rid!r} got blocks for round {r.epoch} ahead of the yielding "
                    f"resume of {w[0]!r}, which has fewer tokens left or waited longer"
                )
    return None


def step_served_in_order(
    receiver: ResumableReceiver,
    polled: Callable[[], Sequence[object]] | None = None,
    cancelled: Callable[[Hashable, int], bool] | None = None,
) -> Sequence[Hashable]:
    """One ``receiver.step()``, requiring that it served who was due (invariant 7) and
    accounted for what it handled (invariant 8); ``polled`` gives the batch it polled,
    ``cancelled`` whether the receiver sent a Cancel for a life (id, incarnation)."""
    before, policy = receiver.snapshot(), receiver.policy
    free_before = receiver.allocator.num_free_blocks
    sized: dict[int, int] | None = getattr(receiver.allocator, "free_before", None)
    if sized is not None:
        sized.clear()
    finished = receiver.step()
    after = receiver.snapshot()
    if sized:  # an allocation in the step
        require(PROGRESS, resumes_sized(before, after, receiver, sized))
    if before.resumes or policy is not None:
        require(SERVED_IN_ORDER, served_in_order(before, after, policy))
    if after.resumes:
        free = receiver.allocator.num_free_blocks
        problem = (
            no_resume_idle(after, free)
            if policy is None
            else none_idle_by_policy(after, free, policy)
        )
        require(SERVED_IN_ORDER, problem)
    if policy is not None:
        require(SERVED_IN_ORDER, bulk_rounds_yield(before, after, policy))
    require(ACCOUNTED, reported_once(before, after, finished))
    require(NO_LEAK, owned_by_holder(after))
    if polled is not None:
        batch = polled()
        if cancelled is not None and finished:
            require(EXACTLY_ONCE, failed_cancelled(after, finished, batch, cancelled))
        require(ACCOUNTED, statuses_counted(before, after, batch))
        require(ACCOUNTED, malformed_fails(before, after, batch))
        require(NO_LEAK, quarantined_while_written(before, after, batch))
        require(PROGRESS, next_round_overlaps(receiver, before, after, batch, free_before))
    return finished


def resumes_sized(
    before: ReceiverSnapshot,
    after: ReceiverSnapshot,
    receiver: ResumableReceiver,
    free_before: dict[int, int],
) -> str | None:
    """Each resume allocated in the step takes what its request has left (capped by
    ``max_resume_tokens``, and for a bulk request by the policy's ``bulk_round_tokens``),
    to a block: never more, and fewer only by taking every block free at that moment
    (``free_before``: per allocation's generation, the free blocks just before it)."""
    policy, cap = receiver.policy, receiver.max_resume_tokens
    bs = receiver.allocator.block_size
    old = {(r.rid, r.incarnation): r.allocation for r in before.records}
    for r in after.records:
        a = r.allocation
        if a is None or r.epoch == 0 or r.total is None or old.get((r.rid, r.incarnation)) is a:
            continue
        free = free_before.get(a.generation)
        want = r.total - r.sent
        if free is None or want < 1:
            continue
        if cap is not None:
            want = min(want, cap)
        if policy is not None and policy.bulk_round_tokens is not None and _bulk(r, policy):
            want = min(want, policy.bulk_round_tokens)
        need, got = -(-want // bs), len(a.blocks)
        if got > need or (got < need and got < free):
            return (
                f"round {r.epoch} of request {r.rid!r} got {got} block(s) with {free} free; "
                f"it needs {need} ({want} tokens)"
            )
    return None


def bulk_rounds_yield(
    before: ReceiverSnapshot, after: ReceiverSnapshot, policy: SchedulingPolicy
) -> str | None:
    """Under ``policy``, a bulk request's resumes are at most ``bulk_round_tokens`` (to a
    block); a yielding round (bulk, or more than ``yield_tokens`` left), until passed over
    ``max_passed_over`` times (counting the admissions served in the step), gets no
    blocks in a step after which an admission waiting before it still waits (admissions
    go first), nor while another round is in flight (it takes an idle link)."""
    cap, limit = policy.bulk_round_tokens, policy.max_passed_over
    old = {(r.rid, r.incarnation): r for r in before.records}
    admitting = {(r.rid, r.incarnation) for r in before.admissions if r.state is _WAITING}
    still = [
        r.rid
        for r in after.admissions
        if r.state is _WAITING and (r.rid, r.incarnation) in admitting
    ]
    admitted = sum(
        1
        for r in after.records
        if r.epoch == 0 and r.allocation is not None and (r.rid, r.incarnation) in admitting
    )
    for r in after.records:
        a, was = r.allocation, old.get((r.rid, r.incarnation))
        if a is None or r.epoch == 0:
            continue
        if was is not None and was.allocation is a:
            continue  # held from before this step
        blocks = len(a.blocks)
        if (
            _bulk(r, policy)
            and cap is not None
            and (blocks - 1) * (a.capacity_tokens // blocks) >= cap
        ):
            return (
                f"round {r.epoch} of bulk request {r.rid!r} holds {a.capacity_tokens} tokens, "
                f"more than the policy's {cap} to a block"
            )
        # Passed before the step, and by each admission served in it: once that reaches
        # the bound it goes ahead of the rest.
        passed = (0 if was is None else was.passed) + admitted
        if passed >= limit or not _yields(r._replace(passed=0), policy):
            continue
        if still:
            return (
                f"request {r.rid!r} got blocks for yielding round {r.epoch} while the "
                f"admission of {still[0]!r}, waiting before it, still waits"
            )
        # Posted before it and still in flight (one posted after it, in the same step,
        # saw it in flight and is its own round's business).
        others = [
            o.rid
            for o in after.records
            if o.allocation is not None and o.allocation.generation < a.generation
        ]
        if others:
            return (
                f"request {r.rid!r} got blocks for yielding round {r.epoch} while the round "
                f"of {others[0]!r} is in flight: a yielding round takes an idle link"
            )
    return None


def malformed_fails(
    before: ReceiverSnapshot, after: ReceiverSnapshot, batch: Sequence[object]
) -> str | None:
    """A malformed status that names a live life (its id and incarnation) ends that life:
    the receiver cannot tell which round it meant, so the round is a protocol error."""
    bad = [item for item in batch if _malformed_status(item)]
    if not bad:
        return None
    live = {(r.rid, r.incarnation) for r in before.records if not r.state.terminal}
    named: list[tuple[object, object]] = []
    for item in bad:
        rid, inc = getattr(item, "rid", None), getattr(item, "incarnation", None)
        try:
            if (rid, inc) in live:
                named.append((rid, inc))
        except TypeError:  # an unhashable id or incarnation names no life
            continue
    for r in after.records:
        if (r.rid, r.incarnation) in named and not r.state.terminal:
            return (
                f"a malformed status named request {r.rid!r} (life {r.incarnation}), "
                f"which is still {r.state.name} after the step"
            )
    return None


def owned_by_holder(after: ReceiverSnapshot) -> str | None:
    """Every allocation the receiver holds is owned by the request that holds it: an
    engine's ``free_owner(rid)`` frees exactly that request's blocks."""
    for r in after.records:
        a = r.allocation
        if a is not None and a.owner != r.rid:
            return f"the round {r.epoch} of {r.rid!r} holds blocks owned by {a.owner!r}"
    return None


def no_resume_idle(after: ReceiverSnapshot, free_blocks: int) -> str | None:
    """Without a policy a step ends with no resume waiting while a block is free: a resume
    takes what is free (``allocate_up_to``), so one left waiting was never tried."""
    if free_blocks:
        for r in after.resumes:
            if r.state is TransferState.Transferring and r.allocation is None:
                return (
                    f"the resume of {r.rid!r} still waits for blocks after a step that "
                    f"left {free_blocks} free"
                )
    return None


def none_idle_by_policy(
    after: ReceiverSnapshot, free_blocks: int, policy: SchedulingPolicy
) -> str | None:
    """Under ``policy`` a step ends with no resume that does not yield waiting while a
    block is free and the window has room, and with none at all waiting while a block is
    free, no round is in flight and no admission waits: the policy orders the rounds, it
    never holds one back that nothing goes before."""
    if not free_blocks:
        return None
    in_flight = sum(1 for r in after.records if r.allocation is not None)
    window = policy.max_rounds_in_flight
    if window is not None and in_flight >= window:
        return None
    idle = not in_flight and not any(r.state is _WAITING for r in after.admissions)
    for r in after.resumes:
        waits = r.state is TransferState.Transferring and r.allocation is None
        if waits and (idle or not _yields(r, policy)):
            why = "the link idle and no admission waiting" if idle else "the window room"
            return (
                f"the resume of {r.rid!r} still waits for blocks after a step that left "
                f"{free_blocks} free and {why}, and nothing goes before it"
            )
    return None


def next_round_overlaps(
    receiver: ResumableReceiver,
    before: ReceiverSnapshot,
    after: ReceiverSnapshot,
    batch: Sequence[object],
    free_before: int,
) -> str | None:
    """A round that lands alone in a step, with its request's whole next round free and
    nothing due before it, has that next round posted in other blocks (the sender fills it
    while the landed one is copied out): not in the landed blocks, and not left waiting.
    Under a policy a yielding next round is due only when nothing waits and no other round
    is in flight."""
    if len(batch) != 1 or type(batch[0]) is not msg.Landed:
        return None
    status = batch[0]
    life = (status.rid, status.incarnation)
    was = next((r for r in before.records if (r.rid, r.incarnation) == life), None)
    now = next((r for r in after.records if (r.rid, r.incarnation) == life), None)
    if was is None or now is None or was.allocation is None or now.total is None:
        return None
    if now.epoch != was.epoch + 1 or now.state is not TransferState.Transferring:
        return None  # not consumed, or the last round
    policy = receiver.policy
    if policy is None:
        if before.resumes:
            return None  # older resumes first
    else:
        waiting = [
            r
            for r in before.resumes
            if r.state is TransferState.Transferring and r.allocation is None
        ]
        if any(not _yields(r, policy) for r in waiting):
            return None  # due first
        busy = waiting or any(r.state is _WAITING for r in before.admissions)
        if _yields(now._replace(passed=0), policy) and (
            busy or any(r.allocation is not None for r in before.records if r is not was)
        ):
            return None  # it yields: behind those waiting, and until the link is idle
    want = now.total - now.sent
    cap = receiver.max_resume_tokens
    if cap is not None:
        want = min(want, cap)
    if receiver.allocator.blocks_for(want) > free_before:
        return None
    landed = set(was.allocation.blocks)
    if now.allocation is None or landed.intersection(now.allocation.blocks):
        how = "waits for blocks" if now.allocation is None else "was posted in its blocks"
        return (
            f"round {was.epoch} of {status.rid!r} landed with {free_before} block(s) free for "
            f"the next, but the next round {how}: it was not posted before the copy-out"
        )
    return None


def _served_first(
    waited: list[tuple[Hashable, int]],
    kept: list[tuple[Hashable, int]],
    new: dict[tuple[Hashable, int], tuple[int, RecordState]],
    passes: Callable[[tuple[Hashable, int], RecordState], bool],
) -> str | None:
    """Whether ``waited`` were served in order, with none that ``passes`` ahead of them."""
    last = -1  # the newest generation a waiting resume got, in queue order
    for i, life in enumerate(waited):
        if life in new:
            if new[life][0] < last or any(w in kept for w in waited[:i]):
                return (
                    f"the resume of {life[0]!r} got blocks before one waiting longer "
                    "(waiting resumes are served in the order they began to wait)"
                )
            last = new[life][0]
    waiting = [w for w in waited if w in kept]
    for life, (g, r) in new.items():
        if life not in waited and (waiting or g < last) and passes(life, r):
            how = "its round 0" if r.epoch == 0 else f"round {r.epoch}"
            ahead = waiting[0][0] if waiting else next(w for w in waited if w in new)[0]
            return (
                f"request {r.rid!r} got blocks for {how} ahead of the resume of {ahead!r}, "
                "which was waiting for blocks"
            )
    return None


# -- 8. accounted ----------------------------------------------------------------


def reported_once(
    before: ReceiverSnapshot, after: ReceiverSnapshot, finished: Sequence[Hashable]
) -> str | None:
    """A step hands over, once each, the requests that ended since the last step (in it, or
    failed by the engine before it) and nothing else; an ended request says why it failed."""
    was = {(r.rid, r.incarnation): r.state.terminal for r in before.records}
    expected = Counter(before.finished)
    for r in after.records:
        if r.state.terminal and not was.get((r.rid, r.incarnation), True):
            expected[r.rid] += 1
            failed = r.state is TransferState.Failed
            if failed != (type(r.reason) is str and r.reason != ""):
                return f"request {r.rid!r} ended {r.state.name} with reason {r.reason!r}"
    got = Counter(finished)
    if got != expected or after.finished:
        left = Counter(after.finished)
        return f"a step reported {_ids(got)} as finished, but {_ids(expected)} had ended" + (
            f" (and {_ids(left)} stayed queued)" if left else ""
        )
    return None


def aborted_reported(
    before: ReceiverSnapshot, after: ReceiverSnapshot, rid: Hashable, ended: bool
) -> str | None:
    """``abort`` queues the request it ended for the next step to report, once."""
    more = after.finished.count(rid) - before.finished.count(rid)
    if more != int(ended):
        how = "ended" if ended else "had already ended"
        return f"abort({rid!r}) {how}, and queued it {more} more time(s) for the next step"
    return None


def statuses_counted(
    before: ReceiverSnapshot, after: ReceiverSnapshot, batch: Sequence[object]
) -> str | None:
    """The receiver counts each status it drops once at most, as stale, orphan or malformed,
    as malformed exactly the items that are and as orphans exactly those of no life it holds
    (:func:`_orphans`), and as stale at least those of a life that had ended or of a round
    it had consumed; a record's stale count moves with the total."""
    bad = sum(1 for s in batch if _malformed_status(s))
    deltas = (
        after.stale_statuses - before.stale_statuses,
        after.orphan_statuses - before.orphan_statuses,
        after.malformed_statuses - before.malformed_statuses,
    )
    was = {(r.rid, r.incarnation): r.stale for r in before.records}
    per_record = sum(r.stale - was.get((r.rid, r.incarnation), 0) for r in after.records)
    orphans, stale = _orphans(before, batch) if batch else (0, 0)
    if (
        min(deltas) < 0
        or sum(deltas) > len(batch)
        or deltas[2] != bad
        or deltas[1] != orphans
        or deltas[0] < stale
        or per_record != deltas[0]
    ):
        return (
            f"a step of {len(batch)} item(s), {bad} malformed, {orphans} of no life held and "
            f"{stale} of a finished life or an old round, "
            f"moved the stale, orphan and malformed counts by {deltas} and the records' "
            f"stale counts by {per_record}"
        )
    return None


def _orphans(before: ReceiverSnapshot, batch: Sequence[object]) -> tuple[int, int]:
    """The well-formed round statuses of ``batch`` that name no life the receiver holds (no
    record of the id, or one of another life) and no quarantined round, in batch order: a
    status of a quarantined round frees it, and a lost peer frees them all; and those that
    must be stale: of a life held that had ended, or of a round it had consumed (epochs
    only grow and an ended life stays ended, so the step can only add to them)."""
    lives = {r.rid: r.incarnation for r in before.records}
    done = {r.rid: (r.state.terminal, r.epoch) for r in before.records}
    held = {k for k, _ in before.quarantine}
    n = stale = 0
    for item in batch:
        kind = type(item)
        if kind is msg.PeerLost:
            held.clear()
        elif kind in msg.ROUND_STATUSES and msg.malformed_status(item) is None:
            s: msg.Landed | msg.Cancelled | msg.SenderError = item  # type: ignore[assignment]
            key = (s.rid, s.incarnation, s.epoch)
            if key in held:
                held.discard(key)
            elif s.rid not in lives or lives[s.rid] != s.incarnation:
                n += 1
            elif done[s.rid][0] or 0 <= s.epoch < done[s.rid][1]:
                stale += 1
    return n, stale


def _malformed_status(item: object) -> bool:
    if type(item) in msg.ROUND_STATUSES:
        return msg.malformed_status(item) is not None
    return type(item) is not msg.PeerLost and type(item) is not msg.PeerBack


def _sender_counts(sender: EmbeddingSender) -> tuple[int, int, int, int]:
    return (sender.rounds_served, sender.repeated_posts, sender.stale_posts, sender.malformed_posts)


def reports_a_round(status: msg.Landed | msg.Cancelled | msg.SenderError) -> str | None:
    """A status the sender reports is about a round posted to it (epoch 0 or more): a
    Cancel that named no round is answered by nothing."""
    if type(status.epoch) is int and status.epoch < 0:
        return f"the sender reported {status!r}, of no round"
    return None


def step_counted(sender: EmbeddingSender, polled: Callable[[], Sequence[object]]) -> int:
    """One ``sender.step()``, requiring that it counted each post it polled once at most
    (a round served, a repeat, a stale post) and the malformed ones exactly (invariant 8);
    a malformed post of an ended life is both malformed and stale."""
    before = _sender_counts(sender)
    served = sender.step()
    after, posts = _sender_counts(sender), polled()
    deltas = tuple(a - b for a, b in zip(after, before, strict=True))
    bad = sum(1 for p in posts if msg.malformed_post(p) is not None)
    if min(deltas) < 0 or sum(deltas[:3]) > len(posts) or deltas[3] != bad or served != deltas[0]:
        require(
            ACCOUNTED,
            f"a sender step of {len(posts)} post(s), {bad} malformed, returned {served} and "
            f"moved the served, repeated, stale and malformed counts by {deltas}",
        )
    return served


def owed_round(sender: SenderSnapshot, rid: Hashable, incarnation: int) -> tuple[int, int] | None:
    """The round the sender owes life ``incarnation`` of ``rid`` next and the tokens it sent
    so far, or ``None`` while it holds no unfinished source of that life."""
    for r, lives in sender.lives:
        if r == rid:
            for src in lives:
                if src.incarnation == incarnation and src.sent < src.total:
                    return src.next_epoch, src.sent
    return None


def post_refused(before: SenderSnapshot, post: RoundPost, reported: Sequence[object]) -> str | None:
    """A post the sender cannot serve (malformed, skipping a round of its life's source,
    resuming that source where it did not stop, or expecting other than the round would
    carry) naming a round of a life not ended at the sender, not served yet, is refused
    for that round and life with the problem named: the receiver may be waiting on it."""
    problem, epoch, inc = msg.malformed_post(post), post.epoch, post.incarnation
    if type(epoch) is not int or type(inc) is not int or epoch < 0:
        return None
    try:
        hash(post.rid)
    except TypeError:
        return None  # names no request
    if inc <= dict(before.ended).get(post.rid, 0):
        return None  # a life over here: counted stale
    mine = [s for s in dict(before.lives).get(post.rid, ()) if s.incarnation == inc]
    if problem is None:  # well formed: refused where it skips a round of a bound source
        if not mine or mine[0].next_epoch > epoch:  # no source yet, or a repeat
            return None
        if mine[0].next_epoch < epoch:
            problem = f"posted before round {mine[0].next_epoch}"
        elif post.sent != mine[0].sent:
            problem = f"resumes at token {post.sent}"
        elif post.expect_tokens is not None and post.expect_tokens != min(
            mine[0].total - mine[0].sent, post.capacity_tokens
        ):
            problem = f"expects {post.expect_tokens}"
        else:
            return None
    elif any(s.next_epoch > epoch for s in mine):
        return None  # a garbled repeat of a round served already
    named = (post.rid, epoch, inc)
    refused = (
        s
        for s in reported
        if type(s) is msg.SenderError and (s.rid, s.epoch, s.incarnation) == named
    )
    if any(problem in s.reason for s in refused):
        return None
    return f"the sender took the post {post!r} ({problem}) without refusing its round"


def _ids(counts: Counter[Hashable]) -> str:
    return "[" + ", ".join(sorted(map(repr, counts.elements()))) + "]"


def rounds_counted(rid: Hashable, reported: int, consumed: int) -> str | None:
    """A taken result counts the rounds its life consumed (invariant 8, accounted)."""
    if reported == consumed:
        return None
    return f"request {rid!r} reports {reported} round(s); its life consumed {consumed}"


def post_expects(post: RoundPost) -> str | None:
    """A resume's post names the tokens its round must carry, at least one and at most
    its blocks' worth: the total came with round 0, the sender refuses a round that
    would carry other than that, and a transport sizes its receive by it."""
    expect = post.expect_tokens
    if expect is None:
        if post.epoch == 0:
            return None  # the total is not known before round 0 lands
        return (
            f"round {post.epoch} of request {post.rid!r} is posted with no expect_tokens, "
            "though its total came with round 0"
        )
    if not 1 <= expect <= post.capacity_tokens:
        return (
            f"round {post.epoch} of request {post.rid!r} expects {expect} tokens in "
            f"{post.capacity_tokens} tokens' worth of blocks"
        )
    return None


# -- the ledger: what the Hypothesis machines observe of the real implementation ----


@dataclass
class _Round:
    rid: Hashable
    incarnation: int
    epoch: int
    posts: int = 0
    written: bool = False
    consumed: bool = False


@dataclass
class Ledger:
    """Observes posts, writes, consumptions and frees; checks invariants 1, 3, 4, 5 as they happen.

    Plug it in as the receiver's observer, call :meth:`before_write` from the
    transport before each write and :meth:`before_free` from the allocator.
    """

    allocator: BlockAllocator | None = None
    rounds: dict[int, _Round] = field(default_factory=dict)
    consumed: set[tuple[Hashable, int, int]] = field(default_factory=set)  # (rid, life, epoch)
    sent: dict[tuple[Hashable, int], int] = field(default_factory=dict)  # per (rid, life)
    cancels: dict[tuple[Hashable, int], int] = field(default_factory=dict)  # per (rid, life)

    # ReceiverObserver hooks
    def round_posted(self, post: RoundPost) -> None:
        assert post.allocation is not None
        g = post.allocation.generation
        entry = self.rounds.setdefault(g, _Round(post.rid, post.incarnation, post.epoch))
        entry.posts += 1
        require(EXACTLY_ONCE, allocation_posted_once(g, entry.posts))
        require(INTEGRITY, post_expects(post))

    def round_consumed(
        self, rid: Hashable, epoch: int, tokens: int, allocation: Allocation
    ) -> None:
        entry = self.rounds.get(allocation.generation)
        require(
            INTEGRITY,
            round_landed_before_consumed(rid, epoch, entry is not None and entry.written),
        )
        assert entry is not None
        key = (entry.rid, entry.incarnation, entry.epoch)
        require(EXACTLY_ONCE, round_consumed_once(entry.rid, entry.epoch, key in self.consumed))
        self.consumed.add(key)
        entry.consumed = True
        life = (entry.rid, entry.incarnation)
        before = self.sent.get(life, 0)
        require(PROGRESS, sent_advances(rid, before, before + tokens))
        self.sent[life] = before + tokens

    def request_failed(self, rid: Hashable, reason: str) -> None:
        pass

    # transport and allocator hooks
    def cancelled(self, rid: Hashable, incarnation: int) -> None:
        """The receiver sent a Cancel for this life."""
        times = self.cancels.get((rid, incarnation), 0) + 1
        require(EXACTLY_ONCE, cancelled_once(rid, incarnation, times))
        self.cancels[(rid, incarnation)] = times

    def before_write(self, post: RoundPost) -> None:
        allocation = post.allocation
        assert allocation is not None and self.allocator is not None
        live = self.allocator.is_live(allocation)
        require(
            NO_WRITE_AFTER_FREE,
            write_into_live_round(post.rid, post.epoch, allocation.generation, live),
        )
        entry = _Round(post.rid, post.incarnation, post.epoch)
        self.rounds.setdefault(allocation.generation, entry).written = True

    def before_free(self, allocation: Allocation) -> None:
        assert self.allocator is not None
        require(
            EXACTLY_ONCE,
            allocation_freed_once(allocation.generation, self.allocator.is_live(allocation)),
        )
        self.rounds.pop(allocation.generation, None)


__all__ = [
    "ACCOUNTED",
    "CRASH",
    "EXACTLY_ONCE",
    "INTEGRITY",
    "INVARIANTS",
    "LIVENESS",
    "NO_LEAK",
    "NO_WRITE_AFTER_FREE",
    "PROGRESS",
    "SERVED_IN_ORDER",
    "InvariantViolation",
    "Ledger",
    "aborted_reported",
    "allocation_freed_once",
    "allocation_posted_once",
    "next_round_overlaps",
    "none_idle_by_policy",
    "nothing_left",
    "output_intact",
    "post_expects",
    "quarantined_while_written",
    "record_collected",
    "record_view",
    "reported_once",
    "require",
    "resumes_sized",
    "round_consumed_once",
    "round_landed_before_consumed",
    "rounds_counted",
    "sent_advances",
    "served_in_order",
    "stale_changes_nothing",
    "stale_view",
    "statuses_counted",
    "step_counted",
    "step_served_in_order",
    "succeeds_without_faults",
    "terminates",
    "tokens_in_place",
    "write_into_live_round",
]
