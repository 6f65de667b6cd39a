"""A receiver and a sender joined in one process: what the simulator, the fuzzer and the
tests drive, step by step, over one :class:`InProcessTransport`."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch

from resumekit.allocator import BlockAllocator, BlockBuffers, EmbeddingTensors, ReuseOrder
from resumekit.protocol import EmbeddingSender, ReceiverObserver, ResumableReceiver
from resumekit.protocol.policy import SchedulingPolicy
from resumekit.protocol.receiver import DEFAULT_ALLOCATE_TOKENS
from resumekit.transports.inprocess.transport import InProcessTransport


class Loopback:
    """A receiver and a sender joined by one :class:`InProcessTransport` over shared buffers."""

    def __init__(
        self,
        *,
        pool_blocks: int,
        block_size: int = 128,
        hidden: int = 64,
        reuse: ReuseOrder = "lifo",
        default_allocate: int | Literal["auto"] | None = 8192,
        max_resume_tokens: int | None = None,
        observer: ReceiverObserver | None = None,
        receiver_type: type[ResumableReceiver] = ResumableReceiver,
        allocator_type: type[BlockAllocator] = BlockAllocator,
        transport_type: type[InProcessTransport] = InProcessTransport,
        device: torch.device | str | None = "cpu",
        policy: SchedulingPolicy | None = None,
    ) -> None:
        self.allocator = allocator_type(pool_blocks, block_size, reuse=reuse)
        self.buffers = BlockBuffers(self.allocator, hidden, device=device)
        self.transport = transport_type(self.buffers)
        self.receiver = receiver_type(
            self.buffers,
            self.transport,
            default_allocate,
            max_resume_tokens=max_resume_tokens,
            observer=observer,
            policy=policy,
        )
        self.sender = EmbeddingSender(self.transport)
        self.sources: dict[Hashable, EmbeddingTensors] = {}

    def add(self, rid: Hashable, tokens: int, *, seed: int = 0, mrope_delta: int = 0) -> None:
        """Start ``rid`` on both sides with a random ``tokens``-long source."""
        source = EmbeddingTensors.random(
            tokens, self.buffers.hidden_size, seed=seed, device=self.buffers.device
        )
        self.receiver.add(rid)
        self.sender.add(rid, source, mrope_delta=mrope_delta)
        self.sources[rid] = source

    def step(self) -> list[Hashable]:
        """One receiver step, then one sender step; the ids that finished."""
        finished = list(self.receiver.step())
        self.sender.step()
        return finished

    def live(self) -> list[Hashable]:
        """Requests not yet terminal."""
        return [
            rid
            for rid in self.sources
            if rid in self.receiver and not self.receiver.poll(rid).terminal
        ]

    def run(self, max_steps: int) -> int:
        """Step until every request is terminal or nothing can move any more; returns the steps.

        With no message in flight or queued, a step that moves nothing changes
        nothing (both sides are deterministic): two in a row mean stuck for good.
        """
        idle = 0
        t = self.transport
        for steps in range(max_steps):
            if not self.live():
                return steps
            before = self.traffic()
            self.step()
            quiet = not t.in_flight and not t.posts
            idle = idle + 1 if quiet and self.traffic() == before else 0
            if idle >= 2:
                return max_steps
        return max_steps

    def traffic(self) -> tuple[int, ...]:
        """Counters that move whenever either side does something."""
        t = self.transport
        return (t.posted, t.delivered, len(t.posts), len(t.in_flight), self.sender.rounds_served)

    def step_bound(self, tokens: int) -> int:
        """Steps a transfer of ``tokens`` can need on this pool: one block per round, worst case."""
        return 4 * (tokens // self.allocator.block_size + 4)


def default_pool_blocks(
    tokens: int, default_allocate: int | Literal["auto"], block_size: int
) -> int:
    """A pool that holds the whole embedding and the default allocation (``"auto"``: the
    8192 tokens an auto-sized receiver starts from)."""
    first = DEFAULT_ALLOCATE_TOKENS if isinstance(default_allocate, str) else default_allocate
    return -(-max(tokens, first) // block_size)
