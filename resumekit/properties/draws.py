"""What the protocol machine draws: pool configurations and sources, good and bad."""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
import torch

from resumekit.allocator import EmbeddingTensors, ReuseOrder
from resumekit.protocol.policy import SchedulingPolicy

HIDDEN = 2  # the hidden size of every source the machine makes


@dataclass(frozen=True)
class ProtocolConfig:
    block_size: int
    pool_blocks: int
    default_tokens: int
    max_resume_tokens: int | None
    reuse: ReuseOrder
    auto: bool = False  # round 0 sized by the receiver's AutoSizer, learning from 1 size
    policy: SchedulingPolicy | None = None  # the receiver's scheduling policy


@st.composite
def protocol_configs(draw: st.DrawFn) -> ProtocolConfig:
    """Pools and allocations drawn small (rounds reuse blocks) and large."""
    block_size = draw(st.sampled_from([1, 4, 16, 128]), label="block_size")
    default_blocks = draw(st.sampled_from([1, 2, 4, 64]), label="default blocks")
    pool_blocks = draw(
        st.one_of(
            st.integers(default_blocks, 3 * default_blocks + 2),
            st.just(max(default_blocks, 4096 // block_size)),
        ),
        label="pool blocks",
    )
    cap = draw(st.sampled_from([None, 1, 2, 4]), label="resume cap (x default)")
    return ProtocolConfig(
        block_size=block_size,
        pool_blocks=pool_blocks,
        default_tokens=default_blocks * block_size,
        max_resume_tokens=None if cap is None else cap * default_blocks * block_size,
        reuse=draw(st.sampled_from(["lifo", "fifo"]), label="reuse"),
        auto=draw(st.sampled_from([False, False, False, True]), label="auto round-0 size"),
        policy=draw(policies(block_size, default_blocks), label="policy"),
    )


def policies(block_size: int, default_blocks: int) -> st.SearchStrategy[SchedulingPolicy | None]:
    """None half the time; else a small window, bulk above a round 0 or two, large above
    a block or a round 0 (or half the pool), few passes allowed (its bugs need long
    examples, so it is drawn as often as no policy)."""
    default = default_blocks * block_size
    return st.one_of(
        st.none(),
        st.builds(
            SchedulingPolicy,
            max_rounds_in_flight=st.sampled_from([None, 1, 2]),
            bulk_tokens=st.sampled_from([default, 2 * default]),
            bulk_round_tokens=st.sampled_from([block_size, default]),
            max_passed_over=st.integers(0, 3),
            yield_tokens=st.sampled_from([block_size, block_size, default, None]),
        ),
    )


def labelled_source(tokens: int, label: int, *, hidden: int = HIDDEN) -> EmbeddingTensors:
    """A source whose every token is distinct (fill ids count from ``label << 20``),
    so a token in the wrong place or of the wrong request life fails the comparison;
    built with ``arange``, a fraction of the cost of random tensors."""
    fill = torch.arange(tokens, dtype=torch.int32) + (label << 20)
    emb = (fill % 509).to(torch.bfloat16).unsqueeze(1).repeat(1, hidden)
    mrope = torch.stack([fill, fill + 1, fill + 2])
    return EmbeddingTensors(emb, fill, mrope)


def forged_tensors(embeddings: object, fill_ids: object, mrope: object) -> EmbeddingTensors:
    """An :class:`EmbeddingTensors` built past its own checks, as a caller that bypasses
    them could; what receives it must still refuse it."""
    forged = object.__new__(EmbeddingTensors)
    object.__setattr__(forged, "embeddings", embeddings)
    object.__setattr__(forged, "fill_ids", fill_ids)
    object.__setattr__(forged, "mrope", mrope)
    return forged


def bad_sources(tokens: int) -> list[tuple[str, object]]:
    """Sources the sender must refuse at
    :meth:`~resumekit.protocol.sender.EmbeddingSender.add`, by what is wrong.

    The malformed ones are forged: :class:`EmbeddingTensors` itself refuses them."""
    good = labelled_source(tokens, 0)
    emb, fill, mrope = good.embeddings, good.fill_ids, good.mrope
    return [
        ("int64 fill ids", forged_tensors(emb, fill.long(), mrope)),
        ("integer embeddings", forged_tensors(fill.unsqueeze(1), fill, mrope)),
        ("mRoPE of another length", forged_tensors(emb, fill, mrope[:, :-1])),
        ("transposed mRoPE", forged_tensors(emb, fill, mrope.t().contiguous())),
        (
            "embeddings that require grad",
            EmbeddingTensors(emb.float().requires_grad_(), fill, mrope),
        ),
        ("no embedding rows", EmbeddingTensors(emb[:0], fill[:0], mrope[:, :0])),
        ("not tensors", forged_tensors([1.0], [1], [[1], [2], [3]])),
        ("not EmbeddingTensors", (emb, fill, mrope)),
    ]


__all__ = [
    "HIDDEN",
    "ProtocolConfig",
    "bad_sources",
    "forged_tensors",
    "labelled_source",
    "protocol_configs",
]
