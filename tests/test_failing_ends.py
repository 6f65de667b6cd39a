"""The two-process fault runs' failing ends fail inside their own round, never beside it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from resumekit.allocator import EmbeddingTensors
from resumekit.protocol.messages import RoundPost
from resumekit.sim._failing import _FailingMooncakeSender
from resumekit.transports.mooncake.jsonwire import ADDRESSES_PER_BLOCK

BLOCK, HIDDEN = 4, 8
ROW = HIDDEN * 2  # bytes of one bf16 embedding row
BASE = 1 << 20  # where the receiver's embedding blocks begin, one after another


class _Engine:
    """Records the writes a sender end asks of its transfer engine."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def batch_transfer_sync_write(
        self, session: str, src: list[int], dst: list[int], nbytes: list[int]
    ) -> int:
        self.writes.extend(zip(dst, nbytes, strict=True))
        return 0


def _dying_end(blocks: tuple[int, ...]) -> tuple[Any, RoundPost, _Engine]:
    """A hanging failing end (no kill), one post of ``blocks`` pending, and its engine."""
    end: Any = _FailingMooncakeSender.__new__(_FailingMooncakeSender)
    engine = _Engine()
    post = RoundPost(7, 2, blocks, BLOCK * len(blocks), 0, incarnation=1)
    # Per block: its embeddings' address, then the other tensors' (far away, unused here).
    dst = [[BASE + b * BLOCK * ROW, *[(9 + k) << 24 for k in range(ADDRESSES_PER_BLOCK - 1)]]
           for b in blocks]  # fmt: skip
    end._dst = {(7, 1, 2): dst}
    end._hello = SimpleNamespace(session="receiver:1")
    end.engine, end.fault, end.fault_round, end.rounds_written = engine, "hang", 1, 0
    return end, post, engine


def test_a_killed_mooncake_senders_partial_write_stays_inside_its_rounds_blocks() -> None:
    # Round of blocks 3, 9, 10: its first run is block 3 alone, and block 4 (another
    # round's) follows it in memory. A contiguous half of the round from block 3's
    # address (6 tokens) ran into block 4: under load another request copied out those
    # bytes as its own (docs/transports.md, the Mooncake soak's corruption).
    blocks = (3, 9, 10)
    end, post, engine = _dying_end(blocks)
    data = EmbeddingTensors.random(BLOCK * len(blocks), HIDDEN, seed=0)
    end.write_round(post, data, None)
    assert end.finished and engine.writes, "the failing round wrote nothing"
    owned = [(BASE + b * BLOCK * ROW, BASE + (b + 1) * BLOCK * ROW) for b in blocks]
    for at, nbytes in engine.writes:
        assert any(lo <= at and at + nbytes <= hi for lo, hi in owned), (
            f"wrote [{at}, {at + nbytes}) outside the round's blocks {owned}"
        )
        assert nbytes < BLOCK * ROW  # cut short: a part of the first run, not all of it
