"""The supervisor: beat runs it every few seconds so that no run waits on the broker.

On the Redis transport a message held by a worker whose main process died comes back only
after the visibility timeout (an hour or more), and a message lost with Redis never comes
back. So the supervisor looks at every active run and sends again what is overdue:
- a plan that has not been recorded within `overdue_s`;
- a started step with no news for `overdue_s` (its worker died, or it hangs), and a step
  waiting for a retry whose ETA is `overdue_s` past;
- every step not done, once the whole run has made no progress for `overdue_s` (so a busy
  fleet working through a long queue is left alone, and a message lost with Redis or held by
  a dead worker is replaced).
Sending again is harmless: every step is idempotent. Units the run's window holds back are
not sent; each pass admits what the window has room for. It also finalizes complete runs that
were not finalized (the loader died between its commit and the finalize), renews the lease
of runs it watches, and drops runs whose state Redis lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from etl_tasks.resources import Resources
from etl_tasks.runs import items, lease, state, window
from etl_tasks.runs.state import ACTIVE_RUNS

log = logging.getLogger(__name__)


class Sender:
    """What the supervisor sends: the Celery tasks in production."""

    def plan(self, run_id: str, source: str) -> None: ...
    def step(self, stage: str, run_id: str, item: str) -> None: ...
    def finalize(self, run_id: str) -> None: ...


@dataclass
class Report:
    """What one pass did (returned by the task, shown in Flower; ids only)."""

    runs: int = 0
    resent: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)


def supervise(res: Resources, send: Sender, now: float | None = None) -> Report:
    r, overdue = res.redis, res.settings.overdue_s
    now = time.time() if now is None else now
    report = Report()
    for run_id in state.unrecorded(r):  # failed runs: the loader writes their metrics row
        send.finalize(run_id)
        report.finalized.append(run_id)
    for run_id in state.active_runs(r):
        data = state.info(r, run_id)
        if "source" not in data:
            r.srem(ACTIVE_RUNS, run_id)  # Redis lost the run's record
            continue
        if data.get("status") in state.ENDED:
            r.srem(ACTIVE_RUNS, run_id)
            continue
        report.runs += 1
        last = float(data.get("last_progress_at") or data.get("created_at") or now)
        if not state.is_planned(r, run_id):
            since = float(data.get("planning_at") or data.get("created_at") or now)
            if now - max(since, last) > overdue:
                log.warning("run %s: plan overdue; sending it again", run_id)
                state.touch(r, run_id)
                send.plan(run_id, data["source"])
                report.resent.append(f"plan|{run_id}")
            continue
        lease.renew(r, data["source"], run_id, res.settings.run_lease_s)
        if state.is_complete(r, run_id):
            send.finalize(run_id)
            report.finalized.append(run_id)
            continue
        # Units the window admits now: a release that never happened (its process died
        # between a commit and the dispatch) or slots freed without a commit.
        for unit_id in window.release(r, run_id, res.settings.stage_window):
            send.step("extract", run_id, unit_id)
            report.resent.append(f"extract|{unit_id}")
        if now - last > overdue:
            # The whole run is stalled: send again every step not done, from the run's
            # own sets (this also covers a step whose message was lost before it was noted).
            state.touch(r, run_id)
            for stage, item in missing_steps(res, run_id):
                send.step(stage, run_id, item)
                report.resent.append(f"{stage}|{item}")
            if report.resent:
                log.warning("run %s: no progress for %.0fs; sent %d steps again", run_id,
                            now - last, len(report.resent))
            continue
        for (stage, item), entry in items.pending(r, run_id).items():
            # A started step (or one waiting for its retry) with no news: its worker died.
            if entry["state"] in ("started", "retry") and now - float(entry["at"]) > overdue:
                log.warning("run %s: %s of %s overdue (%s); sending it again", run_id, stage,
                            item, entry["state"])
                send.step(stage, run_id, item)
                report.resent.append(f"{stage}|{item}")
    return report


def missing_steps(res: Resources, run_id: str) -> list[tuple[str, str]]:
    """Every step of a run that is neither done nor dead-lettered, at the stage it is at;
    units the window still holds back are not steps yet (`release` admits them)."""
    r = res.redis
    dead_units, dead_chunks = state.dead_units(r, run_id), state.dead_chunks(r, run_id)
    split = {u.unit_id for u in state.units(r, run_id) if state.is_split(r, run_id, u.unit_id)}
    held = window.held(r, run_id)
    steps = [("extract", u.unit_id) for u in state.units(r, run_id)
             if u.unit_id not in split and u.unit_id not in dead_units
             and u.unit_id not in held]
    done = state.done_chunks(r, run_id)
    for chunk, unit_id in state.chunk_units(r, run_id).items():
        if chunk in done or chunk in dead_chunks or unit_id in dead_units or unit_id not in split:
            continue
        steps.append(("load" if state.is_transformed(r, run_id, chunk) else "transform", chunk))
    return steps
