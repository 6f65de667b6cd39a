"""The workload replay and its benchmark refuse bad input up front, naming the argument."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from resumekit.allocator.block_allocator import MAX_NUM_BLOCKS
from resumekit.errors import InvalidArgumentError
from resumekit.sim import workload
from resumekit.sim.workload import (
    DESIGNS,
    TRACES,
    CostModel,
    check_pool,
    make_trace,
    quantile,
    run,
    sizes,
)

NAN, INF = math.nan, math.inf


def _each(name: str, *values: object) -> list[tuple[dict[str, Any], str]]:
    """One case per value of argument ``name``, whose error must start with ``name``."""
    return [({name: value}, name) for value in values]


# -- run(): each bad argument, and the name its error must start with ---------------------

BAD_RUN: list[tuple[dict[str, Any], str]] = [
    ({"design": "bogus"}, "design"),
    ({"design": "Resumekit"}, "design"),
    ({"design": 3}, "design"),
    ({"trace": "video"}, "trace"),
    ({"trace": None}, "trace"),
    *_each("requests", 0, -1, True, 2.5, "10", NAN),
    *_each("load", 0, 0.0, -0.5, NAN, INF, -INF, True, "0.7", None, 10**400),
    *_each("pool_tokens", 0, -1, True, 1.5, "131072"),
    ({"pool_tokens": 4096}, "pool_tokens"),  # resumekit's 8192-token round 0 does not fit
    ({"design": "one-resume", "pool_tokens": 8191, "block_size": 1}, "pool_tokens"),
    ({"pool_tokens": MAX_NUM_BLOCKS + 1, "block_size": 1}, "pool_tokens"),
    *_each("block_size", 0, -128, True, 2.0, None),
    ({"block_size": 200_000}, "block_size"),  # larger than the pool: no block at all
    ({"design": "size-first", "block_size": 0}, "block_size"),  # checked though unused
    *_each("seed", -1, True, 1.5, "0", NAN),
    *_each("max_resume_tokens", 0, -1, True, 1.5),
    ({"design": "one-resume", "max_resume_tokens": 0}, "max_resume_tokens"),
    *_each("within_pool", 1, "yes", None),
    *_each("cost", "fast", {}, 1.0),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_RUN, ids=[repr(k) for k, _ in BAD_RUN])
def test_run_refuses_a_bad_argument_naming_it_before_any_work(
    kwargs: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad argument raises InvalidArgumentError naming it, before the trace is even made."""

    def no_trace(*args: object, **kw: object) -> None:
        raise AssertionError("run() made a trace before checking its arguments")

    monkeypatch.setattr(workload, "make_trace", no_trace)
    call: dict[str, Any] = {"design": "resumekit", "trace": "image-heavy", "requests": 10}
    call |= kwargs
    with pytest.raises(InvalidArgumentError) as error:
        run(**call)
    assert str(error.value).startswith(name), str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "valid"), [("design", "bogus", DESIGNS), ("trace", "nope", TRACES)]
)
def test_an_unknown_name_lists_the_valid_ones(
    name: str, value: str, valid: tuple[str, ...]
) -> None:
    """An unknown design or trace is refused (it used to run another) and the valid ones shown."""
    call: dict[str, Any] = {"design": "resumekit", "trace": "image-heavy", name: value}
    with pytest.raises(InvalidArgumentError) as error:
        run(**call, requests=10)
    message = str(error.value)
    assert repr(value) in message and all(repr(v) in message for v in valid)


def test_designs_that_need_no_fixed_round_0_still_run_in_a_small_pool() -> None:
    """size-first and resumekit-auto need no 8192-token round 0: a 4096-token pool is theirs."""
    for design in ("size-first", "resumekit-auto"):
        result = run(design, "image-heavy", requests=10, pool_tokens=4096, load=1, seed=0)
        assert result.completed + result.failed == 10 and result.load == 1.0


# -- CostModel, make_trace, sizes, quantile -----------------------------------------------

