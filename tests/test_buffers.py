from __future__ import annotations

import pytest
import torch

from resumekit import (
    BlockAllocator,
    BlockBuffers,
    EmbeddingTensors,
    ForeignAllocationError,
    InvalidArgumentError,
    UseAfterFreeError,
)
from resumekit.allocator import Allocation
from resumekit.properties.draws import forged_tensors

HIDDEN = 8


def source(n: int, *, hidden: int = HIDDEN, seed: int = 0) -> EmbeddingTensors:
    g = torch.Generator().manual_seed(seed)
    return EmbeddingTensors(
        torch.randn(n, hidden, generator=g).to(torch.bfloat16),
        torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32),
        torch.randint(0, 1 << 20, (3, n), generator=g, dtype=torch.int32),
    )


def write(buf: BlockBuffers, a: Allocation, src: EmbeddingTensors, **kw: object) -> int:
    return buf.write(a, src.embeddings, src.fill_ids, src.mrope, **kw)  # type: ignore[arg-type]


def snapshot(buf: BlockBuffers) -> list[torch.Tensor]:
    return [t.clone() for t in (buf.embeddings, buf.fill_ids, buf.mrope, buf.aux)]


def assert_same(buf: BlockBuffers, before: list[torch.Tensor]) -> None:
    after = [buf.embeddings, buf.fill_ids, buf.mrope, buf.aux]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


@pytest.fixture
def buf() -> BlockBuffers:
    return BlockBuffers(BlockAllocator(16, 4), HIDDEN, device="cpu")


def test_defaults(buf: BlockBuffers) -> None:
    assert buf.dtype == torch.bfloat16
    assert buf.embeddings.shape == (16, 4, HIDDEN)
    assert buf.fill_ids.dtype == torch.int32 and buf.fill_ids.shape == (16, 4)
    assert buf.mrope.shape == (3, 16, 4) and buf.mrope.dtype == torch.int32
    assert buf.aux.shape == (16, 16) and buf.aux.dtype == torch.int32
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert BlockBuffers(BlockAllocator(2, 2), 4).device.type == expected


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 13, 16])
def test_round_trip_in_scattered_blocks(n: int) -> None:
    alloc = BlockAllocator(16, 4, reuse="fifo")
    buf = BlockBuffers(alloc, HIDDEN, device="cpu")
    # Fragment the pool so the allocation's blocks are out of order.
    parts = [alloc.allocate(4, i) for i in range(16)]
    for p in parts[::3] + parts[1::3] + parts[2::3]:
        assert p is not None
        alloc.free(p)
    a = alloc.allocate(n, "r")
    assert a is not None
    first = a.blocks[0]
    assert len(a.blocks) == 1 or a.blocks != tuple(range(first, first + len(a.blocks)))
    src = source(n)
    assert write(buf, a, src) == n
    out = buf.new_output(n + 10)
    out.embeddings.zero_()
    out.fill_ids.zero_()
    out.mrope.zero_()
    buf.read_into(a, n, out, 7)
    assert out.narrow(7, n).equal(src)
    assert torch.count_nonzero(out.fill_ids[:7]) == 0
    assert torch.count_nonzero(out.mrope[:, 7 + n :]) == 0


def test_write_accepts_strided_sources(buf: BlockBuffers) -> None:
    src = source(11)
    strided = EmbeddingTensors(
        src.embeddings.t().contiguous().t(),
        torch.stack([src.fill_ids, src.fill_ids], 1)[:, 0],
        src.mrope.t().contiguous().t(),
    )
    assert not strided.fill_ids.is_contiguous() and not strided.mrope.is_contiguous()
    a = buf.allocator.allocate(11, "r")
    assert a is not None
    write(buf, a, strided)
    out = buf.new_output(11)
    buf.read_into(a, 11, out, 0)
    assert out.equal(src)


