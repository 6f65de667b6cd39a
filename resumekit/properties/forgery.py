"""The adversary's made-up messages: forged statuses, and statuses and posts poisoned.

Each is aimed at a live request of the model (:mod:`~resumekit.properties.model`): a
forged status for a round never posted, one already consumed or one of the id's earlier
life; a status or post with one field of an unusable type; a well-typed post that skips
a round (``ahead``) or resumes past what the sender sent (``askew``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from resumekit.properties.bounds import (
    AHEAD,
    ASKEW,
    BUDGET_INDEX,
    FORGED,
    MISCOUNTED,
    OLD,
    POISON_VALUES,
    PREMATURE,
    STALE,
    TRUNCATED,
    Bounds,
)
from resumekit.properties.invariants import (
    ACCOUNTED,
    PROGRESS,
    owed_round,
    post_refused,
    record_view,
    require,
    stale_changes_nothing,
    stale_view,
    step_counted,
)
from resumekit.properties.world import World, replaced, spend
from resumekit.protocol import messages as msg
from resumekit.protocol.declaration import TransferState

S = TransferState
FORGE, POISON = BUDGET_INDEX["forge"], BUDGET_INDEX["poison"]


class Model(Protocol):
    """What a forgery needs of the model: its bounds, whether stale statuses are judged,
    and its receiver step (which checks the step's invariants)."""

    bounds: Bounds
    judges_stale: bool

    def _receiver_step(self, w: World) -> None: ...


def forge(model: Model, w: World, action: tuple[Any, ...]) -> None:
    """Deliver at once a status for a round of ``r`` not posted: the next, or a far one,
    or (``old``, ``stale``) one already consumed or of the id's earlier life, which must
    change nothing."""
    w.budget = spend(w.budget, FORGE)
    r, what, far = action[1], action[2], action[3]
    rec = w.receiver.record(r)
    epoch, inc = rec.epoch + (2 * model.bounds.max_rounds if far else 1), rec.incarnation
    if far == OLD:
        epoch = rec.epoch - 1  # changes nothing, like a late duplicate
    elif far == STALE:
        inc = w.ledger.incarnations[(r, w.lives[r] - 1)]
        epoch = rec.epoch  # the number of the round in flight, of another life
        if (r, inc, epoch) in w.receiver.quarantined():
            epoch += 2 * model.bounds.max_rounds  # that round may still be written: not it
    else:
        w.hurt = replaced(w.hurt, r, True)
    forged: msg.Status
    if what == "oversized":  # the round in flight, with more tokens than its blocks hold
        assert rec.allocation is not None
        tokens = rec.allocation.capacity_tokens + 1
        forged = msg.Landed(r, rec.epoch, tokens, rec.sent + tokens, True, incarnation=inc)
    elif what == PREMATURE:  # the round in flight, written and not the last, said final
        total = w.totals[r]
        assert rec.allocation is not None
        tokens = min(total - rec.sent, rec.allocation.capacity_tokens)
        forged = msg.Landed(r, rec.epoch, tokens, total, True, incarnation=inc)
    elif what == TRUNCATED:  # the round in flight, written, said to end the request
        assert rec.allocation is not None  # (round 0's aux row, or the total that came
        tokens = rec.allocation.capacity_tokens  # with it, says not)
        forged = msg.Landed(r, rec.epoch, tokens, rec.sent + tokens, True, incarnation=inc)
    elif what == "landed":
        forged = msg.Landed(r, epoch, 1, w.totals[r], False, incarnation=inc)
    elif what == "cancelled":
        forged = msg.Cancelled(r, epoch, incarnation=inc)
    else:
        forged = msg.SenderError(r, epoch, "forged", incarnation=inc)
    before = stale_view(w.receiver, forged) if model.judges_stale and far in (STALE, OLD) else None
    w.transport.deliver = (forged,)
    model._receiver_step(w)
    if before is not None:
        require(PROGRESS, stale_changes_nothing(r, before, record_view(w.receiver, r)))


def poison(model: Model, w: World, action: tuple[Any, ...]) -> None:
    """A status (into the channel) or a post (straight to the sender) with one field of
    an unusable type, as a broken decoder would make it; one naming no live life (an
    unhashable id, an ill-typed incarnation, the id's earlier life) must fail no one."""
    w.budget = spend(w.budget, POISON)
    r, where = action[1], action[2]
    rec = w.receiver.record(r)
    inc: Any = rec.incarnation
    if where in ("incarnation", STALE, "cancel"):
        inc = None if where != STALE else w.ledger.incarnations[(r, w.lives[r] - 1)]
    elif where != "rid":
        w.hurt = replaced(w.hurt, r, True)
    rid: Any = POISON_VALUES["rid"] if where == "rid" else r
    if action[0] == "poison":
        fields: dict[str, Any] = {"epoch": rec.epoch, "tokens": 1, "final": False}
        if where not in ("incarnation", "rid"):
            fields[where if where in fields else "epoch"] = POISON_VALUES[where]
        bad: Any = msg.Landed(
            rid, fields["epoch"], fields["tokens"], w.totals[r], fields["final"], incarnation=inc
        )
        if where == "rid":  # delivered at once: no key orders an unhashable id among others
            w.transport.deliver = (bad,)
            model._receiver_step(w)
            return
        w.transport.statuses += (bad,)
        return
    post: dict[str, Any] = {"blocks": (0,), "sent": rec.sent}
    if where in post:
        post[where] = POISON_VALUES[where]
    epoch, expect = rec.epoch + 2 if where == AHEAD else rec.epoch, None
    if where in (ASKEW, MISCOUNTED):  # the round the sender owes, from the token it sent ...
        epoch, sent = owed(w, r)  # type: ignore[misc]
        post["sent"] = sent + 1 if where == ASKEW else sent  # ... or a token past it
        if where == MISCOUNTED:  # expecting a token more than the one it carries
            expect = min(w.totals[r] - sent, 1) + 1
    bad = msg.RoundPost(rid, epoch, post["blocks"], 1, post["sent"], None, expect, incarnation=inc)
    if where == "cancel":  # a Cancel, not a post, naming no life
        bad = msg.Cancel(r, msg.NO_EPOCH, incarnation=inc)
    w.transport.hand_over = (bad,)
    before, n = w.sender.snapshot(), len(w.transport.statuses)
    step_counted(w.sender, lambda: w.transport.polled_posts)
    reported = w.transport.statuses[n:]
    require(ACCOUNTED, post_refused(before, bad, reported))


def forgeries(w: World, r: int) -> Iterator[tuple[Any, ...]]:
    """The forged statuses for live request ``r``: of rounds never posted, the round in
    flight oversized, a written round in flight not the last said final (premature) or
    said to end the request (truncated), a round consumed already, a round of the id's
    earlier life."""
    yield from (("forge", r, kind, far) for kind in FORGED for far in (False, True))
    rec = w.receiver.record(r)
    a = rec.allocation
    if a is not None:
        yield ("forge", r, "oversized", False)
        if w.totals[r] - rec.sent > a.capacity_tokens:  # not the last round
            entry = w.ledger.rounds.get(a.generation)
            if entry is not None and entry[3]:  # written: the receiver may read it
                yield ("forge", r, PREMATURE, False)
                yield ("forge", r, TRUNCATED, False)
    if rec.epoch and rec.state is S.Transferring:
        yield from (("forge", r, kind, OLD) for kind in FORGED)
    if w.lives[r] > 1:
        yield from (("forge", r, kind, STALE) for kind in FORGED)


def owed(w: World, r: int) -> tuple[int, int] | None:
    """The round the sender owes ``r``'s current life next and the tokens it sent, or
    ``None`` while it holds no unfinished source of that life."""
    return owed_round(w.sender.snapshot(), r, w.receiver.record(r).incarnation)


__all__ = ["Model", "forge", "forgeries", "owed", "poison"]
