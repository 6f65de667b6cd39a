"""The command line: exit codes and what it prints."""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resumekit.cli import main
from resumekit.properties.fuzz import fuzz

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_check_epoch_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "check", "--blocks", "3", "--requests", "1", "--max-rounds", "3")
    assert code == 0
    assert "no violation; every reachable state can finish" in out
    assert "states/s" in out


def test_check_reports_a_numbered_counterexample(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(
        capsys,
        "check",
        "--strategy",
        "seed-index",
        "--faults",
        "none",
        "--reuse",
        "lifo",
        "--requests",
        "1",
        "--blocks",
        "1",
    )
    assert code == 1
    assert "violates liveness" in out
    assert "  1. engine adds r0" in out


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["check", "--faults", "meteor"], "--faults"),
        (["check", "--faults", "abort,crash,abort"], "--faults"),
        (["check", "--max-rounds", "0"], "--max-rounds"),
        (["check", "--requests", "0"], "--requests"),
        (["check", "--blocks", "-1"], "--blocks"),
        (["fuzz", "--max-examples", "0"], "--max-examples"),
        (["fuzz", "--budget", "-5"], "--budget"),
        (["fuzz", "--budget", "0"], "--budget"),
        (["fuzz", "--budget", "inf"], "--budget"),
        (["verify", "--examples", "0"], "--examples"),
        (["verify", "--broken-examples", "0"], "--broken-examples"),
        (["verify", "--budget", "0"], "--budget"),
    ],
)
def test_a_run_that_would_check_nothing_is_refused(
    capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "no violation" not in err


def test_check_default_blocks_beyond_the_pool_names_the_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--blocks", "2", "--default-blocks", "3"]) == 2
    assert "--default-blocks" in capsys.readouterr().err


def test_fuzz_clean_and_caught(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    db = str(tmp_path / "examples")
    code, out = run(capsys, "fuzz", "--max-examples", "30", "--database", db)
    assert code == 0 and "no violation" in out
    code, out = run(
        capsys, "fuzz", "--strategy", "seed-index", "--max-examples", "300", "--database", db
    )
    assert code == 1
    assert (
        "violates" in out and f"replay: resumekit fuzz --strategy seed-index --replay {db}" in out
    )


def test_fuzz_capped_by_seconds_is_inconclusive(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "fuzz", "--max-examples", "100000", "--budget", "0.5")
    assert code == 3 and "inconclusive" in out and "no violation" not in out


def test_a_finding_replays_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """The fuzzer's replay command reproduces its finding in another process."""
    db = tmp_path / "examples"
    found = fuzz("seed-index", max_examples=300, database=db)
    assert found.failed and found.replay_command is not None
    command = found.replay_command.split()
    assert command[:2] == ["resumekit", "fuzz"]
    proc = subprocess.run(
        [sys.executable, "-m", "resumekit", *command[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"violates {found.invariant}: {found.detail}" in proc.stdout
    for i, step in enumerate(found.actions, 1):
        assert f"  {i}. {step}" in proc.stdout


def test_simulate_and_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "simulate", "--tokens", "20000", "--pool-blocks", "64")
    assert code == 0 and "output intact, 0 block(s) leaked" in out
    code, out = run(capsys, "simulate", "--pool-blocks", "3")
    assert code == 2
    code, out = run(capsys, "diagram")
    assert code == 0 and "stateDiagram-v2" in out


def test_verify_main_job(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "verify", "--database", str(tmp_path / "examples"))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["strategy", "states", "explored"]
    for name in ("seed-index", "no-dedup", "sent-tokens"):
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("caught")
        assert f"{name}: shortest counterexample (explorer" in out
        assert f"replay: resumekit fuzz --strategy {name} --replay" in out
    assert next(line for line in lines if line.startswith("epoch")).rstrip().endswith("verified")
    for name in ("standard", "id reuse", "sender restart", "forged and poisoned"):
        assert f"  {name}: " in out
    assert "verdict: PASS" in out
    # The README shows this run: every count and bound is what it prints (states/s vary).
    shown = README.split("<!-- verify-output -->\n```\n", 1)[1].split("```", 1)[0]
    ran, readme = _without_rates(out), _without_rates(shown)
    diff = "\n".join(difflib.unified_diff(readme.splitlines(), ran.splitlines(), lineterm=""))
    assert ran.startswith(readme), f"README's verify output differs from this run:\n{diff}"


def _without_rates(text: str) -> str:
    """The output less what varies: states/s (the machine), and how many examples the
    fuzzer needed to catch a broken design and which invariant it tripped first
    (Hypothesis's draws, which its releases and a pytest process change; caught either way)."""
    broken = r"^((?:seed-index|no-dedup|sent-tokens) +\S+ +\S+ +)\d+( .*fuzz: )\w+"
    text = re.sub(broken, r"\1-\2-", text, flags=re.M)
    return re.sub(r"[\d,]+/s", "-/s", re.sub(r" +", " ", text))


def test_verify_capped_early_is_inconclusive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out = run(capsys, "verify", "--budget", "1", "--database", str(tmp_path / "db"))
    assert code == 3, out
    assert "verdict: INCONCLUSIVE" in out
    assert "MISSED" not in out and "VIOLATED" not in out and "verdict: FAIL" not in out
