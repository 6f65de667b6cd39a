"""The wire format of :func:`~resumekit.transports.torch.TorchDistributedTransport`.

Control messages are int64 headers of ``HEADER`` values on two tags; their
trailers (block indices, a refusal's reason) and each round's payload travel on
tags of their own. ``inc`` is the request's incarnation.

- receiver to sender (``TAG_TO_SENDER``): POST ``[1, rid, inc, epoch, sent,
  capacity, n, tag, expect, layout, aux]`` with the ``n`` block indices on
  ``TAG_BLOCKS`` (``layout``: what a token's embedding is in the blocks, see
  :func:`layout`; ``aux``: the values in a block's aux row);
  CANCEL ``[2, rid, inc, epoch]``; CLOSE ``[3]``; PING ``[4]``.
- sender to receiver (``TAG_TO_RECEIVER``): DATA ``[10, rid, inc, epoch, tokens,
  tag]`` announces a round's payload (on the round's own ``tag``: per run of
  blocks the embeddings, fill ids and three mRoPE rows, then the aux row of the
  first block); LANDED ``[11, rid, inc, epoch, tokens, total, final]``;
  CANCELLED ``[12, rid, inc, epoch]``; SENDER_ERROR ``[13, rid, inc, epoch, n]``
  with ``n`` bytes of reason on ``TAG_REASON``; BYE ``[14]`` answers CLOSE; PING ``[4]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Final

import torch

from resumekit.errors import InvalidArgumentError

HEADER: Final = 11
# Headers only on 1 and 2 (so heartbeats may interleave); their trailers on tags of their own.
TAG_TO_SENDER, TAG_TO_RECEIVER, TAG_DATA, TAG_BLOCKS, TAG_REASON = 1, 2, 3, 4, 5
FIRST_ROUND_TAG, ROUND_TAGS = 16, 1 << 30  # each round's payload has a tag of its own
POST, CANCEL, CLOSE, PING = 1, 2, 3, 4
DATA, LANDED, CANCELLED, SENDER_ERROR, BYE = 10, 11, 12, 13, 14
MAX_REASON_BYTES: Final = 4096

Key = tuple[int, int, int]  # (rid, incarnation, epoch): one round of one life
_INT64: Final = 1 << 63


def wire_rid(rid: Hashable) -> int:
    """``rid`` as it travels: an int64, or the error that names it."""
    if type(rid) is not int or not -_INT64 <= rid < _INT64:
        raise InvalidArgumentError(
            f"rid must be an int64 over TorchDistributedTransport, not {rid!r}"
        )
    return rid


# The floating dtypes a layout names, by place (append only: both ends must agree).
_LAYOUT_DTYPES: Final = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
)


def _dtype_code(dtype: torch.dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    return _LAYOUT_DTYPES.index(name) + 1 if name in _LAYOUT_DTYPES else 0


def layout(hidden: int, dtype: torch.dtype) -> int:
    """A token's embedding in the receiver's blocks, as one int64: its hidden size,
    its dtype's width in bytes and the dtype (0 for one not listed)."""
    return hidden << 16 | dtype.itemsize << 8 | _dtype_code(dtype)


def layout_mismatch(value: int, embeddings: torch.Tensor) -> str | None:
    """Why ``embeddings`` (n, hidden) cannot go into blocks of ``layout`` ``value``, or None.

    Sent as they are, they would be misread (another dtype of the same width), or
    overrun the blocks (gloo aborts the receiving process on a longer payload).
    """
    hidden, width, code = value >> 16, value >> 8 & 0xFF, value & 0xFF
    dtype = embeddings.dtype
    if embeddings.shape[1] == hidden and dtype.itemsize == width and _dtype_code(dtype) == code:
        return None
    theirs = (
        _LAYOUT_DTYPES[code - 1] if 0 < code <= len(_LAYOUT_DTYPES) else f"a {width}-byte dtype"
    )
    return (
        f"the source's embeddings are {str(dtype).removeprefix('torch.')} x "
        f"{embeddings.shape[1]}; the receiver's blocks hold {theirs} x {hidden}"
    )


def header(*values: int) -> torch.Tensor:
    """A control header: ``values`` then zeros."""
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return h


def next_round_tag(tag: int) -> int:
    """The payload tag after ``tag``, cycling through ``ROUND_TAGS`` tags."""
    return FIRST_ROUND_TAG + (tag + 1 - FIRST_ROUND_TAG) % ROUND_TAGS


def runs(blocks: Sequence[int], tokens: int, block_size: int) -> list[tuple[int, int]]:
    """``tokens`` tokens laid over ``blocks`` as (first block, tokens) runs of adjacent blocks."""
    out: list[tuple[int, int]] = []
    left = tokens
    for b in blocks:
        if left <= 0:
            break
        n = min(block_size, left)
        if out and out[-1][1] % block_size == 0 and out[-1][0] + out[-1][1] // block_size == b:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((b, n))
        left -= n
    return out


def encode_reason(reason: str) -> bytes:
    """A refusal's reason as it travels: UTF-8, at most ``MAX_REASON_BYTES``, never empty."""
    return reason.encode()[:MAX_REASON_BYTES] or b"?"


def why(error: BaseException) -> str:
    """The first sentence of a gloo error, without its source location."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]
