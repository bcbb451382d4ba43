"""One small entrypoint per worker role: `python -m workers.fleet`, `python -m workers.loader`."""
