"""Every bad flag value exits 2 at once with one line naming the flag; every flag has help."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from resumekit import __version__
from resumekit.cli import build_parser, main

BAD_VALUES = [
    (["simulate", "--tokens", "-5"], "--tokens"),
    (["simulate", "--tokens", "0"], "--tokens"),
    (["simulate", "--tokens", "many"], "--tokens"),
    (["simulate", "--default-allocate", "0"], "--default-allocate"),
    (["simulate", "--pool-blocks", "0"], "--pool-blocks"),
    (["simulate", "--block-size", "0"], "--block-size"),
    (["simulate", "--block-size", "1.5"], "--block-size"),
    (["simulate", "--hidden", "-1"], "--hidden"),
    (["simulate", "--max-round-tokens", "0"], "--max-round-tokens"),
    (["simulate", "--seed", "-1"], "--seed"),
    (["simulate", "--seed", str(2**70)], "--seed"),
    (["simulate", "--reuse", "random"], "--reuse"),
    (["simulate", "--transport", "carrier-pigeon"], "--transport"),
    (["simulate", "--transport", "torch", "--timeout", "0"], "--timeout"),
    (["simulate", "--timeout", "-1"], "--timeout"),
    (["simulate", "--timeout", "nan"], "--timeout"),
    (["simulate", "--timeout", "inf"], "--timeout"),
    (["verify", "--seed", str(2**64)], "--seed"),
    (["verify", "--workers", "0"], "--workers"),
    (["fuzz", "--seed", "-3"], "--seed"),
    (["fuzz", "--strategy", "hope"], "--strategy"),
    (["check", "--workers", "0"], "--workers"),
    (["check", "--default-blocks", "0"], "--default-blocks"),
    (["check", "--reuse", "mru"], "--reuse"),
    (["check", "--requests", "100000000000"], "--requests"),
    (["check", "--blocks", "65"], "--blocks"),
    (["check", "--max-rounds", "1000"], "--max-rounds"),
    (["check", "--default-blocks", "-2"], "--default-blocks"),
    (["simulate", "--pool-blocks", "100000000"], "--pool-blocks"),
    (["simulate", "--tokens", str(2**31)], "--tokens"),
    (["simulate", "--hidden", str(2**40)], "--hidden"),
    (["simulate", "--block-size", str(2**31)], "--block-size"),
    (["simulate", "--default-allocate", str(2**31)], "--default-allocate"),
    (["simulate", "--max-round-tokens", str(2**40)], "--max-round-tokens"),
    # The transports take a day at most: the child process used to die on it.
    (["simulate", "--transport", "mooncake", "--timeout", "100000"], "--timeout"),
    (["simulate", "--transport", "torch", "--timeout", "86401"], "--timeout"),
    (["simulate", "--default-allocate", "automatic"], "--default-allocate"),
]


@pytest.mark.parametrize(("args", "flag"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_exits_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], args: list[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and "Traceback" not in captured.err
    assert captured.out == ""


IMPOSSIBLE = [
    # Values each fine alone, impossible together: refused before anything is allocated.
    (["--hidden", "1000000000"], ["--tokens", "--hidden", "bytes"]),
    (["--tokens", "10", "--hidden", str(2**30)], ["--hidden", "bytes"]),
    (["--pool-blocks", "1", "--block-size", "16"], ["--default-allocate", "--pool-blocks"]),
    (["--transport", "torch", "--device", "cuda"], ["--transport", "--device cuda", "NCCL"]),
    (
        ["--pool-blocks", "2", "--block-size", "8", "--default-allocate", "17"],
        ["--default-allocate", "--pool-blocks", "--block-size"],
    ),
]


@pytest.mark.parametrize(("args", "named"), IMPOSSIBLE)
def test_simulate_refuses_what_could_never_run(
    capsys: pytest.CaptureFixture[str], args: list[str], named: list[str]
) -> None:
    assert main(["simulate", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == ""
    assert all(word in lines[0] for word in named), lines[0]


def test_simulate_takes_round_0_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", "4096")
    assert main(["simulate", "--tokens", "10000"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["0", "4096", "4096"]
    # The flag wins over the variable.
    assert main(["simulate", "--tokens", "10000", "--default-allocate", "2048"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["0", "2048", "2048"]
    # A pool too small for the variable's round 0 names the variable.
    assert main(["simulate", "--tokens", "100", "--pool-blocks", "1", "--block-size", "16"]) == 2
    assert "RESUMEKIT_DEFAULT_ALLOCATE_TOKENS" in capsys.readouterr().err
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", "lots")
    assert main(["simulate", "--tokens", "100"]) == 2
    assert "RESUMEKIT_DEFAULT_ALLOCATE_TOKENS='lots'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"resumekit {__version__}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_flag_has_help_and_shows_its_default(name: str) -> None:
    command = _subcommands()[name]
    assert command.description, f"{name} has no description"
    text = command.format_help()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{name} {flag} has no help"
        if action.default is not None and action.default is not False:
            assert "default" in (action.help % {"default": action.default}) or (
                f"(default: {action.default})" in " ".join(text.split())
            ), f"{name} {flag} does not show its default"


@pytest.mark.parametrize(
    ("args", "end"),
    [
        (["check", "--blocks", "3", "--requests", "1", "--max-rounds", "3"], "2/2 explored"),
        (["check", "--blocks", "3", "--requests", "1", "--reuse", "fifo"], "1/1 explored"),
        (["fuzz", "--max-examples", "3"], "3/3 fuzz"),
    ],
)
def test_progress_without_a_terminal_ends_where_the_run_ended(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], end: str
) -> None:
    if args[0] == "fuzz":
        args = [*args, "--database", str(tmp_path)]
    assert main(args) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert end in lines[-1], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_simulate_reads_auto_from_the_environment_as_the_receiver_does(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", "auto")
    # An auto-sized receiver starts from 8192 tokens (the pool's, when it holds fewer).
    assert main(["simulate", "--tokens", "20000"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:3] == ["0", "8192", "8192"]
    assert main(["simulate", "--tokens", "20000", "--pool-blocks", "40"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["0", "5120", "5120"]
    monkeypatch.delenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS")
    assert main(["simulate", "--tokens", "3000", "--default-allocate", "auto"]) == 0
    assert "intact" in capsys.readouterr().out


def test_simulate_blames_the_variable_that_sized_the_pool(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", str(2**31))
    assert main(["simulate", "--tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert "RESUMEKIT_DEFAULT_ALLOCATE_TOKENS" in err and "--tokens" not in err
    monkeypatch.setenv("RESUMEKIT_DEFAULT_ALLOCATE_TOKENS", "2000000000")
    assert main(["simulate", "--tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert "round 0's 2000000000 tokens, RESUMEKIT_DEFAULT_ALLOCATE_TOKENS" in err
    assert "sized for --tokens" not in err


def test_check_names_the_faults_that_take_blocks_not_internal_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--blocks", "1", "--faults", "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--faults grab,squeeze" in err[0] and "--blocks 1" in err[0]
    assert "pressure" not in err[0] and "squeezes" not in err[0]


@pytest.mark.parametrize("command", ["fuzz", "verify"])
def test_an_unwritable_database_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main([command, "--database", str(a_file / "db")]) == 2
    captured = capsys.readouterr()
    assert "--database" in captured.err and captured.out == ""


def test_replay_errors_name_the_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["fuzz", "--replay", str(tmp_path / "missing")]) == 2
    assert "--replay" in capsys.readouterr().err


def test_simulate_on_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["resumekit simulate: --device cuda: CUDA is not available on this machine"]
