"""The resumable transfer protocol: its declaration, messages, the two drivers and the
interface each needs of a transport. No threads, sockets or torch.distributed here:
the backends are in :mod:`resumekit.transports`.

- :mod:`~resumekit.protocol.declaration`: states, events, guards, the compiled table,
  the reference ``transitions`` machine and the Mermaid diagram;
- :mod:`~resumekit.protocol.messages`: what crosses between the two sides;
- :mod:`~resumekit.protocol.receiver` and :mod:`~resumekit.protocol.sender`: the drivers;
- :mod:`~resumekit.protocol.rounds`: "is this the round I am waiting for?";
- :mod:`~resumekit.protocol.sizing`: round 0's size learned (``"auto"``);
- :mod:`~resumekit.protocol.policy`: who is served next when several rounds wait;
- :mod:`~resumekit.protocol.interfaces`: what each driver needs of a transport.
"""

from resumekit.protocol.declaration import TransferState
from resumekit.protocol.interfaces import ReceiverTransport, SenderTransport
from resumekit.protocol.messages import (
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
from resumekit.protocol.policy import SchedulingPolicy
from resumekit.protocol.receiver import (
    DEFAULT_ALLOCATE_TOKENS,
    ENV_DEFAULT_ALLOCATE_TOKENS,
    ReceiverObserver,
    ReceiverSnapshot,
    RequestRecord,
    ResumableReceiver,
    TransferResult,
)
from resumekit.protocol.sender import EmbeddingSender, SenderSnapshot

__all__ = [
    "DEFAULT_ALLOCATE_TOKENS",
    "ENV_DEFAULT_ALLOCATE_TOKENS",
    "NO_EPOCH",
    "Cancel",
    "Cancelled",
    "EmbeddingSender",
    "Landed",
    "PeerBack",
    "PeerLost",
    "ReceiverObserver",
    "ReceiverSnapshot",
    "ReceiverTransport",
    "RequestRecord",
    "ResumableReceiver",
    "RoundPost",
    "SchedulingPolicy",
    "SenderError",
    "SenderSnapshot",
    "SenderTransport",
    "Status",
    "TransferResult",
    "TransferState",
]
