"""Pure planning, config and staging behaviour, without services."""

from __future__ import annotations

import pyarrow as pa
import pytest
from celery.schedules import crontab

from beat_schedule import build_schedule
from etl_tasks import staging
from etl_tasks.config import PipelineConfig, Settings, SourceConfig, load_pipeline
from etl_tasks.errors import FatalError, TransientError
from etl_tasks.runs.plan import plan_ranges
from etl_tasks.sources import firebird
from etl_tasks.sources.firebird import FirebirdTarget


def _billing(chunk_size=100):
    return SourceConfig(name="billing", kind="firebird", location="BILLING_CLAIMS",
                        chunk_size=chunk_size)


def test_ranges_cover_every_new_key_once_in_chunk_size_pieces():
    """New keys above the checkpoint are cut into contiguous ranges of at most chunk_size."""
    units = plan_ranges(_billing(100), after=250, bounds=(1, 555))
    assert [(u.lo, u.hi) for u in units] == [(251, 350), (351, 450), (451, 550), (551, 555)]
    assert units[0].unit_id == "billing:keys:251-350"


def test_ranges_are_deterministic_and_empty_without_new_rows():
    """The same checkpoint and data give the same ids; no new key gives no unit."""
    assert plan_ranges(_billing(), 0, (1, 1000)) == plan_ranges(_billing(), 0, (1, 1000))
    assert plan_ranges(_billing(), 1000, None) == []


def test_ranges_start_right_after_the_mark_and_are_cut_from_the_first_existing_key():
    """A table whose keys start high is not planned as thousands of empty ranges, and the
    first range starts right after the mark, so committed ranges are contiguous from key 1."""
    units = plan_ranges(_billing(100), after=0, bounds=(10_001, 10_150))
    assert [(u.lo, u.hi) for u in units] == [(1, 10_100), (10_101, 10_150)]


def test_packaged_pipeline_names_the_demo_sources():
    """The default pipeline config defines billing, lab_results, registrations and the
    second lab partner, whose dataset it declares."""
    config = load_pipeline(Settings(pipeline_config=None))
    expected = {"billing": ("firebird", "billing_claims"), "lab_results": ("xml", "lab_results"),
                "registrations": ("excel", "patient_registrations"),
                "partner_labs": ("xml", "partner_observations")}
    found = {s.name: (s.kind, s.table) for s in config.sources}
    assert {name: found.get(name) for name in expected} == expected
    assert "partner_observations" in [d.name for d in config.datasets]


def test_unknown_source_error_lists_the_known_ones():
    """Asking for a source that is not configured names the configured ones."""
    config = PipelineConfig(sources=[_billing()])
    with pytest.raises(FatalError, match="defines: billing"):
        config.source("billng")


def test_bad_pipeline_config_is_a_fatal_error_naming_the_file(tmp_path):
    """A broken pipeline file fails with its path, not a traceback from deep inside."""
    path = tmp_path / "pipeline.toml"
    path.write_text("[[sources]]\nname = 'x'\nkind = 'ftp'\nlocation = 'y'\n")
    with pytest.raises(FatalError, match=str(path)):
        load_pipeline(Settings(pipeline_config=path))


def test_sql_identifiers_in_config_are_checked():
    """Table and key names reach SQL text, so anything but an identifier is refused."""
    with pytest.raises(ValueError, match="letters, digits"):
        SourceConfig(name="b", kind="firebird", location="T", key_column="ID; DROP TABLE T")
    with pytest.raises(ValueError, match="table name"):
        SourceConfig(name="b", kind="firebird", location="T WHERE 1=1")


def test_beat_schedule_has_one_entry_per_source_with_its_schedule():
    """Seconds become an interval, a crontab string a crontab, and args carry no run id."""
    config = PipelineConfig(sources=[
        _billing(), SourceConfig(name="labs", kind="xml", location="in", schedule="*/5 * * * *")])
    schedule = build_schedule(config)
    assert schedule["run-billing"]["schedule"] == 300.0
    assert schedule["run-billing"]["args"] == (None, "billing")
    assert isinstance(schedule["run-labs"]["schedule"], crontab)


def test_beat_schedule_runs_the_supervisor_and_leaves_manual_sources_out():
    """The supervisor is scheduled at ETL_SUPERVISE_EVERY_S; a "manual" source is not."""
    config = PipelineConfig(sources=[
        _billing(), SourceConfig(name="labs", kind="xml", location="in", schedule="manual")])
    schedule = build_schedule(config, Settings(supervise_every_s=7))
    assert schedule["supervise"]["task"] == "etl.control.supervise"
    assert schedule["supervise"]["schedule"] == 7
    assert "run-labs" not in schedule
    assert "run-billing" in schedule


def test_key_mark_rebuilt_from_the_ledger_stops_at_the_first_gap():
    """Committed ranges prove the mark up to the first gap, and the oldest covering version."""
    from datetime import datetime

    from etl_tasks.checkpoints import prefix_mark

    old, new = datetime(2026, 1, 1), datetime(2026, 2, 1)
    # 1-100 read by two runs (the newer counts), 101-200 by the old one, 301-400 after a gap.
    ranges = [(1, 100, old), (1, 100, new), (101, 200, old), (301, 400, new)]
    assert prefix_mark(ranges) == (200, old)
    assert prefix_mark([(1, 100, new), (101, 200, new)]) == (200, new)
    assert prefix_mark([(101, 200, new)]) == (0, None)  # never read from the start
    assert prefix_mark([]) == (0, None)
    # The marks a finished run left vouch for every key up to its key mark.
    newer = datetime(2026, 3, 1)
    assert prefix_mark(ranges, floor=(200, newer)) == (200, newer)
    assert prefix_mark(ranges, floor=(100, newer)) == (200, old)  # 101-200: only old


def test_staged_payload_round_trips_arrow_exactly():
    """A chunk survives zstd Arrow IPC staging with its types, decimals included."""
    from decimal import Decimal

    table = pa.table({"a": pa.array([Decimal("1.10"), None], pa.decimal128(12, 2)),
                      "b": ["µmol/L", None]})
    assert staging.decode(staging.encode(table)).equals(table)


def test_server_and_embedded_dsns_are_told_apart(tmp_path):
    """A path is the embedded engine; host:path and host/port:path are servers."""
    def target(dsn):
        return FirebirdTarget(dsn, "u", "p", tmp_path)

    assert target("data/demo/billing.fdb").embedded
    assert target("/srv/billing.fdb").embedded
    assert not target("db.prod:/srv/billing.fdb").embedded
    assert not target("db.prod/3050:/srv/billing.fdb").embedded


def test_firebird_errors_are_classified_once():
    """Lock conflicts and lost connections retry; bad credentials are fatal and say what to fix."""
    assert isinstance(firebird.classify(Exception("lock conflict on no wait transaction")),
                      TransientError)
    fatal = firebird.classify(Exception("Your user name and password are not defined"))
    assert isinstance(fatal, FatalError)
    assert "ETL_FIREBIRD_PASSWORD" in str(fatal)
    assert isinstance(firebird.classify(Exception("Table unknown BILLING")), FatalError)
