"""Every benchmark script refuses a bad flag value at once: exit 2, naming the flag."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

BAD = [
    ("bench_allocator", ["--hidden", "0"], "--hidden"),
    ("bench_allocator", ["--threads", "0"], "--threads"),
    ("bench_distributed", ["--tokens", "-1"], "--tokens"),
    ("bench_distributed", ["--pairs", "2"], "--pairs"),
    ("bench_distributed", ["--hidden", "x"], "--hidden"),
    ("bench_mooncake", ["--tokens", "0"], "--tokens"),
    ("bench_mooncake", ["--threads", "-2"], "--threads"),
    ("bench_mooncake", ["--pairs", "1"], "--pairs"),
    ("bench_protocol", ["--tokens", str(2**31)], "--tokens"),
    ("bench_protocol", ["--hidden", "-1"], "--hidden"),
    ("bench_vllm", ["--requests", "0"], "--requests"),
    ("bench_vllm", ["--rate", "nan"], "--rate"),
    ("bench_vllm", ["--rate", "0"], "--rate"),
    ("bench_vllm", ["--seed", "-1"], "--seed"),
    ("bench_vllm", ["--width", "0"], "--width"),
    ("bench_vllm", ["--pool-mb", "-48"], "--pool-mb"),
    ("bench_vllm", ["--push-wait", "inf"], "--push-wait"),
    ("bench_vllm", ["--max-resume", "0"], "--max-resume"),
    ("bench_vllm", ["--round0", "many"], "--round0"),
    ("bench_vllm", ["--round0", "100000", "--pool-mb", "1"], "--round0"),
    ("bench_vllm", ["--deadline", "-5"], "--deadline"),
    ("bench_vllm", ["--json", "/no/such/folder/out.json"], "--json"),
    ("soak", ["--requests", "-1"], "--requests"),
    ("soak", ["--ids", "0"], "--ids"),
    ("soak", ["--mooncake-tokens", "0"], "--mooncake-tokens"),
]


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # as when it runs as a script
    spec = importlib.util.spec_from_file_location(f"resumekit_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "argv", "flag"), BAD, ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD]
)
def test_a_bad_value_exits_2_naming_the_flag(
    script: str,
    argv: list[str],
    flag: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = _load(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert flag in captured.err.strip().splitlines()[-1] and "Traceback" not in captured.err
    assert captured.out == ""
