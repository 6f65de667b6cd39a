"""The resumable transfer protocol, as an engine uses it: states, messages, the receiver
and sender drivers and the transports.

The protocol's declaration (events, guards, the compiled table, the reference
``transitions`` machine, the Mermaid diagram) is in
:mod:`resumekit.statemachine.declaration`; the round filters the checkers swap in
are in :mod:`resumekit.statemachine.dedup`.
"""

from resumekit.statemachine.declaration import TransferState
from resumekit.statemachine.distributed import TorchDistributedTransport
from resumekit.statemachine.messages import (
    NO_EPOCH,
    Cancel,
    Cancelled,
    Landed,
    PeerBack,
    PeerLost,
    RoundPost,
    SenderError,
    Status,
)
from resumekit.statemachine.mooncake import MooncakeTransport
from resumekit.statemachine.receiver import (
    DEFAULT_ALLOCATE_TOKENS,
    ENV_DEFAULT_ALLOCATE_TOKENS,
    ReceiverObserver,
    RequestRecord,
    ResumableReceiver,
    TransferResult,
)
from resumekit.statemachine.sender import EmbeddingSender
from resumekit.statemachine.transport import (
    InProcessTransport,
    ReceiverTransport,
    SenderTransport,
)

__all__ = [
    "DEFAULT_ALLOCATE_TOKENS",
    "ENV_DEFAULT_ALLOCATE_TOKENS",
    "NO_EPOCH",
    "Cancel",
    "Cancelled",
    "EmbeddingSender",
    "InProcessTransport",
    "Landed",
    "MooncakeTransport",
    "PeerBack",
    "PeerLost",
    "ReceiverObserver",
    "ReceiverTransport",
    "RequestRecord",
    "ResumableReceiver",
    "RoundPost",
    "SenderError",
    "SenderTransport",
    "Status",
    "TorchDistributedTransport",
    "TransferResult",
    "TransferState",
]
