"""Hypothesis profiles: ``ci`` (deterministic, bounded; the default) and ``fuzz`` (long).

``HYPOTHESIS_PROFILE`` picks one; :func:`load_profile` applies it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI = "ci"
FUZZ = "fuzz"

settings.register_profile(
    CI,
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
    max_examples=20_000,
    stateful_step_count=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def load_profile() -> str:
    """Load the profile ``HYPOTHESIS_PROFILE`` names (``ci`` when unset); return its name."""
    name = os.environ.get("HYPOTHESIS_PROFILE", CI)
    settings.load_profile(name)
    return name
