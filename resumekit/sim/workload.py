"""One request trace, replayed on a virtual clock against each landing-buffer design.

``resumekit`` and ``resumekit-auto`` drive the real :class:`ResumableReceiver`,
:class:`EmbeddingSender` and :class:`BlockAllocator` over a transport that
delivers each message when the cost model says it arrives; ``size-first`` (the
upstream SGLang encoder-disaggregation design) and ``one-resume`` (the fork this
project grew from) are models of those designs. Every design gets the same pool
bytes, the same link, the same copy-out and the same trace.

Cost model (:class:`CostModel`, every field a flag of ``benchmarks/bench_workload.py``):
a message takes ``rtt / 2``; a round takes ``round_overhead`` plus its bytes over
``link`` (one link, rounds in the order they start); copying a landed round out
takes its bytes over ``copy`` (one copy engine). A request's latency runs from
its arrival ("embedding ready") to the end of its last copy-out.

One file: the four designs run on one clock under one cost model and are judged by
one meter; apart, a change to one design's model could drift from the others'.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import torch

from resumekit._check import (
    as_int,
    as_positive,
    as_seconds,
    check_bool,
    check_choice,
    check_interface,
)
from resumekit.allocator import Allocation, BlockAllocator, BlockBuffers, EmbeddingTensors
from resumekit.allocator.block_allocator import MAX_BLOCK_SIZE, MAX_NUM_BLOCKS
from resumekit.errors import InvalidArgumentError
from resumekit.protocol.messages import Cancel, Landed, Post, RoundPost, Status
from resumekit.protocol.policy import SchedulingPolicy, check_policy
from resumekit.protocol.receiver import ReceiverObserver, ResumableReceiver
from resumekit.protocol.sender import EmbeddingSender

Design = Literal["resumekit", "resumekit-auto", "size-first", "one-resume"]
DESIGNS: Final[tuple[Design, ...]] = ("resumekit", "resumekit-auto", "size-first", "one-resume")
Trace = Literal["image-heavy", "video-mixed", "adversarial"]
TRACES: Final[tuple[Trace, ...]] = ("image-heavy", "video-mixed", "adversarial")
SIZE_FIRST_WAIT: Final = 60.0  # upstream's wait for a release before it gives up
SIZE_FIRST_ALIGN: Final = 256  # bytes
HORIZON: Final = 300.0  # virtual seconds after the last arrival before the rest count stuck
ROUND0: Final = 8192  # tokens: the fixed round 0 of ``resumekit`` and ``one-resume``
#: resumekit's policy on this link: one FIFO link is kept busy by two rounds in flight
#: (one transferring, the next posted), so the rest wait in the receiver, in its order.
POLICY: Final = SchedulingPolicy(max_rounds_in_flight=3)


def _cost(value: object) -> CostModel:
    """``value`` itself, after proving it is a :class:`CostModel` (``None``: the default)."""
    if value is None:
        return CostModel()
    if not isinstance(value, CostModel):
        raise InvalidArgumentError(f"cost must be a CostModel or None, not {type(value).__name__}")
    return value


def check_pool(design: Design, pool_tokens: int, block_size: int) -> tuple[int, int]:
    """``(pool_tokens, block_size)`` as ints, after proving ``design`` can run in that pool.

    The pool must be at least one block, within the allocator's block count, and hold
    the fixed round 0 of ``resumekit`` and ``one-resume`` (else one raises mid-run,
    the other waits forever); ``benchmarks/bench_workload.py`` checks its flags with it.
    """
    design = check_choice(design, "design", DESIGNS)  # type: ignore[assignment]
    pool_tokens = as_int(pool_tokens, "pool_tokens", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1, maximum=MAX_BLOCK_SIZE)
    if block_size > pool_tokens:
        raise InvalidArgumentError(
            f"block_size must be <= pool_tokens ({pool_tokens:,}), got {block_size:,}: "
            "the pool would have no block"
        )
    blocks = pool_tokens // block_size
    if blocks > MAX_NUM_BLOCKS:
        raise InvalidArgumentError(
            f"pool_tokens={pool_tokens:,} is {blocks:,} blocks of {block_size}, more than the "
            f"{MAX_NUM_BLOCKS:,} a pool may have (raise block_size)"
        )
    need = -(-ROUND0 // block_size)
    if design in ("resumekit", "one-resume") and need > blocks:
        raise InvalidArgumentError(
            f"pool_tokens must hold {design}'s {ROUND0:,}-token round 0 ({need} blocks of "
            f"{block_size}), got {pool_tokens:,} ({blocks} blocks)"
        )
    return pool_tokens, block_size


@dataclass(frozen=True)
class CostModel:
    """Times of the simulated machine; the defaults are one 200 Gb/s RDMA link."""

    rtt: float = 200e-6  # seconds, one control round trip
    link: float = 25e9  # bytes/s
    copy: float = 500e9  # bytes/s, device-to-device copy-out
    round_overhead: float = 50e-6  # seconds per round (post, completion, bookkeeping)
    bytes_per_token: int = 3584 * 2 + 16  # bf16 hidden 3584, fill id and mRoPE rows

    def __post_init__(self) -> None:
        """Refuse a time or rate no machine has: 0, negative, NaN or inf divide into nonsense."""
        checked = {
            "rtt": as_seconds(self.rtt, "rtt", maximum=HORIZON),
            "link": as_positive(self.link, "link"),
            "copy": as_positive(self.copy, "copy"),
            "round_overhead": as_seconds(self.round_overhead, "round_overhead", maximum=HORIZON),
            "bytes_per_token": as_int(self.bytes_per_token, "bytes_per_token", minimum=1),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def transfer(self, tokens: int) -> float:
        """Seconds one round of ``tokens`` takes on the link."""
        tokens = as_int(tokens, "tokens", minimum=0)
        return self.round_overhead + tokens * self.bytes_per_token / self.link

    def copy_out(self, tokens: int) -> float:
        """Seconds copying ``tokens`` landed tokens out takes."""
        tokens = as_int(tokens, "tokens", minimum=0)
        return tokens * self.bytes_per_token / self.copy


@dataclass(frozen=True)
class Item:
    arrival: float
    tokens: int
    hint: str  # "image" or "video": what an engine knows before the size


def sizes(kind: Trace, n: int, rng: random.Random) -> list[tuple[int, str]]:
    """``n`` (tokens, hint) pairs of a trace, from ``rng``.

    image-heavy: log-uniform 256..4096; video-mixed: 60% such images, 40% videos
    Pareto-tailed (alpha 1.1) from 8,192, capped at 200,000; adversarial: each
    just above the 8,192 default (8,193..8,448).
    """
    kind = check_choice(kind, "kind", TRACES)  # type: ignore[assignment]
    n = as_int(n, "n", minimum=0)
    check_interface(rng, "rng", "random.Random", ("random", "randint", "uniform", "paretovariate"))
    out: list[tuple[int, str]] = []
    for _ in range(n):
        if kind == "adversarial":
            out.append((8192 + rng.randint(1, 256), "image"))
        elif kind == "image-heavy" or rng.random() < 0.6:
            out.append((round(math.exp(rng.uniform(math.log(256), math.log(4096)))), "image"))
        else:
            out.append((min(200_000, round(8192 * rng.paretovariate(1.1))), "video"))
    return out


def make_trace(kind: Trace, n: int, load: float, cost: CostModel, seed: int) -> list[Item]:
    """Poisson arrivals at ``load`` times the link's capacity for this trace's mean size."""
    kind = check_choice(kind, "kind", TRACES)  # type: ignore[assignment]
    n = as_int(n, "n", minimum=1)
    load = as_positive(load, "load")
    cost = _cost(cost)
    seed = as_int(seed, "seed", minimum=0)
    rng = random.Random(f"{kind}/{seed}")
    picked = sizes(kind, n, rng)
    mean = statistics.fmean(t for t, _ in picked)
    rate = load / cost.transfer(round(mean))
    clock, items = 0.0, []
    for tokens, hint in picked:
        clock += rng.expovariate(rate)
        items.append(Item(clock, tokens, hint))
    return items


# -- what every design reports -----------------------------------------------------------


@dataclass
class Outcome:
    arrival: float
    tokens: int
    done: float | None = None  # end of the last copy-out
    failed: str | None = None
    rounds: int = 0
    waited: float = 0.0  # seconds spent waiting for pool space


@dataclass
class Result:
    design: str
    trace: str
    load: float
    pool_tokens: int
    completed: int
    failed: int
    stuck: int
    p50: float | None
    p99: float | None
    max: float | None
    throughput: float  # completed tokens per second over the run
    occupancy: float  # time-averaged fraction of the pool allocated
    waste: float  # time-averaged fraction of the pool allocated but never written
    fragmentation: float  # time-averaged 1 - largest free run / free (size-first only)
    rounds: float  # mean rounds per completed request
    wait_p50: float
    wait_p99: float
    latencies: dict[int, float] = field(repr=False)  # per completed request index
    failures: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Meter:
    """Time-weighted means of values that change at events."""

    def __init__(self) -> None:
        self.last = 0.0
        self.values: dict[str, float] = {}
        self.areas: dict[str, float] = {}

    def set(self, now: float, **values: float) -> None:
        dt = now - self.last
        for k, v in self.values.items():
            self.areas[k] = self.areas.get(k, 0.0) + v * dt
        self.last = now
        self.values.update(values)

    def mean(self, key: str, until: float) -> float:
        self.set(until)
        return self.areas.get(key, 0.0) / until if until > 0 else 0.0


class _Clock:
    """Events in virtual time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn))

    def run(self, until: float, after: Callable[[], None]) -> None:
        while self._heap and self._heap[0][0] <= until:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()
            if not self._heap or self._heap[0][0] > t:
                after()  # once per instant, after everything due then


