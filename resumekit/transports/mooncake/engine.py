"""The Mooncake transfer engine as the transport uses it: loading it (an optional extra),
starting an end's own engine, and the ledger of source memory the sender ends that
share one engine registered."""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, Final

import torch

from resumekit.errors import TransportError, TransportUnavailableError

INSTALL_HINT: Final = (
    "pip install 'resumekit[mooncake]' (the transfer engine and pyzmq), and the system "
    "packages libibverbs1 and librdmacm1 (apt-get install libibverbs1 librdmacm1)"
)


def load_mooncake() -> tuple[Any, Any]:
    """``(mooncake.engine.TransferEngine, zmq)``, or the error that says what to install.

    Sets ``MC_LOG_LEVEL=WARNING`` unless set: the engine logs each connection at INFO.
    """
    try:
        zmq = importlib.import_module("zmq")
    except ImportError as error:
        raise TransportUnavailableError(f"pyzmq is missing ({error}): {INSTALL_HINT}") from None
    os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # read when the engine starts
    try:
        engine = importlib.import_module("mooncake.engine")
    except (ImportError, OSError) as error:
        raise TransportUnavailableError(
            f"the Mooncake transfer engine cannot be loaded ({error}): {INSTALL_HINT}"
        ) from None
    return engine.TransferEngine, zmq


# Every engine an end started, for the life of the process. Tearing a TransferEngine
# down joins its handshake thread with the GIL held, for up to a second, stalling every
# thread: freed with its end, it would stall whichever event loop the garbage collector
# happened to run in. Kept, it costs two threads, five descriptors and a port, and
# refuses any write (its end unregistered everything). The list is never freed, not
# even at exit, where freeing it would tear the engines down one by one.
_OWN_ENGINES: Final[list[Any]] = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_OWN_ENGINES))


def start_engine(transfer_engine: Any, hostname: str, protocol: str) -> tuple[Any, str]:
    """A new engine on ``hostname`` over ``protocol``, kept for the life of the process,
    and its session (``host:rpc_port``)."""
    engine = transfer_engine()
    _OWN_ENGINES.append(engine)  # before initialize: a failed one is torn down the same
    if engine.initialize(hostname, "P2PHANDSHAKE", protocol, "") != 0:
        raise TransportError(f"the transfer engine did not start on {hostname}")
    return engine, f"{hostname}:{engine.get_rpc_port()}"


_User = tuple[int, Hashable, int]  # (the sender end's id, rid, incarnation)


class SourceLedger:
    """The source storages sender ends registered with one engine, shared by every end
    that uses it: a storage is registered once and unregistered when the last request
    writing from it ends, through whichever end. One the engine refuses (its owner
    registered it, as an encoder's output pool is) is written as it is, and tried
    again once no request writes from it (its owner may have unregistered it)."""

    _ledgers: ClassVar[dict[int, SourceLedger]] = {}  # by id(engine), while an end uses it
    _ledgers_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.ends = 0
        self._lock = threading.Lock()
        # address -> (the storage, kept alive while registered; None when the engine
        # refused it), and the requests writing from it
        self.sources: dict[int, tuple[torch.Tensor | None, set[_User]]] = {}

    @classmethod
    def join(cls, engine: Any) -> SourceLedger:
        with cls._ledgers_lock:
            ledger = cls._ledgers.get(id(engine))
            if ledger is None:
                ledger = cls._ledgers[id(engine)] = cls(engine)
            ledger.ends += 1
            return ledger

    def leave(self, end: int) -> None:
        """``end`` is released: what only its requests still used is unregistered."""
        self.forget(lambda user: user[0] == end)
        with self._ledgers_lock:
            self.ends -= 1
            if self.ends == 0:
                del self._ledgers[id(self.engine)]

    def use(self, t: torch.Tensor, user: _User) -> None:
        """Register the storage under ``t`` unless it is already; ``user`` writes from it."""
        storage = t.untyped_storage()
        address = storage.data_ptr()
        with self._lock:
            known = self.sources.get(address)
            if known is not None:
                known[1].add(user)
                return
            keep = None
            if self.engine.register_memory(address, storage.nbytes()) == 0:
                keep = torch.empty(0, dtype=torch.uint8).set_(storage)
            self.sources[address] = (keep, {user})

    def forget(self, ended: Callable[[_User], bool]) -> None:
        """The requests ``ended`` picks write no more: unregister what nobody else uses."""
        with self._lock:
            for address, (keep, users) in list(self.sources.items()):
                users.difference_update([u for u in users if ended(u)])
                if not users:
                    del self.sources[address]
                    if keep is not None:
                        self.engine.unregister_memory(address)
