"""resumekit's EC connector inside vLLM 0.34's own scheduler and worker-side glue, on the CPU.

vLLM loads the connector by module path; its ``Scheduler`` drives the scheduler role;
per tensor-parallel rank, its ``ActiveECConnector`` drives the worker role, and its
``ECOutputAggregator`` folds the ranks' outputs (``resumekit.sim.vllm`` says which
vLLM code runs and what is faked). Without vLLM these tests skip, saying so, except
under ``.ci/run``, which installs it and makes a skip a failure.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import vllm  # noqa: F401

    MISSING = None
except ImportError as error:
    MISSING = (
        f"vLLM is not installed ({error}): pip install --no-deps vllm==0.34.0 and the pins "
        "of requirements/vllm-cpu.txt"
    )
needs_vllm = pytest.mark.skipif(
    MISSING is not None and os.environ.get("RESUMEKIT_REQUIRE_VLLM") != "1",
    reason=str(MISSING),
)

BASE = {
    "ec_connector": "ResumekitECConnector",
    "ec_connector_module_path": "resumekit.integrations.vllm",
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resumekit.sim.vllm import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-vl"))


_LINKS = iter(range(1 << 30))


def pair(
    model: Path,
    *,
    tp: int = 2,
    pool_tokens: int = 65536,
    block_size: int = 256,
    default: int | str = 8192,
    transport: str = "inprocess",
    **instance: Any,
) -> tuple[Any, Any]:
    """An encode instance and a language instance of ``tp`` ranks, joined by ``transport``."""
    from resumekit.sim.vllm import Instance

    if transport == "inprocess":
        link = {"transport": "inprocess", "link": f"test-{next(_LINKS)}"}
        consumer_link, producer_link = link, link
    else:
        consumer_base, producer_base = _free_ports(tp), _free_ports(tp)
        consumer_link = {
            "transport": "mooncake",
            "listen": f"tcp://127.0.0.1:{consumer_base}",
            "peer": f"tcp://127.0.0.1:{producer_base}",
            "timeout": 10.0,
        }
        producer_link = {
            "transport": "mooncake",
            "listen": f"tcp://127.0.0.1:{producer_base}",
            "peer": f"tcp://127.0.0.1:{consumer_base}",
            "timeout": 10.0,
        }
    consumer_extra = {
        **consumer_link,
        "pool_tokens": pool_tokens,
        "block_size": block_size,
        "default_allocate_tokens": default,
    }
    consumer = Instance(
        model,
        {**BASE, "ec_role": "ec_consumer", "ec_connector_extra_config": consumer_extra},
        tp=tp,
        **instance,
    )
    producer = Instance(
        model,
        {
            **BASE,
            "ec_role": "ec_producer",
            "ec_connector_extra_config": {**producer_link, "consumer_ranks": tp},
        },
    )
    return producer, consumer


def _free_ports(n: int) -> int:
    """A base port with ``n`` free ports after it."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for k in range(n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free ports")


def submit(
    producer: Any,
    consumer: Any,
    request_id: str,
    sizes: list[int],
    kind: str = "image",
    max_tokens: int = 1,
) -> None:
    from resumekit.sim.vllm import Item

    items = [
        Item(f"{request_id}-item{i}", n, kind, f"{request_id}-tid{i}") for i, n in enumerate(sizes)
    ]
    producer.add(f"enc-{request_id}", items)
    consumer.add(request_id, items, max_tokens=max_tokens)


def ranks(consumer: Any) -> list[Any]:
    return [c.consumer for c in consumer.connectors]


def assert_nothing_left(producer: Any, consumer: Any) -> None:
    book = consumer.scheduler.ec_connector.book
    assert book.items == {} and book.needs == {} and book.by_identifier == {}
    assert not book.pending()
    for rank in ranks(consumer):
        receiver = rank.receiver
        assert len(receiver) == 0 and receiver.quarantined() == {}
        assert receiver.allocator.num_free_blocks == receiver.allocator.num_blocks
        assert rank.landing == {} and rank.whole == {}
    assert producer.connectors[0].producer.held() == 0
    assert not consumer.busy() and not producer.busy()


@pytest.fixture(autouse=True)
def _shutdown_mooncake() -> Iterator[None]:
    yield


@needs_vllm
def test_vllm_loads_the_connector_by_module_path(model: Path) -> None:
    from resumekit.integrations.vllm.connector import ResumekitECConnector

    producer, consumer = pair(model, tp=1)
    for instance in (producer, consumer):
        assert type(instance.scheduler.ec_connector) is ResumekitECConnector
        assert all(type(c) is ResumekitECConnector for c in instance.connectors)
    assert (
        consumer.scheduler.ec_connector.is_consumer and producer.scheduler.ec_connector.is_producer
    )


