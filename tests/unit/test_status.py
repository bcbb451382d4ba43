"""`etl status` figures: error patterns and the run summary, without services."""

from __future__ import annotations

from datetime import UTC, datetime

from etl_tasks.status import normalize_error, summarize


def test_error_patterns_normalize_ids_and_numbers():
    a = normalize_error("chunk 3f2a9c01-77b4-4c1e-9d2e-0a1b2c3d4e5f of unit 12: DuckDB locked "
                        "for 61.5s (keys 1000..4999)")
    b = normalize_error("chunk 9e8d7c6b-1111-4222-8333-444455556666 of unit 7: DuckDB locked "
                        "for 3s (keys 5000..8999)")
    assert a == b == "chunk N of unit N: DuckDB locked for Ns (keys N..N)"
    assert normalize_error("run deadbeef42 failed") == "run N failed"
    # Words are left alone, even hex-looking ones without a digit.
    assert normalize_error("Firebird  unreachable: facade") == "Firebird unreachable: facade"


def _run(run_id, status, minute, error=None, quality=1.0):
    at = datetime(2026, 1, 1, 12, minute, tzinfo=UTC)
    return {"run_id": run_id, "source": "billing", "status": status, "started_at": at,
            "finished_at": at, "loaded": 10, "quarantined": 1, "duration_s": 2.0 * minute,
            "quality_score": quality, "error": error}


def test_summarize_counts_partial_as_not_a_success_and_orders_the_trend():
    runs = [_run("c", "failed", 3, "unit 4 failed after 3 attempts", 0.5),
            _run("a", "finished", 1, quality=0.9), _run("b", "partial", 2, quality=0.8),
            _run("d", "failed", 4, "unit 17 failed after 3 attempts", 0.4)]
    committed = datetime(2026, 1, 1, 12, 2, tzinfo=UTC)
    figures = summarize(runs, committed, now=committed.timestamp() + 30)
    assert figures["success_rate"] == 0.25
    assert figures["average_duration_s"] == 5.0
    assert figures["quality_trend"] == [0.9, 0.8, 0.5, 0.4]
    assert figures["error_patterns"] == {"unit N failed after N attempts": 2}
    assert figures["last_run"]["run_id"] == "d"
    assert figures["staleness_s"] == 30
    empty = summarize([])
    assert (empty["success_rate"], empty["last_run"], empty["staleness_s"]) == (None, None, None)