class _Machine:
    """The shared link and copy engine."""

    def __init__(self, clock: _Clock, cost: CostModel) -> None:
        self.clock, self.cost = clock, cost
        self.link_free = 0.0
        self.copy_free = 0.0

    def transfer(self, tokens: int) -> float:
        """Start ``tokens`` on the link now or when it frees; when they have landed."""
        start = max(self.clock.now, self.link_free)
        self.link_free = start + self.cost.transfer(tokens)
        return self.link_free

    def copy(self, tokens: int) -> float:
        start = max(self.clock.now, self.copy_free)
        self.copy_free = start + self.cost.copy_out(tokens)
        return self.copy_free


# -- resumekit: the real receiver, sender and allocator ----------------------------------


class _TimedTransport(ReceiverObserver):
    """Both ends of the protocol with the cost model's delays; observes the receiver."""

    def __init__(
        self,
        clock: _Clock,
        machine: _Machine,
        buffers: BlockBuffers,
        outcomes: dict[Hashable, Outcome],
    ) -> None:
        self.clock, self.machine, self.buffers = clock, machine, buffers
        self.outcomes = outcomes
        self.half = machine.cost.rtt / 2
        self._posts: list[Post] = []
        self._statuses: list[Status] = []
        self._landed_at = 0.0
        self.ready: dict[Hashable, float] = {}  # when a request could next post a round
        self.copied: dict[Hashable, float] = {}  # end of its latest copy-out
        self.posted: dict[int, float] = {}  # allocation generation -> when posted
        self.waste_area = 0.0  # token-seconds allocated but never written

    def check_request_id(self, rid: Hashable) -> None:
        """Any id travels here."""

    # receiver end
    def post_round(self, post: RoundPost) -> None:
        self.clock.at(self.clock.now + self.half, lambda: self._posts.append(post))

    def cancel(self, rid: Hashable, epoch: int, *, incarnation: int) -> None:
        message = Cancel(rid, epoch, incarnation=incarnation)
        self.clock.at(self.clock.now + self.half, lambda: self._posts.append(message))

    def poll_statuses(self) -> Sequence[Status]:
        out, self._statuses = self._statuses, []
        for status in out:
            if isinstance(status, Landed):
                self.ready[status.rid] = self.clock.now
        return out

    # sender end
    def poll_posts(self) -> Sequence[Post]:
        out, self._posts = self._posts, []
        return out

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        assert post.allocation is not None
        self.buffers.write(post.allocation, data.embeddings, data.fill_ids, data.mrope, aux=aux)
        self._landed_at = self.machine.transfer(data.num_tokens)

    def report(self, status: Landed | Any) -> None:
        at = self._landed_at if isinstance(status, Landed) else self.clock.now
        self.clock.at(at + self.half, lambda: self._statuses.append(status))

    # observer
    def round_posted(self, post: RoundPost) -> None:
        outcome = self.outcomes[post.rid]
        outcome.rounds += 1
        outcome.waited += self.clock.now - self.ready.get(post.rid, self.clock.now)
        assert post.allocation is not None
        self.posted[post.allocation.generation] = self.clock.now

    def round_consumed(
        self, rid: Hashable, epoch: int, tokens: int, allocation: Allocation
    ) -> None:
        self.copied[rid] = self.machine.copy(tokens)
        held = self.clock.now - self.posted.pop(allocation.generation, self.clock.now)
        self.waste_area += (allocation.capacity_tokens - tokens) * held


