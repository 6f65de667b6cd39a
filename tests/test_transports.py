"""One conformance suite for every transport: the same scenarios, each with a deadline,
in one process (in-process), and across two real processes on 127.0.0.1 over
torch.distributed (gloo, payloads matched by tag or by order) and over Mooncake."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest
import torch.distributed as dist

from resumekit.errors import InvalidArgumentError, TransportError, TransportUnavailableError
from resumekit.sim.twoprocess import (
    PairConfig,
    Request,
    collect,
    run_pair,
    simulate_distributed,
)
from resumekit.transports.mooncake import load_mooncake
from resumekit.transports.torch.wire import runs, wire_rid

DEADLINE = 60.0


def _mooncake_missing() -> str | None:
    try:
        load_mooncake()
    except TransportUnavailableError as error:
        return str(error)
    return None


MOONCAKE_MISSING = _mooncake_missing()
# .ci/run sets this where it installed the system packages: there a skip would hide a break.
REQUIRE_MOONCAKE = os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") == "1"
GLOO = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
MOONCAKE = pytest.mark.skipif(MOONCAKE_MISSING is not None, reason=str(MOONCAKE_MISSING))
TWO_PROCESS = [
    pytest.param({"transport": "torch"}, id="torch", marks=GLOO),
    pytest.param({"transport": "torch", "payload": "ordered"}, id="torch-ordered", marks=GLOO),
    pytest.param({"transport": "mooncake"}, id="mooncake", marks=MOONCAKE),
]
EVERY = [pytest.param({"transport": "inprocess"}, id="inprocess"), *TWO_PROCESS]


def test_mooncake_runs_where_it_is_required() -> None:
    if not REQUIRE_MOONCAKE and MOONCAKE_MISSING is not None:
        pytest.skip(MOONCAKE_MISSING)
    assert MOONCAKE_MISSING is None, MOONCAKE_MISSING


def test_runs_merge_adjacent_full_blocks() -> None:
    assert runs((4, 5, 6, 9), 30, 8) == [(4, 24), (9, 6)]
    assert runs((4, 5, 6, 9), 20, 8) == [(4, 20)]
    assert runs((7, 3, 4), 24, 8) == [(7, 8), (3, 16)]
    assert runs((1, 2), 5, 8) == [(1, 5)]
    assert runs((1, 2), 0, 8) == []


def test_request_ids_must_be_ints() -> None:
    assert wire_rid(7) == 7
    with pytest.raises(InvalidArgumentError, match="rid must be an int64"):
        wire_rid("seven")
    with pytest.raises(InvalidArgumentError, match="rid must be an int64"):
        wire_rid(2**63)


@pytest.mark.parametrize("over", [p for p in TWO_PROCESS if p.id != "torch-ordered"])
def test_50k_tokens_capped_resumes(over: dict[str, Any]) -> None:
    report = simulate_distributed(50_000, max_round_tokens=16_384, hidden=64, **over)
    assert report.state == "Success" and report.intact
    assert [r.tokens for r in report.rounds] == [8192, 16_384, 16_384, 9040]
    assert report.resumes == 3 and report.leaked_blocks == 0
    assert report.steps >= len(report.rounds)  # the receiver loop's iterations, as in-process


# "torch-ordered": payloads on a group of their own, received in the order they are
# sent (NCCL has no tags), here over gloo.
@pytest.mark.parametrize("reuse", ["lifo", "fifo"])
@pytest.mark.parametrize("over", EVERY)
def test_concurrent_requests_on_a_small_pool(reuse: str, over: dict[str, Any]) -> None:
    requests = [Request(i, 3000 * (i + 1) + 17 * i, seed=i) for i in range(6)]
    report = run_pair(
        PairConfig(
            requests,
            pool_blocks=48,
            hidden=32,
            reuse=reuse,  # type: ignore[arg-type]
            default_allocate=2048,
            max_round_tokens=2048,
            deadline=DEADLINE,
            **over,
        )
    )
    for outcome in report.outcomes:
        assert outcome.state == "Success" and outcome.intact, outcome
    assert sum(len(o.rounds) for o in report.outcomes) > len(requests)  # resumes happened
    assert report.leaked_blocks == 0 and report.quarantined == 0 and report.records_left == 0
    assert (report.receiver_exit, report.sender_exit) == (0, 0)


@pytest.mark.parametrize("over", EVERY)
def test_sender_killed_mid_round(over: dict[str, Any]) -> None:
    requests = [Request(0, 40_000, 1), Request(1, 30_000, 2)]
    report = run_pair(
        PairConfig(
            requests,
            pool_blocks=256,
            hidden=32,
            max_round_tokens=8192,
            timeout=10.0,
            deadline=DEADLINE,
            fault_round=3,
            fault="die",
            **over,
        )
    )
    for outcome in report.outcomes:
        assert outcome.state == "Failed", outcome
        assert outcome.reason is not None and outcome.reason.startswith("peer lost"), outcome
    assert report.seconds < 10.0  # the dead connection is noticed before the timeout
    assert report.leaked_blocks == 0 and report.quarantined == 0 and report.records_left == 0
    assert report.receiver_exit == 0 and report.sender_exit == -9


@pytest.mark.parametrize("over", TWO_PROCESS)
def test_silent_sender_is_declared_lost_after_the_timeout(over: dict[str, Any]) -> None:
    report = run_pair(
        PairConfig(
            [Request(0, 40_000, 1)],
            pool_blocks=256,
            hidden=32,
            max_round_tokens=8192,
            timeout=2.0,
            deadline=DEADLINE,
            fault_round=2,
            fault="hang",
            **over,
        )
    )
    [outcome] = report.outcomes
    assert outcome.state == "Failed"
    assert outcome.reason is not None and "made no progress for 2 s" in outcome.reason
    assert 2.0 <= report.seconds < 20.0
    assert report.leaked_blocks == 0 and report.quarantined == 0
    assert report.receiver_exit == 0


@pytest.mark.parametrize("over", EVERY)
def test_abort_with_a_round_in_flight_quarantines_until_it_lands(over: dict[str, Any]) -> None:
    requests = [Request(0, 40_000, 1), Request(1, 20_000, 2)]
    report = run_pair(
        PairConfig(
            requests,
            pool_blocks=128,
            hidden=32,
            max_round_tokens=8192,
            deadline=DEADLINE,
            aborts=((0, 2),),
            **over,
        )
    )
    aborted, other = report.outcomes
    assert aborted.state == "Failed" and aborted.reason == "aborted by the engine"
    assert len(aborted.rounds) == 2  # rounds 0 and 1 consumed, round 2 in flight
    assert other.state == "Success" and other.intact
    assert report.quarantined == 0 and report.leaked_blocks == 0 and report.records_left == 0
    assert (report.receiver_exit, report.sender_exit) == (0, 0)


@pytest.mark.parametrize("over", [p for p in TWO_PROCESS if p.id != "torch-ordered"])
def test_simulate_cli_prints_the_same_table(
    over: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from resumekit.cli import main

    args = ["simulate", "--tokens", "30000", "--max-round-tokens", "8192", "--pool-blocks", "96"]
    assert main(args) == 0
    in_process = capsys.readouterr().out
    assert main([*args, "--transport", over["transport"], "--timeout", "20"]) == 0
    assert capsys.readouterr().out == in_process


@pytest.mark.parametrize("over", EVERY)
def test_aborts_mid_transfer_on_a_tight_pool(over: dict[str, Any]) -> None:
    """Aborts at different rounds while other requests wait for blocks: the aborted
    fail, the rest arrive intact, and every block comes back."""
    requests = [Request(i, 5000 + 1500 * i + 7 * i, seed=10 + i) for i in range(8)]
    aborts = ((1, 1), (4, 0), (6, 2), (7, 3))
    report = run_pair(
        PairConfig(
            requests,
            pool_blocks=40,
            hidden=32,
            default_allocate=2048,
            max_round_tokens=2048,
            deadline=DEADLINE,
            aborts=aborts,
            **over,
        )
    )
    aborted = {rid for rid, _ in aborts}
    for outcome in report.outcomes:
        if outcome.rid in aborted:
            assert outcome.state == "Failed" and outcome.reason == "aborted by the engine"
            assert len(outcome.rounds) == dict(aborts)[outcome.rid], outcome
        else:
            assert outcome.state == "Success" and outcome.intact, outcome
    assert report.leaked_blocks == 0 and report.quarantined == 0 and report.records_left == 0
    assert (report.receiver_exit, report.sender_exit) == (0, 0)


@pytest.mark.parametrize("over", EVERY)
def test_a_source_that_does_not_match_the_blocks_fails_only_its_request(
    over: dict[str, Any],
) -> None:
    """An encoder for another model: a float16 source, a wider one, and a float32 one of
    the same width as the pool's bfloat16 rows. Each fails before anything is written
    (as bytes they landed as garbage, or overran the blocks and aborted the receiving
    process over gloo); the others arrive intact."""
    requests = [
        Request(0, 3000, 1),
        Request(1, 3000, 2, dtype="float16"),
        Request(2, 3000, 3, hidden=64),
        Request(3, 3000, 4, hidden=16, dtype="float32"),
        Request(4, 3000, 5),
    ]
    report = run_pair(
        PairConfig(
            requests, pool_blocks=64, hidden=32, default_allocate=2048, deadline=DEADLINE, **over
        )
    )
    for outcome in report.outcomes:
        if outcome.rid in (1, 2, 3):
            assert outcome.state == "Failed", outcome
            assert outcome.reason is not None
            assert outcome.reason.startswith("sender error: round 0 could not be written: ")
            assert outcome.rounds == []
        else:
            assert outcome.state == "Success" and outcome.intact, outcome
    assert report.leaked_blocks == 0 and report.quarantined == 0 and report.records_left == 0
    assert (report.receiver_exit, report.sender_exit) == (0, 0)


@pytest.mark.parametrize("aux_size", [3, 40])
@pytest.mark.parametrize("over", EVERY)
def test_the_receivers_aux_rows_decide_what_the_sender_writes(
    over: dict[str, Any], aux_size: int
) -> None:
    """The receiver's buffers are made with their own aux_size, the sender's end with its
    default: each round writes the receiver's whole row (over gloo a longer row aborted
    the receiving process; over Mooncake it ran into the next block's row)."""
    requests = [Request(i, 6000 + 1000 * i, seed=30 + i) for i in range(3)]
    report = run_pair(
        PairConfig(
            requests,
            pool_blocks=48,
            hidden=32,
            default_allocate=2048,
            max_round_tokens=2048,
            aux_size=aux_size,
            deadline=DEADLINE,
            **over,
        )
    )
    for outcome in report.outcomes:
        assert outcome.state == "Success" and outcome.intact, outcome
    assert report.leaked_blocks == 0 and report.quarantined == 0 and report.records_left == 0
    assert (report.receiver_exit, report.sender_exit) == (0, 0)