@needs_vllm
def test_items_of_1_to_200000_tokens_land_whole_through_a_pool_smaller_than_their_sum(
    model: Path,
) -> None:
    from resumekit.sim.vllm import run

    producer, consumer = pair(model, tp=2, pool_tokens=32768)
    sizes = [[1], [300, 9000], [200_000], [8192], [8193, 4096, 30_000], [12_345], [65_536]]
    for i, s in enumerate(sizes):
        submit(producer, consumer, f"r{i}", s, "video" if max(s) > 20_000 else "image")
    assert sum(map(sum, sizes)) > 10 * 32768
    run([producer, consumer], max_steps=5000)
    assert sorted(f.request_id for f in consumer.finished) == sorted(
        f"r{i}" for i in range(len(sizes))
    )
    assert {f.reason for f in consumer.finished} == {"LENGTH"}, consumer.finished
    assert consumer.misses.encoder_cache_miss == [] and consumer.misses.wrong_tensor == []
    rounds = max(rank.receiver.allocator.next_generation for rank in ranks(consumer))
    assert rounds > len(sizes) + 10  # the large items were resumed, round after round
    assert_nothing_left(producer, consumer)


@needs_vllm
def test_an_item_is_available_only_once_every_rank_has_it(model: Path) -> None:
    """Rank 1 gets nothing for a while: the scheduler neither schedules the request nor
    answers has_cache_item until rank 1 too has the item whole."""
    producer, consumer = pair(model, tp=2)
    submit(producer, consumer, "r", [5000])
    slow = producer.connectors[0].producer.senders[1]
    real_step = slow.step
    slow.step = lambda: 0  # rank 1's sender stalls
    book = consumer.scheduler.ec_connector.book
    seen_partial = False
    for _ in range(40):
        producer.step()
        consumer.step()
        item = book.items.get("r-tid0")
        if item is not None and item.ranks == {0}:
            seen_partial = True
            assert not book.has("r-item0") and not book.want("r", [item.spec])
            assert consumer.scheduler.requests["r"].num_computed_tokens == 0
    assert seen_partial
    slow.step = real_step
    from resumekit.sim.vllm import run

    run([producer, consumer], max_steps=500)
    assert [(f.request_id, f.reason) for f in consumer.finished] == [("r", "LENGTH")]
    assert consumer.misses.encoder_cache_miss == []
    assert_nothing_left(producer, consumer)