def _run_resumekit(
    items: list[Item],
    cost: CostModel,
    pool_tokens: int,
    block_size: int,
    auto: bool,
    max_resume_tokens: int | None,
    policy: SchedulingPolicy | None,
) -> tuple[list[Outcome], _Meter, float, float]:
    clock = _Clock()
    machine = _Machine(clock, cost)
    allocator = BlockAllocator(pool_tokens // block_size, block_size, reuse="lifo")
    buffers = BlockBuffers(allocator, 1, dtype=torch.bfloat16, device="cpu")
    outcomes = [Outcome(it.arrival, it.tokens) for it in items]
    by_rid: dict[Hashable, Outcome] = dict(enumerate(outcomes))
    transport = _TimedTransport(clock, machine, buffers, by_rid)
    receiver = ResumableReceiver(
        buffers,
        transport,
        "auto" if auto else ROUND0,
        max_resume_tokens=max_resume_tokens,
        observer=transport,
        policy=policy,
    )
    sender = EmbeddingSender(transport)
    meter = _Meter()
    pending: set[Hashable] = set(range(len(items)))

    def arrive(i: int, item: Item) -> None:
        receiver.add(i, size_hint=item.hint)
        transport.ready[i] = clock.now
        sender.add(i, _source(item.tokens))

    for i, item in enumerate(items):
        clock.at(item.arrival, lambda i=i, item=item: arrive(i, item))  # type: ignore[misc]

    def settle() -> None:
        while True:
            finished = receiver.step()
            served = sender.step()
            for rid in finished:
                result = receiver.take(rid)
                outcome = by_rid[rid]
                pending.discard(rid)
                if result.ok:
                    outcome.done = transport.copied.get(rid, clock.now)
                else:
                    outcome.failed = result.reason or "failed"
            if not finished and not served:
                break
        used = allocator.num_blocks - allocator.num_free_blocks
        meter.set(clock.now, used=used / allocator.num_blocks)

    end = items[-1].arrival + HORIZON if items else 0.0
    clock.run(end, settle)
    for rid in pending:
        by_rid[rid].failed = "stuck"
    makespan = max([o.done for o in outcomes if o.done is not None] or [clock.now])
    waste = transport.waste_area / (pool_tokens * makespan) if makespan > 0 else 0.0
    return outcomes, meter, makespan, waste


_SOURCES: dict[int, EmbeddingTensors] = {}


def _source(tokens: int) -> EmbeddingTensors:
    """A one-wide embedding of ``tokens`` tokens: the cost model, not the tensors, sets time."""
    src = _SOURCES.get(tokens)
    if src is None:
        src = _SOURCES[tokens] = EmbeddingTensors(
            torch.ones(tokens, 1, dtype=torch.bfloat16),
            torch.zeros(tokens, dtype=torch.int32),
            torch.zeros(3, tokens, dtype=torch.int32),
        )
    return src


# -- size-first: exact contiguous bytes, first fit, wait on full --------------------------


class _Segments:
    """Free byte ranges of one pool: first fit, aligned, coalesced on release."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]  # (start, length), sorted
        self.used = 0

    def take(self, nbytes: int) -> int | None:
        need = -(-nbytes // SIZE_FIRST_ALIGN) * SIZE_FIRST_ALIGN
        for i, (start, length) in enumerate(self.free):
            if length >= need:
                if length == need:
                    del self.free[i]
                else:
                    self.free[i] = (start + need, length - need)
                self.used += need
                return start
        return None

    def give(self, start: int, nbytes: int) -> None:
        need = -(-nbytes // SIZE_FIRST_ALIGN) * SIZE_FIRST_ALIGN
        self.used -= need
        self.free.append((start, need))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free = merged

    def fragmentation(self) -> float:
        total = self.size - self.used
        if total <= 0:
            return 0.0
        return 1.0 - max(n for _, n in self.free) / total


def _run_size_first(
    items: list[Item], cost: CostModel, pool_tokens: int, seed: int
) -> tuple[list[Outcome], _Meter, float, float]:
    clock = _Clock()
    machine = _Machine(clock, cost)
    pool = _Segments(pool_tokens * cost.bytes_per_token)
    outcomes = [Outcome(it.arrival, it.tokens) for it in items]
    waiting: list[int] = []
    asked: dict[int, float] = {}
    rng = random.Random(seed)
    meter = _Meter()
    half = cost.rtt / 2

    def try_start(i: int) -> bool:
        nbytes = items[i].tokens * cost.bytes_per_token
        start = pool.take(nbytes)
        if start is None:
            return False
        o = outcomes[i]
        o.waited += clock.now - asked[i]
        o.rounds = 1
        clock.at(clock.now + half, lambda: landed_later(i, start, nbytes))
        return True

    def landed_later(i: int, start: int, nbytes: int) -> None:
        at = machine.transfer(items[i].tokens)
        clock.at(at + half, lambda: release(i, start, nbytes))

    def release(i: int, start: int, nbytes: int) -> None:
        outcomes[i].done = machine.copy(items[i].tokens)
        pool.give(start, nbytes)
        rng.shuffle(waiting)  # no ordering guarantee among waiters
        for j in list(waiting):
            if try_start(j):
                waiting.remove(j)

    def sized(i: int) -> None:  # one round trip after arrival: the size is known
        asked[i] = clock.now
        if items[i].tokens * cost.bytes_per_token > pool.size:
            outcomes[i].failed = "larger than the pool: raise SGLANG_EMBEDDING_POOL_SIZE_MB"
        elif not try_start(i):
            waiting.append(i)
            clock.at(clock.now + SIZE_FIRST_WAIT, lambda: give_up(i))

    def give_up(i: int) -> None:
        if i in waiting:
            waiting.remove(i)
            outcomes[i].failed = f"no room within {SIZE_FIRST_WAIT:g} s"
            outcomes[i].waited += SIZE_FIRST_WAIT

    for i, item in enumerate(items):
        clock.at(item.arrival + cost.rtt, lambda i=i: sized(i))  # type: ignore[misc]

    def after() -> None:
        meter.set(clock.now, used=pool.used / pool.size, frag=pool.fragmentation())

    clock.run(items[-1].arrival + HORIZON if items else 0.0, after)
    for o in outcomes:
        if o.done is None and o.failed is None:
            o.failed = "stuck"
    makespan = max([o.done for o in outcomes if o.done is not None] or [clock.now])
    return outcomes, meter, makespan, 0.0


# -- one-resume: the default buffer, then the whole rest at once, hold-and-wait -----------


def _run_one_resume(  # noqa: PLR0915 - one design's event handlers, closures over its state
    items: list[Item], cost: CostModel, pool_tokens: int, block_size: int
) -> tuple[list[Outcome], _Meter, float, float]:
    clock = _Clock()
    machine = _Machine(clock, cost)
    allocator = BlockAllocator(pool_tokens // block_size, block_size)
    outcomes = [Outcome(it.arrival, it.tokens) for it in items]
    admissions: deque[int] = deque()
    resumes: deque[tuple[int, Allocation]] = deque()  # each holds round 0 while it waits
    since: dict[int, float] = {}
    meter = _Meter()
    half = cost.rtt / 2
    waste = [0.0]
    default = ROUND0

    def send(i: int, allocation: Allocation, tokens: int, then: Callable[[], None]) -> None:
        o = outcomes[i]
        o.rounds += 1
        o.waited += clock.now - since[i]
        posted = clock.now

        def write() -> None:
            at = machine.transfer(tokens)

            def land() -> None:
                waste[0] += (allocation.capacity_tokens - tokens) * (clock.now - posted)
                then()

            clock.at(at + half, land)

        clock.at(clock.now + half, write)

    def admit(i: int) -> bool:
        allocation = allocator.allocate(default, i)
        if allocation is None:
            return False
        first = min(default, items[i].tokens)
        send(i, allocation, first, lambda: round0_landed(i, allocation))
        return True

    def round0_landed(i: int, held: Allocation) -> None:
        rest = items[i].tokens - default
        if rest <= 0:
            outcomes[i].done = machine.copy(items[i].tokens)
            allocator.free(held)
            return
        if allocator.blocks_for(rest) > allocator.num_blocks:
            allocator.free(held)
            outcomes[i].failed = "the rest is larger than the pool"
            return
        since[i] = clock.now
        resumes.append((i, held))

    def resume(i: int, held: Allocation) -> bool:
        rest = items[i].tokens - default
        allocation = allocator.allocate(rest, i)
        if allocation is None:
            return False
        machine.copy(default)
        allocator.free(held)  # copied out once the rest has room

        def landed() -> None:
            outcomes[i].done = machine.copy(rest)
            allocator.free(allocation)

        send(i, allocation, rest, landed)
        return True

    def arrive(i: int) -> None:
        since[i] = clock.now
        admissions.append(i)

    def after() -> None:
        while resumes and resume(*resumes[0]):
            resumes.popleft()
        while not resumes and admissions and admit(admissions[0]):
            admissions.popleft()
        used = allocator.num_blocks - allocator.num_free_blocks
        meter.set(clock.now, used=used / allocator.num_blocks)

    for i, item in enumerate(items):
        clock.at(item.arrival, lambda i=i: arrive(i))  # type: ignore[misc]
    clock.run(items[-1].arrival + HORIZON if items else 0.0, after)
    for o in outcomes:
        if o.done is None and o.failed is None:
            o.failed = "stuck"
    makespan = max([o.done for o in outcomes if o.done is not None] or [clock.now])
    return outcomes, meter, makespan, waste[0] / (pool_tokens * makespan) if makespan else 0.0


# -- running and reporting ----------------------------------------------------------------


def run(
    design: Design,
    trace: Trace,
    *,
    requests: int = 400,
    load: float = 0.7,
    cost: CostModel | None = None,
    pool_tokens: int = 131_072,
    block_size: int = 128,
    seed: int = 0,
    max_resume_tokens: int | None = None,
    within_pool: bool = False,
    policy: SchedulingPolicy | None = POLICY,
) -> Result:
    """Replay one trace against one design; the same seed gives the same trace.

    ``within_pool`` drops the requests larger than the pool (for every design alike):
    a diagnostic that shows what completing them costs the others. ``policy`` is the
    resumekit designs' :class:`SchedulingPolicy` (``None``: none). Every argument is
    checked before anything runs: an unknown name or a count, load or seed out of
    range raises :class:`~resumekit.errors.InvalidArgumentError` naming it.
    """
    design = check_choice(design, "design", DESIGNS)  # type: ignore[assignment]
    trace = check_choice(trace, "trace", TRACES)  # type: ignore[assignment]
    requests = as_int(requests, "requests", minimum=1)
    load = as_positive(load, "load")
    cost = _cost(cost)
    pool_tokens, block_size = check_pool(design, pool_tokens, block_size)
    seed = as_int(seed, "seed", minimum=0)
    if max_resume_tokens is not None:
        max_resume_tokens = as_int(max_resume_tokens, "max_resume_tokens", minimum=1)
    check_bool(within_pool, "within_pool")
    policy = check_policy(policy)
    items = make_trace(trace, requests, load, cost, seed)
    if within_pool:
        items = [it for it in items if it.tokens <= pool_tokens]
    if design in ("resumekit", "resumekit-auto"):
        outcomes, meter, makespan, waste = _run_resumekit(
            items,
            cost,
            pool_tokens,
            block_size,
            design == "resumekit-auto",
            max_resume_tokens,
            policy,
        )
    elif design == "size-first":
        outcomes, meter, makespan, waste = _run_size_first(items, cost, pool_tokens, seed)
    else:
        outcomes, meter, makespan, waste = _run_one_resume(items, cost, pool_tokens, block_size)
    done = [o for o in outcomes if o.done is not None]
    latencies = {i: o.done - o.arrival for i, o in enumerate(outcomes) if o.done is not None}
    lat = sorted(latencies.values())
    waits = sorted(o.waited for o in done) or [0.0]
    failures: dict[str, int] = {}
    for o in outcomes:
        if o.failed is not None:
            failures[o.failed] = failures.get(o.failed, 0) + 1
    span = makespan - (items[0].arrival if items else 0.0)
    return Result(
        design=design,
        trace=trace,
        load=load,
        pool_tokens=pool_tokens,
        completed=len(done),
        failed=sum(n for why, n in failures.items() if why != "stuck"),
        stuck=failures.get("stuck", 0),
        p50=quantile(lat, 0.5),
        p99=quantile(lat, 0.99),
        max=lat[-1] if lat else None,
        throughput=sum(o.tokens for o in done) / span if span > 0 else 0.0,
        occupancy=meter.mean("used", makespan),
        waste=waste,
        fragmentation=meter.mean("frag", makespan),
        rounds=statistics.fmean(o.rounds for o in done) if done else 0.0,
        wait_p50=quantile(waits, 0.5) or 0.0,
        wait_p99=quantile(waits, 0.99) or 0.0,
        latencies=latencies,
        failures=failures,
    )


def fewest_rounds(
    tokens: int,
    round0_tokens: int,
    *,
    pool_tokens: int = 131_072,
    block_size: int = 128,
    max_resume_tokens: int | None = None,
    policy: SchedulingPolicy | None = POLICY,
) -> int:
    """The fewest rounds the receiver can take for a request of ``tokens`` whose round 0
    holds at most ``round0_tokens``, however its round 0 is sized and however empty the
    pool: each resume holds at most the pool, ``max_resume_tokens``, and a bulk
    request's ``bulk_round_tokens`` (each in whole blocks). A floor no sizing can beat.
    """
    tokens = as_int(tokens, "tokens", minimum=1)
    round0_tokens = as_int(round0_tokens, "round0_tokens", minimum=1)
    pool_tokens = as_int(pool_tokens, "pool_tokens", minimum=1)
    block_size = as_int(block_size, "block_size", minimum=1)
    if max_resume_tokens is not None:
        max_resume_tokens = as_int(max_resume_tokens, "max_resume_tokens", minimum=1)
    policy = check_policy(policy)

    def blocks(n: int) -> int:  # what an allocation asked for n tokens holds
        return -(-n // block_size) * block_size

    first = min(blocks(round0_tokens), pool_tokens // block_size * block_size)
    if tokens <= first:
        return 1
    most = pool_tokens // block_size * block_size
    if max_resume_tokens is not None:
        most = min(most, blocks(max_resume_tokens))
    if policy is not None:
        resolved = policy.resolved(pool_tokens, block_size)
        assert resolved.bulk_tokens is not None and resolved.bulk_round_tokens is not None
        if tokens > resolved.bulk_tokens:
            most = min(most, blocks(resolved.bulk_round_tokens))
    return 1 + -(-(tokens - first) // most)


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (nearest rank); ``None`` when empty."""
    q = as_positive(q, "q")
    if q > 1:
        raise InvalidArgumentError(f"q must be <= 1, got {q!r}")
    if not isinstance(values, Sequence):
        raise InvalidArgumentError(f"values must be a sorted list, not {type(values).__name__}")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise InvalidArgumentError("values must be sorted")
    if not values:
        return None
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


__all__ = [
    "DESIGNS",
    "POLICY",
    "TRACES",
    "CostModel",
    "Item",
    "Result",
    "check_pool",
    "fewest_rounds",
    "make_trace",
    "quantile",
    "run",
    "sizes",
]
