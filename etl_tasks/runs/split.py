"""Out of memory: a key range too big for its worker is split in halves and tried again.

A MemoryError in extract or transform, or a step that killed its worker `max_attempts` times
(the OOM killer, a native crash, the hard time limit: `EtlTask` counts the starts that never
ended), replaces its key range unit in the run's plan by two half ranges with ids of their
own (`billing:keys:1-50000` -> `billing:keys:1-25000`, `billing:keys:25001-50000`), down to
`min_split_keys` keys; below that the work becomes a dead letter as before. The halves take
the old unit's place in the plan's order, so the key mark still walks the run's ranges in key
order over contiguous, committed ranges, and each half is committed and checkpointed on its
own. The old unit is settled as split into its parts (`replaced`), not dead: a late message
for it is dropped, and the run completes when its parts do.

A sampled range (a key that is not an integer, cut at sealed boundaries sampled from the
table) is cut at the key of its middle row, which Firebird picks in its own key order
(`plan.middle_token`): `visits:skeys:3` -> `visits:skeys:3.1` (lo, middle] and
`visits:skeys:3.2` (middle, hi], the middle sealed once and shared by both, so the mark
walks them by token as it walks the plan's ranges. Its floor is in rows: a range of
`min_split_keys` rows or fewer, or one no key inside can cut, is not split.

Files are not split: a file loads or is refused whole, so a file chunk that runs out of
memory is retried and dead-lettered after its attempts like any other failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace

import redis

from etl_tasks import staging
from etl_tasks.runs import items
from etl_tasks.runs.state import Unit, key, unit

_KEEP_S = 30 * 24 * 3600  # as long as the run's other records

# KEYS: units, unit, replaced, split, chunks, chunk_unit, transformed, held, extracting,
#       staged, run.  ARGV: old id, keep_s, record, then (new id, new unit JSON) pairs.
# Returns 1 when the unit was replaced, 0 when it already was (or a part id is taken).
_REPLACE = """
local old = ARGV[1]
if redis.call('hexists', KEYS[3], old) == 1 then return 0 end
for j = 4, #ARGV, 2 do
  if redis.call('hexists', KEYS[2], ARGV[j]) == 1 then return 0 end
end
local ids, order, found = redis.call('lrange', KEYS[1], 0, -1), {}, false
for _, u in ipairs(ids) do
  if u == old then
    found = true
    for j = 4, #ARGV, 2 do order[#order + 1] = ARGV[j] end
  else
    order[#order + 1] = u
  end
end
if not found then return 0 end
redis.call('del', KEYS[1])
for i = 1, #order, 1000 do  -- unpack has a stack limit: push a thousand at a time
  redis.call('rpush', KEYS[1], unpack(order, i, math.min(i + 999, #order)))
end
redis.call('expire', KEYS[1], ARGV[2])
for j = 4, #ARGV, 2 do redis.call('hset', KEYS[2], ARGV[j], ARGV[j + 1]) end
redis.call('hset', KEYS[3], old, ARGV[3])
redis.call('expire', KEYS[3], ARGV[2])
redis.call('srem', KEYS[4], old)
local cu = redis.call('hgetall', KEYS[6])
for i = 1, #cu, 2 do
  if cu[i + 1] == old then
    redis.call('hdel', KEYS[5], cu[i])
    redis.call('hdel', KEYS[6], cu[i])
    redis.call('srem', KEYS[7], cu[i])
    redis.call('srem', KEYS[10], cu[i])
  end
end
redis.call('srem', KEYS[9], old)
for j = #ARGV - 1, 4, -2 do redis.call('lpush', KEYS[8], ARGV[j]) end
redis.call('expire', KEYS[8], ARGV[2])
redis.call('hincrby', KEYS[11], 'units_total', (#ARGV - 3) / 2 - 1)
return 1
"""


Middle = Callable[[Unit], str | None]
"""The sealed boundary cutting a sampled range in halves; None when it cannot be cut."""


def halves(old: Unit, floor: int, middle: Middle | None = None) -> tuple[Unit, Unit] | None:
    """The two halves of a key range, or None: a file, a range of `floor` keys or less, or a
    sampled range that `middle` (None: not given) does not cut."""
    if old.sampled:
        token = middle(old) if middle is not None and old.kind != "file" else None
        if not token:
            return None
        return (replace(old, unit_id=f"{old.unit_id}.1", text_hi=token),
                replace(old, unit_id=f"{old.unit_id}.2", text_lo=token))
    span = f"{old.lo}-{old.hi}"
    if old.kind == "file" or old.hi - old.lo + 1 <= floor or span not in old.unit_id:
        return None
    mid = (old.lo + old.hi) // 2
    return (replace(old, unit_id=old.unit_id.replace(span, f"{old.lo}-{mid}", 1), hi=mid),
            replace(old, unit_id=old.unit_id.replace(span, f"{mid + 1}-{old.hi}", 1),
                    lo=mid + 1))


def split_unit(r: redis.Redis, run_id: str, unit_id: str, floor: int, stage: str,
               reason: str, middle: Middle | None = None) -> tuple[Unit, Unit] | None:
    """Replace the unit by its halves in the run's plan, first in line for the window;
    None when it cannot be split (or another delivery split it first). `middle` cuts a
    sampled range (`plan.middle_token`)."""
    try:
        old = unit(r, run_id, unit_id)
    except KeyError:
        return None
    if is_replaced(r, run_id, unit_id):
        return None  # another delivery split it first: no boundary to look for
    parts = halves(old, floor, middle)
    if parts is None:
        return None
    record = json.dumps({"parts": [p.unit_id for p in parts], "stage": stage,
                         "reason": reason, "at": time.time()})
    keys = [key(run_id, part) for part in (
        "units", "unit", "replaced", "split", "chunks", "chunk_unit", "transformed", "held",
        "extracting", "staged")] + [key(run_id)]
    args: list[str | int] = [unit_id, _KEEP_S, record]
    for part in parts:
        args += [part.unit_id, part.to_json()]
    if not r.eval(_REPLACE, len(keys), *keys, *args):
        return None
    # The old unit's work is over: its steps are not watched, its payloads not kept.
    staging.drop(r, run_id, unit_id)
    for step in ("extract", "transform", "load"):
        items.settle(r, run_id, step, unit_id)
    return parts


def is_replaced(r: redis.Redis, run_id: str, item: str) -> bool:
    """Was this unit (or a range's chunk, which has the unit's id) split into parts?"""
    return bool(r.hexists(key(run_id, "replaced"), item))


def replaced(r: redis.Redis, run_id: str) -> dict[str, dict[str, object]]:
    """Old unit id -> {"parts", "stage", "reason", "at"} of every split in the run."""
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in r.hgetall(key(run_id, "replaced")).items()}
