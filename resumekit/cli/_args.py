"""What the command line's parsers share: flag types, the help format, a progress bar."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Final, Literal

from resumekit.properties.bounds import FAULTS, STANDARD_FAULTS
from resumekit.protocol.receiver import AUTO
from resumekit.transports._threaded import MAX_TIMEOUT


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in ``[minimum, maximum]`` (a run that checks nothing is refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


#: The largest seed torch's generator takes.
MAX_SEED: Final = 2**63 - 1
MAX_TOKENS: Final = 2**31 - 1  # token counts travel as int32


Round0 = int | Literal["auto"]  # simulate's round 0: tokens, or the receiver's auto sizing


def _parse_faults(text: str) -> set[str]:
    """``check --faults``: standard, all, none, or a comma list of fault names."""
    names = [f.name for f in FAULTS]
    if text == "standard":
        return set(STANDARD_FAULTS)
    if text == "all":
        return set(names)
    if text == "none":
        return set()
    chosen = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown fault(s) {unknown}; choose standard, all, none or a list of "
            + ",".join(names)
        )
    twice = sorted({f for f in chosen if chosen.count(f) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} listed twice; each at most once")
    return set(chosen)


def _timeout(text: str) -> float:
    """``simulate --timeout``: seconds in (0, a day], as the transports take them."""
    value = _seconds(text)
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_TIMEOUT:g} seconds, got {text}")
    return value


def _tokens_or_auto(text: str) -> Round0:
    """``simulate --default-allocate``: a token count, or ``auto``."""
    return AUTO if text == AUTO else _at_least(1, MAX_TOKENS)(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


class Progress:
    """A one-line progress bar on stderr (plain lines when it is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._text = ""
        self._shown = -1  # ``done`` when a plain line was last printed

    def _line(self) -> str:
        width = 24
        filled = min(width, int(width * self.done / self.total)) if self.total else width
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self._text}"

    def show(self, text: str, *, force: bool = False) -> None:
        self._text = text
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r" + self._line()[:110].ljust(110))
            sys.stderr.flush()
        elif force or now - self._last >= 10:
            print(self._line(), file=sys.stderr, flush=True)
            self._last = now
            self._shown = self.done

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text, force=True)

    def close(self) -> None:
        """Clear the bar; without a terminal, print where it ended if that was not shown."""
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()
        elif self._text and self._shown != self.done:
            print(self._line(), file=sys.stderr, flush=True)
            self._shown = self.done
