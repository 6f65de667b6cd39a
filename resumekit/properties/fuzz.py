"""The protocol machine as a fuzzer: a time or example budget, a seed, a replayable report."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from resumekit.properties.invariants import InvariantViolation
from resumekit.properties.protocol_machine import ProtocolMachineBase, protocol_machine

BATCH = 25  # examples per Hypothesis run; the budget is checked between runs
STEPS = 50  # steps per example


@dataclass
class FuzzResult:
    strategy: str
    seed: int
    examples: int = 0
    steps: int = 0
    seconds: float = 0.0
    invariant: str | None = None  # the violated invariant, or "crash" for any other error
    detail: str = ""
    trace: list[str] = field(default_factory=list)  # the shrunk falsifying steps
    replay_seed: int | None = None  # pass as --seed to reproduce

    @property
    def failed(self) -> bool:
        return self.invariant is not None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def actions(self) -> list[str]:
        """The rule calls of the falsifying example, each with the values it drew."""
        steps: list[str] = []
        draws: list[str] = []
        for line in self.trace:
            if line.startswith("Draw "):
                draws.append(
                    line.split(": ", 1)[-1].replace("  # or any other generated value", "")
                )
                continue
            match = _RULE.match(line)
            if match is None:
                continue
            step = f"{match.group(1)}({match.group(2)})"
            if draws:
                step += f" drawing {', '.join(draws)}"
                draws = []
            steps.append(step)
        return steps

    def format(self) -> str:
        lines = [f"violates {self.invariant}: {self.detail}"]
        lines += [f"  {i}. {a}" for i, a in enumerate(self.actions, 1)]
        lines.append(
            f"  replay: resumekit fuzz --strategy {self.strategy} --seed {self.replay_seed}"
        )
        return "\n".join(lines)


_RULE = re.compile(r"^state\.(?!teardown\b)(\w+)\((.*)\)$")
_INVARIANT_CHECKS = {"allocator_consistent"}


def fuzz(
    strategy_name: str,
    *,
    budget: float | None = None,
    max_examples: int | None = None,
    start_seed: int = 0,
    progress: Callable[[FuzzResult], None] | None = None,
) -> FuzzResult:
    """Run the protocol machine with ``strategy_name`` until a violation or the budget ends."""
    if budget is None and max_examples is None:
        budget = 60.0
    machine = protocol_machine(strategy_name)
    result = FuzzResult(strategy_name, start_seed)
    examples = _count_examples(machine)
    start = time.perf_counter()
    run = 0
    while True:
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed >= budget:
            break
        if max_examples is not None and result.examples >= max_examples:
            break
        batch = BATCH if max_examples is None else min(BATCH, max_examples - result.examples)
        run_seed = start_seed + run
        run += 1
        before_steps, before_examples = machine.steps_run, examples[0]
        try:
            run_state_machine_as_test(
                seed(run_seed)(machine),
                settings=settings(
                    max_examples=batch,
                    stateful_step_count=STEPS,
                    deadline=None,
                    database=None,
                    derandomize=False,
                    phases=[Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=False,
                ),
            )
        except BaseException as error:  # any failure is a finding
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            result.replay_seed = run_seed
            _record_failure(result, error)
        finally:
            result.examples += min(batch, examples[0] - before_examples)
            result.steps += machine.steps_run - before_steps
            result.seconds = time.perf_counter() - start
        if progress is not None:
            progress(result)
        if result.failed:
            break
    result.seconds = time.perf_counter() - start
    return result


def _count_examples(machine: type[ProtocolMachineBase]) -> list[int]:
    """A counter of machines built (one per example, plus shrinking attempts)."""
    counter = [0]
    original = machine.__init__

    def counting_init(self: ProtocolMachineBase) -> None:
        counter[0] += 1
        original(self)

    machine.__init__ = counting_init  # type: ignore[method-assign]
    return counter


def _record_failure(result: FuzzResult, error: BaseException) -> None:
    if isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    if isinstance(error, InvariantViolation):
        result.invariant, result.detail = error.invariant, error.detail
    else:
        result.invariant, result.detail = "crash", f"{type(error).__name__}: {error}"
    notes = getattr(error, "__notes__", [])
    lines: list[str] = []
    for raw in (line for note in notes for line in note.splitlines()):
        if raw.startswith(("state.", "Draw ")):
            lines.append(raw)
        elif lines and lines[-1].startswith("state.") and not lines[-1].endswith(")"):
            lines[-1] += " " + raw.strip()  # a long argument printed over several lines
        elif lines and raw.startswith(" ") and lines[-1].startswith("state."):
            lines[-1] += " " + raw.strip()
    result.trace = [
        line for line in lines if not any(line.startswith(f"state.{c}(") for c in _INVARIANT_CHECKS)
    ]


__all__ = ["FuzzResult", "fuzz"]
