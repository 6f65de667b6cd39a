"""Hypothesis state machines, invariants and reference strategies, shipped for users to run."""
