"""``ResumekitECConnector``: resumekit as a vLLM encoder-cache connector (vLLM 0.34).

vLLM builds one per role (``ECConnectorFactory.create_connector(config, role)``,
``vllm/distributed/ec_transfer/ec_connector/factory.py``): the scheduler role
in the engine core process, the worker role in every worker process. The
language instance (``ec_role="ec_consumer"``) lands items; the encode instance
(``ec_role="ec_producer"``) sends them. Each hook maps onto
:mod:`~resumekit.integrations.vllm.book` (scheduler) or
:mod:`~resumekit.integrations.vllm.rank` (worker); docs/vllm.md says what each
means, hook by hook, with vLLM's lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
    ECConnectorWorkerMetadata,
)

from resumekit.allocator import BlockAllocator, BlockBuffers
from resumekit.errors import IntegrationUnavailableError, InvalidArgumentError
from resumekit.integrations.vllm.book import ConsumerBook, ProducerBook
from resumekit.integrations.vllm.orders import ItemSpec, Orders, RankReport, merge
from resumekit.integrations.vllm.rank import ConsumerRank, EncoderCache, ProducerRank
from resumekit.integrations.vllm.settings import Settings, endpoint_for, read_settings
from resumekit.integrations.vllm.wiring import inprocess_link
from resumekit.protocol import EmbeddingSender, ResumableReceiver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import ECConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("resumekit.integrations.vllm")


@dataclass
class ResumekitECMetadata(ECConnectorMetadata):
    """The scheduler's orders to every worker rank for one step."""

    orders: Orders = field(default_factory=Orders)


@dataclass
class ResumekitWorkerMetadata(ECConnectorWorkerMetadata):
    """One or more ranks' reports; vLLM folds the ranks' with :meth:`aggregate`
    (``ECOutputAggregator``, ``vllm/distributed/ec_transfer/ec_connector/utils.py``)."""

    reports: dict[int, RankReport] = field(default_factory=dict)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        if not isinstance(other, ResumekitWorkerMetadata):
            raise InvalidArgumentError(
                f"cannot aggregate {type(other).__name__} with ResumekitWorkerMetadata"
            )
        return ResumekitWorkerMetadata(merge(self.reports, other.reports))


def transfer_id(request: Any, index: int) -> str | None:
    """The transfer id the proxy gave item ``index`` in ``ec_transfer_params`` (the
    convention vLLM's Mooncake connector reads): the entry at its position unless that
    names another item, else the entry naming its identifier."""
    params = getattr(request, "ec_transfer_params", None) or {}
    entries = params.get("ec_items") or [] if isinstance(params, dict) else []
    identifier = request.mm_features[index].identifier
    if index < len(entries) and isinstance(entries[index], dict):
        entry = entries[index]
        if entry.get("mm_hash") in (None, identifier) and entry.get("transfer_id"):
            return str(entry["transfer_id"])
    for entry in entries:
        if (
            isinstance(entry, dict)
            and entry.get("mm_hash") == identifier
            and entry.get("transfer_id")
        ):
            return str(entry["transfer_id"])
    return None


def item_specs(request: Any) -> tuple[list[ItemSpec], str | None]:
    """A request's items, each named by the transfer id its ``ec_transfer_params`` give it,
    or why they cannot be named (an item without one: the encode side could not tell
    which of its outputs the item is)."""
    specs = []
    for index, feature in enumerate(request.mm_features):
        rid = transfer_id(request, index)
        if rid is None:
            return [], (
                f"item {index} ({feature.identifier}) has no transfer id: the proxy gives each "
                "item one in sampling_params.extra_args['ec_transfer_params']['ec_items']"
            )
        tokens = int(feature.mm_position.get_num_embeds())
        specs.append(ItemSpec(rid, feature.identifier, tokens, str(feature.modality)))
    return specs, None


def _tp_rank() -> int:
    """This worker's tensor-parallel rank (0 outside vLLM's distributed setup)."""
    from vllm.distributed import parallel_state  # noqa: PLC0415 - worker-only state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return int(parallel_state.get_tensor_model_parallel_rank())


