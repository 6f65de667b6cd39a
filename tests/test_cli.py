"""The command line: exit codes and what it prints."""

from __future__ import annotations

import pytest

from resumekit.cli import main


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
    assert "  1. r0 is added" in out


def test_check_rejects_unknown_faults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--faults", "meteor"]) == 2
    assert "unknown fault" in capsys.readouterr().err


def test_fuzz_clean_and_caught(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "fuzz", "--strategy", "epoch", "--max-examples", "30")
    assert code == 0 and "no violation" in out
    code, out = run(capsys, "fuzz", "--strategy", "seed-index", "--max-examples", "300")
    assert code == 1
    assert "violates" in out and "replay: resumekit fuzz --strategy seed-index --seed" in out


def test_simulate_and_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "simulate", "--tokens", "20000", "--pool-blocks", "64")
    assert code == 0 and "output intact, 0 block(s) leaked" in out
    code, out = run(capsys, "simulate", "--pool-blocks", "3")
    assert code == 2
    code, out = run(capsys, "diagram")
    assert code == 0 and "stateDiagram-v2" in out


def test_verify_main_job(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "verify", "--budget", "30")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["strategy", "states", "explored"]
    for name in ("seed-index", "no-dedup", "sent-tokens"):
        row = next(line for line in lines if line.startswith(name))
        assert row.rstrip().endswith("caught")
        assert f"{name}: shortest counterexample (explorer" in out
    assert next(line for line in lines if line.startswith("epoch")).rstrip().endswith("verified")
    assert "verdict: PASS" in out
