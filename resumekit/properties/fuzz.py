"""The protocol machine as a fuzzer: an example budget, seeds, and replays that reproduce.

The budget is a number of examples, so the verdict is the same on a fast idle
machine and a slow loaded one; an optional seconds cap may stop a run early,
which the result says (``capped``), so a caller can report it inconclusive.
Every falsifying example (shrunk, unless the caller only needs to know one
exists) is saved in an example database (a directory); :func:`replay` runs
those saved examples again, in any process.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

try:  # where Hypothesis keeps the constants it draws from local modules (private)
    from hypothesis.internal.conjecture import providers as _PROVIDERS
except ImportError:  # pragma: no cover - a release without it draws none
    _PROVIDERS = None  # type: ignore[assignment]

from resumekit._check import as_cap_seconds, as_int, check_bool, check_callback
from resumekit.errors import InvalidArgumentError
from resumekit.properties.invariants import CRASH, InvariantViolation
from resumekit.properties.profiles import DEFAULT_DATABASE
from resumekit.properties.protocol_machine import ProtocolMachineBase, protocol_machine

BATCH = 25  # examples per Hypothesis run: the cap is checked between runs


@contextmanager
def only_the_seed() -> Iterator[None]:
    """Examples that depend on the seed alone, not on what the process imported.

    Hypothesis also draws, now and then, constants it finds in the source of the
    local modules loaded in the process: which ones depends on what ran before and
    on where resumekit is installed (in site-packages it is not local), so one seed
    ran different examples in a CLI, a test process and CI, and verify's fuzz caught
    a broken design in one and missed it in another. This turns those draws off for
    the run (a private hook of Hypothesis; without it, nothing changes).
    """
    providers = _PROVIDERS
    get = getattr(providers, "_get_local_constants", None)
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if get is None or cache is None:
        yield
        return
    empty = type(providers._local_constants)()
    providers._get_local_constants = lambda: empty
    cache.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = get
        cache.cache.clear()


STEPS = 50  # steps per example


@dataclass
class FuzzResult:
    strategy: str
    seed: int
    examples: int = 0  # examples generated (shrinking attempts not counted)
    runs: int = 0  # machines run, shrinking included
    steps: int = 0
    seconds: float = 0.0
    capped: bool = False  # the seconds cap stopped it before its example budget
    invariant: str | None = None  # the violated invariant, or CRASH for any other error
    detail: str = ""
    actions: list[str] = field(default_factory=list)  # the falsifying steps
    database: str | None = None  # where the falsifying example was saved
    shrunk: bool = True  # whether a falsifying example was shrunk before it was kept

    @property
    def failed(self) -> bool:
        return self.invariant is not None

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def replay_command(self) -> str | None:
        if self.database is None:
            return None
        return f"resumekit fuzz --strategy {self.strategy} --replay {self.database}"

    def format(self, *, steps: bool = True) -> str:
        """The violation, its steps (unless ``steps`` is false) and the replay command."""
        lines = [f"violates {self.invariant}: {self.detail}"]
        if steps:
            lines += [f"  {i}. {a}" for i, a in enumerate(self.actions, 1)]
        if self.replay_command is not None:
            lines.append(f"  replay: {self.replay_command}")
        return "\n".join(lines)


def writable_database(database: str | Path, name: str = "database") -> str:
    """``database`` as a folder a falsifying example can be saved in, created if missing;
    checked before a run, so a finding is never lost to a path that cannot be written."""
    if not isinstance(database, str | Path) or str(database) == "":
        raise InvalidArgumentError(f"{name} must be a folder path, not {database!r}")
    path = Path(database)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise InvalidArgumentError(
            f"{name} {str(path)!r} is not a writable folder: {error.strerror or error}"
        ) from None
    return str(path)


def _settings(examples: int, database: str | None, phases: list[Phase]) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        database=None if database is None else DirectoryBasedExampleDatabase(database),
        derandomize=False,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )


def fuzz(
    strategy_name: str,
    *,
    max_examples: int,
    start_seed: int = 0,
    cap_seconds: float | None = None,
    database: str | Path | None = DEFAULT_DATABASE,
    progress: Callable[[FuzzResult], None] | None = None,
    shrink: bool = True,
) -> FuzzResult:
    """Run ``max_examples`` examples of the protocol machine, stopping at the first violation.

    Examples run in batches seeded ``start_seed``, ``start_seed + 1``, ...: the
    same arguments run the same examples. A falsifying example is shrunk (unless
    ``shrink`` is false: whether one exists is the same either way, and shrinking
    can take most of the time) and saved in ``database`` (``None``: not saved), a
    folder checked writable first.
    """
    if type(max_examples) is not int or max_examples < 1:
        raise InvalidArgumentError(f"max_examples must be an int >= 1, got {max_examples!r}")
    cap_seconds = as_cap_seconds(cap_seconds, "cap_seconds")
    as_int(start_seed, "start_seed", minimum=0)
    check_callback(progress, "progress")
    check_bool(shrink, "shrink")
    machine = protocol_machine(strategy_name)
    db = None if database is None else writable_database(database)
    result = FuzzResult(strategy_name, start_seed, shrunk=shrink)
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    start = time.perf_counter()
    run = 0
    while result.examples < max_examples:
        if cap_seconds is not None and time.perf_counter() - start >= cap_seconds:
            result.capped = True
            break
        batch = min(BATCH, max_examples - result.examples)
        before_steps, before_runs = machine.steps_run, machine.machines
        try:
            with only_the_seed():
                run_state_machine_as_test(
                    seed(start_seed + run)(machine),
                    settings=_settings(batch, db, phases),
                )
        except BaseException as error:  # any failure is a finding
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            _record_failure(result, machine, error)
            result.database = db
        finally:
            run += 1
            result.examples += batch
            result.runs += machine.machines - before_runs
            result.steps += machine.steps_run - before_steps
            result.seconds = time.perf_counter() - start
        if progress is not None:
            progress(result)
        if result.failed:
            break
    result.seconds = time.perf_counter() - start
    return result


def replay(strategy_name: str, database: str | Path) -> FuzzResult:
    """Run again the falsifying examples saved in ``database`` for ``strategy_name``."""
    if not isinstance(database, str | Path):
        raise InvalidArgumentError(f"database must be a folder path, not {database!r}")
    path = Path(database)
    if not path.is_dir():
        raise InvalidArgumentError(f"no example database at {str(path)!r}")
    machine = protocol_machine(strategy_name)
    result = FuzzResult(strategy_name, 0)
    start = time.perf_counter()
    before_steps, before_runs = machine.steps_run, machine.machines
    try:
        with only_the_seed():
            run_state_machine_as_test(
                machine, settings=_settings(1000, str(path), [Phase.explicit, Phase.reuse])
            )
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        _record_failure(result, machine, error)
        result.database = str(path)
    result.runs = result.examples = machine.machines - before_runs
    result.steps = machine.steps_run - before_steps
    result.seconds = time.perf_counter() - start
    return result


def _record_failure(
    result: FuzzResult, machine: type[ProtocolMachineBase], error: BaseException
) -> None:
    if isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    if isinstance(error, InvariantViolation):
        result.invariant, result.detail = error.invariant, error.detail
    else:
        result.invariant, result.detail = CRASH, f"{type(error).__name__}: {error}"
    # Hypothesis runs the falsifying example (shrunk or not) once more, last: its
    # machine logged the steps.
    last = machine.last
    result.actions = list(last.log) if last is not None else []


__all__ = [
    "DEFAULT_DATABASE",
    "FuzzResult",
    "fuzz",
    "only_the_seed",
    "replay",
    "writable_database",
]
