"""Monitoring: alerts and thresholds for on-call people, Sentry, the Prometheus exporter and
the HTML report."""
