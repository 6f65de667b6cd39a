"""benchmarks/soak.py: clean on the shipped code, and it counts a planted bug as stuck."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Hashable
from pathlib import Path
from types import ModuleType

import pytest

from resumekit.allocator import EmbeddingTensors
from resumekit.protocol import EmbeddingSender

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # as when it runs as a script: it imports _flags
    spec = importlib.util.spec_from_file_location("resumekit_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_in_process_soak_is_clean(soak: ModuleType) -> None:
    tally = soak.soak_in_process(300, 25, seed=1)
    assert tally.ok, tally.line("soak")
    assert tally.intact > 250 and tally.failed > 0  # aborts happened, most lives arrived
    assert tally.intact + tally.failed == 300


class _LosesSources(EmbeddingSender):
    """Says it kept every 25th source and drops it: those lives can never finish."""

    calls = 0

    def add(
        self,
        rid: Hashable,
        source: EmbeddingTensors,
        *,
        mrope_delta: int = 0,
        incarnation: int | None = None,
    ) -> bool:
        type(self).calls += 1
        if type(self).calls % 25 == 0:
            return True
        return super().add(rid, source, mrope_delta=mrope_delta, incarnation=incarnation)


def test_a_lost_source_is_counted_stuck_and_fails_the_soak(soak: ModuleType) -> None:
    tally = soak.soak_in_process(300, 25, seed=1, sender_type=_LosesSources)
    assert not tally.ok and tally.stuck > 0 and tally.leaked > 0
    assert "stuck ids" in tally.detail


def test_bad_flags_exit_2(soak: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--requests", "-1"],
        ["--ids", "0"],
        ["--requests", "0", "--mooncake-requests", "0"],
    ):
        with pytest.raises(SystemExit) as info:
            soak.main(argv)
        assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_the_script_exits_0_when_clean(
    soak: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert soak.main(["--requests", "100", "--ids", "10", "--mooncake-requests", "0"]) == 0
    assert "stuck 0, leaked 0" in capsys.readouterr().out


def test_the_mooncake_soak_with_a_sender_kill_is_clean(soak: ModuleType) -> None:
    from resumekit.errors import TransportUnavailableError
    from resumekit.transports.mooncake import load_mooncake

    try:
        load_mooncake()
    except TransportUnavailableError as error:
        if os.environ.get("RESUMEKIT_REQUIRE_MOONCAKE") == "1":
            raise
        pytest.skip(str(error))
    tally = soak.soak_mooncake(30, 100_000, seed=2)
    assert tally.ok, tally.line("mooncake")
    assert tally.failed > 0 and tally.intact > 0  # the kill landed mid-run
