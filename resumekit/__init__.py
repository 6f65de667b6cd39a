"""resumekit: a verified core for resumable embedding transfers (encode side to language side).

What an engine needs, in one import: the allocator and buffers, the receiver and the
sender, their results and errors, and the transports' constructors. The protocol's
declaration is in :mod:`resumekit.protocol`, the backends in :mod:`resumekit.transports`,
the checkers in :mod:`resumekit.properties`.
"""

import warnings

with warnings.catch_warnings():
    # torch warns at import when numpy is absent; nothing in resumekit uses numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from resumekit import _compat  # noqa: F401 - the old import paths, for one release
from resumekit.allocator import Allocation, BlockAllocator, BlockBuffers, EmbeddingTensors
from resumekit.errors import (
    AllocatorError,
    CapacityExceededError,
    DeviceMemoryError,
    DoubleFreeError,
    DuplicateRequestError,
    ForeignAllocationError,
    IntegrationUnavailableError,
    InvalidArgumentError,
    InvariantError,
    LeakError,
    RequestError,
    RequestNotFinishedError,
    ResumeKitError,
    TransportError,
    TransportUnavailableError,
    UnknownRequestError,
    UseAfterFreeError,
)
from resumekit.protocol import (
    EmbeddingSender,
    ReceiverObserver,
    ResumableReceiver,
    SchedulingPolicy,
    TransferResult,
    TransferState,
)
from resumekit.transports.inprocess import InProcessTransport
from resumekit.transports.mooncake import MooncakeTransport
from resumekit.transports.torch import TorchDistributedTransport

__version__ = "0.1.0"

# What an engine needs, in one import: from resumekit import ResumableReceiver, ...
__all__ = [
    "Allocation",
    "AllocatorError",
    "BlockAllocator",
    "BlockBuffers",
    "CapacityExceededError",
    "DeviceMemoryError",
    "DoubleFreeError",
    "DuplicateRequestError",
    "EmbeddingSender",
    "EmbeddingTensors",
    "ForeignAllocationError",
    "InProcessTransport",
    "IntegrationUnavailableError",
    "InvalidArgumentError",
    "InvariantError",
    "LeakError",
    "MooncakeTransport",
    "ReceiverObserver",
    "RequestError",
    "RequestNotFinishedError",
    "ResumableReceiver",
    "ResumeKitError",
    "SchedulingPolicy",
    "TorchDistributedTransport",
    "TransferResult",
    "TransferState",
    "TransportError",
    "TransportUnavailableError",
    "UnknownRequestError",
    "UseAfterFreeError",
    "__version__",
]