@needs_vllm
def test_a_failure_on_one_rank_fails_the_request_on_every_rank_with_its_reason(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from resumekit.sim.vllm import run

    producer, consumer = pair(model, tp=2, pool_tokens=8192, default=1024)
    submit(producer, consumer, "doomed", [40_000])
    submit(producer, consumer, "fine", [2000])
    for _ in range(6):  # under way on both ranks
        producer.step()
        consumer.step()
    link = ranks(consumer)[1].receiver.transport
    link.crash_sender("the encoder's link to rank 1 went down")
    with caplog.at_level(logging.WARNING, "resumekit.integrations.vllm"):
        run([producer, consumer], max_steps=500)
    reasons = {f.request_id: f.reason for f in consumer.finished}
    assert reasons["doomed"] == "ERROR"
    assert "rank 1: peer lost: the encoder's link to rank 1 went down" in caplog.text
    assert "doomed" in caplog.text
    assert consumer.misses.encoder_cache_miss == []
    # Rank 0 released its share of the failed item: nothing is left on any rank.
    for rank in ranks(consumer):
        assert rank.whole == {} and len(rank.receiver) == 0
        assert rank.receiver.quarantined() == {}
        assert rank.receiver.allocator.num_free_blocks == rank.receiver.allocator.num_blocks


@needs_vllm
@pytest.mark.parametrize("when", [0, 1, 2, 4, 8, 30])
def test_an_abort_at_any_step_releases_everything(model: Path, when: int) -> None:
    from resumekit.sim.vllm import run

    producer, consumer = pair(model, tp=2, pool_tokens=8192, default=1024)
    submit(producer, consumer, "aborted", [20_000, 3000])
    submit(producer, consumer, "kept", [6000])

    def abort(step: int) -> None:
        if step == when and "aborted" in consumer.scheduler.requests:
            consumer.abort("aborted")

    run([producer, consumer], max_steps=1000, between=abort)
    reasons = {f.request_id: f.reason for f in consumer.finished}
    assert reasons["kept"] == "LENGTH"
    assert reasons.get("aborted") in ("ABORT", "LENGTH", None)
    assert consumer.misses.encoder_cache_miss == [] and consumer.misses.wrong_tensor == []
    assert_nothing_left(producer, consumer)


@needs_vllm
def test_preempted_requests_find_their_items_again(model: Path) -> None:
    """A KV cache too small for every request makes vLLM preempt running ones; a preempted
    request's encoder inputs are freed, and when it runs again its items must be there."""
    from resumekit.sim.vllm import run

    producer, consumer = pair(model, tp=2, pool_tokens=16384, kv_blocks=1000, max_num_seqs=8)
    for i in range(6):
        submit(producer, consumer, f"r{i}", [2500, 500], max_tokens=200)
    preempted: set[str] = set()
    sched = consumer.scheduler
    real = sched._preempt_request

    def spy(request: Any, *args: Any, **kwargs: Any) -> Any:
        preempted.add(request.request_id)
        return real(request, *args, **kwargs)

    sched._preempt_request = spy
    run([producer, consumer], max_steps=5000)
    assert preempted, "nothing was preempted: the test did not test"
    assert {f.reason for f in consumer.finished} == {"LENGTH"}
    assert len(consumer.finished) == 6
    assert consumer.misses.encoder_cache_miss == [] and consumer.misses.wrong_tensor == []
    assert_nothing_left(producer, consumer)


@needs_vllm
def test_a_request_without_transfer_ids_fails_at_once_with_the_reason(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from resumekit.sim.vllm import Item, run

    _, consumer = pair(model, tp=1)
    consumer.add("anonymous", [Item("img", 100)])
    with caplog.at_level(logging.WARNING, "resumekit.integrations.vllm"):
        run([consumer], max_steps=20)
    assert [(f.request_id, f.reason) for f in consumer.finished] == [("anonymous", "ERROR")]
    assert "has no transfer id" in caplog.text and "ec_transfer_params" in caplog.text


@needs_vllm
def test_a_request_over_mooncake_tcp_lands_on_both_ranks(model: Path) -> None:
    from resumekit.errors import TransportUnavailableError
    from resumekit.sim.vllm import run
    from resumekit.transports.mooncake.engine import load_mooncake

    try:
        load_mooncake()
    except TransportUnavailableError as error:  # like every Mooncake test: skip, or fail in CI
        if os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") == "1":
            raise
        pytest.skip(str(error))

    producer, consumer = pair(model, tp=2, pool_tokens=16384, transport="mooncake")
    try:
        submit(producer, consumer, "a", [20_000])
        submit(producer, consumer, "b", [700, 3000])
        run([producer, consumer], max_steps=20_000)
        assert {f.request_id: f.reason for f in consumer.finished} == {"a": "LENGTH", "b": "LENGTH"}
        assert consumer.misses.encoder_cache_miss == [] and consumer.misses.wrong_tensor == []
        assert_nothing_left(producer, consumer)
    finally:
        consumer.shutdown()
        producer.shutdown()


@needs_vllm
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"pool_tokens": 0}, "pool_tokens"),
        ({"pool_tokens": "lots"}, "pool_tokens"),
        ({"block_size": -1}, "block_size"),
        ({"default_allocate_tokens": 10**9}, "default_allocate_tokens"),
        ({"transport": "pigeon"}, "transport"),
        ({"timeout": 0}, "timeout"),
        ({"listen": "nowhere"}, "listen"),
        ({"transport": "mooncake", "listen": "tcp://127.0.0.1:9000"}, "peer"),
        ({"pool_tokenz": 4}, "pool_tokenz"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_key(
    model: Path, extra: dict[str, Any], key: str
) -> None:
    from resumekit.errors import InvalidArgumentError
    from resumekit.sim.vllm import Instance

    settings = {"transport": "inprocess", "link": f"bad-{next(_LINKS)}", **extra}
    with pytest.raises(InvalidArgumentError, match=rf'ec_connector_extra_config\["{key}"\]'):
        Instance(model, {**BASE, "ec_role": "ec_consumer", "ec_connector_extra_config": settings})


SCRIPT = """
import sys
sys.modules["vllm"] = None  # as if vLLM were not installed
import resumekit, resumekit.integrations.vllm as v
from resumekit.integrations.vllm import book, orders, rank, settings, wiring
assert "vllm" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
try:
    v.ResumekitECConnector
except resumekit.IntegrationUnavailableError as error:
    print("refused:", error)
"""


def test_without_vllm_resumekit_imports_and_the_connector_says_what_to_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refused: the resumekit vLLM connector needs vLLM" in done.stdout
    assert "pip install --no-deps vllm==0.34.0" in done.stdout
