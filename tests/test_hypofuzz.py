"""HypoFuzz can fuzz the shipped state machines under the ``fuzz`` profile.

HypoFuzz collects with ``pytest --collect-only -m hypothesis`` and keeps a test
only if it is not derandomized, uses the default example database and may
generate. Where HypoFuzz is installed (the ``fuzz`` extra) its own collection
runs; elsewhere a plugin applies the same rules to the same collection.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MACHINES = {"TestAllocatorLifo", "TestAllocatorFifo", "TestProtocolEpoch", "TestVllmConnector"}

RULES = textwrap.dedent(
    """
    import json, os
    import pytest
    from hypothesis import Phase, settings

    def pytest_collection_finish(session):
        verdicts = {}
        for item in session.items:
            name = item.nodeid.split("::")[1]
            s = getattr(item.obj, "_hypothesis_internal_use_settings", settings())
            if not isinstance(item, pytest.Function):
                verdicts[name] = "not_a_function"
            elif list(item.iter_markers("skip")) or list(item.iter_markers("xfail")):
                verdicts[name] = "skipped"
            elif s.derandomize:
                verdicts[name] = "sets_derandomize"
            elif s.database != settings().database:
                verdicts[name] = "differing_database"
            elif Phase.generate not in s.phases:
                verdicts[name] = "no_generate_phase"
            elif not hasattr(item.obj, "_hypothesis_state_machine_class"):
                verdicts[name] = "not_a_state_machine"
            else:
                verdicts[name] = f"fuzzed, examples in {settings().database}"
        with open(os.environ["VERDICTS"], "w") as f:
            json.dump(verdicts, f)
    """
)

HYPOFUZZ = textwrap.dedent(
    """
    import json, os
    from hypofuzz.collection import collect_tests
    result = collect_tests(["--pyargs", "resumekit.properties", "-p", "no:cacheprovider"])
    verdicts = {t.nodeid.split("::")[1]: "fuzzed" for t in result.fuzz_targets}
    for nodeid, why in result.not_collected.items():
        verdicts[nodeid.split("::")[1]] = why["status_reason"]
    with open(os.environ["VERDICTS"], "w") as f:
        json.dump(verdicts, f)
    """
)


# Hypothesis loads its own ``ci`` profile when ``CI`` is set, as on CI machines;
# the verdict must not depend on where the suite runs.
ON_CI = pytest.mark.parametrize("on_ci", [False, True], ids=["local", "CI-set"])


def collect(profile: str, tmp_path: Path, on_ci: bool) -> dict[str, str]:
    """What HypoFuzz (or its rules) makes of each shipped machine under ``profile``."""
    verdicts = tmp_path / "verdicts.json"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env |= {"HYPOTHESIS_PROFILE": profile, "VERDICTS": str(verdicts)}
    if on_ci:
        env["CI"] = "true"
    if importlib.util.find_spec("hypofuzz") is not None:
        command = [sys.executable, "-c", HYPOFUZZ]
    else:
        (tmp_path / "hypofuzz_rules.py").write_text(RULES)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
        command = [
            *(sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "hypothesis"),
            *("-p", "hypofuzz_rules", "-p", "no:cacheprovider", "--pyargs", "resumekit.properties"),
        ]
    subprocess.run(command, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    result: dict[str, str] = json.loads(verdicts.read_text())
    return result


@ON_CI
def test_the_fuzz_profile_lets_hypofuzz_fuzz_every_machine(tmp_path: Path, on_ci: bool) -> None:
    verdicts = collect("fuzz", tmp_path, on_ci)
    assert set(verdicts) == MACHINES
    assert all(v.startswith("fuzzed") for v in verdicts.values()), verdicts
    if "examples in" in next(iter(verdicts.values())):
        assert all(".resumekit/examples" in v for v in verdicts.values()), verdicts


@ON_CI
def test_the_ci_profile_is_derandomized_so_hypofuzz_skips_it(tmp_path: Path, on_ci: bool) -> None:
    verdicts = collect("ci", tmp_path, on_ci)
    assert verdicts == dict.fromkeys(MACHINES, "sets_derandomize")


@pytest.mark.skipif(
    importlib.util.find_spec("hypofuzz") is None, reason="the real check needs the fuzz extra"
)
def test_hypofuzz_itself_is_what_ran() -> None:
    assert importlib.util.find_spec("hypofuzz.collection") is not None
