"""The fuzzer's examples depend on its seed alone: not on what the process imported, nor
on where resumekit is installed (issue 23: the same verdict every run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis.internal.conjecture import providers

from resumekit.properties.fuzz import only_the_seed

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "with":
    import constants_galore  # a local module full of constants Hypothesis would draw
from resumekit.properties.fuzz import fuzz
r = fuzz("seed-index", max_examples=50, database=None)
print(json.dumps([r.failed, r.examples, r.steps, r.invariant]))
"""


def _probe(folder: Path, extra: str) -> list[object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: list[object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_the_same_seed_runs_the_same_examples_whatever_else_is_loaded(tmp_path: Path) -> None:
    """Without only_the_seed, a local module's constants changed which examples ran
    (verify's fuzz missed sent-tokens under pytest and caught it from the CLI)."""
    values = ", ".join(str(n) for n in (*range(2, 60), 127, 128, 255, 256, 4096, 8192))
    (tmp_path / "constants_galore.py").write_text(f"VALUES = ({values})\nNAMES = ('r0', 'r1')\n")
    plain, loaded = _probe(tmp_path, "without"), _probe(tmp_path, "with")
    assert plain == loaded
    assert plain[0] is True  # seed-index is caught: the probe checked something


def test_only_the_seed_empties_hypothesis_local_constants_and_restores_them() -> None:
    # The hook is private: this fails first when a Hypothesis release moves it.
    get = providers._get_local_constants
    with only_the_seed():
        assert len(providers._get_local_constants()) == 0
    assert providers._get_local_constants is get


def test_without_shrinking_the_same_examples_find_the_same_failure_in_fewer_runs(
    tmp_path: Path,
) -> None:
    """verify fuzzes the broken designs with ``shrink=False``: the finding, and the
    example it is found at, are the shrinking run's; only the steps are not minimal."""
    from resumekit.errors import InvalidArgumentError
    from resumekit.properties.fuzz import fuzz, replay
    from resumekit.properties.verify import StrategyReport, VerifyReport, format_report

    shrunk = fuzz("seed-index", max_examples=100, database=None)
    found = fuzz("seed-index", max_examples=100, database=tmp_path / "db", shrink=False)
    assert shrunk.failed and found.failed and shrunk.shrunk and not found.shrunk
    assert found.examples == shrunk.examples  # found at the same example
    assert found.runs < shrunk.runs and len(found.actions) >= len(shrunk.actions) > 0
    assert replay("seed-index", tmp_path / "db").failed  # kept, and it replays
    entry = StrategyReport("seed-index")
    entry.fuzzed = found
    text = format_report(VerifyReport([entry], 1, 1, None, quick=True))
    assert f"fuzzer's counterexample ({len(found.actions)} steps, not shrunk;" in text
    assert f"violates {found.invariant}: {found.detail}" in text
    assert f"  1. {found.actions[0]}" not in text  # no unshrunk steps printed
    with pytest.raises(InvalidArgumentError, match="shrink"):
        fuzz("seed-index", max_examples=1, database=None, shrink=1)  # type: ignore[arg-type]
