"""How :class:`~resumekit.transports.mooncake.MooncakeTransport`'s JSON control messages are read.

A message is an envelope (its kind ``t`` and, for a message about a round,
``rid``, ``inc``, ``epoch``) and a body. An envelope this end cannot read means
the link itself is broken: :class:`MalformedMessage`, and the transport
declares the peer lost. A body travels as it came, never coerced (no ``2.7`` read
as 2, no ``"no"`` as true), into the message the driver checks as it checks any
in-process one: a malformed body fails at most the request it names. A hello the
sender will not serve is answered ``refused``, which the receiver reads as
:class:`HelloRefused`.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any, Final, NamedTuple

import torch

from resumekit.allocator.buffers import MROPE_ROWS
from resumekit.errors import InvalidArgumentError, TransportError
from resumekit.protocol.messages import Cancel, Cancelled, Landed, RoundPost, SenderError

VERSION: Final = 1  # the control protocol's; a hello without ``v`` is of version 1
MAX_RID_CHARS: Final = 1024
MAX_REASON_BYTES: Final = 4096  # a refusal's reason is cut to this many bytes of UTF-8
MAX_AUX: Final = 1 << 16  # the most values an aux row may hold (as the constructors allow)
ADDRESSES_PER_BLOCK: Final = 3 + MROPE_ROWS  # embeddings, fill ids, mRoPE rows, aux row
_INT64: Final = 1 << 63
_UINT64: Final = 1 << 64

Key = tuple[Hashable, int, int]  # (rid, incarnation, epoch)


class MalformedMessage(TransportError):
    """A control message whose envelope this end cannot read: the link is broken."""


class HelloRefused(TransportError):
    """(receiver) The sender refused this end's hello; ``reason`` is the sender's why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the sender refused this receiver's hello: {reason}")
        self.reason = reason


def cut_reason(reason: str) -> str:
    """``reason`` cut to :data:`MAX_REASON_BYTES` of UTF-8 (never empty), as it travels."""
    return reason.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore") or "?"


def wire_rid(rid: object) -> int | str:
    """``rid`` as it travels in JSON: an int64 or a str, or the error that names it."""
    if type(rid) is int and -_INT64 <= rid < _INT64:
        return rid
    if type(rid) is str and len(rid) <= MAX_RID_CHARS:
        return rid
    raise InvalidArgumentError(
        f"rid must be an int64 or a str of at most {MAX_RID_CHARS} characters over "
        f"MooncakeTransport, not {rid!r}"
    )


