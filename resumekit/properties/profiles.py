"""Hypothesis profiles: ``ci`` (deterministic, bounded; the default) and ``fuzz`` (long).

``HYPOTHESIS_PROFILE`` picks one; :func:`load_profile` applies it. ``fuzz`` keeps
what it finds in the example database at ``DEFAULT_DATABASE`` (the one
``resumekit fuzz`` uses), and is the profile HypoFuzz can collect: it fuzzes
only tests that are not derandomized and share the default database.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

CI = "ci"
FUZZ = "fuzz"
DEFAULT_DATABASE = ".resumekit/examples"

# Hypothesis loads its own ``ci`` profile at import when a ``CI`` variable is set;
# both profiles name their parent so neither inherits from whichever was loaded.
_BASE = settings.get_profile("default")

settings.register_profile(
    CI,
    parent=_BASE,
    max_examples=100,
    stateful_step_count=50,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    FUZZ,
    parent=_BASE,
    max_examples=20_000,
    stateful_step_count=100,
    derandomize=False,
    deadline=None,
    database=DirectoryBasedExampleDatabase(DEFAULT_DATABASE),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def load_profile() -> str:
    """Load the profile ``HYPOTHESIS_PROFILE`` names (``ci`` when unset); return its name."""
    name = os.environ.get("HYPOTHESIS_PROFILE", CI)
    settings.load_profile(name)
    return name