def _put_report(queue: Any, size: int) -> None:
    queue.put(b"x" * size)


def _exit_quietly() -> None:
    pass


@pytest.mark.parametrize("size", [10, 4 << 20])
def test_a_report_larger_than_the_pipe_is_read_while_the_processes_run(size: int) -> None:
    """run_pair used to join both processes before reading the report queue; a report over
    the pipe's 64 KiB blocked the receiver process in its put until it was killed."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_put_report, args=(queue, size), name="resumekit-receiver"),
        ctx.Process(target=_exit_quietly, name="resumekit-sender"),
    ]
    for p in procs:
        p.start()
    started = time.monotonic()
    report = collect(procs, queue, time.monotonic() + 30.0)
    assert report == b"x" * size
    assert time.monotonic() - started < 10.0
    assert [p.exitcode for p in procs] == [0, 0]


def test_a_receiver_that_reports_nothing_is_said_so() -> None:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_exit_quietly, name=n) for n in ("receiver", "sender")]
    for p in procs:
        p.start()
    with pytest.raises(TransportError, match=r"reported nothing \(exit 0\)"):
        collect(procs, queue, time.monotonic() + 30.0)


@pytest.mark.parametrize("over", TWO_PROCESS)
def test_a_two_process_run_whose_report_is_over_64_kib_finishes(over: dict[str, Any]) -> None:
    """30,000 one-token blocks: the receiver's round log pickles to about 150 KiB."""
    cfg = PairConfig([Request(0, 30_000, 1)], 30_000, block_size=1, deadline=20.0, **over)
    started = time.monotonic()
    report = run_pair(cfg)
    assert time.monotonic() - started < 40.0  # the old join-then-read waited out deadline + 60
    [outcome] = report.outcomes
    assert outcome.state == "Success" and outcome.intact
    assert sum(len(r.blocks) for r in outcome.rounds) == 30_000
    assert report.leaked_blocks == 0 and report.receiver_exit == 0