def read(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, which names its kind in ``t``."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as error:  # not UTF-8 or JSON, or nested too deep
        raise MalformedMessage(f"not JSON ({type(error).__name__})") from None
    if type(message) is not dict or type(message.get("t")) is not str:
        raise MalformedMessage("not a JSON object with a kind 't'")
    return message


def _field(m: dict[str, Any], name: str) -> Any:
    try:
        return m[name]
    except KeyError:
        raise MalformedMessage(f"{m['t']!r} without {name!r}") from None


def key(m: dict[str, Any]) -> tuple[int | str, int, int]:
    """The envelope of a message about a round: (rid, incarnation, epoch)."""
    rid, inc, epoch = _field(m, "rid"), _field(m, "inc"), _field(m, "epoch")
    try:
        wire_rid(rid)
    except InvalidArgumentError as error:
        raise MalformedMessage(f"{m['t']!r}: {error}") from None
    if type(inc) is not int or type(epoch) is not int:
        raise MalformedMessage(f"{m['t']!r}: inc and epoch must be ints")
    return rid, inc, epoch


class Hello(NamedTuple):
    """(sender) The receiver's engine session, where every round is written, and what
    one token's embedding is in its blocks: a source must match it byte for byte."""

    session: str
    hidden: int
    dtype: torch.dtype
    aux: int  # the values in a block's aux row


def hello(m: dict[str, Any]) -> Hello:
    """(sender) A receiver's first message, of this protocol version (``v``, absent: 1)."""
    version = m.get("v", VERSION)
    if type(version) is not int:
        raise MalformedMessage("'hello': v must be an int, the protocol version")
    if version != VERSION:
        raise MalformedMessage(f"'hello': protocol version {version}; this sender speaks {VERSION}")
    session, hidden, dtype = _field(m, "session"), _field(m, "hidden"), _field(m, "dtype")
    aux = _field(m, "aux")
    if type(session) is not str or not session:
        raise MalformedMessage("'hello': session must be a non-empty str")
    if type(hidden) is not int or hidden < 1:
        raise MalformedMessage("'hello': hidden must be a positive int")
    named = getattr(torch, dtype, None) if type(dtype) is str else None
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise MalformedMessage("'hello': dtype must name a floating torch dtype")
    if type(aux) is not int or not 2 <= aux <= MAX_AUX:
        raise MalformedMessage(f"'hello': aux must be an int from 2 to {MAX_AUX}")
    return Hello(session, hidden, named, aux)


def reply(m: dict[str, Any]) -> str | None:
    """(sender) Where a hello says its receiver listens (``reply``), to answer a refusal."""
    to = m.get("reply")
    return to if type(to) is str else None


def refused(m: dict[str, Any]) -> HelloRefused:
    """(receiver) The sender's answer to a hello it will not serve: why, as an error."""
    reason = _field(m, "reason")
    if type(reason) is not str:
        raise MalformedMessage("'refused': reason must be a str")
    return HelloRefused(cut_reason(reason))


def hi(m: dict[str, Any]) -> str:
    """(receiver) A sender's answer to the hello: the engine session it writes to."""
    to = _field(m, "to")
    if type(to) is not str or not to:
        raise MalformedMessage("'hi': to must be a non-empty str")
    return to


def dtype_name(dtype: torch.dtype) -> str:
    """How ``dtype`` travels in a hello: ``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def status(m: dict[str, Any]) -> Landed | Cancelled | SenderError:
    """(receiver) A round's status; its body is checked by the receiver, per request."""
    kind = m["t"]
    if kind not in ("landed", "cancelled", "error"):
        raise MalformedMessage(f"unknown message {kind!r}")
    rid, inc, epoch = key(m)
    if kind == "landed":
        tokens, total, final = _field(m, "tokens"), _field(m, "total"), _field(m, "final")
        return Landed(rid, epoch, tokens, total, final, incarnation=inc)
    if kind == "cancelled":
        return Cancelled(rid, epoch, incarnation=inc)
    return SenderError(rid, epoch, _field(m, "reason"), incarnation=inc)


def cancel(m: dict[str, Any]) -> Cancel:
    """(sender) A cancel."""
    rid, inc, epoch = key(m)
    return Cancel(rid, epoch, incarnation=inc)


def post(m: dict[str, Any]) -> tuple[RoundPost, list[list[int]] | str]:
    """(sender) A post, checked by the sender per request, and where its blocks are:
    ``dst`` per block, or why the addresses cannot be used."""
    rid, inc, epoch = key(m)
    blocks, dst = _field(m, "blocks"), _field(m, "dst")
    if type(blocks) is list:
        blocks = tuple(blocks)  # JSON has no tuples; the items stay as they came
    p = RoundPost(
        rid,
        epoch,
        blocks,
        _field(m, "cap"),
        _field(m, "sent"),
        None,
        _field(m, "expect"),
        incarnation=inc,
    )
    return p, _addresses(dst, blocks)


def _addresses(dst: object, blocks: object) -> list[list[int]] | str:
    """``dst`` if it holds one row of addresses per block, or why not."""
    if type(dst) is not list or type(blocks) is not tuple or len(dst) != len(blocks):
        return "the post's addresses do not match its blocks"
    for row in dst:
        if (
            type(row) is not list
            or len(row) != ADDRESSES_PER_BLOCK
            or not all(type(a) is int and 0 < a < _UINT64 for a in row)
        ):
            return f"each block needs {ADDRESSES_PER_BLOCK} addresses, non-zero uint64s"
    return dst
