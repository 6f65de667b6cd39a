"""The transports, one subpackage per backend, each behind the role interfaces of
:mod:`resumekit.protocol.interfaces` and made by one factory:

- :mod:`~resumekit.transports.inprocess`: both ends in one process (tests, checkers);
- :mod:`~resumekit.transports.torch`: ``torch.distributed`` point-to-point (gloo, NCCL);
- :mod:`~resumekit.transports.mooncake`: the Mooncake TransferEngine, control over ZMQ.

:func:`create` picks a backend by name, importing it only then (vLLM's connector
factory does the same), so an engine that configures its transport by a string
needs no import of its own. A new backend is a subpackage with a factory
``f(role, **options)`` and one line in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from typing import Any, Final, Literal

from resumekit.errors import InvalidArgumentError

#: backend name -> (module, factory): the one place a backend is registered.
BACKENDS: Final[dict[str, tuple[str, str]]] = {
    "torch": ("resumekit.transports.torch", "TorchDistributedTransport"),
    "mooncake": ("resumekit.transports.mooncake", "MooncakeTransport"),
}


def create(backend: str, role: Literal["receiver", "sender"], **options: Any) -> Any:
    """The ``role`` end of ``backend``, made by that backend's factory with ``options``.

    The in-process transport is both ends at once, so it is not made by role: build an
    :class:`~resumekit.transports.inprocess.InProcessTransport` over the buffers.
    """
    try:
        module, factory = BACKENDS[backend]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
        ) from None
    return getattr(importlib.import_module(module), factory)(role, **options)


__all__ = ["BACKENDS", "create"]
