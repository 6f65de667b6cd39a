"""The model the bounded explorer explores: the real protocol objects under an adversary.

Stateright's shape: :meth:`Harness.initial_world`, :meth:`Harness.actions`,
:meth:`Harness.apply` (the next state, computed by calling the real receiver,
sender and allocator) and the properties (:meth:`Harness.done_problems`, and the
liveness the explorer proves over the graph); the state's key is in
:mod:`~resumekit.properties.abstraction`, an action's words in
:mod:`~resumekit.properties.trace`, the bounds in :mod:`~resumekit.properties.bounds`.
The harness owns only what the engine and the network do: which request is added
when, which status is delivered, which post the sender reads, and the faults within
the bounds. Every decision about rounds, blocks and failures is the shipped code's.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations_with_replacement
from typing import Any, Final

from resumekit.properties.abstraction import batch_order, state_key, status_order
from resumekit.properties.bounds import (
    AHEAD,
    ASKEW,
    BUDGET_INDEX,
    MISCOUNTED,
    POISONED_POST,
    POISONED_STATUS,
    STALE,
    Bounds,
    policy_of,
)
from resumekit.properties.forgery import forge, forgeries, owed, poison
from resumekit.properties.invariants import (
    ACCOUNTED,
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    PROGRESS,
    InvariantViolation,
    aborted_reported,
    nothing_left,
    output_intact,
    record_view,
    require,
    rounds_counted,
    stale_changes_nothing,
    stale_view,
    step_counted,
    step_served_in_order,
    succeeds_without_faults,
)
from resumekit.properties.ledger import Ledger
from resumekit.properties.strategies import Strategy
from resumekit.properties.world import (
    MROPE_BASE,
    PRESSURE,
    CellBuffers,
    CheckedAllocator,
    ExplorerTransport,
    TokenSource,
    World,
    WorldState,
    replaced,
    spend,
)
from resumekit.protocol import messages as msg
from resumekit.protocol.declaration import TransferState
from resumekit.protocol.sender import EmbeddingSender

S = TransferState
DUP, ABORT, CRASHES, GRAB, SQUEEZE, FORGE, REUSE, RESTART, POISON = (
    BUDGET_INDEX[name]
    for name in (
        *("duplicate", "abort", "crash", "grab", "squeeze"),
        *("forge", "reuse", "restart", "poison"),
    )
)


class Harness:
    """Initial worlds, enabled actions and successors of the real protocol under ``bounds``."""

    def __init__(self, bounds: Bounds, strategy: Strategy, *, reductions: bool = True) -> None:
        """``reductions`` (off: the keys of before issue 23) renames requests of equal totals
        and leaves unwritten rounds' bytes out."""
        self.bounds = bounds
        self.strategy = strategy
        self.remembers_blocks = strategy.remembers_blocks
        self.reductions = reductions
        self.judges_stale = strategy.name == "epoch"  # the broken designs are stale-blind
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
        allocator.free_before = {}
        buffers = CellBuffers(allocator, ledger)
        transport = ExplorerTransport(buffers, ledger)
        receiver = self.strategy.receiver(
            buffers,  # type: ignore[arg-type]
            transport,
            b.default_blocks * b.block_size,
            policy=policy_of(b),
        )
        transport.receiver = receiver
        w = World()
        w.receiver, w.allocator = receiver, allocator
        w.buffers, w.transport, w.ledger = buffers, transport, ledger
        w.sender = EmbeddingSender(transport)
        _prime_counters(w)
        w.totals = totals
        w.added = (False,) * len(totals)
        w.encoded = (False,) * len(totals)
        w.lives = (1,) * len(totals)
        w.budget = b.budget
        w.hurt = (False,) * len(totals)
        for r in range(len(totals)):
            ledger.set_label(r, self._label(w, r))
            if not b.late_sources:
                self._encode(w, r)
        return w

    def _label(self, w: World, r: int) -> int:
        """The current life of request ``r``: its tokens are ``(label, i)``."""
        return r + len(w.totals) * (w.lives[r] - 1)

    def _encode(self, w: World, r: int) -> None:
        """The encode side finishes request ``r``'s current life: its source goes to the sender."""
        label = w.ledger.labels[r]
        w.encoded = replaced(w.encoded, r, True)
        total = w.totals[r]
        src = self.sources.get((label, total))
        if src is None:
            src = self.sources[(label, total)] = TokenSource.make(label, total)
        w.sender.add(r, src, mrope_delta=MROPE_BASE + label)

    # -- actions -----------------------------------------------------------------------

    def key(self, s: WorldState) -> tuple[Any, ...]:
        """The abstraction of state ``s`` (:func:`~resumekit.properties.abstraction.state_key`)."""
        return state_key(s, self.remembers_blocks, self.reductions)

    def actions(self, w: World, s: WorldState) -> list[tuple[Any, ...]]:
        """Every action enabled in ``w``, which holds state ``s``."""
        out: list[tuple[Any, ...]] = [("add", r) for r, done in enumerate(w.added) if not done]
        out.extend(("encode", r) for r, done in enumerate(w.encoded) if not done)
        receiver, t, allocator = w.receiver, w.transport, w.allocator
        if s.receiver.resumes or s.receiver.admissions or t.loss_seen:
            out.append(("step",))
        # One delivery per distinct status, told apart by status_order, not ==:
        # a poisoned status can equal a well-formed one (final=1 == final=True).
        distinct = {status_order(s): s for s in t.statuses}
        statuses = [distinct[k] for k in sorted(distinct)]
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
            out.extend(a for r in live for a in forgeries(w, r))
        if reuse:
            out.extend(("reuse", r) for r in range(n) if w.added[r] and receiver.poll(r).terminal)
        if restart and t.sender_alive:
            out.append(("restart",))
        if poison:
            for r in live:
                out.extend(("poison", r, f) for f in POISONED_STATUS)
                if w.lives[r] > 1:
                    out.append(("poison", r, STALE))
                # Handed straight to the sender, so only with nothing queued ahead of it: the
                # channel keeps its order and a corrupted post cannot overtake a queued cancel.
                if t.sender_alive and not t.posts:
                    out.extend(("poison-post", r, f) for f in (*POISONED_POST, AHEAD))
                    if owed(w, r) is not None:
                        out.extend(("poison-post", r, f) for f in (ASKEW, MISCOUNTED))
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
        order = status_order(status)
        i = next(i for i, s in enumerate(t.statuses) if s is status or status_order(s) == order)
        t.statuses = t.statuses[:i] + t.statuses[i + 1 :]
        before = stale_view(w.receiver, status) if self.judges_stale else None
        t.deliver = (status,)
        self._receiver_step(w)
        if before is not None:
            after = record_view(receiver, status.rid)
            require(PROGRESS, stale_changes_nothing(status.rid, before, after))

    def _event(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.deliver, t.events = t.events[:1], t.events[1:]
        self._receiver_step(w)

    def _deliver_all(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.deliver = t.events + tuple(sorted(t.statuses, key=batch_order(w.receiver.snapshot())))
        t.statuses, t.events = (), ()
        self._receiver_step(w)

    def _step(self, w: World, action: tuple[Any, ...]) -> None:
        self._receiver_step(w)

    def _receiver_step(self, w: World) -> None:
        """One receiver step (fairness checked); after a restart, the new sender connects."""
        t = w.transport
        ledger = w.ledger  # its dicts are copied on write: looked up after the step
        step_served_in_order(w.receiver, lambda: t.polled, lambda _, i: i in ledger.cancels)
        if t.new_sender:
            self._connect_new_sender(w)

    def _send(self, w: World, action: tuple[Any, ...]) -> None:
        t = w.transport
        t.hand_over, t.posts = t.posts[:1], t.posts[1:]
        step_counted(w.sender, lambda: t.polled_posts)

    def _add(self, w: World, action: tuple[Any, ...]) -> None:
        r, t, receiver = action[1], w.transport, w.receiver
        w.added = replaced(w.added, r, True)
        # The receiver was told the sender is gone and not yet that a new one is back (the
        # model's own knowledge, not the receiver's: one that never clears its loss is a bug).
        told_lost = t.loss_seen or any(type(e) is msg.PeerBack for e in t.events)
        if t.restarting or told_lost or not t.sender_alive:
            w.hurt = replaced(w.hurt, r, True)  # added while the sender is (known) gone:
            w.encoded = replaced(w.encoded, r, True)  # its source is lost with the link
        receiver.add(r)
        inc = receiver.record(r).incarnation
        w.ledger.born(r, w.lives[r], inc)

    def _duplicate(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = spend(w.budget, DUP)
        w.transport.statuses += (action[1],)

    def _abort(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = spend(w.budget, ABORT)
        w.hurt, before = replaced(w.hurt, action[1], True), w.receiver.snapshot()
        ended = w.receiver.abort(action[1])
        require(ACCOUNTED, aborted_reported(before, w.receiver.snapshot(), action[1], ended))

    def _crash(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = spend(w.budget, CRASHES)
        w.hurt = (True,) * len(w.hurt)
        t = w.transport
        if action[0] == "crash":
            t.crash()
            return
        t.crash_armed = True  # crash-mid-round: write the next round, die before reporting
        t.hand_over, t.posts = t.posts[:1], t.posts[1:]
        step_counted(w.sender, lambda: t.polled_posts)
        if t.sender_alive:  # the post wrote nothing: the sender dies all the same
            t.crash()

    def _squeeze(self, w: World, action: tuple[Any, ...]) -> None:
        if action[0] == "squeeze":
            w.budget = spend(w.budget, SQUEEZE)
            w.allocator.squeeze()
        else:
            w.budget = spend(w.budget, GRAB)
            w.allocator.grab_armed = True

    def _unsqueeze(self, w: World, action: tuple[Any, ...]) -> None:
        allocator = w.allocator
        allocator.free(allocator.pressure[-1])
        allocator.pressure = allocator.pressure[:-1]

    def _reuse_id(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = spend(w.budget, REUSE)
        self._reuse(w, action[1])

    def _restart(self, w: World, action: tuple[Any, ...]) -> None:
        w.budget = spend(w.budget, RESTART)
        w.hurt = tuple(h or a for h, a in zip(w.hurt, w.added, strict=True))
        # What the old encoder had not finished for started requests dies with it.
        w.encoded = tuple(e or a for e, a in zip(w.encoded, w.added, strict=True))
        w.transport.crash("sender restarted")
        w.transport.restarting = True

    def _encode_late(self, w: World, action: tuple[Any, ...]) -> None:
        self._encode(w, action[1])

    def _connect_new_sender(self, w: World) -> None:
        """After a restart: a fresh sender, given the sources of lives not yet added."""
        w.transport.new_sender = False
        w.sender = EmbeddingSender(w.transport)
        _prime_counters(w, receiver=False)
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
        w.lives = replaced(w.lives, r, w.lives[r] + 1)
        w.added = replaced(w.added, r, False)
        w.encoded = replaced(w.encoded, r, False)
        w.ledger.set_label(r, self._label(w, r))
        w.hurt = replaced(w.hurt, r, not w.transport.sender_alive and not w.transport.restarting)
        if not self.bounds.late_sources:
            self._encode(w, r)

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
            got = w.buffers.outputs.get(result.output)
            if got != tuple(expected) or result.total_tokens != total:
                problems.append((INTEGRITY, output_intact(f"r{r} life {w.lives[r]}", False) or ""))
            if result.mrope_delta != MROPE_BASE + label:
                problems.append(
                    (
                        INTEGRITY,
                        f"request {r!r} reports mRoPE delta {result.mrope_delta}, "
                        f"the sender announced {MROPE_BASE + label}",
                    )
                )
        counted = rounds_counted(r, result.rounds, w.ledger.consumed.get(label, -1) + 1)
        if counted is not None:
            problems.append((ACCOUNTED, counted))
        if not w.hurt[r]:
            why = succeeds_without_faults(r, result.state.name, result.reason)
            if why is not None:
                problems.append((LIVENESS, why))
        return problems

    def done_problems(self, w: World) -> list[tuple[str, str]]:
        """At a done state: outputs intact, unhurt requests succeeded, nothing left.

        It takes every request out of ``w``: restore ``w`` before using it again.
        """
        problems: list[tuple[str, str]] = []
        for r in range(len(w.totals)):
            problems += self._judge(w, r, w.receiver.take(r))
        held = [a for a in w.allocator.outstanding() if a.owner != PRESSURE]
        sender_left = len(w.sender) + w.sender.parked_posts if w.transport.sender_alive else 0
        leak = nothing_left(len(held), len(w.receiver.quarantined()), len(w.receiver), sender_left)
        if leak is not None:
            problems.append((NO_LEAK, leak))
        return problems


def _prime_counters(w: World, *, receiver: bool = True) -> None:
    """Start the drop counters at 1, as on a receiver and a sender that have run a while.

    The invariants read only how a step moves them, and the key leaves them out, so a
    miscount that shows only past zero (a count reset to 1) would show only where the
    state the key kept happened to have counted before; past zero from the start, it
    shows at the first drop.
    """
    if receiver:
        snap = w.receiver.snapshot()
        w.receiver.restore(snap._replace(stale_statuses=1, orphan_statuses=1, malformed_statuses=1))
    w.sender.restore(
        w.sender.snapshot()._replace(
            rounds_served=1, repeated_posts=1, stale_posts=1, malformed_posts=1
        )
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
    "forge": forge,
    "reuse": Harness._reuse_id,
    "restart": Harness._restart,
    "poison": poison,
    "poison-post": poison,
}


__all__ = ["MROPE_BASE", "Harness"]
