"""Both ends in one process: :class:`InProcessTransport` (the link, with the adversary's
hooks) and :class:`Loopback` (a receiver and a sender joined by one)."""

from resumekit.transports.inprocess.loopback import Loopback
from resumekit.transports.inprocess.transport import InProcessTransport

__all__ = ["InProcessTransport", "Loopback"]