BAD_PAIRS = [
    ({"timeout": 100_000.0}, "timeout"),
    ({"timeout": float("nan")}, "timeout"),
    ({"deadline": 0.0}, "deadline"),
    ({"pool_blocks": 0}, "pool_blocks"),
    ({"block_size": 2**31}, "block_size"),
    ({"hidden": 0}, "hidden"),
    ({"reuse": "mru"}, "reuse"),
    ({"default_allocate": "automatic"}, "default_allocate"),
    ({"max_round_tokens": 0}, "max_round_tokens"),
    ({"fault_round": 0}, "fault_round"),
    ({"fault": "explode"}, "fault"),
    ({"payload": "scattered"}, "payload"),
    ({"transport": "pigeon"}, "transport"),
    ({"aux_size": 1}, "aux_size"),
    ({"requests": [Request(0, 0)]}, "Request.tokens"),
    ({"requests": [Request(0, 5), Request(0, 6)]}, "each rid"),
    ({"requests": [(0, 5)]}, "requests"),
]


@pytest.mark.parametrize(("change", "named"), BAD_PAIRS, ids=[n for _, n in BAD_PAIRS])
def test_a_pair_config_the_children_would_die_on_is_refused_up_front(
    change: dict[str, Any], named: str
) -> None:
    """A timeout over a day used to pass here and kill the receiver process with a
    traceback, reported as "the receiver process reported nothing"."""
    fields: dict[str, Any] = {"requests": [Request(0, 100)], "pool_blocks": 4, **change}
    with pytest.raises(InvalidArgumentError, match=named):
        PairConfig(**fields)


def test_simulate_distributed_refuses_a_bad_timeout_before_starting_processes() -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="timeout"):
        simulate_distributed(100, timeout=100_000.0)
    assert time.monotonic() - started < 2.0  # no process was spawned


@GLOO
def test_what_the_receiver_process_raised_reaches_the_caller() -> None:
    """A round 0 the pool cannot hold fails in the receiver process; its error is sent
    back in place of the report instead of "reported nothing"."""
    cfg = PairConfig([Request(0, 100)], pool_blocks=1, block_size=16, default_allocate=8192)
    with pytest.raises(TransportError, match="receiver process failed: InvalidArgumentError"):
        run_pair(cfg)
