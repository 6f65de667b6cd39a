"""The connector's scheduler-side bookkeeping, apart from vLLM's types (the checkers drive it).

A consumer request needs each of its multimodal items landed on every
tensor-parallel rank before vLLM may schedule it. :class:`ConsumerBook` keeps,
per item, which requests need it and which ranks have it whole; it orders the
ranks to start landing an item the first step a request asks for it, to load it
into vLLM's encoder cache when vLLM allocates it, and to release it the moment
no unfinished request needs it. An item is available only once every rank
reported it whole; a failure on any rank fails every request that needs it, and
the item is released on every rank. :class:`ProducerBook` is the encode side's:
it tells its rank which encoder outputs to send under which name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from resumekit.errors import InvalidArgumentError, InvariantError
from resumekit.integrations.vllm.orders import ItemSpec, Orders, RankReport


class ItemState(Enum):
    LANDING = "landing"  # the ranks were told to land it; not every one has it yet
    AVAILABLE = "available"  # every rank has it whole: vLLM may load it
    FAILED = "failed"  # a rank could not land it; released everywhere


@dataclass
class Item:
    spec: ItemSpec
    state: ItemState = ItemState.LANDING
    requests: set[str] = field(default_factory=set)  # unfinished requests that need it
    ranks: set[int] = field(default_factory=set)  # ranks that have it whole
    reason: str | None = None


@dataclass
class Need:
    """One request's items, by the index of its multimodal feature."""

    rids: tuple[str, ...]
    waiting: int  # items not available yet
    failed: str | None = None


_NOTHING: Final[frozenset[str]] = frozenset()


class ConsumerBook:
    """What the language side's scheduler knows of every item in transfer; ``ranks`` is the
    number of tensor-parallel ranks that each land every item."""

    def __init__(self, ranks: int) -> None:
        if type(ranks) is not int or ranks < 1:
            raise InvalidArgumentError(f"ranks must be an int >= 1, not {ranks!r}")
        self.ranks = ranks
        self.items: dict[str, Item] = {}  # by rid
        self.needs: dict[str, Need] = {}  # by request id
        self.by_identifier: dict[str, set[str]] = {}  # identifier -> rids of live items
        self.orders = Orders()
        self.unavailable: dict[str, str] = {}  # request id -> why, until taken
        self.busy: dict[int, bool] = {}  # per rank, from its latest report
        self.made_available = 0  # items that became available (each once)
        # Transfers whose one life is over (landed and released, or cancelled): the encode
        # side sent (or dropped) each once, so a later request naming one fails at once.
        self.ended: dict[str, str] = {}
        self.remember = 1 << 16

    # -- vLLM's scheduler hooks ----------------------------------------------------------

    def want(self, request_id: str, specs: Sequence[ItemSpec]) -> bool:
        """``ensure_cache_available``: the first call names the request's items (and starts
        the ones no one is landing yet); every call says whether all have landed."""
        need = self.needs.get(request_id)
        if need is None:
            need = self._register(request_id, specs)
        return need.waiting == 0 and need.failed is None

    def refuse(self, request_id: str, why: str) -> None:
        """A request whose items cannot be named (no transfer id): it fails, once."""
        if request_id not in self.needs:
            self.needs[request_id] = Need((), 0, why)
            self.unavailable[request_id] = why

    def has(self, identifier: str) -> bool:
        """``has_cache_item``: whether an item of this identifier is whole on every rank."""
        return self._available(identifier) is not None

    def allocated(self, request_id: str, index: int) -> None:
        """``update_state_after_alloc``: vLLM gave the item encoder-cache space, so the ranks
        load it into the encoder cache this step. An index of an item that is not available
        (one vLLM encodes itself) is left to vLLM."""
        need = self.needs.get(request_id)
        if need is None or not 0 <= index < len(need.rids):
            return
        item = self.items.get(need.rids[index])
        if item is not None and item.state is not ItemState.AVAILABLE:
            # vLLM asks by identifier: another transfer of it may be whole.
            item = self._available(item.spec.identifier)
        if item is not None and item.state is ItemState.AVAILABLE:
            self.orders.load.append((item.spec.rid, item.spec.identifier))

    def build(self) -> Orders:
        """``build_connector_meta``: this step's orders to every rank (then a fresh list)."""
        orders, self.orders = self.orders, Orders()
        return orders

    def reported(self, reports: Mapping[int, RankReport]) -> None:
        """``update_connector_output``: what the ranks said since their last report."""
        for rank, report in reports.items():
            if not 0 <= rank < self.ranks:
                raise InvariantError(f"a report from rank {rank}; there are {self.ranks}")
            self.busy[rank] = report.busy
            for rid, why in report.failed.items():
                self._fail(rid, f"rank {rank}: {why}")
            for rid in report.completed:
                self._landed(rid, rank)

    def take_unavailable(self) -> set[str]:
        """``take_unavailable_requests``: the requests that failed, once each."""
        failed = set(self.unavailable)
        self.unavailable.clear()
        return failed

    def finished(self, request_id: str) -> None:
        """``request_finished`` (done, aborted, failed): release what only it needed."""
        need = self.needs.pop(request_id, None)
        self.unavailable.pop(request_id, None)
        if need is None:
            return
        for rid in set(need.rids):
            item = self.items.get(rid)
            if item is None:
                continue
            item.requests.discard(request_id)
            if not item.requests:
                self._release(item)

    def never(self, request_id: str, specs: Sequence[ItemSpec]) -> None:
        """``request_finished`` for a request it never saw (aborted before its first
        schedule): the encode side is told none of its items will be landed, so it
        drops their outputs rather than keep them for a consumer that never comes."""
        if request_id in self.needs:
            self.finished(request_id)
            return
        for spec in specs:
            if spec.rid not in self.items and spec.rid not in self.ended:
                self.orders.cancel.append(spec.rid)
                self._ended(spec.rid, "was cancelled when a request naming it ended unseen")

    def pending(self) -> bool:
        """``has_pending_push_work``: orders not yet sent, or a rank still holding a
        transfer or a quarantined round, so the engine keeps stepping until all is back."""
        return bool(self.orders) or any(self.busy.values())

    def reason(self, request_id: str) -> str | None:
        """Why ``request_id`` failed, while it is not finished."""
        need = self.needs.get(request_id)
        return None if need is None else need.failed

    # -- transitions ---------------------------------------------------------------------

    def _register(self, request_id: str, specs: Sequence[ItemSpec]) -> Need:
        rids = tuple(spec.rid for spec in specs)
        need = self.needs[request_id] = Need(rids, 0)
        for spec in specs:
            item = self.items.get(spec.rid)
            gone = self.ended.get(spec.rid) if item is None else None
            if gone is not None:
                need.failed = need.failed or (
                    f"transfer {spec.rid!r} {gone}: the encode side sends a transfer once, so "
                    "each request needs transfer ids of its own"
                )
                continue
            if item is None:
                item = self.items[spec.rid] = Item(spec)
                self.by_identifier.setdefault(spec.identifier, set()).add(spec.rid)
                self.orders.start.append(spec)
            elif item.spec != spec:
                need.failed = (
                    f"item {spec.rid!r} is asked for as {spec}, but is landing as {item.spec}"
                )
            item.requests.add(request_id)
        mine = {rid for rid in rids if rid in self.items}
        need.waiting = sum(1 for rid in mine if self.items[rid].state is not ItemState.AVAILABLE)
        for rid in mine:
            if self.items[rid].state is ItemState.FAILED:
                need.failed = need.failed or self.items[rid].reason
        if need.failed is not None:
            self.unavailable[request_id] = need.failed
        return need

    def _landed(self, rid: str, rank: int) -> None:
        item = self.items.get(rid)
        if item is None or item.state is not ItemState.LANDING:
            return  # released (or failed) since: the rank drops it on the release order
        item.ranks.add(rank)
        if len(item.ranks) < self.ranks:
            return
        item.state = ItemState.AVAILABLE
        self.made_available += 1
        for request_id in item.requests:
            self.needs[request_id].waiting -= 1  # each request counts an item once

    def _available(self, identifier: str) -> Item | None:
        for rid in self.by_identifier.get(identifier, _NOTHING):
            item = self.items[rid]
            if item.state is ItemState.AVAILABLE:
                return item
        return None

    def _fail(self, rid: str, why: str) -> None:
        item = self.items.get(rid)
        if item is None or item.state is ItemState.FAILED:
            return
        item.state, item.reason = ItemState.FAILED, why
        for request_id in item.requests:
            need = self.needs[request_id]
            if need.failed is None:
                need.failed = why
                self.unavailable[request_id] = why
        # Nothing more of it is any use: every rank lets it go now, not at the finish.
        self.orders.release.append(rid)
        self._forget_identifier(item)

    def _release(self, item: Item) -> None:
        del self.items[item.spec.rid]
        self._ended(item.spec.rid, f"ended ({item.state.value}) for the requests that needed it")
        if item.state is not ItemState.FAILED:  # a failed item was released already
            self.orders.release.append(item.spec.rid)
            self._forget_identifier(item)

    def _ended(self, rid: str, how: str) -> None:
        self.ended[rid] = how
        if len(self.ended) > self.remember:
            del self.ended[next(iter(self.ended))]

    def _forget_identifier(self, item: Item) -> None:
        rids = self.by_identifier.get(item.spec.identifier)
        if rids is not None:
            rids.discard(item.spec.rid)
            if not rids:
                del self.by_identifier[item.spec.identifier]


