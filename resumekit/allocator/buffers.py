"""Torch storage addressed by block: where each transfer round lands.

Per block: ``block_size`` rows of embeddings, ``fill_ids``, three rows of mRoPE
positions and a small aux row (aux[0] = total tokens, aux[1] = mRoPE position
delta, written with the first round only; later rounds zero it). Full blocks move with one
``index_select``/``index_copy_`` per tensor, so each token is copied exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from resumekit._check import as_int
from resumekit.allocator.block_allocator import MAX_BLOCK_SIZE, Allocation, BlockAllocator
from resumekit.errors import CapacityExceededError, DeviceMemoryError, InvalidArgumentError

MROPE_ROWS = 3
DEFAULT_AUX_SIZE = 16
AUX_TOTAL_TOKENS = 0
AUX_MROPE_DELTA = 1


def default_device() -> torch.device:
    """CUDA (the current device) when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _normalize_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "meta":
        raise InvalidArgumentError(
            "device 'meta' holds no data; landed embeddings could not be read"
        )
    return dev


def _check_copyable(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot copy the way the pool does (float8 on CPU), so it
    fails when the buffers are built instead of in the first transfer with blocks held."""
    try:
        pool = torch.zeros((2, 1, 1), dtype=dtype, device=device)
        row = torch.zeros((1, 1, 1), dtype=dtype, device=device)
        idx = torch.zeros((1,), dtype=torch.long, device=device)
        pool.index_copy_(0, idx, row)
        torch.index_select(pool, 0, idx, out=row)
        pool[0].copy_(row[0])
    except (NotImplementedError, RuntimeError) as exc:
        raise InvalidArgumentError(
            f"dtype {dtype} cannot be copied on {device} ({str(exc).splitlines()[0]})"
        ) from None


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical memory for CPU); ``None`` where unknown."""
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def _zeros(
    shapes: Sequence[tuple[tuple[int, ...], torch.dtype]],
    device: torch.device,
    what: str,
    *,
    fill: bool = True,
) -> list[torch.Tensor]:
    """Tensors of ``shapes``, refused up front with the size in bytes when ``device`` is smaller."""
    needed = 0
    for shape, dtype in shapes:
        count = 1
        for d in shape:
            count *= d
        needed += count * dtype.itemsize
    total = device_memory_bytes(device)
    if total is not None and needed > total:
        raise CapacityExceededError(f"{what} need {needed:,} bytes; {device} has {total:,} in all")
    make = torch.zeros if fill else torch.empty
    try:
        return [make(shape, dtype=dtype, device=device) for shape, dtype in shapes]
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc):
            raise
        raise DeviceMemoryError(
            f"{what} need {needed:,} bytes that {device} could not provide now: {exc}"
        ) from None


_GRAD = (
    "tensors that require grad cannot go through the pool (the copy would join the autograd "
    "graph); pass .detach() or build them under torch.inference_mode()"
)


