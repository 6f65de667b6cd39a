"""The explorer's abstraction: a hashable key of a :class:`~resumekit.properties.world.WorldState`.

States with equal keys have the same futures, so the explorer visits each key
once. The key is computed from the state's values alone (the snapshots the
shipped objects take of themselves), with two symmetry reductions, sound because
the protocol compares generations and block numbers only for identity: live
allocations are named by age and their blocks by position (the ledger proved each
post names its allocation's blocks), and a freed block's stale content is left out,
because a read of a round the sender has not written is itself a violation (the
ledger's ``written`` check). Only a design that remembers block numbers
(``seed-index``) needs the blocks of dead allocations renamed. Incarnations are
named by the life of their id they belong to: the code compares them only for
equality and order within one id.
"""

from __future__ import annotations

from collections.abc import Hashable
from operator import itemgetter
from typing import Any

from resumekit.properties.world import WorldState
from resumekit.protocol import messages as msg
from resumekit.protocol.declaration import TransferState

S = TransferState


def key(s: WorldState, remembers_blocks: bool = False) -> tuple[Any, ...]:
    """A hashable abstraction of ``s``: see the module docstring."""
    alloc = s.allocator
    live = alloc.live
    rank: dict[int, Any] = {id(a): i for i, a in enumerate(live)}
    rank[id(None)] = -1
    rounds, consumed, labels, _, lives, _ = s.ledger
    renamed = None
    if remembers_blocks:
        order = list(alloc.free)
        for a in live:
            order.extend(a.blocks)
        renamed = {b: i for i, b in enumerate(order)}
    memos = dict(s.memos) if s.memos else {}
    outputs = s.outputs
    rs = s.receiver
    # Live records keep their order (a lost peer fails them in it, freeing blocks in
    # it). Finished ones are inert (a status for one changes counters only), so only
    # what the take is judged by stays: not their order, reason text or progress.
    live_records: list[tuple[object, ...]] = []
    finished: list[tuple[object, ...]] = []
    running: list[Hashable] = []
    for rec in rs.records:
        rid = rec.rid
        if rec.state is S.Failed:
            finished.append((rid, lives.get(rec.incarnation), False, rec.reason is None))
            continue
        if rec.state is S.Success:
            out = outputs[rec.output]  # type: ignore[index]
            finished.append(
                (rid, lives.get(rec.incarnation), True, out, rec.total, rec.mrope_delta)
            )
            continue
        memo = memos.get((rid, rec.incarnation))
        if renamed is not None and type(memo) is tuple:
            memo = tuple(renamed.get(b, -1 - b) for b in memo)
        live_records.append(
            (
                rid,
                lives.get(rec.incarnation),
                rec.state,
                rec.epoch,
                rec.sent,
                rec.total,
                rec.mrope_delta,
                rank.get(id(rec.allocation), "dead"),
                None if rec.output is None else outputs[rec.output],  # type: ignore[index]
                rec.reason,
                memo,
                rec.passed,
            )
        )
        running.append(rid)
    if len(finished) > 1:
        finished.sort(key=itemgetter(0))
    cells, aux = s.cells, s.aux
    bs = len(cells) // len(aux)
    slots = range(bs)
    allocations = tuple(
        (
            a.owner,
            tuple([cells[b * bs + i] for b in a.blocks for i in slots]),
            rounds.get(a.generation),
            *aux[a.blocks[0]][:3],
        )
        for a in live
    )
    posts, statuses, events, _, _, sender_alive, _, restarting, loss_seen = s.transport[:9]
    return (
        s.added,
        s.encoded,
        s.lives,
        s.budget,
        s.hurt,
        tuple([rank.get(id(a), "dead") for a in s.pressure]),
        s.grab_armed,
        len(alloc.free),
        allocations,
        tuple(live_records),
        tuple(finished),
        tuple([r.rid for r in rs.admissions]),
        tuple([r.rid for r in rs.resumes]),
        tuple([(k[0], lives.get(k[1]), k[2], rank.get(id(a), "dead")) for k, a in rs.quarantine]),
        rs.peer_lost,
        _sender_key(s, rank, lives) if sender_alive or restarting or loss_seen else None,
        tuple([_post_key(p, rank, lives) for p in posts]),
        tuple(sorted([_status_key(st, lives) for st in statuses])) if statuses else (),
        events,
        sender_alive,
        restarting,
        loss_seen,
        # The last epoch consumed, for lives still running (a finished life's is inert).
        tuple([consumed.get(labels[r], -1) for r in running]),
    )


