"""Every transport end is exactly the role it says, every call the drivers make of it is in
its role's interface, and the old import paths still work for one release."""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

import pytest

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    EmbeddingSender,
    InvalidArgumentError,
    ResumableReceiver,
)
from resumekit.protocol.interfaces import ReceiverTransport, SenderTransport
from resumekit.protocol.receiver import RECEIVER_TRANSPORT_METHODS
from resumekit.protocol.sender import SENDER_TRANSPORT_METHODS
from resumekit.sim.workload import _TimedTransport
from resumekit.transports import BACKENDS, create
from resumekit.transports._threaded import ThreadedEnd
from resumekit.transports.inprocess import InProcessTransport
from resumekit.transports.mooncake import MooncakeReceiverEnd, MooncakeSenderEnd
from resumekit.transports.torch import TorchReceiverEnd, TorchSenderEnd


def methods(protocol: type) -> set[str]:
    return {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}


def test_the_interfaces_name_every_call_the_drivers_make() -> None:
    """The Protocols listed three methods while the drivers also relied on
    ``check_request_id`` through ``getattr``."""
    assert methods(ReceiverTransport) == set(RECEIVER_TRANSPORT_METHODS)
    assert methods(SenderTransport) == set(SENDER_TRANSPORT_METHODS)
    for driver in (ResumableReceiver, EmbeddingSender):
        assert "getattr(self.transport" not in inspect.getsource(driver)


ENDS: list[tuple[type, type, type]] = [
    (TorchReceiverEnd, ReceiverTransport, SenderTransport),
    (MooncakeReceiverEnd, ReceiverTransport, SenderTransport),
    (TorchSenderEnd, SenderTransport, ReceiverTransport),
    (MooncakeSenderEnd, SenderTransport, ReceiverTransport),
]


@pytest.mark.parametrize(("end", "own", "other"), ENDS, ids=[e[0].__name__ for e in ENDS])
def test_an_end_is_one_role_and_has_none_of_the_others_calls(
    end: type, own: type, other: type
) -> None:
    """Each end inherited the other role's methods as stubs that raise."""
    assert all(callable(getattr(end, m, None)) for m in methods(own))
    theirs = methods(other) - methods(own)
    assert theirs and not any(hasattr(end, m) for m in theirs), theirs
    assert issubclass(end, ThreadedEnd)
    for call in ("wait", "close", "shutdown", "check_request_id"):
        assert callable(getattr(end, call))


def test_the_in_process_link_and_the_simulated_one_are_both_roles_for_real() -> None:
    for both in (InProcessTransport, _TimedTransport):
        assert all(callable(getattr(both, m)) for m in methods(ReceiverTransport))
        assert all(callable(getattr(both, m)) for m in methods(SenderTransport))


def test_a_transport_without_check_request_id_is_refused_by_name() -> None:
    class Partial:
        def post_round(self, post: Any) -> None: ...
        def cancel(self, rid: Any, epoch: int, *, incarnation: int) -> None: ...
        def poll_statuses(self) -> tuple[()]:
            return ()

    buffers = BlockBuffers(BlockAllocator(4, 4), 2, device="cpu")
    with pytest.raises(InvalidArgumentError, match="has no check_request_id"):
        ResumableReceiver(buffers, Partial(), 4)  # type: ignore[arg-type]


def test_the_factory_picks_a_backend_by_name_and_refuses_others() -> None:
    assert set(BACKENDS) == {"torch", "mooncake"}
    with pytest.raises(InvalidArgumentError, match="backend must be one of torch, mooncake"):
        create("carrier-pigeon", "receiver")
    with pytest.raises(InvalidArgumentError, match="role"):
        create("torch", "encoder", peer=1)  # type: ignore[arg-type]


OLD_PATHS = [
    ("resumekit.statemachine", "ResumableReceiver", "resumekit.protocol.receiver"),
    ("resumekit.statemachine", "InProcessTransport", "resumekit.transports.inprocess.transport"),
    ("resumekit.statemachine.receiver", "ResumableReceiver", "resumekit.protocol.receiver"),
    ("resumekit.statemachine.mooncake", "MooncakeTransport", "resumekit.transports.mooncake"),
    (
        "resumekit.statemachine.distributed",
        "TorchDistributedTransport",
        "resumekit.transports.torch",
    ),
    ("resumekit.statemachine.transport", "ReceiverTransport", "resumekit.protocol.interfaces"),
    ("resumekit.simulate", "simulate", "resumekit.sim.simulate"),
    ("resumekit.workload", "run", "resumekit.sim.workload"),
]


@pytest.mark.parametrize(("old", "name", "home"), OLD_PATHS)
def test_an_old_import_path_still_works_and_says_where_it_went(
    old: str, name: str, home: str
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(importlib.import_module(old), name)
    assert got is getattr(importlib.import_module(home), name)
    assert any(
        issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message) for w in caught
    )
    new = importlib.import_module(home)
    assert new.__spec__ is not None and new.__spec__.name == home  # the new module keeps its name
