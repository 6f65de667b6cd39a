"""Forked checker pools survive a parent that already ran multi-threaded torch ops."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: the parent must own a live OpenMP team when it forks,
# which this pytest process may or may not have, depending on what ran before.
SCRIPT = textwrap.dedent(
    """
    import torch
    from resumekit.properties.forking import fork_pool

    def parallel_op(n):
        return float(torch.arange(n, dtype=torch.float32).repeat(2).sum())

    torch.set_num_threads(2)
    here = parallel_op(4_000_000)
    with fork_pool(1) as pool:
        print(pool.map(parallel_op, [4_000_000])[0] == here, torch.get_num_threads())
    """
)


def test_a_forked_worker_runs_parallel_torch_ops_after_the_parent_did() -> None:
    # Before fork_pool, the worker hung for ever in libgomp's barrier (CI timed out).
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    # The same result as the parent's, and the parent keeps its own thread count.
    assert done.stdout.split() == ["True", "2"]
