"""The connector's settings, read from ``ec_connector_extra_config`` and checked key by key.

Every error names the key it is about (``ec_connector_extra_config["pool_tokens"]``),
and a key the connector does not know is refused, so a misspelt setting never
falls back to a default unheard. Nothing here imports vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from resumekit._check import as_seconds
from resumekit.errors import InvalidArgumentError
from resumekit.protocol.receiver import DEFAULT_ALLOCATE_TOKENS

Transport = Literal["mooncake", "inprocess"]

DEFAULT_BLOCK_SIZE: Final = 256
DEFAULT_TIMEOUT: Final = 30.0
MAX_TIMEOUT: Final = 86_400.0
#: Per token, beside its embedding: a fill id and three mRoPE positions (int32 each).
EXTRA_BYTES_PER_TOKEN: Final = 16

COMMON_KEYS: Final = frozenset(
    {"transport", "timeout", "listen", "peer", "hostname", "protocol", "link"}
)
CONSUMER_KEYS: Final = frozenset(
    {"block_size", "pool_tokens", "default_allocate_tokens", "max_resume_tokens", "hidden_size"}
)
PRODUCER_KEYS: Final = frozenset({"consumer_ranks"})

_ENDPOINT: Final = re.compile(r"^(tcp)://([^:/]+):(\d{1,5})$")


def _key(name: str) -> str:
    return f'ec_connector_extra_config["{name}"]'


def _int(extra: Mapping[str, Any], name: str, default: int | None, minimum: int) -> int | None:
    value = extra.get(name, default)
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise InvalidArgumentError(f"{_key(name)} must be an int >= {minimum}, not {value!r}")
    return value


def _choice(extra: Mapping[str, Any], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = extra.get(name, default)
    if value not in choices:
        raise InvalidArgumentError(
            f"{_key(name)} must be one of {', '.join(map(repr, choices))}, not {value!r}"
        )
    return str(value)


def _str(extra: Mapping[str, Any], name: str, default: str) -> str:
    value = extra.get(name, default)
    if type(value) is not str or not value:
        raise InvalidArgumentError(f"{_key(name)} must be a non-empty str, not {value!r}")
    return value


def endpoint_for(base: str, offset: int) -> str:
    """``tcp://host:port`` with ``offset`` added to the port: one endpoint per rank."""
    match = _ENDPOINT.match(base)
    assert match is not None  # checked when the settings were read
    return f"{match.group(1)}://{match.group(2)}:{int(match.group(3)) + offset}"


def _endpoint(extra: Mapping[str, Any], name: str, ranks: int) -> str | None:
    value = extra.get(name)
    if value is None:
        return None
    match = _ENDPOINT.match(value) if type(value) is str else None
    if match is None or not 0 < int(match.group(3)) <= 65535 - (ranks - 1):
        raise InvalidArgumentError(
            f"{_key(name)} must be a ZMQ endpoint tcp://host:port whose port leaves room for "
            f"{ranks} rank(s) (port + rank), not {value!r}"
        )
    return str(value)


@dataclass(frozen=True)
class Settings:
    """What one side of the connector runs with (see the README for each key)."""

    role: Literal["consumer", "producer"]
    transport: Transport
    timeout: float
    listen: str | None  # Mooncake: this instance's base endpoint (rank r binds port + r)
    peer: str | None  # Mooncake: the other instance's base endpoint
    hostname: str
    protocol: Literal["tcp", "rdma"]
    link: str  # in-process: the name both sides meet under
    ranks: int  # consumer: tensor-parallel ranks that land every item; producer: its peers
    block_size: int = DEFAULT_BLOCK_SIZE
    pool_tokens: int = 0
    default_allocate_tokens: int | Literal["auto"] = DEFAULT_ALLOCATE_TOKENS
    max_resume_tokens: int | None = None
    hidden_size: int = 0


