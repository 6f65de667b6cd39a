"""The protocol across two processes over ``torch.distributed`` point-to-point messages.

:func:`TorchDistributedTransport` makes the end of a role: a
:class:`~resumekit.transports.torch.receiver.TorchReceiverEnd` or a
:class:`~resumekit.transports.torch.sender.TorchSenderEnd`. What they share is in
:mod:`~resumekit.transports.torch._end`, the wire format in
:mod:`~resumekit.transports.torch.wire`.
"""

from __future__ import annotations

import warnings
from typing import Literal, overload

import torch.distributed as dist

from resumekit._check import as_int
from resumekit.allocator.buffers import BlockBuffers
from resumekit.errors import InvalidArgumentError
from resumekit.transports._threaded import DEFAULT_TIMEOUT
from resumekit.transports.torch._end import Match, TorchEnd
from resumekit.transports.torch.receiver import TorchReceiverEnd
from resumekit.transports.torch.sender import TorchSenderEnd


@overload
def TorchDistributedTransport(
    role: Literal["receiver"],
    peer: int,
    *,
    buffers: BlockBuffers,
    group: dist.ProcessGroup | None = ...,
    data_group: dist.ProcessGroup | None = ...,
    timeout: float = ...,
    owns_group: bool = ...,
    match: Match | None = ...,
    aux_size: int | None = ...,
) -> TorchReceiverEnd: ...


@overload
def TorchDistributedTransport(
    role: Literal["sender"],
    peer: int,
    *,
    buffers: None = ...,
    group: dist.ProcessGroup | None = ...,
    data_group: dist.ProcessGroup | None = ...,
    timeout: float = ...,
    owns_group: bool = ...,
    match: Match | None = ...,
    aux_size: int | None = ...,
) -> TorchSenderEnd: ...


def TorchDistributedTransport(
    role: Literal["receiver", "sender"],
    peer: int,
    *,
    buffers: BlockBuffers | None = None,
    group: dist.ProcessGroup | None = None,
    data_group: dist.ProcessGroup | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    owns_group: bool = False,
    match: Match | None = None,
    aux_size: int | None = None,
) -> TorchEnd:
    """The end of ``role`` over ``torch.distributed``: one receiver rank, one sender rank.

    Args:
        role: ``"receiver"`` (the language side) or ``"sender"`` (the encode side).
        peer: the other end's global rank.
        buffers: (receiver) the :class:`BlockBuffers` rounds land in.
        group: carries control messages (the default group if ``None``).
        data_group: carries payloads; give an NCCL group when the buffers are on CUDA.
        timeout: seconds without progress before the peer counts as lost.
        owns_group: the end's ``close()`` destroys the default process group.
        match: ``"tag"`` (the default on gloo) gives each round's payload a tag and posts
            its receives with the round; ``"order"`` (the default otherwise: NCCL has no
            tags) posts them when the sender announces the payload. Both ends must agree.
        aux_size: deprecated and ignored: the receiver's aux rows decide what a round writes.

    Returns:
        A :class:`TorchReceiverEnd` or a :class:`TorchSenderEnd`. Request ids must be
        int64s. Call it from one event loop; its threads wait on transfers.
    """
    if aux_size is not None:
        as_int(aux_size, "aux_size", minimum=2, maximum=1 << 16)
        warnings.warn(
            "aux_size is ignored: the receiver's aux rows decide what a round writes",
            DeprecationWarning,
            stacklevel=2,
        )
    if role == "receiver":
        if buffers is None:
            raise InvalidArgumentError(
                "buffers: the receiver end needs the BlockBuffers rounds land in"
            )
        return TorchReceiverEnd(
            peer,
            buffers=buffers,
            group=group,
            data_group=data_group,
            timeout=timeout,
            owns_group=owns_group,
            match=match,
        )
    if role == "sender":
        if buffers is not None:
            raise InvalidArgumentError(
                "buffers: the sender end writes into the receiver's; it takes none"
            )
        return TorchSenderEnd(
            peer,
            group=group,
            data_group=data_group,
            timeout=timeout,
            owns_group=owns_group,
            match=match,
        )
    raise InvalidArgumentError(f"role must be 'receiver' or 'sender', not {role!r}")


__all__ = ["Match", "TorchDistributedTransport", "TorchEnd", "TorchReceiverEnd", "TorchSenderEnd"]
