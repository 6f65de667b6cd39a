"""Forked worker pools that survive a parent which already ran multi-threaded torch ops."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool

import torch


def fork_pool(processes: int) -> multiprocessing.pool.Pool:
    """A pool of forked workers that run torch on one thread.

    Forked, so planted bugs and mutants in the parent reach the workers. One
    thread, because libgomp's thread pool does not survive ``fork``: a child's
    first parallel torch op hangs for ever once the parent has run one (seen
    under pytest, where the buffer tests run before ``verify``).
    """
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(processes, initializer=torch.set_num_threads, initargs=(1,))
