"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    runnable = [code for code in blocks if "\n...\n" not in code]  # "..." marks a sketch
    assert runnable
    for code in runnable:
        exec(compile(code, "README.md", "exec"), {})


def test_simulate_example_output_matches() -> None:
    match = re.search(r"\$ resumekit (simulate [^\n]*)\n(.*?)```", README, re.S)
    assert match is not None
    args, expected = match.group(1).split(), match.group(2)
    out = subprocess.run(
        [sys.executable, "-m", "resumekit", *args], capture_output=True, text=True, check=True
    ).stdout
    assert out == expected


def test_quickstart_has_exactly_two_commands() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", quickstart, re.S)
    assert len(commands) == 2
    assert all(len(c.strip().splitlines()) == 1 for c in commands)
    assert "resumekit verify" in commands[0] and "pytest" in commands[1]
