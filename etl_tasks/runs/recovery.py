"""Recover from Redis losing its data: checkpoints, loaded files and open dead letters are
rebuilt from the DuckDB ledger, and runs whose state was lost are recorded as failed.

Runs on the loader (the only process that opens DuckDB), before the next plan: the plan
finds the marker key missing and sends this first (see `tasks.plan_source`).
"""

from __future__ import annotations

import logging
import time

import duckdb

from etl_tasks import checkpoints
from etl_tasks.load import duckdb as store
from etl_tasks.load.fence import WriterFence
from etl_tasks.resources import Resources
from etl_tasks.runs import dead_letters, state

log = logging.getLogger(__name__)

LOST = ("the run's state was lost when Redis lost its data (restarted without persistence?); "
        "the chunks it committed are kept and the next run loads the rest")


def rebuild_state(res: Resources, con: duckdb.DuckDBPyConnection,
                  fence: WriterFence | None = None) -> dict[str, int]:
    """Rebuild every source's checkpoints from the ledger; returns the key marks. The runs
    recorded as failed are written under the loader's writer `fence`."""
    r = res.redis
    if checkpoints.intact(r):
        return {}
    marks = {}
    for src in res.pipeline.sources:
        key_mark, updated = checkpoints.prefix_mark(store.committed_ranges(con, src.name),
                                                    store.last_marks(con, src.name))
        sampled = store.committed_sampled_ranges(con, src.name)
        sampled_mark = ""
        if sampled:  # a key cut at sampled boundaries: its mark is a sealed token
            sampled_mark, updated = checkpoints.sampled_prefix_mark(sampled)
        files = store.loaded_files(con, src.name)
        checkpoints.restore(r, src.name, key_mark, updated, files, sampled_mark)
        dead_letters.restore(r, src.name, store.dead_letters(con, src.name))
        marks[src.name] = key_mark
        log.warning("rebuilt checkpoints of %s from the ledger: key mark %d, updated mark %s, "
                    "%d loaded files", src.name, key_mark, updated, len(files))
    now = time.time()
    with store.transaction(con, fence):
        for run_id, source in store.runs_without_record(con):
            if not state.exists(r, run_id):
                store.record_run(con, state.Summary(
                    source=source, run_id=run_id, status="failed", error=LOST).public(), now, now)
    checkpoints.mark_intact(r)
    return marks
