"""How the two sides meet when both run in one process (``"transport": "inprocess"``).

A named link holds one :class:`~resumekit.transports.inprocess.InProcessTransport`
per consumer rank, made over that rank's block buffers; the producer's sender for
that rank reaches it through a :class:`LinkEnd`, which waits for the consumer rank
to exist (vLLM builds the two instances' connectors in either order). For tests,
the checkers and single-process runs; across processes the connector uses Mooncake.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Final

from resumekit._check import check_hashable
from resumekit.allocator.buffers import BlockBuffers, EmbeddingTensors
from resumekit.errors import InvalidArgumentError
from resumekit.protocol.messages import Cancelled, Landed, Post, RoundPost, SenderError
from resumekit.transports.inprocess import InProcessTransport

_NOTHING: Final[tuple[Post, ...]] = ()


class Link:
    """The in-process transports of one link, by consumer rank."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ranks: dict[int, InProcessTransport] = {}

    def receiver_end(self, rank: int, buffers: BlockBuffers) -> InProcessTransport:
        if rank in self.ranks:
            raise InvalidArgumentError(
                f"in-process link {self.name!r} has a consumer rank {rank} already: give each "
                'consumer instance its own ec_connector_extra_config["link"]'
            )
        transport = self.ranks[rank] = InProcessTransport(buffers)
        return transport

    def sender_end(self, rank: int) -> LinkEnd:
        return LinkEnd(self, rank)


class LinkEnd:
    """The producer's end towards one consumer rank; nothing arrives before that rank exists."""

    def __init__(self, link: Link, rank: int) -> None:
        self.link = link
        self.rank = rank

    @property
    def transport(self) -> InProcessTransport | None:
        return self.link.ranks.get(self.rank)

    def check_request_id(self, rid: Hashable) -> None:
        check_hashable(rid, "rid")

    def poll_posts(self) -> Sequence[Post]:
        t = self.transport
        return _NOTHING if t is None else t.poll_posts()

    def write_round(
        self, post: RoundPost, data: EmbeddingTensors, aux: Sequence[int] | None
    ) -> None:
        t = self.transport
        assert t is not None  # a post came from it
        t.write_round(post, data, aux)

    def report(self, status: Landed | Cancelled | SenderError) -> None:
        t = self.transport
        assert t is not None
        t.report(status)


_LINKS: dict[str, Link] = {}


def inprocess_link(name: str) -> Link:
    """The link of this name in this process (made on first use)."""
    link = _LINKS.get(name)
    if link is None:
        link = _LINKS[name] = Link(name)
    return link


def forget_link(name: str) -> None:
    """Drop a link (tests make a fresh one per scenario)."""
    _LINKS.pop(name, None)
