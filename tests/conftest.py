import os

import pytest

from resumekit.properties.profiles import load_profile

load_profile()

# Under mutmut each mutant runs its tests in the order of a Python set, with -x.
# Cheapest files first, so a mutant that a unit test kills costs a second, not a
# minute of exploration (test_mutation_check.py orders its own checks by cost).
MUTATION_ORDER = (
    "test_jsonwire.py",
    "test_bad_input.py",
    "test_allocator.py",
    "test_protocol.py",
    "test_adversary.py",
    "test_allocator_machine.py",
    "test_mutation_check.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if "MUTANT_UNDER_TEST" not in os.environ:
        return

    def rank(item: pytest.Item) -> tuple[int, int]:
        path, line, _ = item.location
        name = os.path.basename(path)
        order = MUTATION_ORDER.index(name) if name in MUTATION_ORDER else len(MUTATION_ORDER)
        return order, line or 0

    items.sort(key=rank)
