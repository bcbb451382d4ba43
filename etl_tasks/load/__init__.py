"""Sinks: DuckDB (the primary, single writer)."""
