"""The explorer's abstraction: a hashable key of a :class:`~resumekit.properties.world.WorldState`.

States with equal keys have the same futures, so the explorer visits each key
once. The key is computed from the state's values alone (the snapshots the
shipped objects take of themselves), with two symmetry reductions, sound because
the protocol compares generations and block numbers only for identity: live
allocations are named by age and their blocks by position (the ledger proved each
post names its allocation's blocks), and a freed block's stale content is left out,
and so is what a live allocation's blocks held before the sender wrote its round,
because a read of a round the sender has not written is itself a violation (the
ledger's ``written`` check). Only a design that remembers block numbers
(``seed-index``) needs the blocks of dead allocations renamed. Incarnations are
named by the life of their id they belong to: the code compares them only for
equality and order within one id.

Requests of equal totals are interchangeable (:func:`renamed`): the code compares
request ids only for equality and keeps them in the order events brought them, so a
state with two such requests swapped has the mirrored futures. The explorer names
them in the order the receiver holds their records, one key for both mirrors.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from operator import itemgetter
from typing import Any, Final

from resumekit.properties.world import MROPE_BASE, WorldState
from resumekit.protocol import messages as msg
from resumekit.protocol.declaration import TransferState
from resumekit.protocol.receiver import ReceiverSnapshot

S = TransferState


def key(s: WorldState, remembers_blocks: bool = False, reduced: bool = True) -> tuple[Any, ...]:
    """A hashable abstraction of ``s``: see the module docstring. ``reduced`` (off: the key
    of before issue 23) leaves out what unwritten rounds' blocks hold and keys the
    sender's ids in order, not in the order it met them (nothing it does depends on
    that order), so that :func:`renamed` mirrors meet."""
    alloc = s.allocator
    live = alloc.live
    rank: dict[int, Any] = {id(a): i for i, a in enumerate(live)}
    rank[id(None)] = -1
    rounds, consumed, labels, _, lives = s.ledger[:5]  # cancels: the ledger's memory only
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
    allocations: list[tuple[Any, ...]] = []
    for a in live:
        entry = rounds.get(a.generation)
        if reduced and (entry is None or not entry[3]):  # unwritten: stale, never read
            allocations.append((a.owner, None, entry, None, None, None))
            continue
        content = tuple([cells[b * bs + i] for b in a.blocks for i in slots])
        allocations.append((a.owner, content, entry, *aux[a.blocks[0]][:3]))
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
        tuple(allocations),
        tuple(live_records),
        tuple(finished),
        tuple([r.rid for r in rs.admissions]),
        tuple([r.rid for r in rs.resumes]),
        tuple([(k[0], lives.get(k[1]), k[2], rank.get(id(a), "dead")) for k, a in rs.quarantine]),
        rs.peer_lost,
        _sender_key(s, rank, lives, reduced) if sender_alive or restarting or loss_seen else None,
        tuple([_post_key(p, rank, lives) for p in posts]),
        tuple(sorted([_status_key(st, lives) for st in statuses])) if statuses else (),
        events,
        sender_alive,
        restarting,
        loss_seen,
        # The last epoch consumed, for lives still running (a finished life's is inert).
        tuple([consumed.get(labels[r], -1) for r in running]),
    )


def state_key(
    s: WorldState, remembers_blocks: bool = False, reductions: bool = True
) -> tuple[Any, ...]:
    """The explorer's key of ``s``: :func:`key`, with interchangeable requests
    :func:`renamed` (``reductions`` off: the key of before issue 23)."""
    k = key(s, remembers_blocks, reductions)
    perm = request_permutation(s) if reductions else None
    return k if perm is None else renamed(k, perm)


def budget_split(k: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Key ``k`` of :func:`state_key` as the rest, and the fault budget left with the hurt
    flags (what :func:`covers` compares)."""
    return (*k[:3], *k[5:]), (k[3], k[4])