def test_read_into_writes_in_place(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(16, "r")
    assert a is not None
    write(buf, a, source(16))
    out = buf.new_output(16)
    ptrs = [t.data_ptr() for t in (out.embeddings, out.fill_ids, out.mrope)]
    buf.read_into(a, 16, out, 0)
    assert ptrs == [t.data_ptr() for t in (out.embeddings, out.fill_ids, out.mrope)]


def test_partial_reads_assemble_at_offsets(buf: BlockBuffers) -> None:
    src = source(21)
    out = buf.new_output(21)
    sent = 0
    for n in (8, 8, 5):
        a = buf.allocator.allocate(n, "r")
        assert a is not None
        write(buf, a, src.narrow(sent, n))
        buf.read_into(a, n, out, sent)
        buf.allocator.free(a)
        sent += n
    assert out.equal(src)


def test_aux_written_with_first_round_and_zeroed_otherwise(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(8, "r")
    assert a is not None
    write(buf, a, source(8), aux=[50_000, -7])
    aux = buf.read_aux(a)
    assert aux[:3] == (50_000, -7, 0) and len(aux) == 16
    buf.allocator.free(a)
    b = buf.allocator.allocate(8, "r")  # the same blocks (LIFO)
    assert b is not None and b.blocks == a.blocks
    write(buf, b, source(8))
    assert buf.read_aux(b) == (0,) * 16
    write(buf, b, source(8), aux=torch.tensor([3], dtype=torch.int32))
    assert buf.read_aux(b)[0] == 3


def test_read_aux_is_a_copy(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(4, "r")
    assert a is not None
    write(buf, a, source(4), aux=[9])
    aux = buf.read_aux(a)
    buf.aux.zero_()
    assert aux[0] == 9


def test_use_after_free_is_refused(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(8, "r")
    assert a is not None
    buf.allocator.free(a)
    before = snapshot(buf)
    with pytest.raises(UseAfterFreeError):
        write(buf, a, source(8))
    with pytest.raises(UseAfterFreeError):
        buf.read_into(a, 8, buf.new_output(8), 0)
    with pytest.raises(UseAfterFreeError):
        buf.read_aux(a)
    assert_same(buf, before)


def test_foreign_allocation_is_refused(buf: BlockBuffers) -> None:
    other = BlockAllocator(16, 4)
    a = other.allocate(4, "r")
    assert a is not None
    before = snapshot(buf)
    with pytest.raises(ForeignAllocationError):
        write(buf, a, source(4))
    with pytest.raises(ForeignAllocationError):
        buf.read_into(a, 4, buf.new_output(4), 0)
    assert_same(buf, before)


def bad_sources() -> list[tuple[str, EmbeddingTensors]]:
    good = source(6)
    return [
        ("too many tokens", source(9)),
        ("empty", source(0)),
        ("hidden", source(6, hidden=HIDDEN + 1)),
        ("dtype", forged_tensors(good.embeddings.float(), good.fill_ids, good.mrope)),
        ("fill dtype", forged_tensors(good.embeddings, good.fill_ids.long(), good.mrope)),
        ("fill length", forged_tensors(good.embeddings, good.fill_ids[:5], good.mrope)),
        ("mrope rows", forged_tensors(good.embeddings, good.fill_ids, good.mrope[:2])),
        ("mrope dtype", forged_tensors(good.embeddings, good.fill_ids, good.mrope.long())),
        ("1-D embeddings", forged_tensors(good.fill_ids.bfloat16(), good.fill_ids, good.mrope)),
        (
            "device",
            forged_tensors(good.embeddings.to("meta"), good.fill_ids, good.mrope),
        ),
    ]


@pytest.mark.parametrize(("why", "bad"), bad_sources(), ids=[w for w, _ in bad_sources()])
def test_write_validates_and_changes_nothing(
    buf: BlockBuffers, why: str, bad: EmbeddingTensors
) -> None:
    a = buf.allocator.allocate(8, "r")
    assert a is not None
    write(buf, a, source(8), aux=[1, 2])
    before = snapshot(buf)
    with pytest.raises(InvalidArgumentError):
        write(buf, a, bad)
    assert_same(buf, before)


@pytest.mark.parametrize("aux", [[1] * 17, [], [2**31], ["x"], torch.tensor([1.0])])
def test_write_validates_aux(buf: BlockBuffers, aux: object) -> None:
    a = buf.allocator.allocate(4, "r")
    assert a is not None
    before = snapshot(buf)
    with pytest.raises(InvalidArgumentError):
        write(buf, a, source(4), aux=aux)
    assert_same(buf, before)


def test_write_rejects_non_tensors(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(4, "r")
    assert a is not None
    src = source(4)
    with pytest.raises(InvalidArgumentError):
        buf.write(a, [[0.0] * HIDDEN] * 4, src.fill_ids, src.mrope)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        buf.write(a, src.embeddings, [0] * 4, src.mrope)  # type: ignore[arg-type]


def test_read_into_validates(buf: BlockBuffers) -> None:
    a = buf.allocator.allocate(8, "r")
    assert a is not None
    write(buf, a, source(8))
    out = buf.new_output(10)
    sentinel = out.embeddings.clone()
    cases: list[tuple[object, object, object]] = [
        (0, out, 0),
        (9, buf.new_output(20), 0),  # beyond capacity
        (8, out, 3),  # beyond the destination
        (8, out, -1),
        (True, out, 0),
        (8, "out", 0),
        (4, EmbeddingTensors.empty(10, HIDDEN + 1), 0),
        (4, EmbeddingTensors.empty(10, HIDDEN, dtype=torch.float16), 0),
        (4, forged_tensors(out.embeddings, out.fill_ids[:9], out.mrope), 0),
        (4, forged_tensors(out.embeddings, out.fill_ids, out.mrope.long()), 0),
        (
            4,
            EmbeddingTensors(out.embeddings.t().contiguous().t(), out.fill_ids, out.mrope),
            0,
        ),
    ]
    for n, dest, offset in cases:
        with pytest.raises(InvalidArgumentError):
            buf.read_into(a, n, dest, offset)  # type: ignore[arg-type]
    assert torch.equal(out.embeddings, sentinel) or torch.isnan(sentinel).any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hidden_size": 0},
        {"hidden_size": 4, "dtype": torch.int32},
        {"hidden_size": 4, "aux_size": 1},
        {"hidden_size": 4, "device": "nonsense"},
    ],
)
def test_constructor_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        BlockBuffers(BlockAllocator(2, 2), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        BlockBuffers("allocator", 4)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        BlockBuffers(BlockAllocator(2, 2), 4, device="cuda")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": torch.float8_e4m3fn, "device": "cpu"}, "cannot be copied on cpu"),
        ({"device": "meta"}, "meta"),
    ],
)
def test_buffers_that_could_not_copy_are_refused_when_built(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        BlockBuffers(BlockAllocator(2, 2), 4, **kwargs)  # type: ignore[arg-type]


def test_tensors_that_require_grad_are_refused_and_leave_the_pool_usable(
    buf: BlockBuffers,
) -> None:
    src = source(6)
    grad = src.embeddings.float().to(torch.bfloat16).requires_grad_()
    a = buf.allocator.allocate(8, "a")
    assert a is not None
    before = snapshot(buf)
    with pytest.raises(InvalidArgumentError, match="require grad"):
        buf.write(a, grad, src.fill_ids, src.mrope)
    assert_same(buf, before)
    write(buf, a, src)
    out = buf.new_output(6)
    with pytest.raises(InvalidArgumentError, match="require grad"):
        buf.read_into(
            a, 6, forged_tensors(out.embeddings.requires_grad_(), out.fill_ids, out.mrope), 0
        )
    out = buf.new_output(6)
    buf.read_into(a, 6, out, 0)
    assert out.equal(src)
    assert not buf.embeddings.requires_grad


def test_a_landed_round_forwarded_from_the_pool_is_a_typed_error(buf: BlockBuffers) -> None:
    a, b = buf.allocator.allocate(8, "a"), buf.allocator.allocate(8, "b")
    assert a is not None and b is not None
    write(buf, a, source(8))
    first = a.blocks[0]
    view = buf.embeddings[first], buf.fill_ids[first], buf.mrope[:, first]
    before = snapshot(buf)
    with pytest.raises(InvalidArgumentError, match="view of these buffers"):
        buf.write(b, *view)
    assert_same(buf, before)
    buf.write(b, *(t.clone() for t in view))
