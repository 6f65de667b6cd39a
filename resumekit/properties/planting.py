"""Plant a bug in the shipped code for as long as a ``with`` block runs.

A planted bug is a small textual change to one method's source: the method is
recompiled in its own module's namespace and set on its class, then restored.
That is how the property suite proves it can fail: each kind of bug kept in
``tests/test_planted_bugs.py`` must be caught by the explorer over the real
code. The explorer's worker processes are forked, so they see the change too.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from resumekit.errors import InvalidArgumentError


@dataclass(frozen=True)
class Bug:
    """``old`` replaced by ``new`` (each exactly once) in ``owner.method``."""

    name: str
    owner: type
    method: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.owner.__name__}.{self.method}: {self.name}"


@contextmanager
def planted(bug: Bug) -> Iterator[None]:
    """The shipped class with ``bug`` in it, for the duration of the block."""
    original = bug.owner.__dict__[bug.method]
    function = original.__func__ if isinstance(original, staticmethod) else original
    source = inspect.getsource(function)  # as indented in its file, like ``old`` and ``new``
    if source.count(bug.old) != 1:
        raise InvalidArgumentError(
            f"{bug}: the text to replace occurs {source.count(bug.old)} times, not once"
        )
    module = sys.modules[function.__module__]
    namespace: dict[str, Any] = dict(vars(module))
    changed_source = textwrap.dedent(source.replace(bug.old, bug.new))
    code = compile(changed_source, f"<planted: {bug}>", "exec")
    exec(code, namespace)  # our own source, changed by our own test
    changed = namespace[bug.method]
    if isinstance(original, staticmethod):
        changed = staticmethod(changed)
    setattr(bug.owner, bug.method, changed)
    try:
        yield
    finally:
        setattr(bug.owner, bug.method, original)


__all__ = ["Bug", "planted"]
