"""The import paths of resumekit 0.1's layout, kept for one release with a DeprecationWarning.

``resumekit.statemachine`` held the protocol and the transports, and the simulators
lived at the top. Each old module is the new one under its old name (the very same
module object); ``resumekit.statemachine`` itself and its ``transport`` module mixed
names that now live apart, so they resolve each name where it went. Delete this
file, and its import in ``resumekit/__init__.py``, to drop the old paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any, Final

#: old module -> the module it became
MOVED: Final[dict[str, str]] = {
    "resumekit.statemachine.declaration": "resumekit.protocol.declaration",
    "resumekit.statemachine.messages": "resumekit.protocol.messages",
    "resumekit.statemachine.receiver": "resumekit.protocol.receiver",
    "resumekit.statemachine.sender": "resumekit.protocol.sender",
    "resumekit.statemachine.sizing": "resumekit.protocol.sizing",
    "resumekit.statemachine.dedup": "resumekit.protocol.rounds",
    "resumekit.statemachine.distributed": "resumekit.transports.torch",
    "resumekit.statemachine.torch_receiver": "resumekit.transports.torch.receiver",
    "resumekit.statemachine.torch_sender": "resumekit.transports.torch.sender",
    "resumekit.statemachine.wire": "resumekit.transports.torch.wire",
    "resumekit.statemachine.mooncake": "resumekit.transports.mooncake",
    "resumekit.statemachine.jsonwire": "resumekit.transports.mooncake.jsonwire",
    "resumekit.simulate": "resumekit.sim.simulate",
    "resumekit.twoprocess": "resumekit.sim.twoprocess",
    "resumekit.workload": "resumekit.sim.workload",
    "resumekit.properties.harness": "resumekit.properties.model",
}

#: old modules whose names went to several places: name -> the module that has it now
SPLIT: Final[dict[str, dict[str, str]]] = {
    "resumekit.statemachine": {
        **dict.fromkeys(
            (
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
                "ReceiverTransport",
                "RequestRecord",
                "ResumableReceiver",
                "RoundPost",
                "SenderError",
                "SenderTransport",
                "Status",
                "TransferResult",
                "TransferState",
            ),
            "resumekit.protocol",
        ),
        "InProcessTransport": "resumekit.transports.inprocess",
        "TorchDistributedTransport": "resumekit.transports.torch",
        "MooncakeTransport": "resumekit.transports.mooncake",
    },
    "resumekit.statemachine.transport": {
        "ReceiverTransport": "resumekit.protocol.interfaces",
        "SenderTransport": "resumekit.protocol.interfaces",
        "InProcessTransport": "resumekit.transports.inprocess.transport",
        "StatusFilter": "resumekit.transports.inprocess.transport",
    },
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path goes in the next release",
        DeprecationWarning,
        stacklevel=4,
    )


class _SplitModule(types.ModuleType):
    """An old module whose names resolve, each, from where it went."""

    def __init__(self, name: str, names: dict[str, str]) -> None:
        super().__init__(name)
        self.__path__: list[str] = []  # a package: its old submodules import through it
        self._names = names

    def __getattr__(self, attr: str) -> Any:
        where = self._names.get(attr)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        _warn(f"{self.__name__}.{attr}", f"{where}.{attr}")
        return getattr(importlib.import_module(where), attr)

    def __dir__(self) -> list[str]:
        return sorted(self._names)


class _Alias(importlib.abc.Loader):
    """Hands importlib a module that exists already (it sets ``__spec__`` on it: put back)."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.spec = getattr(module, "__spec__", None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        if self.spec is not None:
            module.__spec__ = self.spec


class _OldPaths(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED:
            new = MOVED[fullname]
            _warn(fullname, new)
            module = importlib.import_module(new)
        elif fullname in SPLIT:
            module = _SplitModule(fullname, SPLIT[fullname])
        else:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(module))


def install() -> None:
    """Let the old paths import (once per process)."""
    if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
        sys.meta_path.append(_OldPaths())


install()