BAD_COST: list[tuple[str, object]] = [
    *(("rtt", v) for v in (0, -1e-6, NAN, INF, True, "1", None, 301.0)),
    *(("round_overhead", v) for v in (0, -1.0, NAN, INF, False, "5e-5", 1e9)),
    *(("link", v) for v in (0, -25e9, NAN, INF, True, "25e9", None, 10**400)),
    *(("copy", v) for v in (0, -1, NAN, INF, True, [500e9])),
    *(("bytes_per_token", v) for v in (0, -1, True, 1.5, "7184", NAN)),
]


@pytest.mark.parametrize(("field", "value"), BAD_COST, ids=[f"{f}={v!r}" for f, v in BAD_COST])
def test_the_cost_model_refuses_a_time_or_rate_no_machine_has(field: str, value: object) -> None:
    """Each CostModel constant: 0, negative, NaN, inf, bool or wrong type raise, naming it."""
    with pytest.raises(InvalidArgumentError) as error:
        CostModel(**{field: value})  # type: ignore[arg-type]
    assert str(error.value).startswith(field), str(error.value)


def test_the_cost_model_keeps_good_values_as_given() -> None:
    """An int time or rate is a float after the checks; the defaults are unchanged."""
    cost = CostModel(rtt=1, link=25_000_000_000)
    assert cost.rtt == 1.0 and isinstance(cost.rtt, float) and cost.link == 25e9
    assert CostModel() == CostModel(200e-6, 25e9, 500e9, 50e-6, 3584 * 2 + 16)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda c: c.transfer(-1), "tokens"),
        (lambda c: c.transfer(1.5), "tokens"),
        (lambda c: c.copy_out(True), "tokens"),
    ],
    ids=["transfer(-1)", "transfer(1.5)", "copy_out(True)"],
)
def test_cost_model_times_refuse_a_bad_token_count(call: Any, name: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        call(CostModel())
    assert str(error.value).startswith(name)


BAD_TRACE: list[tuple[dict[str, Any], str]] = [
    ({"kind": "bogus"}, "kind"),
    *_each("n", 0, -5, True, 2.5),
    *_each("load", 0, -1, NAN, INF, "1"),
    ({"cost": "fast"}, "cost"),
    *_each("seed", -1, False, 0.5),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_TRACE, ids=[repr(k) for k, _ in BAD_TRACE])
def test_make_trace_refuses_a_bad_argument_naming_it(kwargs: dict[str, Any], name: str) -> None:
    call: dict[str, Any] = {"kind": "image-heavy", "n": 10, "load": 0.5, "cost": CostModel()}
    call |= {"seed": 0} | kwargs
    with pytest.raises(InvalidArgumentError) as error:
        make_trace(**call)
    assert str(error.value).startswith(name), str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "bogus"}, "kind"),
        ({"n": -1}, "n"),
        ({"n": 1.0}, "n"),
        ({"rng": None}, "rng"),
        ({"rng": 7}, "rng"),
    ],
)
def test_sizes_refuses_a_bad_argument_naming_it(kwargs: dict[str, Any], name: str) -> None:
    call: dict[str, Any] = {"kind": "video-mixed", "n": 3, "rng": random.Random(0)} | kwargs
    with pytest.raises(InvalidArgumentError) as error:
        sizes(**call)
    assert str(error.value).startswith(name), str(error.value)


