"""The fuzzer's examples depend on its seed alone: not on what the process imported, nor
on where resumekit is installed (issue 23: the same verdict every run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