def covers(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether budget and hurt ``a`` (of :func:`budget_split`) allow every fault ``b`` does
    and hurt no request ``b`` leaves unhurt: with the same rest, the state of ``a`` has
    every future of ``b``'s, judged at least as strictly."""
    (budget_a, hurt_a), (budget_b, hurt_b) = a, b
    return all(x >= y for x, y in zip(budget_a, budget_b, strict=True)) and all(
        y or not x for x, y in zip(hurt_a, hurt_b, strict=True)
    )


def request_permutation(s: WorldState) -> tuple[int, ...] | None:
    """The new name of each request, for requests of equal totals named in the order the
    receiver holds their live records (then the rest in index order); ``None`` for no change.

    Any choice is sound (a renamed state has the mirrored futures); this one names both
    mirrors of a state alike, so the explorer keeps one of them.
    """
    totals = s.totals
    n = len(totals)
    if n < 2 or s.memos:  # a design's memory is not renamed
        return None
    if n == 2:  # the common case, in short: swapped when request 1's record leads
        if totals[0] != totals[1]:
            return None
        for rec in s.receiver.records:
            if rec.state is not S.Failed and rec.state is not S.Success:
                return _SWAP if rec.rid == 1 else None
        return None
    if len(set(totals)) == n:
        return None
    order: list[int] = []
    for rec in s.receiver.records:  # live ones: the key keeps their order, not the finished'
        rid = rec.rid
        live = rec.state is not S.Failed and rec.state is not S.Success
        if live and type(rid) is int and 0 <= rid < n and rid not in order:
            order.append(rid)
    if not order or order == list(range(len(order))):
        return None
    order += [r for r in range(n) if r not in order]
    free: dict[int, list[int]] = {}
    for r in range(n - 1, -1, -1):
        free.setdefault(totals[r], []).append(r)  # each total's indices, smallest last
    perm = [0] * n
    for r in order:
        perm[r] = free[totals[r]].pop()
    return None if perm == list(range(n)) else tuple(perm)


_SWAP: Final = (1, 0)


def renamed(k: tuple[Any, ...], perm: tuple[int, ...]) -> tuple[Any, ...]:
    """The key ``k`` of a state, of the state with request ``r`` renamed ``perm[r]``.

    Ids, the labels of lives (``r + n * (life - 1)``), the mRoPE deltas that announce
    them (:data:`~resumekit.properties.model.MROPE_BASE` ``+ label``) and the tokens
    ``(label, position)`` are renamed; per-request tuples are permuted, sorted parts re-sorted.
    """
    n = len(perm)
    # Ids, labels and deltas are ints where the key holds them (never bools): looked up.
    rid = {r: perm[r] for r in range(n)}.get
    labels = {x: perm[x % n] + x - x % n for x in range(n * (len(k[2]) and max(k[2])))}
    label = labels.get
    mrope = {MROPE_BASE + x: MROPE_BASE + y for x, y in labels.items()}.get

    def cells(cs: Any) -> Any:
        if type(cs) is not tuple:
            return cs
        return tuple([c if c is None else (label(c[0], c[0]), *c[1:]) for c in cs])

    def per_request(values: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(values)
        for r, v in enumerate(values):
            out[perm[r]] = v
        return tuple(out)

    def post(p: tuple[Any, ...]) -> tuple[Any, ...]:
        if p[0] == "cancel":
            return (p[0], rid(p[1], p[1]), *p[2:])
        return (rid(p[0], p[0]), *p[1:])

    (added, encoded, lives_, budget, hurt, pressure, grab, free, allocations, live, finished,
     admissions, resumes, quarantine, peer_lost, sender, posts, statuses, *rest) = k  # fmt: skip
    allocations = tuple(
        [
            (
                rid(a[0], a[0]),
                cells(a[1]),
                a[2] if a[2] is None else (label(a[2][0], a[2][0]), *a[2][1:]),
                a[3],
                mrope(a[4], a[4]),
                *a[5:],
            )
            for a in allocations
        ]
    )
    live = tuple(
        [(rid(r[0], r[0]), *r[1:6], mrope(r[6], r[6]), r[7], cells(r[8]), *r[9:]) for r in live]
    )
    finished = tuple(
        sorted(
            [
                (rid(f[0], f[0]), *f[1:3], cells(f[3]), f[4], mrope(f[5], f[5]))
                if f[2]  # a success: its output's tokens
                else (rid(f[0], f[0]), *f[1:])
                for f in finished
            ],
            key=itemgetter(0),
        )
    )
    if sender is not None:
        sources, parked, cancelled, ended = sender
        sender = (
            _by_id(
                tuple(
                    [
                        (
                            rid(r, r),
                            tuple([(label(x[0], x[0]), *x[1:5], mrope(x[5], x[5])) for x in xs]),
                        )
                        for r, xs in sources
                    ]
                )
            ),
            _by_id(tuple([(rid(r, r), tuple([post(p) for p in ps])) for r, ps in parked])),
            tuple(sorted([(rid(r, r), c) for r, c in cancelled])),
            tuple(sorted([(rid(r, r), e) for r, e in ended])),
        )
    return (
        per_request(added),
        per_request(encoded),
        per_request(lives_),
        budget,
        per_request(hurt),
        pressure,
        grab,
        free,
        allocations,
        live,
        finished,
        tuple([rid(r, r) for r in admissions]),
        tuple([rid(r, r) for r in resumes]),
        tuple([(rid(q[0], q[0]), *q[1:]) for q in quarantine]),
        peer_lost,
        sender,
        tuple([post(p) for p in posts]),
        tuple(
            sorted([(st[0], rid(st[1], st[1]), *st[2:]) if st[0] < 3 else st for st in statuses])
        ),
        *rest,
    )


def _sender_key(
    s: WorldState, rank: dict[int, Any], lives: dict[int, int], reduced: bool
) -> object:
    """What the sender holds (only while it lives: a sender dead for good hears nothing)."""
    snap = s.sender
    sources = tuple(
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
    )
    parked = (
        tuple([(rid, tuple([_post_key(p, rank, lives) for p in ps])) for rid, ps in snap.parked])
        if snap.parked
        else ()
    )
    if reduced:
        sources, parked = _by_id(sources), _by_id(parked)
    return (
        sources,
        parked,
        # Both keep recency order only to evict beyond max_tombstones: sorted. The explorer
        # adds every source unnamed, so only how many lives wait for theirs can matter.
        tuple(sorted([(rid, len(incs)) for rid, incs in snap.cancelled])),
        tuple(sorted([(rid, lives.get(inc, 0)) for rid, inc in snap.ended])),
    )


def _by_id(parts: tuple[tuple[Any, Any], ...]) -> tuple[tuple[Any, Any], ...]:
    """``(id, part)`` pairs in id order (the explorer's ids are ints)."""
    return tuple(sorted(parts, key=itemgetter(0))) if len(parts) > 1 else parts


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


def batch_order(snap: ReceiverSnapshot) -> Callable[[msg.Status], tuple[Any, ...]]:
    """The order a batch is handed over in, never by id where an id's place matters (so the
    mirror of a run is a run): live requests' statuses in the order of their records, then
    those of quarantined rounds in the quarantine's order, then the rest (inert: they change
    counters only), each request's by :func:`status_order`."""
    live: dict[Hashable, int] = {}
    for rec in snap.records:
        if not rec.state.terminal:
            live.setdefault(rec.rid, len(live))
    held = {k: i for i, (k, _) in enumerate(snap.quarantine)}

    def order(st: msg.Status) -> tuple[Any, ...]:
        o = status_order(st)
        if o[0] < 3:  # a round status: kind, id, then the rest
            place = live.get(o[1])
            if place is not None:
                return (0, place, o[0], *o[2:])
            round_ = (o[1], getattr(st, "incarnation", None), getattr(st, "epoch", None))
            if round_ in held:
                return (1, held[round_], o[0], *o[2:])
        return (2, *o)

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
