"""Ends that fail on purpose inside a round, for the two-process fault runs
(:class:`~resumekit.sim.twoprocess.PairConfig`'s ``fault_round`` and ``fault``)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from typing import Any

from resumekit.allocator import BlockBuffers, EmbeddingTensors
from resumekit.protocol import RoundPost
from resumekit.transports.inprocess import InProcessTransport
from resumekit.transports.mooncake import MooncakeSenderEnd
from resumekit.transports.mooncake.sender import _runs
from resumekit.transports.torch import TorchEnd, TorchSenderEnd
from resumekit.transports.torch.wire import DATA, TAG_DATA, TAG_TO_RECEIVER

IDLE_SLEEP = 0.0002  # seconds a drain loop yields (gloo's threads need CPU)


class _FailingInProcess(InProcessTransport):
    """Kills the sender inside round ``fault_round`` (from 1), before it reports."""

    def __init__(self, buffers: BlockBuffers, fault_round: int | None) -> None:
        super().__init__(buffers)
        self.fault_round = fault_round
        self.rounds_written = 0

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        self.rounds_written += 1
        if self.rounds_written == self.fault_round:
            self.crash_sender("sender killed mid-round")
            return
        super().write_round(post, data, aux)


class _FailingSenderTransport(TorchSenderEnd):
    """Fails inside round ``fault_round`` after the header and half the payload: it kills
    its process (``die``) or stays alive and silent (``hang``)."""

    def __init__(self, *args: Any, fault_round: int, fault: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault_round = fault_round
        self.fault = fault
        self.rounds_written = 0

    def write_round(self, post: RoundPost, data: EmbeddingTensors, aux: Any) -> None:
        self.rounds_written += 1
        if self.rounds_written != self.fault_round:
            super().write_round(post, data, aux)
            return
        assert isinstance(post.rid, int)
        half = data.narrow(0, max(1, data.num_tokens // 2))
        inc = post.incarnation
        tag = self._tags.pop((post.rid, inc, post.epoch), TAG_DATA)
        self._send_header(TAG_TO_RECEIVER, DATA, post.rid, inc, post.epoch, data.num_tokens, tag)
        # Half of the first piece: the receive into the blocks can never complete.
        self._send(half.embeddings.contiguous(), tag, self.data_group)
        _drain(self, time.monotonic() + 1.0)
        if self.fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        self.finished = True  # hang: serve nothing more, keep the connection open


class _FailingMooncakeSender(MooncakeSenderEnd):
    """Fails inside round ``fault_round`` after writing half of its first piece: it kills
    its process (``die``) or stays alive and silent (``hang``)."""

    def __init__(self, *args: Any, fault_round: int, fault: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault_round = fault_round
        self.fault = fault
        self.rounds_written = 0

    def write_round(self, post: RoundPost, data: EmbeddingTensors, aux: Any) -> None:
        self.rounds_written += 1
        if self.rounds_written != self.fault_round:
            super().write_round(post, data, aux)
            return
        key = (post.rid, post.incarnation, post.epoch)
        dst = self._dst.get(key)
        if not isinstance(dst, list) or not dst:  # never posted, or unusable: refused as usual
            super().write_round(post, data, aux)
            return
        del self._dst[key]
        # Half of the embeddings' first run of blocks, where a write cut short stops: a
        # contiguous half of the whole round from the first block's address would run
        # past that run into blocks of other rounds (seen as another request's bytes).
        sources, targets = _runs(data, dst, data.num_tokens, post.capacity_tokens // len(dst))
        first = sources[0]
        half = first[: max(1, first.shape[0] // 2)].contiguous()
        assert self._hello is not None
        self.engine.batch_transfer_sync_write(
            self._hello.session,
            [half.data_ptr()],
            [targets[0]],
            [half.numel() * half.element_size()],
        )
        if self.fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        self.finished = True  # hang: serve nothing more, keep the connection open


def _drain(transport: TorchEnd, until: float) -> None:
    while transport.pending_sends() and time.monotonic() < until:
        time.sleep(IDLE_SLEEP)
