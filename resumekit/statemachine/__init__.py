"""The resumable transfer protocol: states, events, guards, receiver and sender drivers."""

from resumekit.statemachine.declaration import (
    TABLE,
    TRANSITIONS,
    Action,
    Event,
    Guard,
    TransferState,
    Transition,
    diagram,
    next_state,
    reference_machine,
)
from resumekit.statemachine.dedup import EpochFilter, Observation, RoundFilter, Verdict
from resumekit.statemachine.messages import (
    NO_EPOCH,
    Cancel,
    Cancelled,
    Landed,
    PeerLost,
    RoundPost,
    SenderError,
    Status,
)
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
    "TABLE",
    "TRANSITIONS",
    "Action",
    "Cancel",
    "Cancelled",
    "EmbeddingSender",
    "EpochFilter",
    "Event",
    "Guard",
    "InProcessTransport",
    "Landed",
    "Observation",
    "PeerLost",
    "ReceiverObserver",
    "ReceiverTransport",
    "RequestRecord",
    "ResumableReceiver",
    "RoundFilter",
    "RoundPost",
    "SenderError",
    "SenderTransport",
    "Status",
    "TransferResult",
    "TransferState",
    "Transition",
    "Verdict",
    "diagram",
    "next_state",
    "reference_machine",
]