@pytest.mark.parametrize(
    ("values", "q", "name"),
    [
        ([1.0, 2.0], 0, "q"),  # used to answer the maximum
        ([1.0, 2.0], -0.5, "q"),
        ([1.0, 2.0], 1.5, "q"),
        ([1.0, 2.0], NAN, "q"),
        ([1.0, 2.0], True, "q"),
        ([1.0, 2.0], "0.5", "q"),
        ([2.0, 1.0], 0.5, "values"),
        (iter([1.0, 2.0]), 0.5, "values"),
    ],
)
def test_quantile_refuses_a_bad_argument_naming_it(values: Any, q: Any, name: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        quantile(values, q)
    assert str(error.value).startswith(name), str(error.value)


def test_check_pool_answers_the_pool_it_proved() -> None:
    assert check_pool("resumekit", 8192, 128) == (8192, 128)
    assert check_pool("size-first", 100, 100) == (100, 100)


# -- benchmarks/bench_workload.py ---------------------------------------------------------

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # as when it runs as a script
    spec = importlib.util.spec_from_file_location(
        "resumekit_bench_workload", BENCH / "bench_workload.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BAD_FLAGS: list[tuple[list[str], str]] = [
    (["--requests", "9"], "--requests"),
    (["--requests", "x"], "--requests"),
    (["--load", "0"], "--load"),
    (["--load", "nan"], "--load"),
    (["--load", "inf"], "--load"),
    (["--load", "-0.7"], "--load"),
    (["--sweep", ""], "--sweep"),
    (["--sweep", ","], "--sweep"),
    (["--sweep", "0.5,x"], "--sweep"),
    (["--sweep", "0.5,-1"], "--sweep"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--seeds", ""], "--seeds"),
    (["--seeds", "0,-1"], "--seeds"),
    (["--seeds", "0,x"], "--seeds"),
    (["--window", "-1"], "--window"),
    (["--window", "two"], "--window"),
    (["--pool-tokens", "0"], "--pool-tokens"),
    (["--pool-tokens", "4096"], "--pool-tokens"),  # round 0 of resumekit does not fit
    (["--pool-tokens", str(MAX_NUM_BLOCKS + 1), "--block-size", "1"], "--pool-tokens"),
    (["--block-size", "0"], "--block-size"),
    (["--block-size", "200000"], "--block-size"),  # larger than the pool
    (["--rtt-us", "0"], "--rtt-us"),
    (["--rtt-us", "4e8"], "--rtt-us"),  # 400 s: past the horizon
    (["--rtt-us", "1e-320"], "--rtt-us"),  # 0 s once in seconds
    (["--link-gbs", "nan"], "--link-gbs"),
    (["--link-gbs", "1e300"], "--link-gbs"),  # inf bytes/s once in bytes
    (["--copy-gbs", "-1"], "--copy-gbs"),
    (["--round-us", "inf"], "--round-us"),
    (["--hidden", "0"], "--hidden"),
    (["--hidden", "1.5"], "--hidden"),
    (["--trace", "bogus"], "--trace"),
    (["--design", "bogus"], "--design"),
    (["--json", "/no/such/folder/out.json"], "--json"),
    (["--plot", "/no/such/folder/out.png"], "--plot"),
    (["--json", "/"], "--json"),  # a folder, not a file
]


@pytest.mark.parametrize(("argv", "flag"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bench_workload_exits_2_naming_a_bad_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value exits 2 naming the flag, before the run prints anything."""
    with pytest.raises(SystemExit) as info:
        _bench().main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert flag in captured.err.strip().splitlines()[-1] and "Traceback" not in captured.err
    assert captured.out == ""


def _no_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the benchmark ran before refusing its flags")


def test_bench_workload_json_into_a_missing_folder_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json whose folder is missing exits 2 at once: not after minutes of simulation."""
    bench = _bench()
    monkeypatch.setattr(bench, "run", _no_run)
    with pytest.raises(SystemExit) as info:
        bench.main(["--requests", "10", "--json", str(tmp_path / "missing" / "out.json")])
    assert info.value.code == 2
    assert "--json" in capsys.readouterr().err and not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_bench_workload_json_into_an_unwritable_folder_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench, "run", _no_run)
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as info:
        bench.main(["--json", str(folder / "out.json")])
    assert info.value.code == 2 and "--json" in capsys.readouterr().err


def test_bench_workload_runs_only_the_traces_and_designs_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--trace and --design (repeatable) narrow the run; the targets they allow are shown."""
    out = tmp_path / "out.json"
    argv = ["--requests", "10", "--trace", "image-heavy", "--design", "size-first"]
    argv += ["--design", "resumekit", "--sweep", "0.5", "--json", str(out)]
    assert _bench().main(argv) == 0
    text = capsys.readouterr().out
    assert "image-heavy at load 0.7" in text and "video-mixed" not in text
    assert "image-heavy p50: resumekit / size-first" in text and "one-resume" not in text
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["image-heavy"]
    assert list(data["results"]["image-heavy"]) == ["resumekit", "size-first"]
    assert [len(rs) for rs in data["sweep"]["image-heavy"].values()] == [1, 1]
