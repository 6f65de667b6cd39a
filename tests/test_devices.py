"""The buffers and the protocol on every device this machine has: CPU always, CUDA when
present, so the README's test command checks the CUDA path on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    EmbeddingTensors,
    InvalidArgumentError,
    UseAfterFreeError,
)
from resumekit.allocator.buffers import default_device
from resumekit.sim.simulate import random_source, simulate
from resumekit.transports.inprocess import Loopback

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def test_the_default_device_is_cuda_when_present() -> None:
    assert default_device().type == DEVICES[-1]


@pytest.mark.parametrize("n", [1, 5, 16, 37, 64])
def test_a_round_trip_through_scattered_blocks(device: torch.device, n: int) -> None:
    allocator = BlockAllocator(32, 8, reuse="fifo")
    buffers = BlockBuffers(allocator, 16, device=device)
    spacer = [allocator.allocate(8, "spacer") for _ in range(3)]
    allocator.free(spacer[1])  # a hole, so the allocation's blocks are not adjacent
    allocation = allocator.allocate(n, "r")
    assert allocation is not None
    src = random_source(n, 16, seed=n, device=device)
    assert buffers.write(allocation, src.embeddings, src.fill_ids, src.mrope, aux=[n, 7]) == n
    out = buffers.new_output(n + 3)
    assert out.embeddings.device.type == device.type
    buffers.read_into(allocation, n, out, 3)
    assert out.narrow(3, n).equal(src)
    assert buffers.read_aux(allocation)[:2] == (n, 7)
    allocator.free(allocation)
    with pytest.raises(UseAfterFreeError):
        buffers.read_into(allocation, n, out, 3)


def test_a_source_on_another_device_is_refused(device: torch.device) -> None:
    allocator = BlockAllocator(4, 8)
    buffers = BlockBuffers(allocator, 16, device=device)
    allocation = allocator.allocate(8, "r")
    assert allocation is not None
    other = "meta" if device.type == "cpu" else "cpu"
    src = random_source(8, 16)
    with pytest.raises(InvalidArgumentError, match="is on"):
        buffers.write(
            allocation, src.embeddings.to(other), src.fill_ids.to(other), src.mrope.to(other)
        )


def test_concurrent_transfers_land_intact(device: torch.device) -> None:
    pair = Loopback(pool_blocks=96, block_size=128, hidden=32, device=device)
    for i, tokens in enumerate([100, 9_000, 20_000, 8_192]):
        pair.add(f"r{i}", tokens, seed=i)
    pair.run(400)
    for rid, source in pair.sources.items():
        result = pair.receiver.take(rid)
        assert result.ok and isinstance(result.output, EmbeddingTensors)
        assert result.output.embeddings.device.type == device.type
        assert result.output.equal(source)
    pair.receiver.check_quiescent()


def test_simulate_runs_on_the_device(device: torch.device) -> None:
    report = simulate(30_000, max_round_tokens=8192, device=device)
    assert report.state == "Success" and report.intact and report.leaked_blocks == 0
    assert report.resumes == 3
