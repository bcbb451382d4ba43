"""Monitoring: alerts for on-call people (and, later, metrics and thresholds)."""