class ResumekitECConnector(ECConnectorBase):
    """Resumable embedding transfers as a vLLM EC connector: no size round trip first, a
    landing pool of any size, every item whole on every tensor-parallel rank before vLLM
    uses it, and nothing left behind when a request ends in any way."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole, rank: int | None = None):
        super().__init__(vllm_config, role)
        ec = vllm_config.ec_transfer_config
        assert ec is not None  # the base class refused a config without one
        if self.is_producer and self.is_consumer:
            raise InvalidArgumentError(
                "ec_role='ec_both' is not supported by the resumekit connector: an instance "
                "is the encode side (ec_producer) or the language side (ec_consumer)"
            )
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        self.tp_size = int(parallel.tensor_parallel_size)
        self.settings: Settings = read_settings(
            ec.ec_connector_extra_config,
            role="producer" if self.is_producer else "consumer",
            ranks=self.tp_size,
            hidden_size=int(model.get_hidden_size()),
            bytes_per_element=torch.empty(0, dtype=model.dtype).element_size(),
            pool_bytes=float(ec.ec_buffer_size),
            hostname=str(ec.ec_ip),
        )
        self.dtype = model.dtype
        self.book: ConsumerBook | ProducerBook | None = None
        self.consumer: ConsumerRank | None = None
        self.producer: ProducerRank | None = None
        self._closers: list[Any] = []
        if role is ECConnectorRole.SCHEDULER:
            self.book = (
                ProducerBook(served=self._served())
                if self.is_producer
                else ConsumerBook(self.tp_size)
            )
            return
        self.rank = _tp_rank() if rank is None else rank
        # One endpoint pair per (data-parallel index, tensor-parallel rank).
        self.offset = int(getattr(parallel, "data_parallel_index", 0)) * self.tp_size + self.rank
        if self.is_producer:
            # Mooncake's ends can wait, so posts are served as they come, not at step ends.
            self.producer = ProducerRank(
                self.rank, self._senders() if self.rank == 0 else [], serve=self._served()
            )
        else:
            self.consumer = ConsumerRank(self.rank, self._receiver(vllm_config))

    # -- building the ranks ----------------------------------------------------------------

    def _served(self) -> bool:
        """Whether the producer's posts are served from threads (Mooncake), not steps."""
        return self.settings.transport != "inprocess"

    def _receiver(self, vllm_config: VllmConfig) -> ResumableReceiver:
        s = self.settings
        device = vllm_config.device_config.device
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        allocator = BlockAllocator(s.pool_tokens // s.block_size, s.block_size)
        buffers = BlockBuffers(allocator, s.hidden_size, dtype=self.dtype, device=device)
        transport: Any
        if s.transport == "inprocess":
            transport = inprocess_link(s.link).receiver_end(self.offset, buffers)
        else:
            from resumekit.transports.mooncake import MooncakeTransport  # noqa: PLC0415

            assert s.listen is not None and s.peer is not None
            transport = MooncakeTransport(
                "receiver",
                listen=endpoint_for(s.listen, self.offset),
                peer=endpoint_for(s.peer, self.offset),
                buffers=buffers,
                hostname=s.hostname,
                protocol=s.protocol,
                timeout=s.timeout,
            )
            self._closers.append(transport)
        return ResumableReceiver(
            buffers,
            transport,
            s.default_allocate_tokens,
            max_resume_tokens=s.max_resume_tokens,
        )

    def _senders(self) -> list[EmbeddingSender]:
        s = self.settings
        senders = []
        for peer_rank in range(s.ranks):
            transport: Any
            if s.transport == "inprocess":
                transport = inprocess_link(s.link).sender_end(peer_rank)
            else:
                from resumekit.transports.mooncake import MooncakeTransport  # noqa: PLC0415

                assert s.listen is not None and s.peer is not None
                transport = MooncakeTransport(
                    "sender",
                    listen=endpoint_for(s.listen, peer_rank),
                    peer=endpoint_for(s.peer, peer_rank),
                    hostname=s.hostname,
                    protocol=s.protocol,
                    timeout=s.timeout,
                )
                self._closers.append(transport)
            senders.append(EmbeddingSender(transport))
        return senders

    # -- worker side -------------------------------------------------------------------------

    def _orders(self) -> Orders:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ResumekitECMetadata):
            raise InvalidArgumentError(f"metadata must be ResumekitECMetadata, not {meta!r}")
        return meta.orders

    def start_load_caches(self, encoder_cache: EncoderCache, **kwargs: Any) -> None:
        if self.consumer is not None:
            self.consumer.apply(self._orders(), encoder_cache)

    def start_save_caches(self, **kwargs: Any) -> None:
        if self.producer is not None:
            self.producer.apply(self._orders(), kwargs["encoder_cache"])

    def save_caches(self, encoder_cache: EncoderCache, mm_hash: str, **kwargs: Any) -> None:
        if self.producer is not None:
            self.producer.saved(mm_hash, encoder_cache)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None

    def build_connector_worker_meta(self) -> ECConnectorWorkerMetadata | None:
        side = self.consumer or self.producer
        if side is None:
            return None
        if self.producer is not None:
            self.producer.pump()  # what the encoder saved this step goes out now
        report = side.report()
        return None if report is None else ResumekitWorkerMetadata({report.rank: report})

    # -- scheduler side ----------------------------------------------------------------------

    def _consumer_book(self) -> ConsumerBook | None:
        return self.book if isinstance(self.book, ConsumerBook) else None

    def has_cache_item(self, identifier: str) -> bool:
        book = self._consumer_book()
        return book is not None and book.has(identifier)

    def ensure_cache_available(self, request: Request, num_computed_tokens: int) -> bool:
        book = self.book
        if isinstance(book, ConsumerBook):
            need = book.needs.get(request.request_id)
            if need is not None:  # every step, for every multimodal request: one lookup
                return need.waiting == 0 and need.failed is None
            specs, problem = item_specs(request)
            if problem is not None:
                book.refuse(request.request_id, problem)
                return False
            return book.want(request.request_id, specs)
        if isinstance(book, ProducerBook) and request.request_id not in book.announced:
            specs, problem = item_specs(request)
            if problem is not None:
                logger.warning(
                    "resumekit: request %s sends nothing: %s", request.request_id, problem
                )
            return book.want(request.request_id, [(x.identifier, x.rid) for x in specs])
        return True

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        book = self._consumer_book()
        if book is not None:
            book.allocated(request.request_id, index)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        assert self.book is not None
        return ResumekitECMetadata(self.book.build())

    def update_connector_output(self, connector_output: ECConnectorOutput) -> None:
        meta = connector_output.ec_connector_worker_meta
        if isinstance(meta, ResumekitWorkerMetadata) and self.book is not None:
            self.book.reported(meta.reports)

    def take_unavailable_requests(self) -> set[str]:
        book = self._consumer_book()
        if book is None:
            return set()
        failed = dict(book.unavailable)
        for request_id, why in failed.items():
            logger.warning("resumekit: request %s fails: %s", request_id, why)
        return book.take_unavailable()

    def request_finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        book = self.book
        if isinstance(book, ConsumerBook) and request.request_id not in book.needs:
            specs, _ = item_specs(request)
            book.never(request.request_id, specs)
        elif book is not None:
            book.finished(request.request_id)
        return False, None  # never holds vLLM's KV blocks

    def has_pending_push_work(self) -> bool:
        return self.book is not None and self.book.pending()

    def shutdown(self) -> None:
        if self.producer is not None:
            self.producer.close()
        closers, self._closers = self._closers, []
        for transport in closers:
            transport.close(wait=5.0)


def check_vllm() -> None:
    """Refuse a vLLM whose connector interface lacks a hook this connector needs."""
    needed = ("ensure_cache_available", "take_unavailable_requests", "has_pending_push_work")
    missing = [name for name in needed if not hasattr(ECConnectorBase, name)]
    if missing:
        raise IntegrationUnavailableError(
            f"this vLLM's ECConnectorBase has no {', '.join(missing)}: the resumekit connector "
            "needs vLLM 0.34 (pip install --no-deps vllm==0.34.0, see requirements/vllm-cpu.txt)"
        )


check_vllm()
