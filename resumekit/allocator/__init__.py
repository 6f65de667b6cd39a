"""Block allocator (host-side index bookkeeping) and the torch block buffers behind it."""

from resumekit.allocator.block_allocator import (
    Allocation,
    AllocatorSnapshot,
    BlockAllocator,
    ReuseOrder,
)
from resumekit.allocator.buffers import (
    AUX_MROPE_DELTA,
    AUX_TOTAL_TOKENS,
    BlockBuffers,
    EmbeddingTensors,
    default_device,
)

__all__ = [
    "AUX_MROPE_DELTA",
    "AUX_TOTAL_TOKENS",
    "Allocation",
    "AllocatorSnapshot",
    "BlockAllocator",
    "BlockBuffers",
    "EmbeddingTensors",
    "ReuseOrder",
    "default_device",
]
