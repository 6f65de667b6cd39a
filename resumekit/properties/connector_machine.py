"""The vLLM connector's own bookkeeping under an adversary, as a Hypothesis state machine.

It drives what vLLM drives, in vLLM's order within a step (``ensure_cache_available``,
``has_cache_item``, ``update_state_after_alloc``, ``build_connector_meta``; every
rank's ``start_load_caches`` and report; ``request_finished``,
``take_unavailable_requests``, ``update_connector_output``), over the real
:class:`~resumekit.integrations.vllm.book.ConsumerBook`, two
:class:`~resumekit.integrations.vllm.rank.ConsumerRank` with their own pools,
receivers and in-process links, and the encode side's
:class:`~resumekit.integrations.vllm.rank.ProducerRank`. The adversary adds
requests (items shared or not), encodes them late, aborts them at any point,
preempts running ones, holds one rank's statuses back, and takes one rank's link down.

Properties: an item is made available once per life and never before every rank
has it whole; what a rank puts into the encoder cache is the encoder's output; a
failure on one rank fails every request needing the item and releases it on every
rank; at the end nothing is left in the book, the ranks, their pools or the
encode side. No vLLM is needed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import hypothesis.strategies as st
import torch
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resumekit.allocator import BlockAllocator, BlockBuffers
from resumekit.integrations.vllm.book import ConsumerBook, ItemState, ProducerBook
from resumekit.integrations.vllm.orders import ItemSpec, RankReport
from resumekit.integrations.vllm.rank import ConsumerRank, ProducerRank
from resumekit.integrations.vllm.wiring import Link
from resumekit.properties.invariants import (
    EXACTLY_ONCE,
    INTEGRITY,
    LIVENESS,
    NO_LEAK,
    InvariantViolation,
    require,
)
from resumekit.protocol import EmbeddingSender, ResumableReceiver

RANKS = 2
WIDTH = 2
BLOCK = 4
POOL_BLOCKS = 8  # 32 tokens a rank: items up to 48 tokens need resumes
DEFAULT = 8
MAX_REQUESTS = 6


def output_of(identifier: str, tokens: int) -> torch.Tensor:
    """The encoder's output for an item: every row names the item and its index (exact in
    float32), so a row of another item or in another place cannot pass for it."""
    base = sum(map(ord, identifier)) % 997
    rows = torch.arange(tokens, dtype=torch.float32).unsqueeze(1) + base * 1000
    return rows.repeat(1, WIDTH)


@dataclass
class Req:
    specs: list[ItemSpec]
    encoded: bool = False
    state: str = "waiting"  # waiting, running, done
    seen: bool = False  # the scheduler has asked ensure_cache_available about it
    loaded: set[int] = field(default_factory=set)  # item indices loaded since it last ran


class ConnectorMachine(RuleBasedStateMachine):
    """The consumer's scheduler book, two ranks and the encode side, stepped as vLLM does."""

    last: ClassVar[ConnectorMachine | None] = None

    def __init__(self) -> None:
        super().__init__()
        type(self).last = self
        self.log: list[str] = []
        self.book = ConsumerBook(RANKS)
        self.producer_book = ProducerBook()
        self.link = Link("machine")
        self.ranks: list[ConsumerRank] = []
        for r in range(RANKS):
            allocator = BlockAllocator(POOL_BLOCKS, BLOCK)
            buffers = BlockBuffers(allocator, WIDTH, dtype=torch.float32, device="cpu")
            transport = self.link.receiver_end(r, buffers)
            self.ranks.append(ConsumerRank(r, ResumableReceiver(buffers, transport, DEFAULT)))
        self.producer = ProducerRank(
            0, [EmbeddingSender(self.link.sender_end(r)) for r in range(RANKS)]
        )
        self.caches: list[dict[str, torch.Tensor]] = [{} for _ in range(RANKS)]
        self.encoder_cache: dict[str, torch.Tensor] = {}
        self.requests: dict[str, Req] = {}
        self.next_request = 0
        self.became_available: dict[str, int] = {}  # rid -> lives made available
        self.lives: dict[str, int] = {}  # rid -> lives begun (start orders)
        self.link_down = False

    def _note(self, text: str) -> None:
        self.log.append(text)

    # -- the engine's traffic ----------------------------------------------------------------

    @precondition(lambda self: self.next_request < MAX_REQUESTS)
    @rule(
        sizes=st.lists(st.integers(1, 48), min_size=1, max_size=2),
        share=st.booleans(),
    )
    def add_request(self, sizes: list[int], share: bool) -> None:
        """A request of one or two items; ``share`` reuses an earlier request's first item
        (a transfer two requests need)."""
        n = self.next_request
        self.next_request += 1
        request_id = f"q{n}"
        specs = [
            ItemSpec(f"t{n}.{i}", f"img{n}.{i}", size, "image") for i, size in enumerate(sizes)
        ]
        if share and self.requests:
            other = next(iter(self.requests.values()))
            specs[0] = other.specs[0]
        self._note(f"add_request({request_id}, {[(s.rid, s.tokens) for s in specs]})")
        self.requests[request_id] = Req(specs)

    @precondition(lambda self: any(not r.encoded for r in self.requests.values()))
    @rule(data=st.data())
    def encode(self, data: st.DataObject) -> None:
        """The encode instance computes a request's items: its rank hands them to the senders."""
        ids = [k for k, r in self.requests.items() if not r.encoded]
        request_id = data.draw(st.sampled_from(ids), label="request")
        req = self.requests[request_id]
        req.encoded = True
        self._note(f"encode({request_id})")
        self.encode_one(request_id)

    @rule()
    def step(self) -> None:
        """One engine step, in vLLM's order (see the module docstring)."""
        self._note("step()")
        self._step()

    def _step(self) -> None:
        book = self.book
        # schedule(): the running requests, then the waiting ones.
        for request_id, req in self.requests.items():
            if req.state == "done":
                continue
            req.seen = True
            if not book.want(request_id, req.specs) or req.state == "running":
                continue
            for i, spec in enumerate(req.specs):
                cached = all(spec.identifier in c for c in self.caches)
                if not cached and book.has(spec.identifier):
                    book.allocated(request_id, i)
                    req.loaded.add(i)
            req.state = "running"
        orders = book.build()
        for rid, _ in orders.load:
            item = book.items.get(rid)
            whole = [rid in rank.whole for rank in self.ranks]
            require(
                EXACTLY_ONCE,
                None
                if item is not None and item.state is ItemState.AVAILABLE and all(whole)
                else f"item {rid} is loaded while the ranks that have it whole are {whole}",
            )
        for rid in (s.rid for s in orders.start):
            self.lives[rid] = self.lives.get(rid, 0) + 1
        # Every rank's worker step, then what it reports.
        reports: dict[int, RankReport] = {}
        for rank, cache in zip(self.ranks, self.caches, strict=True):
            rank.apply(orders, cache)
            report = rank.report()
            if report is not None:
                reports[rank.rank] = report
        self.producer.pump()
        for rid, identifier in orders.load:
            spec = book.items[rid].spec
            for r, cache in enumerate(self.caches):
                got = cache.get(identifier)
                same = got is not None and torch.equal(got, output_of(spec.identifier, spec.tokens))
                require(INTEGRITY, None if same else f"rank {r} loaded {identifier} wrong")
        # update_from_output(): requests that finished, those that failed, the reports.
        for request_id in book.take_unavailable():
            self._finish(request_id, "failed")
        before = {rid for rid, item in book.items.items() if item.state is ItemState.AVAILABLE}
        book.reported(reports)
        for rid, item in book.items.items():
            if item.state is ItemState.AVAILABLE and rid not in before:
                n = self.became_available.get(rid, 0) + 1
                self.became_available[rid] = n
                require(
                    EXACTLY_ONCE,
                    None
                    if n <= self.lives.get(rid, 0)
                    else f"item {rid} was made available {n} times in {self.lives.get(rid)} lives",
                )
        for report in reports.values():
            for rid in report.failed:
                for request_id, req in self.requests.items():
                    if req.state != "done" and rid in (s.rid for s in req.specs):
                        require(
                            LIVENESS,
                            None
                            if request_id in book.unavailable
                            else f"{rid} failed on rank {report.rank} but {request_id} goes on",
                        )

    def _finish(self, request_id: str, how: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.state == "done":
            return
        self._note(f"  {request_id} {how}")
        if req.seen:
            self.book.finished(request_id)
        else:
            self.book.never(request_id, req.specs)
        req.state = "done"

    @precondition(lambda self: any(r.state == "running" for r in self.requests.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        ids = [k for k, r in self.requests.items() if r.state == "running"]
        request_id = data.draw(st.sampled_from(ids), label="request")
        self._note(f"finish({request_id})")
        self._finish(request_id, "finished")

    @precondition(lambda self: any(r.state != "done" for r in self.requests.values()))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        ids = [k for k, r in self.requests.items() if r.state != "done"]
        request_id = data.draw(st.sampled_from(ids), label="request")
        self._note(f"abort({request_id})")
        self._finish(request_id, "aborted")

    @precondition(lambda self: any(r.state == "running" for r in self.requests.values()))
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        """vLLM preempts a running request and frees its encoder inputs (which it may then
        evict): it must find them again when it runs again."""
        ids = [k for k, r in self.requests.items() if r.state == "running"]
        request_id = data.draw(st.sampled_from(ids), label="request")
        req = self.requests[request_id]
        self._note(f"preempt({request_id})")
        req.state, req.loaded = "waiting", set()
        for spec in req.specs:
            for cache in self.caches:
                cache.pop(spec.identifier, None)

    @rule(rank=st.integers(0, RANKS - 1), hold=st.booleans())
    def delay_rank(self, rank: int, hold: bool) -> None:
        """One rank's statuses are held back (or let go): the ranks land at their own pace."""
        self._note(f"delay_rank(rank {rank}, hold={hold})")
        transport = self.ranks[rank].receiver.transport
        assert hasattr(transport, "hold") and hasattr(transport, "release")
        if hold:
            transport.hold()
        else:
            transport.release()

    @precondition(lambda self: not self.link_down)
    @rule(rank=st.integers(0, RANKS - 1))
    def link_fails(self, rank: int) -> None:
        """The encode side's link to one rank goes down for good."""
        self._note(f"link_fails(rank {rank})")
        self.link_down = True
        transport = self.ranks[rank].receiver.transport
        assert hasattr(transport, "crash_sender")
        transport.crash_sender(f"link to rank {rank} lost")

    @invariant()
    def available_only_when_every_rank_has_it(self) -> None:
        for rid, item in self.book.items.items():
            if item.state is ItemState.AVAILABLE:
                whole = [rid in rank.whole for rank in self.ranks]
                if not all(whole):
                    raise InvariantViolation(
                        EXACTLY_ONCE, f"item {rid} is available; ranks with it whole: {whole}"
                    )

    # -- teardown: everything ends, nothing is left ----------------------------------------

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None:
            return
        for request_id, req in self.requests.items():
            if not req.encoded:
                self.encode_one(request_id)
        for rank in self.ranks:
            transport = rank.receiver.transport
            assert hasattr(transport, "release")
            transport.release()
        for _ in range(400):
            self._step()
            for request_id, req in self.requests.items():
                if req.state == "running":
                    self._finish(request_id, "finished")
            if all(r.state == "done" for r in self.requests.values()) and not self.book.pending():
                break
        for _ in range(8):  # late statuses release the quarantine
            self._step()
        left = []
        if self.book.items or self.book.needs:
            left.append(f"book holds {sorted(self.book.items)} for {sorted(self.book.needs)}")
        for rank in self.ranks:
            r = rank.receiver
            if len(r) or r.quarantined() or rank.whole or rank.landing:
                left.append(f"rank {rank.rank} holds {len(r)} transfers, {rank.holds()} items")
            if r.allocator.num_free_blocks != r.allocator.num_blocks:
                left.append(f"rank {rank.rank}'s pool has {r.allocator.num_free_blocks} free")
        if not self.link_down and self.producer.held():
            left.append(f"the encode side holds {self.producer.held()} sources")
        require(NO_LEAK, "; ".join(left) or None)
        unfinished = [k for k, r in self.requests.items() if r.state != "done"]
        require(LIVENESS, f"requests never finished: {unfinished}" if unfinished else None)

    def encode_one(self, request_id: str) -> None:
        """The encode instance's step for a request: its scheduler book orders the sends
        (each transfer id once), the encoder runs, its rank hands the outputs over."""
        req = self.requests[request_id]
        req.encoded = True
        self.producer_book.want(request_id, [(s.identifier, s.rid) for s in req.specs])
        for s in req.specs:
            self.encoder_cache[s.identifier] = output_of(s.identifier, s.tokens)
        self.producer.apply(self.producer_book.build(), self.encoder_cache)
