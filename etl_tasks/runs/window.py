"""Backpressure: a run never has more than `stage_window` chunks extracted but not committed.

Staged chunks live in the Redis that is also the broker, so a loader slower than the fleet
must hold extraction back rather than let staging grow. The plan records every unit as
*held* (`etl:run:<id>:held`, in plan order) and dispatches only what the window admits;
each commit and each dead letter (and every supervisor pass) calls `release`, which admits
the next held units while the run has free slots. What occupies the window:
- a unit admitted but not extracted yet (`extracting`): a key range becomes one chunk;
- a chunk registered but neither committed nor dead (`staged`): a file unit yields several.
So the bound is on chunks, with one exception: a file is staged whole before any chunk of
it is dispatched (it must load or be refused whole), so one admitted file may exceed the
window by itself; nothing more is admitted until its chunks commit.

`release` is one Lua script: counting and admitting are atomic, so concurrent callers (the
loader's commits, the fleet's dead letters, the supervisor) never admit more than the window,
and a unit is admitted once (popped from `held`). Entries that settled are dropped from the
two sets lazily, by the same script, so the sets stay about the window's size.
"""

from __future__ import annotations

import redis

from etl_tasks.runs.state import key

_KEEP_S = 30 * 24 * 3600  # as long as the run's other records

# KEYS: held, extracting, staged, split, dead_units, chunk_unit, done, dead_chunks, replaced
# ARGV: window, keep_s.  Returns the unit ids admitted now, in plan order.
_RELEASE = """
local held, extracting, staged = KEYS[1], KEYS[2], KEYS[3]
for _, u in ipairs(redis.call('smembers', extracting)) do
  if redis.call('sismember', KEYS[4], u) == 1 or redis.call('sismember', KEYS[5], u) == 1
      or redis.call('hexists', KEYS[9], u) == 1 then
    redis.call('srem', extracting, u)
  end
end
for _, c in ipairs(redis.call('smembers', staged)) do
  local unit = redis.call('hget', KEYS[6], c)
  if not unit or redis.call('sismember', KEYS[7], c) == 1
      or redis.call('sismember', KEYS[8], c) == 1
      or redis.call('sismember', KEYS[5], unit) == 1 then
    redis.call('srem', staged, c)
  end
end
local busy = redis.call('scard', extracting) + redis.call('scard', staged)
local admitted = {}
while busy < tonumber(ARGV[1]) do
  local u = redis.call('lpop', held)
  if not u then break end
  redis.call('sadd', extracting, u)
  redis.call('expire', extracting, ARGV[2])
  admitted[#admitted + 1] = u
  busy = busy + 1
end
return admitted
"""


def held_key(run_id: str) -> str:
    return key(run_id, "held")


def release(r: redis.Redis, run_id: str, window: int) -> list[str]:
    """Admit the next held units of the run while it has fewer than `window` chunks in
    flight; returns the unit ids the caller must dispatch (each is returned once)."""
    keys = [key(run_id, part) for part in (
        "held", "extracting", "staged", "split", "dead_units", "chunk_unit", "done",
        "dead_chunks", "replaced")]
    admitted = r.eval(_RELEASE, len(keys), *keys, window, _KEEP_S)
    return [u.decode() if isinstance(u, bytes) else str(u) for u in admitted]


def held(r: redis.Redis, run_id: str) -> set[str]:
    """Units of the run the window has not admitted yet."""
    return {u.decode() if isinstance(u, bytes) else str(u)
            for u in r.lrange(held_key(run_id), 0, -1)}


def in_flight(r: redis.Redis, run_id: str) -> int:
    """Units admitted but not extracted, plus chunks staged but not committed (an upper
    bound: settled entries leave at the next `release`)."""
    return int(r.scard(key(run_id, "extracting"))) + int(r.scard(key(run_id, "staged")))