def _sender_key(s: WorldState, rank: dict[int, Any], lives: dict[int, int]) -> object:
    """What the sender holds (only while it lives: a sender dead for good hears nothing)."""
    snap = s.sender
    return (
        tuple(
            [
                (
                    rid,
                    tuple(
                        [
                            (
                                src.data.label,  # type: ignore[attr-defined]
                                lives.get(src.incarnation),  # type: ignore[arg-type]
                                src.sent,
                                src.next_epoch,
                                src.total,
                                src.mrope_delta,
                            )
                            for src in sources
                        ]
                    ),
                )
                for rid, sources in snap.lives
            ]
        ),
        tuple([(rid, tuple([_post_key(p, rank, lives) for p in ps])) for rid, ps in snap.parked])
        if snap.parked
        else (),
        # Both keep recency order only to evict beyond max_tombstones: sorted. The explorer
        # adds every source unnamed, so only how many lives wait for theirs can matter.
        tuple(sorted([(rid, len(incs)) for rid, incs in snap.cancelled])),
        tuple(sorted([(rid, lives.get(inc, 0)) for rid, inc in snap.ended])),
    )


def _post_key(p: msg.Post, rank: dict[int, Any], lives: dict[int, int]) -> tuple[object, ...]:
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


#: status_order per status object, by identity: statuses compare equal across types
#: (``final=1 == final=True``), so a cache keyed by the status would hand a poisoned
#: one the order of a well-formed one seen first, and the key would depend on history.
_ORDERS: dict[int, tuple[msg.Status, tuple[Any, ...]]] = {}


def _status_key(st: msg.Status, lives: dict[int, int]) -> tuple[Any, ...]:
    """``status_order`` with the incarnation named by its life (cached per status)."""
    hit = _ORDERS.get(id(st))
    if hit is not None and hit[0] is st:  # held here, so its id is not reused
        order = hit[1]
    else:
        if len(_ORDERS) > 65_536:
            _ORDERS.clear()
        order = status_order(st)
        _ORDERS[id(st)] = (st, order)
    inc = order[2] if len(order) > 2 else None
    if type(inc) is tuple and inc[0] == 0:  # an int incarnation (``_typed``): named by life
        return (*order[:2], (0, lives.get(inc[1], inc[1])), *order[3:])
    return order


def _typed(value: object) -> tuple[int, Any]:
    """An int as itself, anything else (a poisoned field) after every int, by its repr."""
    return (0, value) if type(value) is int else (1, repr(value))


def status_order(s: object) -> tuple[Any, ...]:
    """A total order on statuses (for the multiset in flight), malformed ones included."""
    kind = type(s)
    if kind is msg.Landed:
        landed: msg.Landed = s  # type: ignore[assignment]
        return (
            0,
            landed.rid,
            _typed(landed.incarnation),
            repr(landed.epoch),
            _typed(landed.tokens),
            _typed(landed.total),
            repr(landed.final),
        )
    if kind is msg.Cancelled:
        c: msg.Cancelled = s  # type: ignore[assignment]
        return (1, c.rid, _typed(c.incarnation), repr(c.epoch))
    if kind is msg.SenderError:
        e: msg.SenderError = s  # type: ignore[assignment]
        return (2, e.rid, _typed(e.incarnation), repr(e.epoch), repr(e.reason))
    return (3, kind.__name__, repr(s))
