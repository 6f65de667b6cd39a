"""Typed errors of resumekit: every failure a caller can act on has its own class.

All derive from :class:`ResumeKitError`, so ``except ResumeKitError`` catches
everything the library raises on purpose. A call that raises leaves the object
it was called on unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol


class Held(Protocol):
    """What an error says of an allocation (a :class:`~resumekit.allocator.Allocation`):
    typed structurally, so this bottom module imports nothing of resumekit."""

    @property
    def blocks(self) -> tuple[int, ...]: ...

    @property
    def owner(self) -> Hashable: ...

    @property
    def generation(self) -> int: ...


class ResumeKitError(Exception):
    """Base of every error resumekit raises on purpose."""


class InvalidArgumentError(ResumeKitError, ValueError):
    """An argument has the wrong type or an out-of-range value."""


class AllocatorError(ResumeKitError):
    """Base of the block allocator's errors."""


class CapacityExceededError(AllocatorError, InvalidArgumentError):
    """The request can never be satisfied: it needs more blocks than the pool has.

    Raised at once instead of returning ``None``, which a caller would retry forever.
    """


class DeviceMemoryError(ResumeKitError, MemoryError):
    """The device could not provide the memory for buffers that would fit it when free."""


class DoubleFreeError(AllocatorError):
    """The allocation was already freed."""

    def __init__(self, allocation: Held) -> None:
        self.allocation = allocation
        super().__init__(
            f"allocation generation {allocation.generation} of owner "
            f"{allocation.owner!r} (blocks {list(allocation.blocks)}) was already freed"
        )


class ForeignAllocationError(AllocatorError):
    """The allocation was not issued by this allocator (another pool, or a forged copy)."""


class UseAfterFreeError(AllocatorError):
    """Blocks were read or written through an allocation that has been freed."""


class LeakError(AllocatorError):
    """Allocations are still outstanding where none may be."""

    def __init__(self, leaks: Sequence[Held], detail: str = "") -> None:
        self.leaks: tuple[Held, ...] = tuple(leaks)
        lines = [
            f"owner {a.owner!r} generation {a.generation} blocks {list(a.blocks)}"
            for a in self.leaks
        ]
        message = f"{len(self.leaks)} allocation(s) leaked: " + "; ".join(lines)
        super().__init__(f"{detail}; {message}" if detail else message)

    @property
    def owners(self) -> tuple[Hashable, ...]:
        """Owners of the leaked allocations, in generation order."""
        return tuple(a.owner for a in self.leaks)


class InvariantError(ResumeKitError, AssertionError):
    """Internal bookkeeping is inconsistent: a bug in resumekit or in code that bypassed it."""


class RequestError(ResumeKitError):
    """Base of errors about a request id passed to a receiver or sender."""


class UnknownRequestError(RequestError):
    """No request with this id is known (never added, or already taken)."""


class DuplicateRequestError(RequestError, InvalidArgumentError):
    """A request with this id is still known (or still has a round in quarantine)."""


class RequestNotFinishedError(RequestError):
    """The request has not reached Success or Failed yet."""


class TransportError(ResumeKitError):
    """A transport was misused or delivered something that is not a protocol message."""


class TransportUnavailableError(TransportError):
    """A transport's optional dependencies (a pip extra, a system library) are missing."""


class IntegrationUnavailableError(ResumeKitError, ImportError):
    """A serving engine's integration was used without the engine (or its version) installed."""
