"""The exporter's gauges from what `status.collect` returns, without services: names, labels
that can never carry a value read from the data, figures added to collect later."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from etl_tasks.monitoring.exporter import EtlCollector, Figures, status_figures

CANARY = "Jane Canary P123456 1970-01-01"


def _collected(**billing_extra):
    billing = {"success_rate": 0.5, "average_duration_s": 12.25, "quality_trend": [0.9, 0.75],
               "error_patterns": {CANARY: 1}, "staleness_s": 30.0, "dead_letters": 2,
               "waiting_in_fallbacks": {"sqlite": {"chunks": 1, "rows": 40}},
               "last_run": {"run_id": "r1", "status": "partial", "finished_at": "x",
                            "loaded": 90, "quarantined": 10}, **billing_extra}
    empty = {"success_rate": None, "average_duration_s": None, "quality_trend": [],
             "error_patterns": {}, "last_run": None, "staleness_s": None, "dead_letters": 0}
    return {"sources": {"billing": billing, "lab_results": empty},
            "overall": {**billing, "waiting_in_fallbacks": {"sqlite": {"chunks": 1, "rows": 40},
                                                            "spool": {"chunks": 0, "rows": 0}}},
            "workers": {"extract": ["fleet-1@h"], "load": ["loader@h"]},
            "open_alerts": [{"severity": "warning", "source": "billing"},
                            {"severity": "critical", "source": "billing"},
                            {"severity": CANARY, "source": "billing"}]}


def _page(collected) -> str:
    registry = CollectorRegistry()
    registry.register(EtlCollector(lambda: collected, lambda: {"load": 3}, timeout_s=2))
    return generate_latest(registry).decode()


def _samples(collected) -> dict[str, float]:
    figures = Figures()
    status_figures(figures, collected)
    return {f"{family.name}{sorted(s.labels.items())}": s.value
            for family in figures.families.values() for s in family.samples}


def test_figures_are_named_after_collect_keys_and_absent_when_unknown():
    """Each figure is a gauge per source; a source without runs exports no rate at all."""
    samples = _samples(_collected())
    assert samples["etl_source_success_rate[('source', 'billing')]"] == 0.5
    assert samples["etl_source_average_duration_seconds[('source', 'billing')]"] == 12.25
    assert samples["etl_source_quality_score[('source', 'billing')]"] == 0.75
    assert samples["etl_source_runs[('source', 'billing')]"] == 2
    assert samples["etl_source_last_run_loaded_rows[('source', 'billing')]"] == 90
    assert samples["etl_source_dead_letters[('source', 'lab_results')]"] == 0
    assert "etl_source_success_rate[('source', 'lab_results')]" not in samples
    assert samples["etl_source_last_run_status[('source', 'billing'), ('status', 'partial')]"] \
        == 1
    assert samples["etl_source_last_run_status[('source', 'billing'), ('status', 'failed')]"] \
        == 0
    assert samples["etl_fallback_waiting_rows[('fallback', 'sqlite')]"] == 40
    assert samples["etl_workers_online[('queue', 'transform')]"] == 0
    assert samples["etl_open_alerts[('severity', 'info')]"] == 0
    assert samples["etl_open_alerts[('severity', 'critical')]"] == 1
    assert samples["etl_status_runs_from[('store', 'duckdb')]"] == 1
    assert samples["etl_status_runs_from[('store', 'redis')]"] == 0


def test_figures_added_to_collect_later_are_exported_without_leaking_text():
    """New numbers appear under their key's name; error classes become labels only when they
    look like a class name, so no text from the data can reach a label."""
    collected = _collected(average_extract_s=1.5, errors_by_class={
        "TransientError": 3, CANARY: 1, "KeyError": 1})
    collected["sources"]["billing"]["last_run"].update(
        source_latency_s=0.25, errors_by_class='{"OSError": 2}')
    samples = _samples(collected)
    assert samples["etl_source_average_extract_seconds[('source', 'billing')]"] == 1.5
    assert samples["etl_source_last_run_source_latency_seconds[('source', 'billing')]"] == 0.25
    assert samples["etl_source_errors_by_class[('error_class', 'other'), "
                   "('source', 'billing')]"] == 1
    assert samples["etl_source_errors_by_class[('error_class', 'TransientError'), "
                   "('source', 'billing')]"] == 3
    assert samples["etl_source_last_run_errors_by_class[('error_class', 'OSError'), "
                   "('source', 'billing')]"] == 2
    page = _page(collected)
    assert "Canary" not in page
    assert "P123456" not in page
    assert 'etl_open_alerts{severity="other"} 1.0' in page


def test_a_status_shape_it_does_not_know_is_a_zero_gauge_not_a_failed_scrape():
    """A collect result missing what the exporter needs gives etl_exporter_up 0 and the queue
    depths, never an error page."""
    page = _page({"sources": {"billing": {"last_run": 7}}, "overall": {}})
    assert 'etl_exporter_part_up{part="status"} 0.0' in page
    assert "etl_exporter_up 0.0" in page
    assert 'etl_queue_depth{queue="load"} 3.0' in page