def read_settings(
    extra: object,
    *,
    role: Literal["consumer", "producer"],
    ranks: int,
    hidden_size: int,
    bytes_per_element: int,
    pool_bytes: float,
    hostname: str,
) -> Settings:
    """``extra`` (``ec_connector_extra_config``) checked and completed with the defaults.

    ``ranks`` is the consumer's tensor-parallel size (the producer reads
    ``consumer_ranks`` instead); ``hidden_size`` and ``bytes_per_element`` are the
    model's, and the default pool is ``pool_bytes`` (vLLM's ``ec_buffer_size``) of
    landing memory.
    """
    if not isinstance(extra, Mapping) or not all(type(k) is str for k in extra):
        raise InvalidArgumentError(
            f"ec_connector_extra_config must be a dict of str keys, not {type(extra).__name__}"
        )
    known = COMMON_KEYS | (CONSUMER_KEYS if role == "consumer" else PRODUCER_KEYS)
    unknown = sorted(set(extra) - known)
    if unknown:
        raise InvalidArgumentError(
            f"{_key(unknown[0])} is not a setting of the resumekit {role} connector "
            f"(it takes {', '.join(sorted(known))})"
        )
    transport = _choice(extra, "transport", "mooncake", ("mooncake", "inprocess"))
    timeout = as_seconds(
        extra.get("timeout", DEFAULT_TIMEOUT), _key("timeout"), maximum=MAX_TIMEOUT
    )
    if role == "producer":
        peers = _int(extra, "consumer_ranks", 1, 1)
        assert peers is not None
        ranks = peers
    listen = _endpoint(extra, "listen", ranks)
    peer = _endpoint(extra, "peer", ranks)
    if transport == "mooncake" and (listen is None or peer is None):
        missing = "listen" if listen is None else "peer"
        raise InvalidArgumentError(
            f"{_key(missing)} is needed with the mooncake transport: this instance's and the "
            "other instance's base ZMQ endpoints (rank r uses port + r)"
        )
    protocol = _choice(extra, "protocol", "tcp", ("tcp", "rdma"))
    common: dict[str, Any] = {
        "role": role,
        "transport": transport,
        "timeout": timeout,
        "listen": listen,
        "peer": peer,
        "hostname": _str(extra, "hostname", hostname),
        "protocol": protocol,
        "link": _str(extra, "link", "default"),
        "ranks": ranks,
    }
    if role == "producer":
        return Settings(**common)
    block_size = _int(extra, "block_size", DEFAULT_BLOCK_SIZE, 1)
    hidden = _int(extra, "hidden_size", hidden_size, 1)
    assert block_size is not None and hidden is not None
    per_token = hidden * bytes_per_element + EXTRA_BYTES_PER_TOKEN
    default_pool = max(block_size, int(pool_bytes) // per_token // block_size * block_size)
    pool = _int(extra, "pool_tokens", default_pool, block_size)
    assert pool is not None
    default = extra.get("default_allocate_tokens", DEFAULT_ALLOCATE_TOKENS)
    if default != "auto" and (type(default) is not int or not 1 <= default <= pool):
        raise InvalidArgumentError(
            f"{_key('default_allocate_tokens')} must be 'auto' or an int in 1..{pool} (the pool "
            f"of pool_tokens), not {default!r}"
        )
    # A quarter of the pool a resume, so one long video never takes the whole pool from
    # the requests behind it (the "auto" round 0 is capped the same way).
    quarter = max(block_size, pool // 4 // block_size * block_size)
    max_resume = extra.get("max_resume_tokens", quarter)
    if max_resume is not None and (type(max_resume) is not int or max_resume < 1):
        raise InvalidArgumentError(
            f"{_key('max_resume_tokens')} must be an int >= 1 or None (no cap), not {max_resume!r}"
        )
    return Settings(
        **common,
        block_size=block_size,
        pool_tokens=pool,
        default_allocate_tokens=default,
        max_resume_tokens=max_resume,
        hidden_size=hidden,
    )
