"""Runs: plan, state, work items and dead letters, supervisor, finalize, recovery."""