class ProducerBook:
    """What the encode side's scheduler knows: which encoder outputs go out under which name.

    Each transfer id is ordered sent once (the last ``remember`` of them are kept), so a
    proxy that names an item twice cannot leave a second source no consumer claims.
    """

    def __init__(self, remember: int = 1 << 16, *, served: bool = False) -> None:
        self.served = served  # the ranks serve posts from threads, not from vLLM's steps
        self.announced: set[str] = set()  # request ids whose items were ordered sent
        self.sent: dict[str, None] = {}  # transfer ids ordered sent, oldest first
        self.remember = remember
        self.orders = Orders()
        self.sources = 0  # sources its rank's senders hold, from the latest report

    def want(self, request_id: str, items: Iterable[tuple[str, str]]) -> bool:
        """``ensure_cache_available``: order the rank to send each (identifier, rid) once
        the encoder output is there; the encode side never waits."""
        if request_id not in self.announced:
            self.announced.add(request_id)
            for identifier, rid in items:
                if rid in self.sent:
                    continue
                self.sent[rid] = None
                if len(self.sent) > self.remember:
                    del self.sent[next(iter(self.sent))]
                self.orders.send.append((identifier, rid))
        return True

    def build(self) -> Orders:
        orders, self.orders = self.orders, Orders()
        return orders

    def reported(self, reports: Mapping[int, RankReport]) -> None:
        for report in reports.values():
            self.sources = report.sources

    def finished(self, request_id: str) -> None:
        self.announced.discard(request_id)

    def pending(self) -> bool:
        """Orders to hand over, or sources that only vLLM's steps serve: the engine keeps
        stepping for them (threads serve theirs without it, however long a consumer takes)."""
        return bool(self.orders) or (not self.served and self.sources > 0)
