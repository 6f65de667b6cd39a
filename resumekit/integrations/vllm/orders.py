"""What crosses between the connector's scheduler side and its worker ranks, each step.

vLLM carries :class:`Orders` from the scheduler to every worker rank inside the
step's ``ECConnectorMetadata``, and each rank's :class:`RankReport` back inside
its ``ECConnectorWorkerMetadata``, which vLLM folds across tensor-parallel ranks.
An item is named on the wire by its ``rid``: the transfer id the request's
``ec_transfer_params`` gives it, else vLLM's identifier of the item.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """One multimodal item to land: its name on the wire, vLLM's key, and its size."""

    rid: str
    identifier: str  # MultiModalFeatureSpec.identifier: encoder_cache's key
    tokens: int  # what the request's placeholder takes (mm_position.get_num_embeds())
    hint: str  # the modality: round 0's size is learned per hint with "auto"


@dataclass(slots=True)
class Orders:
    """The scheduler's word to every rank for one step."""

    start: list[ItemSpec] = field(default_factory=list)  # consumer: begin landing these
    load: list[tuple[str, str]] = field(default_factory=list)  # consumer: (rid, identifier)
    release: list[str] = field(default_factory=list)  # consumer: drop these, wherever they are
    cancel: list[str] = field(default_factory=list)  # consumer: tell the encoder: never needed
    send: list[tuple[str, str]] = field(default_factory=list)  # producer: (identifier, rid)

    def __bool__(self) -> bool:
        return bool(self.start or self.load or self.release or self.cancel or self.send)


@dataclass(slots=True)
class RankReport:
    """What one rank says back: items it has landed whole or failed since its last report,
    and whether it still holds anything (a transfer, a quarantined round, a source)."""

    rank: int
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # rid -> why
    busy: bool = False
    sources: int = 0  # producer: sources its senders hold


def merge(reports: dict[int, RankReport], other: dict[int, RankReport]) -> dict[int, RankReport]:
    """The reports of two sets of ranks as one (each rank reports once a step)."""
    return {**reports, **other}