def _check_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class EmbeddingTensors:
    """One embedding's tensors: ``embeddings`` (n, hidden), ``fill_ids`` (n,), ``mrope`` (3, n).

    Checked when built: embeddings floating point, fill ids and mRoPE positions
    int32, one token count and one device, so a bad source fails where it is made.
    """

    embeddings: torch.Tensor
    fill_ids: torch.Tensor
    mrope: torch.Tensor

    def __post_init__(self) -> None:
        emb, fill, mrope = self.embeddings, self.fill_ids, self.mrope
        for name, t in (("embeddings", emb), ("fill_ids", fill), ("mrope", mrope)):
            if not isinstance(t, torch.Tensor):
                raise InvalidArgumentError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
        if emb.dim() != 2:
            raise InvalidArgumentError(
                f"embeddings must be 2-D (tokens, hidden), got shape {tuple(emb.shape)}"
            )
        n = int(emb.shape[0])
        if tuple(fill.shape) != (n,):
            raise InvalidArgumentError(
                f"fill_ids must have shape ({n},) like embeddings' {n} tokens, "
                f"got {tuple(fill.shape)}"
            )
        if tuple(mrope.shape) != (MROPE_ROWS, n):
            raise InvalidArgumentError(
                f"mrope must have shape ({MROPE_ROWS}, {n}) (rows first), got {tuple(mrope.shape)}"
            )
        if not emb.dtype.is_floating_point:
            raise InvalidArgumentError(f"embeddings must be floating point, not {emb.dtype}")
        for name, t in (("fill_ids", fill), ("mrope", mrope)):
            if t.dtype != torch.int32:
                raise InvalidArgumentError(f"{name} must be torch.int32, not {t.dtype}")
        if not emb.device == fill.device == mrope.device:
            raise InvalidArgumentError(
                f"embeddings, fill_ids and mrope are on {emb.device}, {fill.device} and "
                f"{mrope.device}; they must share one device"
            )

    @classmethod
    def _trusted(
        cls, embeddings: torch.Tensor, fill_ids: torch.Tensor, mrope: torch.Tensor
    ) -> EmbeddingTensors:
        """Views of checked tensors, built without checking them again."""
        self = object.__new__(cls)
        object.__setattr__(self, "embeddings", embeddings)
        object.__setattr__(self, "fill_ids", fill_ids)
        object.__setattr__(self, "mrope", mrope)
        return self

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def empty(
        cls,
        num_tokens: int,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> EmbeddingTensors:
        """Uninitialised, contiguous tensors for ``num_tokens`` tokens."""
        n = as_int(num_tokens, "num_tokens", minimum=0)
        hidden = as_int(hidden_size, "hidden_size", minimum=1)
        dtype = _check_dtype(dtype)
        dev = _normalize_device(device)
        emb, fill, mrope = _zeros(
            [((n, hidden), dtype), ((n,), torch.int32), ((MROPE_ROWS, n), torch.int32)],
            dev,
            f"{n:,} tokens of hidden_size {hidden:,}",
            fill=False,
        )
        return cls._trusted(emb, fill, mrope)

    @classmethod
    def random(
        cls,
        num_tokens: int,
        hidden_size: int,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> EmbeddingTensors:
        """A reproducible bf16 embedding with random fill ids and mRoPE positions per token,
        drawn on the CPU (the same values for a seed on every device), then moved."""
        n = as_int(num_tokens, "num_tokens", minimum=0, maximum=MAX_BLOCK_SIZE)
        hidden = as_int(hidden_size, "hidden_size", minimum=1, maximum=MAX_BLOCK_SIZE)
        g = torch.Generator().manual_seed(as_int(seed, "seed", minimum=-(2**63), maximum=2**64 - 1))
        dev = _normalize_device(device)
        needed = n * hidden * 6 + n * 16  # the float32 draw and its bf16 copy, the id rows
        total = device_memory_bytes(torch.device("cpu"))
        if total is not None and needed > total:
            raise CapacityExceededError(
                f"a random {n}-token embedding of width {hidden} needs {needed:,} bytes; "
                f"the host has {total:,} in all"
            )
        return cls(
            torch.randn(n, hidden, generator=g).to(torch.bfloat16).to(dev),
            torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int32).to(dev),
            torch.randint(0, 2**31 - 1, (3, n), generator=g, dtype=torch.int32).to(dev),
        )

    def narrow(self, start: int, length: int) -> EmbeddingTensors:
        """Views of tokens ``[start, start + length)``, which must lie inside these tensors."""
        n = self.num_tokens
        start = as_int(start, "start", minimum=0, maximum=n)
        length = as_int(length, "length", minimum=0, maximum=n - start)
        return EmbeddingTensors._trusted(
            self.embeddings[start : start + length],
            self.fill_ids[start : start + length],
            self.mrope[:, start : start + length],
        )

    def equal(self, other: EmbeddingTensors) -> bool:
        """Bitwise equality of all three tensors."""
        if not isinstance(other, EmbeddingTensors):
            raise InvalidArgumentError(
                f"other must be an EmbeddingTensors, not {type(other).__name__}"
            )
        return (
            torch.equal(self.embeddings, other.embeddings)
            and torch.equal(self.fill_ids, other.fill_ids)
            and torch.equal(self.mrope, other.mrope)
        )


class BlockBuffers:
    """Block-addressed landing storage for one :class:`BlockAllocator`.

    ``write`` is the sender's side, ``read_into`` the receiver's; both refuse an
    allocation that is not live in the allocator, so nothing reads or writes
    through freed blocks.
    """

    def __init__(
        self,
        allocator: BlockAllocator,
        hidden_size: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        aux_size: int = DEFAULT_AUX_SIZE,
    ) -> None:
        if not isinstance(allocator, BlockAllocator):
            raise InvalidArgumentError(
                f"allocator must be a BlockAllocator, not {type(allocator).__name__}"
            )
        hidden_size = as_int(hidden_size, "hidden_size", minimum=1)
        aux_size = as_int(aux_size, "aux_size", minimum=2)
        dtype = _check_dtype(dtype)
        dev = _normalize_device(device)
        _check_copyable(dtype, dev)
        nb, bs = allocator.num_blocks, allocator.block_size
        # Rows first for mrope, so a run of blocks is a (3, k, bs) view of a (3, k*bs) slice.
        embeddings, fill_ids, mrope, aux = _zeros(
            [
                ((nb, bs, hidden_size), dtype),
                ((nb, bs), torch.int32),
                ((MROPE_ROWS, nb, bs), torch.int32),
                ((nb, aux_size), torch.int32),
            ],
            dev,
            f"{nb:,} blocks of {bs:,} tokens of hidden_size {hidden_size:,} "
            f"and aux_size {aux_size:,}",
        )
        self.allocator = allocator
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = dev
        self.block_size = bs
        self.num_blocks = nb
        self.aux_size = aux_size
        self.embeddings = embeddings
        self.fill_ids = fill_ids
        self.mrope = mrope
        self.aux = aux

    def new_output(self, num_tokens: int) -> EmbeddingTensors:
        """Destination tensors for ``num_tokens`` tokens, matching these buffers."""
        return EmbeddingTensors.empty(
            num_tokens, self.hidden_size, dtype=self.dtype, device=self.device
        )

    # -- sender side ---------------------------------------------------------

    def write(
        self,
        allocation: Allocation,
        embeddings: torch.Tensor,
        fill_ids: torch.Tensor,
        mrope: torch.Tensor,
        *,
        aux: Sequence[int] | torch.Tensor | None = None,
    ) -> int:
        """Scatter ``n = embeddings.shape[0]`` tokens into ``allocation``'s blocks; returns n.

        ``aux`` goes to the first block's aux row; without it the row is zeroed,
        so a stale total from an earlier round can never be read back.
        """
        self.allocator.check_live(allocation)
        n = self._check_source(allocation, embeddings, fill_ids, mrope)
        aux_row = self._check_aux(aux)
        blocks = allocation.blocks
        bs = self.block_size
        full, tail = divmod(n, bs)
        if full:
            k = full * bs
            # Splitting one dimension is always a view, whatever the source's strides.
            idx = torch.tensor(blocks[:full], dtype=torch.long, device=self.device)
            self.embeddings.index_copy_(0, idx, embeddings[:k].view(full, bs, self.hidden_size))
            self.fill_ids.index_copy_(0, idx, fill_ids[:k].view(full, bs))
            self.mrope.index_copy_(1, idx, mrope[:, :k].view(MROPE_ROWS, full, bs))
        if tail:
            block, start = blocks[full], full * bs
            self.embeddings[block, :tail].copy_(embeddings[start:])
            self.fill_ids[block, :tail].copy_(fill_ids[start:])
            self.mrope[:, block, :tail].copy_(mrope[:, start:])
        row = self.aux[blocks[0]]
        row.zero_()
        if aux_row is not None:
            row[: aux_row.shape[0]].copy_(aux_row)
        return n

    # -- receiver side -------------------------------------------------------

    def read_into(self, allocation: Allocation, n: int, out: EmbeddingTensors, offset: int) -> None:
        """Gather the first ``n`` tokens of ``allocation`` into ``out`` at ``offset``.

        One copy per token straight into the caller's tensors, which must be
        contiguous for that reason; nothing is concatenated or staged.
        """
        self.allocator.check_live(allocation)
        n = as_int(n, "n", minimum=1)
        offset = as_int(offset, "offset", minimum=0)
        if n > allocation.capacity_tokens:
            raise InvalidArgumentError(
                f"n={n} exceeds the allocation's capacity of {allocation.capacity_tokens} tokens"
            )
        total = self._check_out(out)
        if offset + n > total:
            raise InvalidArgumentError(
                f"offset {offset} + n {n} exceeds the destination's {total} tokens"
            )
        blocks = allocation.blocks
        bs = self.block_size
        full, tail = divmod(n, bs)
        if full:
            k = full * bs
            idx = torch.tensor(blocks[:full], dtype=torch.long, device=self.device)
            emb = out.embeddings[offset : offset + k].view(full, bs, self.hidden_size)
            torch.index_select(self.embeddings, 0, idx, out=emb)
            fill = out.fill_ids[offset : offset + k].view(full, bs)
            torch.index_select(self.fill_ids, 0, idx, out=fill)
            mrope = out.mrope[:, offset : offset + k].view(MROPE_ROWS, full, bs)
            torch.index_select(self.mrope, 1, idx, out=mrope)
        if tail:
            block, start = blocks[full], offset + full * bs
            out.embeddings[start : start + tail].copy_(self.embeddings[block, :tail])
            out.fill_ids[start : start + tail].copy_(self.fill_ids[block, :tail])
            out.mrope[:, start : start + tail].copy_(self.mrope[:, block, :tail])

    def read_aux(self, allocation: Allocation) -> tuple[int, ...]:
        """A copy of the aux row of ``allocation``'s first block (never a view into it)."""
        self.allocator.check_live(allocation)
        return tuple(int(v) for v in self.aux[allocation.blocks[0]].tolist())

    # -- validation ----------------------------------------------------------

    def _check_tensor(
        self, t: object, name: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise InvalidArgumentError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise InvalidArgumentError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != self.device:
            raise InvalidArgumentError(f"{name} is on {t.device}; the buffers are on {self.device}")
        if t.requires_grad:
            raise InvalidArgumentError(f"{name}: {_GRAD}")
        storage = t.untyped_storage().data_ptr()
        if any(storage == p.untyped_storage().data_ptr() for p in self._pool_tensors()):
            raise InvalidArgumentError(
                f"{name} is a view of these buffers; clone() a landed round before passing it on"
            )
        return t

    def _pool_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.embeddings, self.fill_ids, self.mrope, self.aux)

    def _check_source(
        self,
        allocation: Allocation,
        embeddings: torch.Tensor,
        fill_ids: torch.Tensor,
        mrope: torch.Tensor,
    ) -> int:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise InvalidArgumentError("embeddings must be a 2-D torch.Tensor (n, hidden)")
        n = int(embeddings.shape[0])
        if n < 1:
            raise InvalidArgumentError("a write carries at least one token")
        if n > allocation.capacity_tokens:
            raise InvalidArgumentError(
                f"{n} tokens exceed the allocation's capacity of "
                f"{allocation.capacity_tokens} tokens"
            )
        self._check_tensor(embeddings, "embeddings", (n, self.hidden_size), self.dtype)
        self._check_tensor(fill_ids, "fill_ids", (n,), torch.int32)
        self._check_tensor(mrope, "mrope", (MROPE_ROWS, n), torch.int32)
        return n

    def _check_aux(self, aux: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        if aux is None:
            return None
        if isinstance(aux, torch.Tensor):
            if aux.dim() != 1 or aux.dtype != torch.int32:
                raise InvalidArgumentError("aux must be a 1-D int32 tensor or a sequence of ints")
            row = aux.to(self.device)
        elif isinstance(aux, Sequence) and not isinstance(aux, str | bytes):
            values = [as_int(v, "aux value") for v in aux]
            if any(not -(2**31) <= v < 2**31 for v in values):
                raise InvalidArgumentError("aux values must fit in int32")
            row = torch.tensor(values, dtype=torch.int32, device=self.device)
        else:
            raise InvalidArgumentError(
                f"aux must be a 1-D int32 tensor or a sequence of ints, not {type(aux).__name__}"
            )
        if not 1 <= row.shape[0] <= self.aux_size:
            raise InvalidArgumentError(
                f"aux must hold 1 to {self.aux_size} values, got {row.shape[0]}"
            )
        return row

    def _check_out(self, out: EmbeddingTensors) -> int:
        if not isinstance(out, EmbeddingTensors):
            raise InvalidArgumentError(f"out must be an EmbeddingTensors, not {type(out).__name__}")
        total = int(out.embeddings.shape[0]) if isinstance(out.embeddings, torch.Tensor) else -1
        self._check_tensor(out.embeddings, "out.embeddings", (total, self.hidden_size), self.dtype)
        self._check_tensor(out.fill_ids, "out.fill_ids", (total,), torch.int32)
        self._check_tensor(out.mrope, "out.mrope", (MROPE_ROWS, total), torch.int32)
        for name, t in (
            ("embeddings", out.embeddings),
            ("fill_ids", out.fill_ids),
            ("mrope", out.mrope),
        ):
            if not t.is_contiguous():
                raise InvalidArgumentError(f"out.{name} must be contiguous")
        return total
