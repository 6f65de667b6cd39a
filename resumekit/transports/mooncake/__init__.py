"""The protocol across two processes over the Mooncake TransferEngine, control over ZMQ.

:func:`MooncakeTransport` makes the end of a role: a
:class:`~resumekit.transports.mooncake.receiver.MooncakeReceiverEnd` or a
:class:`~resumekit.transports.mooncake.sender.MooncakeSenderEnd`; what both share is in
:mod:`~resumekit.transports.mooncake._end`, the engine's loading and the source
ledger in :mod:`~resumekit.transports.mooncake.engine`.

The receiver registers its whole :class:`~resumekit.allocator.BlockBuffers`
with the engine once, at start, and posts with each round the addresses of its
blocks; the sender writes the round straight into them (one transfer per run of
adjacent blocks and tensor, all submitted before any is waited on) and only then
sends the round's status. Posts, cancels, statuses and heartbeats are JSON over two ZMQ PUSH/PULL
connections: each end binds ``listen`` and connects to ``peer``.

Each end runs a send thread (it owns the PUSH socket and sends a heartbeat when
idle for a quarter ``timeout``) and a control thread (it owns the PULL socket,
reads messages and watches the connection); the sender adds a writer thread
that performs each round's writes, then passes on its status, in the order the
event loop called ``write_round`` and ``report``. It submits the transfers
asynchronously and sleeps between looks at them: the engine's synchronous calls
spin a CPU until a batch completes. The event loop never blocks,
locks or waits. The peer is lost when its connection drops, when nothing comes
from it for ``timeout``, or when a posted round gets no status for ``timeout``;
the receiver then unregisters its buffers (the engine refuses any later write
into them) before it reports :class:`~resumekit.protocol.messages.PeerLost`.

Messages (``t`` names the kind; ``inc`` is the request's incarnation):
``hello {v, session, hidden, dtype, aux, reply}`` (receiver, first: the protocol
version, where the sender writes, what a token's embedding is there, how long an
aux row is, and where this receiver listens), ``post {rid, inc,
epoch, sent, cap, expect, blocks, dst}`` (``dst``: per block, the addresses of
its embeddings, fill ids, three mRoPE rows and aux row), ``cancel {rid, inc,
epoch}``, ``close``; back: ``landed {rid, inc, epoch, tokens, total, final}``,
``cancelled``, ``error {..., reason}``, ``bye``, and first ``hi {to}`` (the session
the sender writes to: a receiver takes statuses only after a hi naming its own)
or ``refused {reason}``: a sender that will not serve a hello (malformed, of
another version, or from a second receiver) says why, to ``reply`` (or over its
link), then ends its link; the receiver loses the peer at once with a
:class:`~resumekit.transports.mooncake.jsonwire.HelloRefused`
(:attr:`~MooncakeEnd.lost_error`). ``ping`` both ways. Within version 1 both sides
are additions: a hello without ``v`` is of version 1, one without ``reply`` is
answered over the link only while unpaired, and an older receiver reads
``refused`` as a malformed message, which loses the peer as promptly. How each is
read, and what a message that cannot be read does: :mod:`~resumekit.transports.mooncake.jsonwire`.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, overload

from resumekit._check import as_int
from resumekit.allocator.buffers import BlockBuffers
from resumekit.errors import InvalidArgumentError
from resumekit.transports._threaded import DEFAULT_TIMEOUT
from resumekit.transports.mooncake._end import MooncakeEnd
from resumekit.transports.mooncake.engine import INSTALL_HINT, load_mooncake
from resumekit.transports.mooncake.jsonwire import HelloRefused, wire_rid
from resumekit.transports.mooncake.receiver import MooncakeReceiverEnd
from resumekit.transports.mooncake.sender import MooncakeSenderEnd


@overload
def MooncakeTransport(
    role: Literal["receiver"],
    *,
    listen: str,
    peer: str,
    buffers: BlockBuffers,
    engine: Any = ...,
    session: str | None = ...,
    hostname: str = ...,
    protocol: Literal["tcp", "rdma"] = ...,
    timeout: float = ...,
    aux_size: int | None = ...,
) -> MooncakeReceiverEnd: ...


@overload
def MooncakeTransport(
    role: Literal["sender"],
    *,
    listen: str,
    peer: str,
    buffers: None = ...,
    engine: Any = ...,
    session: str | None = ...,
    hostname: str = ...,
    protocol: Literal["tcp", "rdma"] = ...,
    timeout: float = ...,
    aux_size: int | None = ...,
) -> MooncakeSenderEnd: ...


def MooncakeTransport(
    role: Literal["receiver", "sender"],
    *,
    listen: str,
    peer: str,
    buffers: BlockBuffers | None = None,
    engine: Any = None,
    session: str | None = None,
    hostname: str = "127.0.0.1",
    protocol: Literal["tcp", "rdma"] = "tcp",
    timeout: float = DEFAULT_TIMEOUT,
    aux_size: int | None = None,
) -> MooncakeEnd:
    """The end of ``role`` over a Mooncake ``TransferEngine``, control over ZMQ.

    Args:
        role: ``"receiver"`` (the language side) or ``"sender"`` (the encode side).
        listen: the ZMQ endpoint this end binds (``tcp://host:port``).
        peer: the endpoint the other end binds.
        buffers: (receiver) the :class:`BlockBuffers` rounds land in; registered with
            the engine by this end, once.
        engine: an initialised ``TransferEngine`` the process already has, with
            ``session``, its ``host:rpc_port`` as peers name it. Without one the end
            starts its own on ``hostname`` over ``protocol`` (``"tcp"``, or ``"rdma"``
            on a cluster), kept for the life of the process: tearing an engine down
            holds the GIL for up to a second. Each costs two threads, five descriptors
            and a port: a process that makes many ends passes the engine it keeps.
        timeout: seconds without progress before the peer counts as lost.
        aux_size: deprecated and ignored: the receiver's aux rows decide what a round writes.

    Returns:
        A :class:`MooncakeReceiverEnd` or a :class:`MooncakeSenderEnd`. Request ids are
        int64s or strs. Call it from one event loop.
    """
    if aux_size is not None:
        as_int(aux_size, "aux_size", minimum=2, maximum=1 << 16)
        warnings.warn(
            "aux_size is ignored: the receiver's aux rows decide what a round writes",
            DeprecationWarning,
            stacklevel=2,
        )
    ends: dict[str, Any] = {
        "listen": listen,
        "peer": peer,
        "engine": engine,
        "session": session,
        "hostname": hostname,
        "protocol": protocol,
        "timeout": timeout,
    }
    if role == "receiver":
        if buffers is None:
            raise InvalidArgumentError(
                "buffers: the receiver end needs the BlockBuffers rounds land in"
            )
        return MooncakeReceiverEnd(buffers=buffers, **ends)
    if role == "sender":
        if buffers is not None:
            raise InvalidArgumentError(
                "buffers: the sender end writes into the receiver's; it takes none"
            )
        return MooncakeSenderEnd(**ends)
    raise InvalidArgumentError(f"role must be 'receiver' or 'sender', not {role!r}")


__all__ = [
    "INSTALL_HINT",
    "HelloRefused",
    "MooncakeEnd",
    "MooncakeReceiverEnd",
    "MooncakeSenderEnd",
    "MooncakeTransport",
    "load_mooncake",
    "wire_rid",
]
